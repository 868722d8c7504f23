"""RecsSubscriber and the example HTTP service against the real broker."""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from stream.broker import free_port
from stream.codec import RecommendedItem, encode_recommendation
from stream.config import KafkaSettings, TopicSettings
from stream.kafka.clients import make_producer
from stream.subscriber import Recommendation, RecsSubscriber
from tests.integration.kafka_utils import Timeout, wait_for

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "recs_http_service.py"
TS = 1_795_400_000_000


def rec_value(user: str, offset: int, items: list[str], partition: int = 1) -> bytes:
    return encode_recommendation(
        user_id=user,
        items=[RecommendedItem(i, 10.0 - n, n + 1) for n, i in enumerate(items)],
        model_version="m-test",
        partition=partition,
        offset=offset,
        event_ts=TS + offset,
        generated_ts=TS + offset + 3,
    )


def produce(kafka: KafkaSettings, topic: str, records: list[tuple[str, bytes | None]]) -> None:
    producer: Producer = make_producer(kafka)
    for key, value in records:
        producer.produce(topic, key=key.encode(), value=value)
    assert producer.flush(Timeout.DEFAULT) == 0, "records not acknowledged"


DROP = object()


def edited(value: bytes, **fields: object) -> bytes:
    """`value` with fields replaced, or removed where given DROP."""
    record = orjson.loads(value)
    for name, new in fields.items():
        if new is DROP:
            del record[name]
        else:
            record[name] = new
    return orjson.dumps(record)


def poll_until(sub: RecsSubscriber, condition: Callable[[], bool], what: str) -> None:
    def polled() -> bool:
        sub.poll(0.2)
        return condition()

    wait_for(polled, what=what)


def drain(sub: RecsSubscriber, total: int) -> None:
    """Poll until every one of `total` records was applied, dropped or counted invalid."""

    poll_until(
        sub,
        lambda: sub.applied + sub.duplicates + sum(sub.invalid.values()) >= total,
        f"{total} records",
    )


def item_ids(rec: Recommendation | None) -> list[str]:
    assert rec is not None
    return [i.item_id for i in rec.items]


def test_subscriber_keeps_latest_valid_list_per_user(
    kafka: KafkaSettings, topics: TopicSettings
) -> None:
    alice, bob, carol = (f"{n}-{uuid.uuid4().hex[:6]}" for n in ("alice", "bob", "carol"))
    produce(
        kafka,
        topics.recs,
        [
            (alice, rec_value(alice, 10, ["i1", "i2"])),
            (alice, rec_value(alice, 20, ["i3", "i4", "i5"])),  # the newer list
            (alice, rec_value(alice, 10, ["i1", "i2"])),  # a replayed older list: dropped
            (alice, rec_value(alice, 20, ["i3", "i4", "i5"])),  # an exact duplicate: dropped
            (bob, rec_value(bob, 5, ["i9"])),
            (bob, None),  # tombstone: bob is deleted
            (bob, rec_value(bob, 5, ["i9"])),  # redelivered old list must not resurrect bob
            (carol, rec_value(carol, 7, ["i7", "i8"], partition=2)),
            (carol, edited(rec_value(carol, 8, ["x"]), items=None)),  # wrong type
            (carol, b"{not json"),
            (carol, edited(rec_value(carol, 9, ["x"]), items=DROP)),  # missing field
            (alice, rec_value(carol, 30, ["i6"])),  # key is not the user id
        ],
    )
    # Produced before the subscriber exists: reading from the beginning bootstraps them.
    with RecsSubscriber(kafka, topic=topics.recs) as sub:
        drain(sub, 12)
        assert item_ids(sub.latest(alice)) == ["i3", "i4", "i5"]
        latest = sub.latest(alice)
        assert latest is not None and (latest.partition, latest.offset) == (1, 20)
        assert latest.model_version == "m-test"
        assert (latest.event_ts, latest.generated_ts) == (TS + 20, TS + 23)
        assert latest.items[0] == RecommendedItem("i3", 10.0, 1)
        assert sub.latest(bob) is None
        latest_carol = sub.latest(carol)
        assert item_ids(latest_carol) == ["i7", "i8"]
        assert sub.users() == 2
        assert sub.duplicates == 3
        assert sub.invalid == {
            "wrong_type": 1,
            "not_json": 1,
            "missing_field": 1,
            "key_mismatch": 1,
        }
        assert sub.applied == 12 - 3 - 4

        # Following the topic: a newer list replaces the held one.
        produce(kafka, topics.recs, [(carol, rec_value(carol, 11, ["i1"], partition=2))])
        poll_until(sub, lambda: sub.latest(carol) != latest_carol, "carol's new list")
        assert item_ids(sub.latest(carol)) == ["i1"]


def test_subscriber_with_group_commits_what_it_applied(
    kafka: KafkaSettings, topics: TopicSettings
) -> None:
    group = f"subscriber-{uuid.uuid4().hex[:8]}"
    produce(kafka, topics.recs, [("u1", rec_value("u1", 1, ["i1"]))])
    with RecsSubscriber(kafka, topic=topics.recs, group=group) as sub:
        drain(sub, 1)
        assert item_ids(sub.latest("u1")) == ["i1"]
    produce(kafka, topics.recs, [("u2", rec_value("u2", 1, ["i2"]))])
    # The same group resumes after its commit: only u2 is new to it.
    with RecsSubscriber(kafka, topic=topics.recs, group=group) as sub:
        drain(sub, 1)
        assert item_ids(sub.latest("u2")) == ["i2"]
        assert sub.latest("u1") is None
        assert sub.applied == 1


@pytest.fixture
def example() -> Iterator[ModuleType]:
    name = "recs_http_service_under_test"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclass/typing machinery looks modules up by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:  # an HTTPError holds the response open
            return err.code, json.loads(err.read())


def test_example_http_service_serves_latest_lists(
    kafka: KafkaSettings, topics: TopicSettings, example: ModuleType
) -> None:
    value = rec_value("u42", 3, ["i5", "i6", "i7"])
    produce(kafka, topics.recs, [("u42", rec_value("u42", 1, ["i1"])), ("u42", value)])
    port = free_port()
    with example.RecsHttpService(kafka, topic=topics.recs, port=port) as service:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: service.subscriber.applied == 2, what="the subscriber to catch up")

        status, body = get(f"{base}/users/u42/recommendations")
        assert status == 200
        assert body == orjson.loads(value)

        status, body = get(f"{base}/users/nobody/recommendations")
        assert status == 404
        assert body == {"error": "unknown user", "user_id": "nobody"}

        status, body = get(f"{base}/healthz")
        assert status == 200
        assert body["status"] == "ok" and body["users"] == 1
    assert not service.healthy()  # stopped: the poller thread has finished
