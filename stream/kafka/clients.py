"""Consumer and producer construction, delivery tracking and offset commits."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from stream.config import KafkaSettings
from stream.errors import DeliveryError, KafkaError

logger = logging.getLogger(__name__)
_kafka_log = logging.getLogger("librdkafka")


class ClosingContext:
    """`with X(...) as x:` calls `x.close()` on the way out, whatever happened."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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
        partition: int = -1,  # -1: the partitioner chooses (by key)
    ) -> None:
        while True:
            try:
                self.producer.produce(
                    topic,
                    key=key,
                    value=value,
                    headers=headers,
                    partition=partition,
                    on_delivery=self.on_delivery,
                )
                return
            except BufferError:
                # The local queue is full: serve delivery reports until there is room.
                self.producer.poll(0.05)

    def flush(self, timeout_s: float = 30.0, beat: Callable[[], None] | None = None) -> None:
        """Wait for every outstanding record; raise DeliveryError if any was not acked.

        Waits in one-second slices, calling `beat` in between: a broker that is slow or briefly
        unreachable is waited for (the producer retries until message.timeout.ms) without the
        loop looking stuck.
        """
        deadline = time.monotonic() + timeout_s
        remaining = self.producer.flush(min(1.0, timeout_s))
        while remaining and time.monotonic() < deadline:
            if beat is not None:
                beat()
            remaining = self.producer.flush(1.0)
        if remaining:
            raise DeliveryError(f"{remaining} records not acknowledged within {timeout_s}s")
        if self.errors:
            errors, self.errors = self.errors, []
            raise DeliveryError(f"{len(errors)} records failed, first: {errors[0]}")


# The group moved on without us: these partitions now belong to another member, which will
# replay from the last commit. Not an error of ours, and retrying cannot succeed.
_LOST = {"ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "FENCED_INSTANCE_ID", "_ASSIGNMENT_LOST"}


def commit_offsets(
    consumer: Consumer,
    next_offsets: Mapping[tuple[str, int], int],
    *,
    retry_for_s: float = 300.0,
    beat: Callable[[], None] | None = None,
) -> bool:
    """Synchronously commit `next_offsets` (the offset of the next record to read).

    Retries retriable errors (a timed-out or moving coordinator, a rebalance under way) for up
    to `retry_for_s`. Returns False when the partitions were lost to another member: the
    commit is dropped and the new owner replays those records (the store recognises them if
    they come back here).
    """
    if not next_offsets:
        return True
    tps = [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()]
    deadline = time.monotonic() + retry_for_s
    delay = 0.1
    while True:
        try:
            consumer.commit(offsets=tps, asynchronous=False)
            return True
        except KafkaException as exc:
            err = exc.args[0]
            if err.name() in _LOST:
                logger.warning("commit dropped, partitions were reassigned: %s", err.str())
                return False
            if not err.retriable() and err.name() != "REBALANCE_IN_PROGRESS":
                raise KafkaError(f"offset commit failed: {err.str()}", code=err.name()) from exc
            if time.monotonic() > deadline:
                raise KafkaError(f"offset commit kept failing: {err.str()}", err.name()) from exc
            logger.warning("commit failed (%s), retrying in %.1fs", err.name(), delay)
            if beat is not None:
                beat()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def wait_for_assignment(consumer: Consumer, timeout_s: float) -> list[TopicPartition]:
    """Poll until the group assigns partitions (tests and tools)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        consumer.poll(0.1)
        assigned = consumer.assignment()
        if assigned:
            return list(assigned)
    raise KafkaError(f"no partitions assigned within {timeout_s}s")
