"""Hostile input against the click decoder: it must never raise, and must never let through an
event that breaks a rule. Property-based (hypothesis): arbitrary bytes, arbitrary JSON, deep
nesting, huge strings, wrong types, NaN/Infinity/1e400 as raw JSON text, extreme timestamps,
integral floats, unknown items and event types, keys that disagree with the payload, unicode.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from stream.badinput import malformed_records
from stream.codec import (
    EVENT_TYPES,
    REASONS,
    ClickEvent,
    Invalid,
    decode_click,
    decode_click_checked,
)
from stream.config import CodecLimits

NOW = 1_795_000_000_000
LIMITS = CodecLimits()
LATEST = NOW + LIMITS.max_future_skew_ms
ITEMS = frozenset({"i1", "i2", "i00017", "ítem-ü", "商品-7", "🎬 film", "a" * LIMITS.max_id_length})
INPUT_REASONS = frozenset(REASONS) - {"scoring_failed"}  # the decoder never blames the model

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decode(key: bytes | None, value: bytes | None) -> ClickEvent | Invalid:
    return decode_click(key, value, known_items=ITEMS, now_ms=NOW, limits=LIMITS)


def assert_obeys_the_rules(key: bytes | None, result: object) -> None:
    """Whatever came in: an event that satisfies every rule, or a well-formed refusal."""
    if isinstance(result, Invalid):
        assert result.reason in INPUT_REASONS, result
        assert isinstance(result.detail, str), result
        assert result.detail, f"{result.reason} with an empty detail"
        return
    assert isinstance(result, ClickEvent), f"decode returned {type(result).__name__}"
    for name in ("user_id", "item_id"):
        value = getattr(result, name)
        assert isinstance(value, str) and value.strip(), (name, value)
        assert len(value) <= LIMITS.max_id_length, (name, len(value))
    assert result.item_id in ITEMS
    assert type(result.ts) is int and 0 <= result.ts <= LATEST, result.ts
    assert result.event_type in EVENT_TYPES
    assert key is None or key == result.user_id.encode("utf-8")
    # What the processor accepted re-encodes to something it accepts again, unchanged.
    assert decode(key, result.to_json()) == result


def check(key: bytes | None, value: bytes | None) -> ClickEvent | Invalid:
    result = decode(key, value)  # an exception here fails the test: "never raises"
    assert_obeys_the_rules(key, result)
    # The fast path for valid clicks and the rule-by-rule path give the same verdict.
    checked = decode_click_checked(key, value, known_items=ITEMS, now_ms=NOW, limits=LIMITS)
    assert result == checked, (result, checked)
    return result


def reason_of(key: bytes | None, value: bytes | None) -> str | None:
    result = check(key, value)
    return result.reason if isinstance(result, Invalid) else None


# -- strategies --------------------------------------------------------------------------------

# Ids that are valid on their own: non-blank after str.strip(), within the length limit.
ids = st.text(min_size=1, max_size=LIMITS.max_id_length).filter(lambda s: bool(s.strip()))
known_items = st.sampled_from(sorted(ITEMS))
valid_ts = st.integers(min_value=0, max_value=LATEST)
keys_for = st.sampled_from(["match", "none"])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)  # beyond int64: orjson reads a float
    | st.floats()  # NaN and ±inf included: json.dumps writes them as raw NaN / Infinity
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["user_id", "item_id", "ts", "event_type"]) | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)
# Anything that is not a valid id: wrong JSON types, blank strings, too-long strings.
wrong_types: st.SearchStrategy[Any] = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.lists(json_scalars, max_size=3)
    | st.dictionaries(st.text(max_size=5), json_scalars, max_size=3)
)
blank = st.text(alphabet=" \t\n\r\u00a0\u2003\u3000", max_size=20)


def dumps(body: Any, *, ascii_only: bool = False) -> bytes:
    """json.dumps (not orjson): big ints, NaN and Infinity come out as raw JSON-ish text."""
    return json.dumps(body, ensure_ascii=ascii_only).encode("utf-8")


def valid_body(user: str, item: str, ts: int | float, event_type: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"user_id": user, "item_id": item, "ts": ts}
    if event_type is not None:
        body["event_type"] = event_type
    return body


# -- properties --------------------------------------------------------------------------------


@FAST
@given(key=st.none() | st.binary(max_size=40), value=st.none() | st.binary(max_size=300))
@example(key=None, value=None)
@example(key=b"", value=b"")
@example(key=b"u1", value=b"\xff\xfe\x00")
@example(key=b"u1", value=b'{"user_id": "u1", "item_id": "i1", "ts": 1}\x00')
def test_arbitrary_bytes_never_raise(key: bytes | None, value: bytes | None) -> None:
    check(key, value)


@FAST
@given(body=json_values, key=st.none() | st.binary(max_size=10), ascii_only=st.booleans())
def test_arbitrary_json_values_never_raise(body: Any, key: bytes | None, ascii_only: bool) -> None:
    check(key, dumps(body, ascii_only=ascii_only))


@QUICK
@given(depth=st.integers(min_value=1, max_value=5000), where=st.sampled_from(["top", "field"]))
def test_deep_nesting_is_refused_not_a_crash(depth: int, where: str) -> None:
    nested = b"[" * depth + b"]" * depth
    if where == "field":
        value = b'{"user_id": "u1", "item_id": ' + nested + b', "ts": 1}'
    else:
        value = nested
    reason = reason_of(b"u1", value)
    assert reason in {"not_json", "not_object", "wrong_type", "oversized"}


@QUICK
@given(
    field=st.sampled_from(["user_id", "item_id", "event_type", "pad"]),
    size=st.integers(min_value=LIMITS.max_id_length + 1, max_value=2 * LIMITS.max_event_bytes),
    char=st.sampled_from(["x", "é", "語", "🎬"]),
)
def test_huge_strings_are_refused(field: str, size: int, char: str) -> None:
    body = valid_body("u1", "i1", NOW, None)
    body[field] = char * size
    value = orjson.dumps(body)
    reason = reason_of(b"u1" if field != "user_id" else None, value)
    if len(value) > LIMITS.max_event_bytes:
        assert reason == "oversized"
    elif field == "event_type":
        assert reason == "unknown_event_type"
    elif field == "pad":
        assert reason is None  # unknown fields are ignored, whatever their size
    else:
        assert reason == "field_too_long"


@FAST
@given(
    field=st.sampled_from(["user_id", "item_id", "ts", "event_type"]),
    bad=wrong_types,
    user=ids,
    item=known_items,
)
def test_a_wrong_type_in_any_field_is_refused(field: str, bad: Any, user: str, item: str) -> None:
    if field == "ts":  # an integral float is a valid ts (JSON has one number type)
        assume(not (isinstance(bad, int | float) and not isinstance(bad, bool)))
    body = valid_body(user, item, NOW, None)
    body[field] = bad
    assert reason_of(None, dumps(body)) in {"wrong_type", "not_json"}  # not_json: NaN/Infinity


@FAST
@given(field=st.sampled_from(["user_id", "item_id"]), value=blank, user=ids, item=known_items)
def test_blank_ids_are_refused(field: str, value: str, user: str, item: str) -> None:
    body = valid_body(user, item, NOW, "view")
    body[field] = value
    assert reason_of(None, orjson.dumps(body)) == "empty_field"


RAW_NUMBERS = {
    "NaN": "not_json",
    "-NaN": "not_json",
    "Infinity": "not_json",
    "-Infinity": "not_json",
    "1e400": "not_json",
    "-1e400": "not_json",
    "0.5": "wrong_type",
    "-0.5": "wrong_type",
    "1e-300": "wrong_type",
    "1e308": "ts_future",
    "-1e308": "ts_negative",
    "123456789012345678901234567890": "ts_future",  # > int64: orjson reads a float
    "-123456789012345678901234567890": "ts_negative",
    "-0": None,
    "-0.0": None,
    "0.0": None,
    "1.7e12": None,
    "1795000000000.0": None,
    '"1795000000000"': "wrong_type",
    "true": "wrong_type",
    "null": "wrong_type",
    "[1]": "wrong_type",
    "{}": "wrong_type",
}


@pytest.mark.parametrize(("raw", "expected"), RAW_NUMBERS.items(), ids=list(RAW_NUMBERS))
def test_raw_json_number_text_in_ts(raw: str, expected: str | None) -> None:
    value = b'{"user_id": "u1", "item_id": "i1", "ts": ' + raw.encode() + b"}"
    assert reason_of(b"u1", value) == expected


@FAST
@given(
    ts=st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.integers(min_value=-10, max_value=10)
    | st.integers(min_value=LATEST - 10, max_value=LATEST + 10),
    as_float=st.booleans(),
    user=ids,
    item=known_items,
)
def test_timestamps_outside_the_window_are_refused(
    ts: int, as_float: bool, user: str, item: str
) -> None:
    if as_float:
        assume(abs(ts) <= 2**53)  # exactly representable: the float is the same integer
    encoded: int | float = float(ts) if as_float else ts
    result = check(None, dumps(valid_body(user, item, encoded, None)))
    if ts < 0:
        assert isinstance(result, Invalid) and result.reason == "ts_negative"
    elif ts > LATEST:
        assert isinstance(result, Invalid) and result.reason == "ts_future"
    else:
        assert result == ClickEvent(user, item, ts)
        assert type(result.ts) is int


@FAST
@given(item=st.text(min_size=1, max_size=LIMITS.max_id_length).filter(lambda s: bool(s.strip())))
@example(item="I1")
@example(item="i1 ")
@example(item="i\u00001")
def test_unknown_items_are_refused(item: str) -> None:
    assume(item not in ITEMS)
    assert reason_of(b"u1", orjson.dumps(valid_body("u1", item, NOW, None))) == "unknown_item"


@FAST
@given(event_type=st.text(max_size=100), user=ids, item=known_items)
@example(event_type="CLICK", user="u1", item="i1")
@example(event_type="click ", user="u1", item="i1")
def test_unknown_event_types_are_refused(event_type: str, user: str, item: str) -> None:
    assume(event_type not in EVENT_TYPES)
    result = check(None, orjson.dumps(valid_body(user, item, NOW, event_type)))
    assert isinstance(result, Invalid) and result.reason == "unknown_event_type"


def test_an_empty_event_type_gets_a_detail() -> None:
    result = decode(b"u1", orjson.dumps(valid_body("u1", "i1", NOW, "")))
    assert isinstance(result, Invalid) and result.reason == "unknown_event_type"
    assert result.detail


@FAST
@given(
    user=ids,
    key=st.none() | st.just(b"") | st.binary(max_size=20) | ids.map(str.encode),
    item=known_items,
)
@example(user="u1", key=b"", item="i1")
@example(user="u1", key=b"u1 ", item="i1")
@example(user="u1", key=b"U1", item="i1")
@example(user="é", key="é".encode("latin-1"), item="i1")  # same text, another encoding
def test_keys_must_match_the_user_or_be_absent(user: str, key: bytes | None, item: str) -> None:
    result = check(key, orjson.dumps(valid_body(user, item, NOW, None)))
    if key is None or key == user.encode("utf-8"):
        assert result == ClickEvent(user, item, NOW)
    else:
        assert isinstance(result, Invalid) and result.reason == "key_mismatch"


@FAST
@given(
    user=ids,
    item=known_items,
    ts=valid_ts,
    event_type=st.none() | st.sampled_from(sorted(EVENT_TYPES)),
    key=keys_for,
    integral_float=st.booleans(),
    ascii_only=st.booleans(),
    extra=st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in {"user_id", "item_id", "ts", "event_type"}),
        json_scalars.filter(lambda v: not isinstance(v, float)),
        max_size=3,
    ),
)
def test_valid_by_construction_decodes_to_exactly_the_event(
    user: str,
    item: str,
    ts: int,
    event_type: str | None,
    key: str,
    integral_float: bool,
    ascii_only: bool,
    extra: dict[str, Any],
) -> None:
    body = {**extra, **valid_body(user, item, float(ts) if integral_float else ts, event_type)}
    record_key = user.encode("utf-8") if key == "match" else None
    result = check(record_key, dumps(body, ascii_only=ascii_only))
    assert result == ClickEvent(user, item, ts, event_type or "click")


@FAST
@given(user=ids, item=known_items)
def test_the_shared_malformed_samples_keep_their_reasons_for_any_ids(user: str, item: str) -> None:
    assume(user != "someone-else")  # the key_mismatch sample's key
    for reason, key, value in malformed_records(user, item, NOW):
        result = check(key, value)
        assert isinstance(result, Invalid) and result.reason == reason, (reason, result)
