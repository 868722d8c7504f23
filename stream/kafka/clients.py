"""Consumer and producer construction, delivery tracking and offset commits."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from stream.config import KafkaSettings
from stream.errors import DeliveryError, KafkaError

logger = logging.getLogger(__name__)
_kafka_log = logging.getLogger("librdkafka")


def make_consumer(kafka: KafkaSettings, group_id: str, **overrides: Any) -> Consumer:
    conf = {**kafka.consumer_config(group_id), "logger": _kafka_log, **overrides}
    return Consumer(conf)


def make_producer(kafka: KafkaSettings, **overrides: Any) -> Producer:
    conf = {**kafka.producer_config(), "logger": _kafka_log, **overrides}
    return Producer(conf)


class DeliveryTracker:
    """Collects delivery reports so a batch is committed only after every record is acked."""

    def __init__(self, producer: Producer) -> None:
        self.producer = producer
        self.errors: list[str] = []
        self.delivered = 0

    def on_delivery(self, err: Any, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err}")
        else:
            self.delivered += 1

    def produce(
        self,
        topic: str,
        key: bytes | str | None,
        value: bytes | None,
        headers: list[tuple[str, str | bytes | None]] | None = None,
    ) -> None:
        while True:
            try:
                self.producer.produce(
                    topic, key=key, value=value, headers=headers, on_delivery=self.on_delivery
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self.producer.poll(0.05)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every outstanding record; raise DeliveryError if any was not acked."""
        remaining = self.producer.flush(timeout_s)
        if remaining:
            raise DeliveryError(f"{remaining} records not acknowledged within {timeout_s}s")
        if self.errors:
            errors, self.errors = self.errors, []
            raise DeliveryError(f"{len(errors)} records failed, first: {errors[0]}")


def commit_offsets(consumer: Consumer, next_offsets: Mapping[tuple[str, int], int]) -> None:
    """Synchronously commit `next_offsets` (the offset of the next record to read)."""
    if not next_offsets:
        return
    tps = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
    try:
        consumer.commit(offsets=tps, asynchronous=False)
    except KafkaException as exc:
        err = exc.args[0]
        raise KafkaError(f"offset commit failed: {err.str()}", code=err.name()) from exc


def wait_for_assignment(consumer: Consumer, timeout_s: float) -> list[TopicPartition]:
    """Poll until the group assigns partitions (tests and tools)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer.poll(0.1)
        assigned = consumer.assignment()
        if assigned:
            return list(assigned)
    raise KafkaError(f"no partitions assigned within {timeout_s}s")
