"""Event and recommendation schemas (v1): parse, validate, encode.

Click event v1 (JSON object, UTF-8; Kafka key = user id):
    {"user_id": str, "item_id": str, "ts": int epoch ms, "event_type": "click" (optional)}
Recommendation v1 (JSON object; Kafka key = user id): see schemas/recommendation.v1.json.

Decoding never raises on bad input: it returns `Invalid(reason, detail)`; the reason is one of
`REASONS` and becomes the dead-letter record's `streamrec.dlq.reason` header.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

import orjson

from stream.config import CodecLimits

SCHEMA_VERSION: Final = 1

Reason = Literal[
    "empty_payload",
    "oversized",
    "not_utf8",
    "not_json",
    "not_object",
    "missing_field",
    "wrong_type",
    "empty_field",
    "field_too_long",
    "unknown_event_type",
    "unknown_item",
    "ts_negative",
    "ts_future",
    "key_mismatch",
    "scoring_failed",
]
REASONS: Final[tuple[str, ...]] = get_args(Reason)
EVENT_TYPES: Final = frozenset({"click", "view", "add_to_cart", "purchase"})
_ID_FIELDS: Final = ("user_id", "item_id")


@dataclass(frozen=True, slots=True)
class ClickEvent:
    user_id: str
    item_id: str
    ts: int
    event_type: str = "click"

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "user_id": self.user_id,
                "item_id": self.item_id,
                "ts": self.ts,
                "event_type": self.event_type,
            }
        )


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: Reason
    detail: str


def decode_click(
    key: bytes | None,
    value: bytes | None,
    *,
    known_items: Container[str],
    now_ms: int,
    limits: CodecLimits,
) -> ClickEvent | Invalid:
    """Parse and validate one click record. Never raises on bad input."""
    if not value:
        return Invalid("empty_payload", "record has no value")
    if len(value) > limits.max_event_bytes:
        return Invalid("oversized", f"{len(value)} bytes > {limits.max_event_bytes}")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid("not_utf8", str(exc)[:200])
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return Invalid("not_json", str(exc)[:200])
    if not isinstance(raw, dict):
        return Invalid("not_object", f"top level is {type(raw).__name__}")
    return _validate(raw, key, known_items=known_items, now_ms=now_ms, limits=limits)


def _validate(
    raw: dict[str, object],
    key: bytes | None,
    *,
    known_items: Container[str],
    now_ms: int,
    limits: CodecLimits,
) -> ClickEvent | Invalid:
    for name in (*_ID_FIELDS, "ts"):
        if name not in raw:
            return Invalid("missing_field", name)
    user_id, item_id, ts = raw["user_id"], raw["item_id"], raw["ts"]
    for name, field in (("user_id", user_id), ("item_id", item_id)):
        if not isinstance(field, str):
            return Invalid("wrong_type", f"{name} must be a string, got {type(field).__name__}")
        if not field.strip():
            return Invalid("empty_field", name)
        if len(field) > limits.max_id_length:
            return Invalid("field_too_long", f"{name} has {len(field)} chars")
    # JSON has one number type: 1.7e12 is an integer to JSON Schema (and to JavaScript
    # producers), so integral floats are accepted. bool is an int subclass; true is no timestamp.
    if isinstance(ts, float) and ts.is_integer():
        ts = int(ts)
    if not isinstance(ts, int) or isinstance(ts, bool):
        return Invalid("wrong_type", f"ts must be an integer (epoch ms), got {ts!r:.40}")
    event_type = raw.get("event_type", "click")
    if not isinstance(event_type, str):
        return Invalid("wrong_type", "event_type must be a string")
    if event_type not in EVENT_TYPES:
        return Invalid(
            "unknown_event_type",
            f"event_type {event_type[:64]!r} is not one of {sorted(EVENT_TYPES)}",
        )
    if ts < 0:
        return Invalid("ts_negative", str(ts))
    if ts > now_ms + limits.max_future_skew_ms:
        return Invalid("ts_future", f"ts {ts} is {(ts - now_ms) // 1000}s ahead of the processor")
    assert isinstance(user_id, str) and isinstance(item_id, str)
    if key is not None and key != user_id.encode("utf-8"):
        return Invalid("key_mismatch", "record key differs from user_id")
    if item_id not in known_items:
        return Invalid("unknown_item", item_id[:64])
    return ClickEvent(user_id=user_id, item_id=item_id, ts=ts, event_type=event_type)


@dataclass(frozen=True, slots=True)
class RecommendedItem:
    item_id: str
    score: float
    rank: int


def encode_recommendation(
    *,
    user_id: str,
    items: Sequence[RecommendedItem],
    model_version: str,
    partition: int,
    offset: int,
    event_ts: int,
    generated_ts: int,
) -> bytes:
    """One output record (schema v1). Additive fields keep v1; breaking changes bump it."""
    return orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "user_id": user_id,
            "items": [{"item_id": i.item_id, "score": i.score, "rank": i.rank} for i in items],
            "model_version": model_version,
            "partition": partition,
            "offset": offset,
            "event_ts": event_ts,
            "generated_ts": generated_ts,
        }
    )


def decode_recommendation(value: bytes) -> dict[str, object]:
    """For subscribers and tests: the parsed output record (raises on a malformed record)."""
    raw = orjson.loads(value)
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        raise ValueError("not a streamrec recommendation v1 record")
    return raw
