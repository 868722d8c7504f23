"""Hostile batches through the processor's pure batch steps, with real RocksDB and real ONNX.

Hypothesis builds lists of `confluent_kafka.Message` records (valid clicks for catalogue items,
forget requests, and hostile records: arbitrary bytes and JSON, wrong types, raw NaN/Infinity,
extreme timestamps, unknown items and event types, keys that disagree with the payload, bogus
control headers, and `stream.badinput.malformed_records`). Each list goes through
decode → apply → write_state → score exactly as `process_batch` runs them; nothing is produced
or committed. One Processor (one store) serves every example of a test, so offsets increase per
partition across examples and the store's applied-offset markers never skip a record.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from confluent_kafka import Message
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from export.bundle import load_bundle
from stream.badinput import malformed_records
from stream.batch import CONTROL_HEADER, FORGET, Batch, Forget
from stream.codec import REASONS, ClickEvent
from stream.config import ProcessorSettings
from stream.processor import Processor

TOPIC_PARTITIONS = 3
NOW = time.time_ns() // 1_000_000  # every generated "valid" ts is at or before this
FUTURE = NOW + 2 * 3_600_000  # beyond the hour of allowed clock skew
USERS = ["user-0", "user-1", "user-2", "user-3", "ü-ser", "用户-5", "🎧-6", "u" * 256]
SCHEMA = json.loads(
    resources.files("stream").joinpath("schemas/recommendation.v1.json").read_text("utf-8")
)


def partition_of(user: str) -> int:
    """A user's records all come from one partition, as the key partitioner guarantees."""
    return zlib.crc32(user.encode("utf-8")) % TOPIC_PARTITIONS


@dataclass(frozen=True)
class Record:
    """One input record; `expect`: "valid" (applied), a dead-letter reason, or None (either)."""

    key: bytes | None
    value: bytes | None
    partition: int
    expect: str | None
    headers: tuple[tuple[str, bytes | None], ...] = ()


def _event(user: str, item: str, ts: Any, **extra: Any) -> bytes:
    return json.dumps({"user_id": user, "item_id": item, "ts": ts, **extra}).encode("utf-8")


@st.composite
def valid_clicks(draw: st.DrawFn, items: list[str]) -> Record:
    user = draw(st.sampled_from(USERS))
    body: dict[str, Any] = {
        "user_id": user,
        "item_id": draw(st.sampled_from(items)),
        "ts": draw(st.integers(min_value=0, max_value=NOW)),
    }
    if draw(st.booleans()):
        body["event_type"] = draw(st.sampled_from(["click", "view", "add_to_cart", "purchase"]))
    if draw(st.booleans()):
        body["ts"] = float(body["ts"])  # an integral float is a valid ts
    key = draw(st.sampled_from([user.encode("utf-8"), None]))
    noise = draw(st.lists(st.tuples(st.sampled_from(["trace", "x-src"]), st.binary(max_size=8))))
    return Record(key, json.dumps(body).encode(), partition_of(user), "valid", tuple(noise))


@st.composite
def forgets(draw: st.DrawFn) -> Record:
    user = draw(st.sampled_from(USERS))
    value = orjson.dumps({"user_id": user, "ts": NOW})
    return Record(user.encode(), value, partition_of(user), "valid", ((CONTROL_HEADER, FORGET),))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(st.sampled_from(["user_id", "item_id", "ts"]) | st.text(max_size=5), c)
    ),
    max_leaves=15,
)


HOSTILE_KINDS = [
    "bytes", "json", "wrong_type", "raw_number", "future", "negative", "unknown_item",
    "event_type", "key_mismatch", "huge", "deep", "bogus_control", "malformed",
]  # fmt: skip
RAW_TS = [  # raw JSON text for ts, and the reason it must get
    ("NaN", "not_json"), ("Infinity", "not_json"), ("-Infinity", "not_json"),
    ("1e400", "not_json"), ("0.5", "wrong_type"), ("1e308", "ts_future"),
]  # fmt: skip


@st.composite
def hostile(draw: st.DrawFn, items: list[str]) -> Record:
    """A record the decoder must refuse (with the reason where construction fixes it)."""
    user = draw(st.sampled_from(USERS))
    item = draw(st.sampled_from(items))
    key: bytes | None = user.encode("utf-8")
    kind = draw(st.sampled_from(HOSTILE_KINDS))
    expect: str | None
    headers: tuple[tuple[str, bytes | None], ...] = ()
    if kind == "bytes":
        key, value = draw(st.none() | st.binary(max_size=8)), draw(st.none() | st.binary())
        expect = None
    elif kind == "json":
        value, expect = json.dumps(draw(json_values)).encode(), None  # NaN/Infinity included
    elif kind == "wrong_type":
        name = draw(st.sampled_from(["user_id", "item_id", "ts", "event_type"]))
        bad = draw(st.none() | st.booleans() | st.lists(st.integers(), max_size=2) | st.just({}))
        body = {"user_id": user, "item_id": item, "ts": NOW, name: bad}
        value, expect = json.dumps(body).encode(), "wrong_type"
    elif kind == "raw_number":
        raw, expect = draw(st.sampled_from(RAW_TS))
        value = f'{{"user_id": {json.dumps(user)}, "item_id": "{item}", "ts": {raw}}}'.encode()
    elif kind == "future":
        value, expect = _event(user, item, draw(st.integers(FUTURE, 2**63 - 1))), "ts_future"
    elif kind == "negative":
        value, expect = _event(user, item, draw(st.integers(-(2**63), -1))), "ts_negative"
    elif kind == "unknown_item":
        other = draw(st.text(min_size=1, max_size=40).filter(lambda s: s.strip()))
        value, expect = _event(user, f"not-in-catalogue:{other}", NOW), "unknown_item"
    elif kind == "event_type":
        other = draw(st.text(max_size=30))
        value, expect = _event(user, item, NOW, event_type=f"x-{other}"), "unknown_event_type"
    elif kind == "key_mismatch":
        key = draw(st.sampled_from([b"", b"someone-else", user.upper().encode() + b"!"]))
        value, expect = _event(user, item, NOW), "key_mismatch"
    elif kind == "huge":
        value, expect = _event(user, item, NOW, pad="é" * 9000), "oversized"
    elif kind == "deep":
        depth = draw(st.integers(1100, 5000))
        value, expect = b"[" * depth + b"]" * depth, "not_json"
    elif kind == "bogus_control":
        headers = ((CONTROL_HEADER, draw(st.sampled_from([b"delete-all", b"", None, b"FORGET"]))),)
        value, expect = orjson.dumps({"user_id": user}), "unknown_event_type"
    else:
        cases = malformed_records(user, item, NOW)
        expect, key, value = draw(st.sampled_from(cases))
    return Record(key, value, draw(st.integers(0, TOPIC_PARTITIONS - 1)), expect, headers)


