"""Which input partitions this process owns, and the state it needs before processing them.

On assignment, every partition whose local store lacks committed events (new machine, lost
disk, the partition was processed elsewhere meanwhile) is restored from the changelog before
the first record of it is processed; readiness waits meanwhile. Revoked and lost partitions
are simply dropped: every batch is committed before the next poll, so nothing is pending.
"""

from __future__ import annotations

import logging

from confluent_kafka import Consumer, TopicPartition

from stream.config import KafkaSettings
from stream.kafka.lag import LagTracker
from stream.metrics import ProcessorMetrics
from stream.ops import Health
from stream.state import SessionStore
from stream.state.changelog import restore_partitions

logger = logging.getLogger(__name__)


class Assignment:
    def __init__(
        self,
        kafka: KafkaSettings,
        changelog: str,
        store: SessionStore,
        lag: LagTracker,
        metrics: ProcessorMetrics,
        health: Health,
    ) -> None:
        self.kafka, self.changelog, self.store = kafka, changelog, store
        self.lag, self.metrics, self.health = lag, metrics, health
        self.partitions: set[tuple[str, int]] = set()
        self._applied: dict[tuple[str, int], int] = {}

    def applied_offset(self, topic: str, partition: int) -> int:
        """The last input offset this store applied (cached; -1 if none)."""
        key = (topic, partition)
        if key not in self._applied:
            self._applied[key] = self.store.applied_offset(topic, partition)
        return self._applied[key]

    def note_applied(self, applied: dict[tuple[str, int], int]) -> None:
        self._applied.update(applied)

    def on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = consumer.committed(partitions, timeout=30) if partitions else []
        self.lag.on_assign(committed)
        behind: dict[tuple[str, int], int] = {}
        for tp in committed:
            key = (tp.topic, tp.partition)
            self._applied.pop(key, None)
            # Behind: the group committed events this store never applied.
            if tp.offset >= 0 and self.applied_offset(*key) < tp.offset - 1:
                behind[key] = tp.offset
        self._restore(behind)
        self.partitions.update((tp.topic, tp.partition) for tp in partitions)
        self._changed("assign", partitions)

    def on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.partitions.discard((tp.topic, tp.partition))
            self._applied.pop((tp.topic, tp.partition), None)
        self.lag.on_revoke(partitions)
        self._changed("revoke", partitions)

    def on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        logger.warning("partitions lost without a revoke (session expired?); their new owner "
                       "replays from the last commit")  # fmt: skip
        self.on_revoke(consumer, partitions)

    def _changed(self, kind: str, partitions: list[TopicPartition]) -> None:
        self.metrics.rebalances.labels(kind).inc()
        self.metrics.assigned.set(len(self.partitions))
        self.health.assigned = len(self.partitions)
        logger.info("%s %s -> now %s", kind, sorted(tp.partition for tp in partitions),
                    sorted(p for _, p in self.partitions))  # fmt: skip

    def _restore(self, behind: dict[tuple[str, int], int]) -> None:
        if not behind:
            return
        logger.info("restoring %s from %s", sorted(behind), self.changelog)
        self.health.restoring += len(behind)
        self.metrics.restoring.set(len(behind))
        try:
            by_partition = {p: c for (_, p), c in behind.items()}
            topics = {p: t for (t, p) in behind}
            # Sessions land in chunks; each partition's marker only after all of its sessions,
            # so a crash mid-restore leaves the store behind and the next assignment restores
            # again.
            results = restore_partitions(
                self.kafka,
                self.changelog,
                by_partition,
                lambda partition, sessions: self.store.write(sessions, {}),
            )
            for partition, result in results.items():
                topic = topics[partition]
                self.store.write({}, {(topic, partition): by_partition[partition] - 1})
                self.metrics.restored_records.inc(result.records)
                self.metrics.restore_seconds.observe(result.seconds)
                logger.info(
                    "restored %s[%d]: %d changelog records, %d sessions, %d uncommitted "
                    "events cut, %.2fs",
                    topic, partition, result.records, result.sessions,
                    result.events_dropped, result.seconds,
                )  # fmt: skip
        finally:
            self.health.restoring -= len(behind)
            self.metrics.restoring.set(0)
