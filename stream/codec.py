"""Event and recommendation schemas (v1): parse, validate, encode.

Click event v1 (JSON object, UTF-8; Kafka key = user id):
    {"user_id": str, "item_id": str, "ts": int epoch ms, "event_type": "click" (optional)}
Recommendation v1 (JSON object; Kafka key = user id): see schemas/recommendation.v1.json.
Item v1 (JSON object; Kafka key = item id; null value = the item is withdrawn): see
schemas/item.v1.json.

Decoding never raises on bad input: it returns `Invalid(reason, detail)`; the reason is one of
`REASONS` and becomes the dead-letter record's `streamrec.dlq.reason` header.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, get_args

import orjson

from export.item_text import item_text
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
    "unsupported_version",
]
REASONS: Final[tuple[str, ...]] = get_args(Reason)
EVENT_TYPES: Final = frozenset({"click", "view", "add_to_cart", "purchase"})
_ID_FIELDS: Final = ("user_id", "item_id")


class ClickEvent(NamedTuple):
    """A valid click. Immutable; a NamedTuple rather than a frozen dataclass because the
    processor makes one per record and a frozen dataclass's __init__ costs three times as
    much (0.76 against 0.26 µs here, BENCHMARKS.md)."""

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
    """Parse and validate one click record. Never raises on bad input.

    A valid click passes one straight line of checks (`valid_click`); a record that fails any
    of them takes `decode_click_checked`, which finds the rule it breaks. Same verdicts (a
    property test holds them equal), half the time per valid click: bad records are rare.
    """
    event = valid_click(key, value, known_items, now_ms, limits)
    if event is not None:
        return event
    return decode_click_checked(key, value, known_items=known_items, now_ms=now_ms, limits=limits)


def valid_click(
    key: bytes | None,
    value: bytes | None,
    known_items: Container[str],
    now_ms: int,
    limits: CodecLimits,
) -> ClickEvent | None:
    """The event if the record is a valid click in its usual form (int ts), else None.

    The hot path's half of decode_click, positional for speed: None is no verdict, the record
    then goes to decode_click_checked for its event or the rule it breaks."""
    if not value or len(value) > limits.max_event_bytes:
        return None
    try:
        raw = orjson.loads(value)  # refuses invalid UTF-8 and lone surrogates itself
    except orjson.JSONDecodeError:
        return None
    if type(raw) is not dict:
        return None
    user_id, item_id, ts = raw.get("user_id"), raw.get("item_id"), raw.get("ts")
    event_type = raw.get("event_type", "click")
    max_id = limits.max_id_length
    if (
        type(user_id) is str
        and type(item_id) is str
        and type(ts) is int  # not bool, not float: those take the checked path
        and type(event_type) is str
        and 0 <= ts <= now_ms + limits.max_future_skew_ms
        and len(user_id) <= max_id
        and len(item_id) <= max_id
        and event_type in EVENT_TYPES
        and item_id in known_items
        and (key is None or key == user_id.encode("utf-8"))
        and user_id.strip()
        and item_id.strip()
    ):
        return ClickEvent(user_id, item_id, ts, event_type)
    return None


def decode_click_checked(
    key: bytes | None,
    value: bytes | None,
    *,
    known_items: Container[str],
    now_ms: int,
    limits: CodecLimits,
) -> ClickEvent | Invalid:
    """decode_click rule by rule: the event, or the first rule the record breaks."""
    raw = _json_object(value, limits)
    if isinstance(raw, Invalid):
        return raw
    return _validate(raw, key, known_items=known_items, now_ms=now_ms, limits=limits)


def _json_object(value: bytes | None, limits: CodecLimits) -> dict[str, object] | Invalid:
    """The record value as a JSON object, or why not."""
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
    return raw


def _id_problem(name: str, field: object, max_length: int) -> Invalid | None:
    """A non-blank string of at most max_length characters, or the reason it is not."""
    if not isinstance(field, str):
        return Invalid("wrong_type", f"{name} must be a string, got {type(field).__name__}")
    if not field.strip():
        return Invalid("empty_field", name)
    if len(field) > max_length:
        return Invalid("field_too_long", f"{name} has {len(field)} chars")
    return None


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
        problem = _id_problem(name, field, limits.max_id_length)
        if problem is not None:
            return problem
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
    # The session item (in the model's window) that explains it; omitted from the JSON if None.
    because: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The item as schema v1 writes it."""
        out: dict[str, object] = {"item_id": self.item_id, "score": self.score, "rank": self.rank}
        if self.because is not None:
            out["because"] = self.because
        return out


