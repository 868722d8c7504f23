"""Consumer-group lag that is right on the embedded broker too.

Tansu 0.6.0 answers list-offsets (`get_watermark_offsets`, `list_offsets(latest)`) with the
start of the last record batch + 1, so lag computed from it is too small. The high watermark
carried in every fetch response is right, and librdkafka caches it: `LagProbe` keeps a
non-committing consumer fetching the topic's tail and reads that cached value. On Apache Kafka
both agree, so the same code serves both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_END, Consumer, Message, TopicPartition

from stream.config import KafkaSettings
from stream.kafka.admin import partition_count
from stream.kafka.clients import ClosingContext, make_consumer
from stream.metrics import ProcessorMetrics


@dataclass(frozen=True)
class PartitionLag:
    partition: int
    committed: int | None  # None: the group has committed nothing on this partition yet
    end: int | None  # None: no fetch has reported the high watermark yet
    start: int

    @property
    def lag(self) -> int | None:
        if self.end is None:
            return None
        return max(self.end - (self.committed if self.committed is not None else self.start), 0)


class LagProbe(ClosingContext):
    """Reads the group's committed offsets and the topic's true end offsets. Never commits."""

    def __init__(self, kafka: KafkaSettings, group: str, topic: str) -> None:
        self.topic = topic
        self.partitions = [TopicPartition(topic, p) for p in range(partition_count(kafka, topic))]
        # group.id names the group whose commits we read; assign() (not subscribe) means this
        # consumer never joins that group, so it cannot steal partitions or commit.
        self._consumer: Consumer = make_consumer(kafka, group)
        self._consumer.assign(
            [TopicPartition(topic, tp.partition, OFFSET_END) for tp in self.partitions]
        )
        self.consumed = 0

    def pump(self, timeout_s: float = 0.0) -> list[Message]:
        """Drive fetches (and so the cached high watermarks); returns the records seen."""
        msgs = self._consumer.consume(10_000, timeout=timeout_s)
        self.consumed += len(msgs)
        return msgs

    def snapshot(self, timeout_s: float = 5.0) -> list[PartitionLag]:
        committed = self._consumer.committed(self.partitions, timeout=timeout_s)
        out = []
        for tp, done in zip(self.partitions, committed, strict=True):
            low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            out.append(
                PartitionLag(
                    partition=tp.partition,
                    committed=done.offset if done.offset >= 0 else None,
                    end=high if high >= 0 else None,
                    start=max(low, 0),
                )
            )
        return out

    def wait_until_fetched(self, timeout_s: float = 10.0) -> bool:
        """Pump until every partition has reported a high watermark."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump(0.1)
            if all(p.end is not None for p in self.snapshot()):
                return True
        return False

    def close(self) -> None:
        self._consumer.close()


class LagTracker:
    """The processor's own lag: fetch high watermark (cached by its consumer) - committed.

    Updated from the processor loop at most every `every_s`; exported as
    kafka_consumergroup_lag{consumergroup,topic,partition}.
    """

    def __init__(self, consumer: Consumer, metrics: ProcessorMetrics, every_s: float = 1.0):
        self._consumer = consumer
        self._metrics = metrics
        self.every_s = every_s
        self._committed: dict[tuple[str, int], int] = {}
        self._last = 0.0
        self.by_partition: dict[tuple[str, int], int] = {}

    @property
    def total(self) -> int:
        return sum(self.by_partition.values())

    def on_assign(self, partitions: list[TopicPartition]) -> None:
        # The group's committed offsets for partitions new to this process (from the broker).
        for tp in self._consumer.committed(partitions, timeout=10):
            self._committed[(tp.topic, tp.partition)] = tp.offset
        self._last = 0.0

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._committed.pop(key, None)
            self.by_partition.pop(key, None)
            self._metrics.drop_lag(tp.topic, tp.partition)

    def on_commit(self, next_offsets: dict[tuple[str, int], int]) -> None:
        self._committed.update(next_offsets)

    def maybe_update(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return False
        self._last = now
        for (topic, partition), committed in list(self._committed.items()):
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True
            )
            if high < 0:  # no fetch response yet
                continue
            lag = max(high - (committed if committed >= 0 else max(low, 0)), 0)
            self.by_partition[(topic, partition)] = lag
            self._metrics.set_lag(topic, partition, lag)
        return True


class StallWatch:
    """Says when to warn that the consumer is stalled: records wait (lag > 0) but no poll has
    returned one for `after_s`, then again every `after_s` while it lasts.

    On the embedded broker a consumer far behind on a log of many small batches gets empty
    fetches at a short fetch.wait.max.ms, for good (README, embedded broker limits); the lag
    from fetch responses still shows the waiting records, so this sees it."""

    def __init__(self, after_s: float) -> None:
        self.after_s = after_s
        self._flowing: float | None = None  # last time records came or none waited
        self._warned = -float("inf")

    def observe(self, consumed: int, lag: int, now: float) -> float | None:
        """After each poll: the seconds stalled when a warning is due, else None."""
        if self._flowing is None or consumed > 0 or lag <= 0:
            self._flowing = now
            return None
        stalled = now - self._flowing
        if stalled < self.after_s or now - self._warned < self.after_s:
            return None
        self._warned = now
        return stalled
