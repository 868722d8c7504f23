from __future__ import annotations

import json
from importlib import resources

import jsonschema
import orjson
import pytest

from stream.badinput import malformed_records
from stream.codec import (
    REASONS,
    ClickEvent,
    Invalid,
    RecommendedItem,
    decode_click,
    decode_recommendation,
    encode_recommendation,
)
from stream.config import CodecLimits

NOW = 1_795_000_000_000
ITEMS = frozenset({"i1", "i2"})
LIMITS = CodecLimits()


def decode(key: bytes | None, value: bytes | None) -> ClickEvent | Invalid:
    return decode_click(key, value, known_items=ITEMS, now_ms=NOW, limits=LIMITS)


def schema(name: str) -> dict[str, object]:
    text = resources.files("stream").joinpath(f"schemas/{name}").read_text(encoding="utf-8")
    return dict(json.loads(text))


def test_valid_event_decodes_with_default_event_type() -> None:
    value = orjson.dumps({"user_id": "u1", "item_id": "i1", "ts": NOW - 5})
    assert decode(b"u1", value) == ClickEvent("u1", "i1", NOW - 5, "click")


def test_unknown_extra_fields_are_ignored_and_null_key_is_allowed() -> None:
    value = orjson.dumps({"user_id": "u1", "item_id": "i2", "ts": 0, "extra": {"a": 1}})
    assert decode(None, value) == ClickEvent("u1", "i2", 0)


@pytest.mark.parametrize(
    ("reason", "key", "value"),
    malformed_records("u1", "i1", NOW),
    ids=[f"{r}-{n}" for n, (r, _, _) in enumerate(malformed_records("u1", "i1", NOW))],
)
def test_each_malformed_record_gets_its_reason(
    reason: str, key: bytes | None, value: bytes | None
) -> None:
    result = decode(key, value)
    assert isinstance(result, Invalid)
    assert result.reason == reason
    assert result.reason in REASONS
    assert result.detail


def test_the_samples_cover_every_input_reason() -> None:
    covered = {reason for reason, _, _ in malformed_records("u1", "i1", NOW)}
    # scoring_failed blames the model; unsupported_version is for versioned records (items).
    assert covered == set(REASONS) - {"scoring_failed", "unsupported_version"}


def test_integral_float_timestamps_are_accepted_like_json_schema_does() -> None:
    value = orjson.dumps({"user_id": "u1", "item_id": "i1", "ts": 1.5e12})
    assert decode(b"u1", value) == ClickEvent("u1", "i1", 1_500_000_000_000)


def test_deeply_nested_json_is_not_json_not_a_crash() -> None:
    value = b"[" * 5000 + b"]" * 5000
    result = decode(b"u1", value)
    assert isinstance(result, Invalid) and result.reason == "not_json"


def test_valid_events_match_the_published_schema() -> None:
    event = ClickEvent("u1", "i1", NOW, "view")
    jsonschema.validate(orjson.loads(event.to_json()), schema("click_event.v1.json"))


def test_schema_and_decoder_agree_on_invalid_examples() -> None:
    validator = jsonschema.Draft202012Validator(schema("click_event.v1.json"))
    for reason, _, value in malformed_records("u1", "i1", NOW):
        if reason in {"wrong_type", "missing_field", "empty_field", "field_too_long"}:
            assert not validator.is_valid(orjson.loads(value or b"{}")), reason


def test_recommendation_encoding_matches_schema_v1() -> None:
    value = encode_recommendation(
        user_id="u1",
        items=[RecommendedItem("i2", 1.5, 1), RecommendedItem("i3", 0.5, 2)],
        model_version="m1",
        partition=2,
        offset=41,
        event_ts=NOW,
        generated_ts=NOW + 3,
    )
    record = decode_recommendation(value)
    jsonschema.validate(record, schema("recommendation.v1.json"))
    assert record["items"] == [
        {"item_id": "i2", "score": 1.5, "rank": 1},
        {"item_id": "i3", "score": 0.5, "rank": 2},
    ]
    required = set(schema("recommendation.v1.json")["required"])  # type: ignore[arg-type]
    assert required == set(record)
