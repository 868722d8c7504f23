"""The sessions changelog: a compacted topic that can rebuild any partition's state.

Every batch writes each touched user's whole session to `<group>-sessions-changelog`, in the
partition of the user's input records (same partition count as the input), with the input
offset it covers in a header. Restoring a partition replays it from the beginning and cuts
every session back to the events whose input offsets were committed (the Quix approach, done
per event rather than per record so that compaction keeping only an uncommitted write cannot
lose the committed events under it). The consumer then resumes at the committed offset, and
the cut events are applied again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from stream.config import KafkaSettings
from stream.errors import KafkaError as StreamKafkaError
from stream.errors import StateError
from stream.kafka.clients import DeliveryTracker, make_consumer
from stream.state.store import Session

logger = logging.getLogger(__name__)

SOURCE_OFFSET = "streamrec.source.offset"


def changelog_topic(group: str) -> str:
    return f"{group}-sessions-changelog"


def ensure_changelog(kafka: KafkaSettings, topic: str, partitions: int, rf: int = 1) -> None:
    """Create the compacted changelog (idempotent); refuse one with the wrong partition count."""
    admin = AdminClient(kafka.librdkafka())
    spec = NewTopic(topic, partitions, rf, config={"cleanup.policy": "compact"})
    future = admin.create_topics([spec])[topic]
    try:
        future.result(timeout=15)
        logger.info("created changelog topic %s (%d partitions)", topic, partitions)
    except KafkaException as exc:
        if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
            raise StreamKafkaError(f"cannot create {topic}: {exc.args[0].str()}") from exc
    existing = len(admin.list_topics(topic=topic, timeout=10).topics[topic].partitions)
    if existing != partitions:
        raise StateError(
            f"{topic} has {existing} partitions but the input has {partitions}; the changelog "
            "must mirror the input's partitions (recreate it, then restart)"
        )


class ChangelogWriter:
    def __init__(self, topic: str, delivery: DeliveryTracker) -> None:
        self.topic = topic
        self._delivery = delivery

    def write(
        self, user_id: str, session: Session | bytes | None, partition: int, offset: int
    ) -> None:
        """The user's session (or its encoding; None: a tombstone) with its source offset."""
        value = session.to_bytes() if isinstance(session, Session) else session
        self._delivery.produce(
            self.topic,
            user_id.encode("utf-8"),
            value,
            headers=[(SOURCE_OFFSET, str(offset).encode())],
            partition=partition,
        )


@dataclass
class RestoreResult:
    records: int = 0
    sessions: int = 0  # distinct users written (tombstones included)
    events_dropped: int = 0
    seconds: float = 0.0


Sink = Callable[[int, dict[str, Session | bytes | None]], None]


def restore_partitions(
    kafka: KafkaSettings,
    topic: str,
    committed: dict[int, int],
    sink: Sink,
    *,
    chunk: int = 50_000,
    timeout_s: float = 900.0,
) -> dict[int, RestoreResult]:
    """Read changelog partitions to their ends (one consumer for all of them); every session is
    cut back to the events at input offsets < that partition's `committed` offset and handed to
    `sink(partition, sessions)` in chunks (memory stays bounded for millions of users; a later
    chunk overwrites an earlier one's users, as the changelog's order says)."""
    started = time.monotonic()
    results = {p: RestoreResult() for p in committed}
    buffers: dict[int, dict[str, Session | bytes | None]] = {p: {} for p in committed}
    if not committed:
        return results
    consumer = make_consumer(kafka, f"{topic}-restore", **{"enable.partition.eof": True})
    pending = set(committed)
    try:
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in committed])
        while pending:
            if time.monotonic() - started > timeout_s:
                raise StateError(f"restoring {topic}{sorted(pending)} took over {timeout_s}s")
            for msg in consumer.consume(10_000, timeout=0.2):
                partition = msg.partition()
                assert partition is not None
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise StreamKafkaError(f"restore read failed: {err.str()}", err.name())
                    if partition in pending:
                        pending.discard(partition)
                        _drain(sink, partition, buffers[partition], results[partition])
                        results[partition].seconds = time.monotonic() - started
                    continue
                result, buffer = results[partition], buffers[partition]
                result.records += 1
                user = (msg.key() or b"").decode("utf-8")
                buffer[user] = _cut(msg, committed[partition], result)
                if len(buffer) >= chunk:
                    _drain(sink, partition, buffer, result)
                    logger.info("restoring %s[%d]: %d records", topic, partition, result.records)
    finally:
        consumer.close()
    return results


def _cut(msg: Message, committed: int, result: RestoreResult) -> Session | bytes | None:
    value = msg.value()
    if value is None:
        return None
    if _source_offset(msg) < committed:
        return value  # all of it committed (the common case): stored as is, never decoded
    session = Session.from_bytes(value)
    result.events_dropped += session.truncate_before(committed)
    return session if session.items or session.count else None


def _source_offset(msg: Message) -> int:
    """The last input offset the record's session covers (2**63 if unknown: decode it)."""
    for header in msg.headers() or []:
        if isinstance(header, tuple) and header[0] == SOURCE_OFFSET:
            value = header[1]
            if isinstance(value, bytes) and value.isdigit():
                return int(value)
    return 2**63


def _drain(
    sink: Sink, partition: int, buffer: dict[str, Session | bytes | None], result: RestoreResult
) -> None:
    if buffer:
        sink(partition, dict(buffer))
        result.sessions += len(buffer)
        buffer.clear()
