"""The JSON Schema files in stream/schemas are the contract; the code must agree with them.

These fail when someone changes a schema file without the code, or the code without the schema:
the encoder's fields, the subscriber's validator and the click decoder are each compared with
jsonschema on the same examples.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import orjson
import pytest

from stream.codec import (
    ClickEvent,
    ItemRecord,
    RecommendedItem,
    decode_click,
    decode_item,
    encode_recommendation,
)
from stream.config import CodecLimits
from stream.subscriber import InvalidRecommendation, Recommendation, validate_recommendation

NOW = 1_795_400_000_000
KNOWN_ITEM = "i1"


def load_schema(name: str) -> dict[str, Any]:
    text = resources.files("stream").joinpath(f"schemas/{name}").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


REC_SCHEMA = load_schema("recommendation.v1.json")
CLICK_SCHEMA = load_schema("click_event.v1.json")
ITEM_SCHEMA = load_schema("item.v1.json")


def encoded(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "user_id": "u1",
        "items": [RecommendedItem("i2", 1.5, 1), RecommendedItem("i3", -0.25, 2)],
        "model_version": "sasrec-20261123T031500-1a2b3c4d",
        "partition": 3,
        "offset": 18211,
        "event_ts": NOW,
        "generated_ts": NOW + 12,
    }
    fields.update(overrides)
    record: dict[str, Any] = orjson.loads(encode_recommendation(**fields))
    return record


# -- (1) + (2): the encoder and the recommendation schema -----------------------------------


def test_encoder_produces_exactly_the_declared_fields() -> None:
    record = encoded(items=[RecommendedItem("i2", 1.5, 1, because="i1")])
    assert set(REC_SCHEMA["required"]) <= set(record), "a required field is not produced"
    assert set(record) <= set(REC_SCHEMA["properties"]), "a produced field is not declared"
    item_schema = REC_SCHEMA["properties"]["items"]["items"]
    for item in record["items"]:
        assert set(item_schema["required"]) <= set(item)
        assert set(item) <= set(item_schema["properties"])


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"items": []},
        {"items": [RecommendedItem("i9", 0.0, 1)], "partition": 0, "offset": 0},
        {"offset": 2**62, "event_ts": 0, "generated_ts": 1},
        {"user_id": "ü-ユーザー", "model_version": ""},
        {"items": [RecommendedItem("i2", 1.5, 1, because="i1"), RecommendedItem("i3", 1.0, 2)]},
    ],
)
def test_encoded_records_validate_against_the_schema(overrides: dict[str, Any]) -> None:
    jsonschema.validate(encoded(**overrides), REC_SCHEMA, cls=jsonschema.Draft202012Validator)


# -- (3): the subscriber's code validator and the recommendation schema ----------------------


def _valid() -> dict[str, Any]:
    return encoded()


def _with(**changes: Any) -> dict[str, Any]:
    record = _valid()
    record.update(changes)
    return record


def _without(name: str) -> dict[str, Any]:
    record = _valid()
    del record[name]
    return record


def _item(n: int = 0, **changes: Any) -> dict[str, Any]:
    record = _valid()
    record["items"][n].update(changes)
    return record


def _item_without(name: str) -> dict[str, Any]:
    record = _valid()
    del record["items"][0][name]
    return record


REC_EXAMPLES: dict[str, object] = {
    "valid": _valid(),
    "valid: empty items": _with(items=[]),
    "valid: unknown extra field (additive change)": _with(explanation={"why": "similar users"}),
    "valid: unknown extra item field": _item(0, title="A title"),
    "valid: because": _item(0, because="i1"),
    "because null": _item(0, because=None),
    "because empty": _item(0, because=""),
    "because not a string": _item(0, because=["i1"]),
    "valid: integral floats are JSON integers": _with(partition=3.0, offset=5.0, event_ts=1e12),
    "valid: schema_version 1.0": _with(schema_version=1.0),
    "valid: integer score": _item(0, score=2),
    "valid: negative timestamps are not the schema's business": _with(event_ts=-1),
    "valid: empty model_version": _with(model_version=""),
    "valid: whitespace user_id": _with(user_id=" "),
    "not an object": [1, 2],
    "a string": "u1",
    "null": None,
    **{f"missing {name}": _without(name) for name in REC_SCHEMA["required"]},
    "missing items[].item_id": _item_without("item_id"),
    "missing items[].score": _item_without("score"),
    "missing items[].rank": _item_without("rank"),
    "schema_version 2": _with(schema_version=2),
    "schema_version '1'": _with(schema_version="1"),
    "schema_version true": _with(schema_version=True),
    "user_id not a string": _with(user_id=42),
    "user_id empty": _with(user_id=""),
    "model_version not a string": _with(model_version=None),
    "items not an array": _with(items={"item_id": "i1"}),
    "items null": _with(items=None),
    "item not an object": _with(items=["i1"]),
    "item_id not a string": _item(0, item_id=5),
    "score a string": _item(0, score="1.5"),
    "score a bool": _item(0, score=True),
    "rank not an integer": _item(0, rank=1.5),
    "rank a string": _item(0, rank="1"),
    "rank a bool": _item(0, rank=True),
    "rank 0": _with(items=[{"item_id": "i1", "score": 1.0, "rank": 0}]),
    "partition negative": _with(partition=-1),
    "offset negative": _with(offset=-5),
    "offset a string": _with(offset="5"),
    "offset not integral": _with(offset=5.5),
    "partition a bool": _with(partition=False),
    "event_ts null": _with(event_ts=None),
    "generated_ts a string": _with(generated_ts="2026-11-23"),
}


@pytest.mark.parametrize("name", list(REC_EXAMPLES))
def test_subscriber_validator_accepts_exactly_what_the_schema_accepts(name: str) -> None:
    record = REC_EXAMPLES[name]
    schema_ok = jsonschema.Draft202012Validator(REC_SCHEMA).is_valid(record)
    result = validate_recommendation(record)
    assert isinstance(result, Recommendation) == schema_ok, (name, result)
    assert schema_ok == name.startswith("valid"), "the example's name says what it expects"


def test_subscriber_keeps_the_record_values() -> None:
    record = _with(partition=3.0, explanation="ignored")
    result = validate_recommendation(record)
    assert isinstance(result, Recommendation)
    assert result.partition == 3 and isinstance(result.partition, int)
    assert result.as_dict() == _valid()  # unknown fields are not kept; integers are ints


def test_rank_sequence_is_the_one_rule_beyond_the_schema() -> None:
    """JSON Schema cannot say "ranks are 1..n in order"; the subscriber checks it on top."""
    for ranks in ([1, 3], [2, 1], [1, 1]):
        items = [{"item_id": f"i{r}", "score": 1.0, "rank": r} for r in ranks]
        record = _with(items=items)
        assert jsonschema.Draft202012Validator(REC_SCHEMA).is_valid(record)
        result = validate_recommendation(record)
        assert isinstance(result, InvalidRecommendation) and result.reason == "rank_sequence"


# -- (4): the click decoder and the click schema ---------------------------------------------
# decode_click also applies business rules the schema cannot know (a known item, a ts not in
# the future, key == user_id, a size limit), so every example here uses a known item, a past
# ts and the matching key: then both must agree.

ID_MAX = CodecLimits().max_id_length


def _click(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"user_id": "u1", "item_id": KNOWN_ITEM, "ts": NOW - 1000}
    record.update(changes)
    return record


def _click_without(name: str) -> dict[str, Any]:
    record = _click()
    del record[name]
    return record


CLICK_EXAMPLES: dict[str, object] = {
    "valid": _click(),
    **{
        f"valid: event_type {t}": _click(event_type=t)
        for t in CLICK_SCHEMA["properties"]["event_type"]["enum"]
    },
    "valid: unknown extra field": _click(session={"id": 7}),
    "valid: ts 0": _click(ts=0),
    "valid: integral float ts": _click(ts=1.5e12),
    "valid: longest user_id": _click(user_id="u" * ID_MAX),
    "valid: non-ASCII user_id": _click(user_id="ユーザー"),
    "valid: user_id with inner spaces": _click(user_id=" u 1 "),
    "not an object": ["u1", "i1"],
    "a number": 5,
    "missing user_id": _click_without("user_id"),
    "missing item_id": _click_without("item_id"),
    "missing ts": _click_without("ts"),
    "user_id not a string": _click(user_id=1),
    "user_id empty": _click(user_id=""),
    "user_id whitespace": _click(user_id=" \t "),
    "user_id Unicode whitespace": _click(user_id="\u00a0\u3000"),
    "user_id too long": _click(user_id="u" * (ID_MAX + 1)),
    "item_id not a string": _click(item_id=["i1"]),
    "item_id whitespace": _click(item_id="  "),
    "item_id too long": _click(item_id="i" * (ID_MAX + 1)),
    "ts a string": _click(ts="1795400000000"),
    "ts not integral": _click(ts=1.5),
    "ts a bool": _click(ts=True),
    "ts null": _click(ts=None),
    "ts negative": _click(ts=-1),
    "event_type unknown": _click(event_type="like"),
    "event_type not a string": _click(event_type=1),
    "event_type null": _click(event_type=None),
}


@pytest.mark.parametrize("name", list(CLICK_EXAMPLES))
def test_click_decoder_accepts_exactly_what_the_schema_accepts(name: str) -> None:
    record = CLICK_EXAMPLES[name]
    schema_ok = jsonschema.Draft202012Validator(CLICK_SCHEMA).is_valid(record)
    user = record.get("user_id") if isinstance(record, dict) else None
    key = user.encode("utf-8") if isinstance(user, str) else None
    result = decode_click(
        key,
        orjson.dumps(record),
        known_items={KNOWN_ITEM},
        now_ms=NOW,
        limits=CodecLimits(),
    )
    assert isinstance(result, ClickEvent) == schema_ok, (name, result)
    assert schema_ok == name.startswith("valid"), "the example's name says what it expects"


def test_click_event_encoding_validates_against_the_schema() -> None:
    for event_type in CLICK_SCHEMA["properties"]["event_type"]["enum"]:
        event = ClickEvent("u1", KNOWN_ITEM, NOW, event_type)
        jsonschema.validate(orjson.loads(event.to_json()), CLICK_SCHEMA)


def test_subscriber_keeps_because() -> None:
    result = validate_recommendation(_item(1, because="i1"))
    assert isinstance(result, Recommendation)
    assert [i.because for i in result.items] == [None, "i1"]
    assert result.as_dict() == _item(1, because="i1")


# -- (5): the item decoder and the item schema -------------------------------------------------


def _catalogue_item(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"schema_version": 1, "item_id": "i9", "title": "Heat (1995)"}
    record.update(changes)
    return record


def _catalogue_item_without(name: str) -> dict[str, Any]:
    record = _catalogue_item()
    del record[name]
    return record


ITEM_EXAMPLES: dict[str, object] = {
    "valid": _catalogue_item(),
    "valid: every optional field": _catalogue_item(
        genres=["Action", "Crime"], year=1995, fields={"director": "Michael Mann"}
    ),
    "valid: empty genres": _catalogue_item(genres=[]),
    "valid: unknown extra field": _catalogue_item(studio="Warner"),
    "valid: integral float year": _catalogue_item(year=1995.0),
    "valid: schema_version 1.0": _catalogue_item(schema_version=1.0),
    "valid: longest title": _catalogue_item(title="t" * 1024),
    "valid: non-ASCII title": _catalogue_item(title="千と千尋の神隠し"),
    "not an object": ["i9", "Heat"],
    **{f"missing {name}": _catalogue_item_without(name) for name in ITEM_SCHEMA["required"]},
    "schema_version 2": _catalogue_item(schema_version=2),
    "schema_version true": _catalogue_item(schema_version=True),
    "schema_version '1'": _catalogue_item(schema_version="1"),
    "item_id not a string": _catalogue_item(item_id=9),
    "item_id whitespace": _catalogue_item(item_id=" "),
    "item_id too long": _catalogue_item(item_id="i" * 257),
    "title null": _catalogue_item(title=None),
    "title empty": _catalogue_item(title=""),
    "title too long": _catalogue_item(title="t" * 1025),
    "genres a string": _catalogue_item(genres="Action|Crime"),
    "genres with a number": _catalogue_item(genres=["Action", 3]),
    "genres with a blank": _catalogue_item(genres=["Action", " "]),
    "genres too many": _catalogue_item(genres=[f"g{n}" for n in range(33)]),
    "genre too long": _catalogue_item(genres=["g" * 65]),
    "year a string": _catalogue_item(year="1995"),
    "year not integral": _catalogue_item(year=1995.5),
    "year a bool": _catalogue_item(year=True),
    "year null": _catalogue_item(year=None),
    "fields an array": _catalogue_item(fields=[1]),
    "fields null": _catalogue_item(fields=None),
}


@pytest.mark.parametrize("name", list(ITEM_EXAMPLES))
def test_item_decoder_accepts_exactly_what_the_schema_accepts(name: str) -> None:
    record = ITEM_EXAMPLES[name]
    schema_ok = jsonschema.Draft202012Validator(ITEM_SCHEMA).is_valid(record)
    item_id = record.get("item_id") if isinstance(record, dict) else None
    key = item_id.encode("utf-8") if isinstance(item_id, str) else None
    result = decode_item(key, orjson.dumps(record), CodecLimits())
    assert isinstance(result, ItemRecord) == schema_ok, (name, result)
    assert schema_ok == name.startswith("valid"), "the example's name says what it expects"


def test_item_encoding_validates_against_the_schema() -> None:
    for item in (
        ItemRecord("i1", "Heat (1995)"),
        ItemRecord("i2", "Heat", ("Action", "Crime"), 1995, {"director": "Michael Mann"}),
    ):
        jsonschema.validate(orjson.loads(item.to_json()), ITEM_SCHEMA)
        assert decode_item(item.item_id.encode(), item.to_json(), CodecLimits()) == item
