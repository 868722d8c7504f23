"""End to end on the real broker, real RocksDB and a real ONNX bundle."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from importlib import resources
from pathlib import Path

import jsonschema
import orjson
from confluent_kafka import Message

from export.bundle import load_bundle
from stream.badinput import malformed_records
from stream.config import KafkaSettings, ProcessorSettings
from stream.producer import ClickProducer
from stream.state import RocksSessionStore
from tests.integration.conftest import RunningProcessor
from tests.integration.kafka_utils import TopicReader, wait_for

BASE_TS = 1_767_225_600_000
Clicks = dict[str, list[tuple[str, int]]]


def _schema(name: str) -> dict[str, object]:
    text = resources.files("stream").joinpath(f"schemas/{name}").read_text(encoding="utf-8")
    return dict(json.loads(text))


def make_clicks(bundle_dir: Path, users: int, per_user: int, seed: int = 1) -> Clicks:
    rng = random.Random(seed)
    catalogue = list(load_bundle(bundle_dir).item_ids[1:])
    clicks: Clicks = {}
    for u in range(users):
        items = rng.sample(catalogue, per_user)
        clicks[f"user-{u:03d}"] = [(i, BASE_TS + 1000 * k + u) for k, i in enumerate(items)]
    return clicks


def send(kafka: KafkaSettings, topic: str, clicks: Clicks, start: int, stop: int) -> int:
    sent = 0
    with ClickProducer(kafka, topic) as producer:
        for k in range(start, stop):  # interleave users, as a live stream would
            for user, events in clicks.items():
                if k < len(events):
                    producer.send(user, events[k][0], ts=events[k][1])
                    sent += 1
    return sent


Malformed = list[tuple[str, bytes | None, bytes | None]]


def send_with_malformed(settings: ProcessorSettings, clicks: Clicks) -> Malformed:
    """The users' clicks, with one of every malformed record after the first user's."""
    bad: Malformed = []
    with ClickProducer(settings.kafka, settings.topics.clicks) as producer:
        for n, (user, events) in enumerate(clicks.items()):
            for item, ts in events:
                producer.send(user, item, ts=ts)
            if n == 0:
                bad = malformed_records(user, item, now_ms=time.time_ns() // 1_000_000)
                for _, key, value in bad:
                    producer.send_raw(key, value)
    return bad


def assert_dead_letters(dead: list[Message], bad: Malformed, topic: str) -> None:
    """Each malformed record is in the DLQ once, with its reason, source and original bytes."""
    got: Counter[str] = Counter()
    sent_values = {value or b"" for _, _, value in bad}
    for msg in dead:
        headers = dict(msg.headers() or [])
        got[headers["streamrec.dlq.reason"].decode()] += 1
        assert (msg.value() or b"") in sent_values, "the DLQ keeps the original bytes"
        assert headers["streamrec.dlq.topic"].decode() == topic
        assert int(headers["streamrec.dlq.partition"]) >= 0
        assert int(headers["streamrec.dlq.offset"]) >= 0
        assert headers["streamrec.dlq.detail"]
        assert int(headers["streamrec.dlq.ts"]) > 0
    assert got == Counter(reason for reason, _, _ in bad)


def latest_by_user(messages: list[Message]) -> dict[str, dict[str, object]]:
    latest: dict[str, dict[str, object]] = {}
    for msg in messages:  # per partition in offset order, and one user is in one partition
        latest[(msg.key() or b"").decode()] = orjson.loads(msg.value() or b"{}")
    return latest


def caught_up(clicks: Clicks, upto: int) -> object:
    def done(messages: list[Message]) -> bool:
        latest = latest_by_user(messages)
        return all(
            latest.get(u, {}).get("event_ts") == ev[min(upto, len(ev)) - 1][1]
            for u, ev in clicks.items()
        )

    return done


def test_every_user_gets_a_fresh_list_that_excludes_their_session(
    settings: ProcessorSettings, bundle_dir: Path
) -> None:
    clicks = make_clicks(bundle_dir, users=60, per_user=5)
    send(settings.kafka, settings.topics.clicks, clicks, 0, 5)
    schema = _schema("recommendation.v1.json")
    version = load_bundle(bundle_dir).model_version
    with RunningProcessor(settings), TopicReader(settings.kafka, settings.topics.recs) as recs:
        messages = recs.read_until(caught_up(clicks, 5))
    partitions = {m.partition() for m in messages}
    assert len(partitions) == settings.topics.partitions, "users should spread over partitions"
    latest = latest_by_user(messages)
    assert set(latest) == set(clicks)
    for user, record in latest.items():
        jsonschema.validate(record, schema)
        assert record["user_id"] == user
        assert record["model_version"] == version
        recommended = [entry["item_id"] for entry in record["items"]]  # type: ignore[attr-defined]
        assert len(recommended) == settings.top_k
        assert not set(recommended) & {item for item, _ in clicks[user]}
        assert [e["rank"] for e in record["items"]] == list(range(1, 11))  # type: ignore[attr-defined]
        scores = [e["score"] for e in record["items"]]  # type: ignore[attr-defined]
        assert scores == sorted(scores, reverse=True)


def test_restart_continues_sessions_without_loss_or_duplicates(
    settings: ProcessorSettings, bundle_dir: Path
) -> None:
    clicks = make_clicks(bundle_dir, users=50, per_user=8, seed=2)
    send(settings.kafka, settings.topics.clicks, clicks, 0, 4)
    with RunningProcessor(settings), TopicReader(settings.kafka, settings.topics.recs) as recs:
        recs.read_until(caught_up(clicks, 4))
    send(settings.kafka, settings.topics.clicks, clicks, 4, 8)
    with RunningProcessor(settings), TopicReader(settings.kafka, settings.topics.recs) as recs:
        recs.read_until(caught_up(clicks, 8))
    # A new group on the same state dir is redelivered everything from offset 0: the store's
    # applied-offset markers must recognise every event, so no session grows.
    regroup = settings.model_copy(update={"group": settings.group + "-again"})
    total = sum(len(v) for v in clicks.values())
    with RunningProcessor(regroup) as processor:
        wait_for(lambda: processor.stats.consumed >= total, what="redelivery of every event")
    assert processor.stats.replayed == total
    assert processor.stats.applied == 0
    store = RocksSessionStore(settings.state_dir / "sessions")
    try:
        sessions = dict(store.iter_sessions())
    finally:
        store.close()
    assert set(sessions) == set(clicks)
    for user, events in clicks.items():
        assert sessions[user].count == len(events)
        assert sessions[user].items == [item for item, _ in events]
        assert sessions[user].ts == [ts for _, ts in events]


def test_malformed_records_go_to_the_dlq_and_valid_ones_still_score(
    settings: ProcessorSettings, bundle_dir: Path
) -> None:
    clicks = make_clicks(bundle_dir, users=12, per_user=3, seed=3)
    bad = send_with_malformed(settings, clicks)
    reasons = Counter(reason for reason, _, _ in bad)
    assert len(reasons) >= 10
    with (
        RunningProcessor(settings),
        TopicReader(settings.kafka, settings.topics.dlq) as dlq,
        TopicReader(settings.kafka, settings.topics.recs) as recs,
    ):
        dead = dlq.read_until(lambda m: len(m) >= len(bad))
        recs.read_until(caught_up(clicks, 3))
    assert_dead_letters(dead, bad, settings.topics.clicks)


def test_bundle_output_covers_every_item_column(bundle_dir: Path) -> None:
    from stream.scoring import OnnxScorer, left_pad

    bundle = load_bundle(bundle_dir)
    scorer = OnnxScorer(bundle)
    scores = scorer.score(left_pad([[1, 2, 3], []], bundle.max_len))
    assert scores.shape == (2, bundle.num_items + 1)
    assert scores.dtype.name == "float32"