# One recommended item as schema v1 writes it (RecommendedItem.to_dict's form).
WireItem = dict[str, object]


def encode_recommendation(
    *,
    user_id: str,
    items: Sequence[RecommendedItem] | Sequence[WireItem],
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
            "items": [i if isinstance(i, dict) else i.to_dict() for i in items],
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


ITEM_TITLE_MAX: Final = 1024
ITEM_GENRES_MAX: Final = 32
ITEM_GENRE_LENGTH_MAX: Final = 64


@dataclass(frozen=True, slots=True)
class ItemRecord:
    """An item of the catalogue topic (schema v1). `fields` holds optional extra attributes."""

    item_id: str
    title: str
    genres: tuple[str, ...] = ()
    year: int | None = None
    fields: dict[str, object] | None = None

    def to_json(self) -> bytes:
        body: dict[str, object] = {
            "schema_version": SCHEMA_VERSION,
            "item_id": self.item_id,
            "title": self.title,
        }
        if self.genres:
            body["genres"] = list(self.genres)
        if self.year is not None:
            body["year"] = self.year
        if self.fields:
            body["fields"] = self.fields
        return orjson.dumps(body)

    def text(self) -> str:
        """What the text encoder reads: the item-text rule over the title (with the year, if
        given and not already there, as catalogue titles carry it) and the genres."""
        title = self.title
        if self.year is not None and f"({self.year})" not in title:
            title = f"{title} ({self.year})"
        return item_text(title, "|".join(self.genres))


@dataclass(frozen=True, slots=True)
class ItemTombstone:
    """A null value on the catalogue topic: the item is withdrawn."""

    item_id: str


def decode_item(
    key: bytes | None, value: bytes | None, limits: CodecLimits
) -> ItemRecord | ItemTombstone | Invalid:
    """Parse and validate one catalogue record. Never raises on bad input."""
    if value is None:
        try:
            withdrawn = (key or b"").decode("utf-8")
        except UnicodeDecodeError:
            withdrawn = ""
        if not withdrawn.strip():
            return Invalid("key_mismatch", "a tombstone needs the item id as its (UTF-8) key")
        return ItemTombstone(withdrawn)
    raw = _json_object(value, limits)
    if isinstance(raw, Invalid):
        return raw
    for name in ("schema_version", "item_id", "title"):
        if name not in raw:
            return Invalid("missing_field", name)
    version = raw["schema_version"]
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        return Invalid("unsupported_version", f"schema_version {version!r:.20} (this reads 1)")
    item_id, title = raw["item_id"], raw["title"]
    problem = _id_problem("item_id", item_id, limits.max_id_length) or _id_problem(
        "title", title, ITEM_TITLE_MAX
    )
    if problem is not None:
        return problem
    assert isinstance(item_id, str) and isinstance(title, str)
    genres = _genres(raw.get("genres", []))
    if isinstance(genres, Invalid):
        return genres
    # Optional means absent: an explicit null is a wrong type, as the schema says.
    year = raw.get("year")
    if isinstance(year, float) and year.is_integer():
        year = int(year)
    if "year" in raw and (not isinstance(year, int) or isinstance(year, bool)):
        return Invalid("wrong_type", f"year must be an integer, got {year!r:.20}")
    fields = raw.get("fields")
    if "fields" in raw and not isinstance(fields, dict):
        return Invalid("wrong_type", "fields must be an object")
    assert year is None or isinstance(year, int)
    assert fields is None or isinstance(fields, dict)
    if key is not None and key != item_id.encode("utf-8"):
        return Invalid("key_mismatch", "record key differs from item_id")
    return ItemRecord(item_id, title, genres, year, fields or None)


def _genres(raw: object) -> tuple[str, ...] | Invalid:
    if not isinstance(raw, list):
        return Invalid("wrong_type", "genres must be an array of strings")
    if len(raw) > ITEM_GENRES_MAX:
        return Invalid("field_too_long", f"{len(raw)} genres > {ITEM_GENRES_MAX}")
    for n, genre in enumerate(raw):
        problem = _id_problem(f"genres[{n}]", genre, ITEM_GENRE_LENGTH_MAX)
        if problem is not None:
            return problem
    return tuple(g.strip() for g in raw)
