"""One poll batch, the processor's unit of work, and the records it carries along."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import orjson
from confluent_kafka import Message

from stream.codec import ClickEvent, Invalid
from stream.state import Session

# A record with this header is a control request, not a click (value: JSON with user_id).
CONTROL_HEADER = "streamrec.control"
FORGET = b"forget"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def source_of(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed record (never None once consumed without error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


def in_offset_order(msgs: Sequence[Message]) -> Sequence[Message]:
    """The batch in offset order per partition, each offset once.

    A rebalance inside a poll (a partition lost under load and assigned back, for instance)
    can hand back records from the committed offset after newer ones of the same partition;
    applied as they come, a session would get events out of order and the store's marker
    would move back. The usual, already ordered batch is returned as is after a linear check.
    """
    last: dict[tuple[str | None, int | None], int] = {}
    ordered = True
    for msg in msgs:
        key = (msg.topic(), msg.partition())
        offset = msg.offset() or 0
        if offset <= last.get(key, -1):
            ordered = False
            break
        last[key] = offset
    if ordered:
        return msgs
    unique = {(m.topic(), m.partition(), m.offset()): m for m in msgs}
    return [unique[k] for k in sorted(unique, key=lambda k: (k[0] or "", k[1] or 0, k[2] or 0))]


@dataclass(frozen=True, slots=True)
class Forget:
    """Delete a user's session, changelog entry and latest output (`streamrec forget`)."""

    user_id: str


@dataclass
class Touched:
    """A user updated in this batch: their session (None once forgotten) and last source."""

    session: Session | None
    msg: Message
    event: ClickEvent | Forget


@dataclass
class Batch:
    touched: dict[str, Touched] = field(default_factory=dict)
    dead: list[tuple[Message, Invalid]] = field(default_factory=list)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    outputs: list[tuple[str, bytes | None]] = field(default_factory=list)
    event_ts: list[int] = field(default_factory=list)  # per scored output: end-to-end latency
    failed: set[str] = field(default_factory=set)  # users whose scoring failed (dead-lettered)
    _encoded: dict[str, bytes | None] | None = None

    def encoded_sessions(self) -> dict[str, bytes | None]:
        """Each touched user's session as stored and as the changelog carries it (None: the
        user was forgotten), encoded once for both."""
        if self._encoded is None:
            self._encoded = {
                user: None if t.session is None else t.session.to_bytes()
                for user, t in self.touched.items()
            }
        return self._encoded


def dead_letter_headers(msg: Message, invalid: Invalid) -> list[tuple[str, str | bytes | None]]:
    """Why and where from: the value stays the original bytes (Kafka Connect's DLQ convention)."""
    return list(dead_letter_headers_at(msg.topic() or "", msg.partition(), msg.offset(), invalid))


def dead_letter_headers_at(
    topic: str, partition: int | None, offset: int | None, invalid: Invalid
) -> list[tuple[str, bytes]]:
    """The DLQ headers for a record at topic/partition/offset (any Kafka client's record)."""
    return [
        ("streamrec.dlq.reason", invalid.reason.encode()),
        ("streamrec.dlq.detail", invalid.detail.encode("utf-8", "replace")),
        ("streamrec.dlq.topic", topic.encode()),
        ("streamrec.dlq.partition", str(partition).encode()),
        ("streamrec.dlq.offset", str(offset).encode()),
        ("streamrec.dlq.ts", str(now_ms()).encode()),
    ]


def control_of(msg: Message) -> bytes | None:
    """The control header's value, if the record is a control request (rare: usually None)."""
    return control_in(msg.headers())


def control_in(headers: Iterable[object] | None) -> bytes | None:
    """control_of for a record's headers as confluent-kafka returns them (None: no headers)."""
    if not headers:
        return None
    for header in headers:
        if isinstance(header, tuple) and header[0] == CONTROL_HEADER:
            value = header[1]
            return value if isinstance(value, bytes) else str(value or "").encode()
    return None


def decode_control(kind: bytes, key: bytes | None, value: bytes | None) -> Forget | Invalid:
    if kind != FORGET:
        return Invalid("unknown_event_type", f"control {kind[:32]!r}")
    try:
        body = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        return Invalid("not_json", str(exc)[:200])
    user = body.get("user_id") if isinstance(body, dict) else None
    if not isinstance(user, str) or not user.strip():
        return Invalid("missing_field", "user_id")
    if key is not None and key != user.encode("utf-8"):
        return Invalid("key_mismatch", "record key differs from user_id")
    return Forget(user)