def batches(items: list[str]) -> st.SearchStrategy[list[Record]]:
    record = st.one_of(valid_clicks(items), hostile(items), forgets())
    return st.lists(record, min_size=1, max_size=40)


@dataclass
class Harness:
    processor: Processor
    items: list[str]
    topic: str
    next_offset: dict[int, int] = field(default_factory=dict)

    def messages(self, records: list[Record]) -> list[Message]:
        out = []
        for r in records:
            offset = self.next_offset.get(r.partition, 0)
            self.next_offset[r.partition] = offset + 1
            out.append(
                Message(
                    topic=self.topic,
                    partition=r.partition,
                    offset=offset,
                    key=r.key,
                    value=r.value,
                    headers=list(r.headers) or None,
                )
            )
        return out


@pytest.fixture
def harness(settings: ProcessorSettings, bundle_dir: Path) -> Iterator[Harness]:
    processor = Processor(settings.model_copy(update={"metrics_addr": ""}))
    try:
        yield Harness(processor, list(load_bundle(bundle_dir).item_ids[1:]), settings.topics.clicks)
    finally:
        processor.store.close()
        processor.consumer.close()


@hypothesis_settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one Processor for every example, on purpose
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_a_hostile_batch_is_fully_accounted_for_and_scored(
    harness: Harness, data: st.DataObject
) -> None:
    processor = harness.processor
    records = data.draw(batches(harness.items), label="records")
    msgs = harness.messages(records)
    replayed_before = processor.stats.replayed

    batch = Batch()
    events = processor._decode(msgs, batch)
    before = {event.user_id: processor.store.get(event.user_id) for _, event, _ in events}
    processor._apply(events, batch)
    processor._write_state(batch)
    processor._score(batch)

    # Every record is accounted for exactly once: dead (with a known reason) or an event.
    where = {(m.partition(), m.offset()): "valid" for m, _, _ in events}
    for msg, invalid in batch.dead:
        assert invalid.reason in REASONS and invalid.reason != "scoring_failed", invalid
        assert invalid.detail, invalid
        assert (msg.partition(), msg.offset()) not in where, "both dead and applied"
        where[(msg.partition(), msg.offset())] = invalid.reason
    assert len(batch.dead) + len(events) == len(msgs)
    assert len(where) == len(msgs)
    for record, msg in zip(records, msgs, strict=True):
        got = where[(msg.partition(), msg.offset())]
        assert record.expect is None or got == record.expect, (record, got)
    assert processor.stats.replayed == replayed_before, "fresh offsets are never replays"
    for (_, partition), nxt in batch.next_offsets.items():
        assert nxt == max(m.offset() for m in msgs if m.partition() == partition) + 1

    # Sessions grew by exactly the valid clicks; a forget deletes the session (and a later
    # click in the same batch starts a new one).
    expected: dict[str, int | None] = {}  # the session's event count; None: no session
    for _, event, _ in events:
        user = event.user_id
        if user not in expected:
            prior = before[user]
            expected[user] = None if prior is None else prior.count
        if isinstance(event, Forget):
            expected[user] = None
        else:
            assert isinstance(event, ClickEvent)
            expected[user] = (expected[user] or 0) + 1
    assert set(expected) == set(batch.touched)
    outputs: dict[str, list[bytes | None]] = {}
    for user, value in batch.outputs:
        outputs.setdefault(user, []).append(value)
    assert set(outputs) == set(batch.touched), "one output per touched user, no others"
    assert not batch.failed
    for user, count in expected.items():
        stored = processor.store.get(user)
        (value,) = outputs[user]
        if count is None:
            assert stored is None and value is None, user  # forgotten: a tombstone
            continue
        assert stored is not None and stored.count == count, (user, stored, count)
        assert value is not None
        out = orjson.loads(value)
        jsonschema.validate(out, SCHEMA)
        assert out["user_id"] == user
        assert out["model_version"] == processor.scorer.model_version
        recommended = [entry["item_id"] for entry in out["items"]]
        assert len(recommended) == processor.settings.top_k
        assert not set(recommended) & set(stored.items), "a session item was recommended"
        assert set(recommended) <= set(harness.items)
        last = batch.touched[user].msg
        assert (out["partition"], out["offset"]) == (last.partition(), last.offset())
        assert stored.items[-1] == orjson.loads(last.value() or b"{}")["item_id"]
