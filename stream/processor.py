"""The processor loop: poll → decode → update sessions → score batch → produce → commit.

One poll batch is the unit of work. Every touched user is scored once per batch and gets one
output record, whose partition/offset are those of the user's last click applied. Offsets are
committed only after every output and dead letter of the batch is acknowledged (at-least-once);
the session store remembers the last offset applied per partition, so a redelivered event is
recognised and not appended to the session twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from export.bundle import Bundle
from export.errors import ExportError
from stream.codec import ClickEvent, Invalid, RecommendedItem, decode_click, encode_recommendation
from stream.config import ProcessorSettings
from stream.errors import DeliveryError, ScoringError, StreamError
from stream.kafka.clients import DeliveryTracker, commit_offsets, make_consumer, make_producer
from stream.kafka.lag import LagTracker
from stream.metrics import ProcessorMetrics
from stream.ops import Health, OpsServer
from stream.reload import BundleSource
from stream.scoring import OnnxScorer, Scorer, left_pad, top_k
from stream.state import RocksSessionStore, Session, SessionStore
from stream.stats import ProcessorStats, Timer

logger = logging.getLogger(__name__)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def source_of(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed record (never None once consumed without error)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


@dataclass
class _Touched:
    """A user updated in this batch: their session and the last source record applied."""

    session: Session
    msg: Message
    event: ClickEvent


@dataclass
class _Batch:
    touched: dict[str, _Touched] = field(default_factory=dict)
    dead: list[tuple[Message, Invalid]] = field(default_factory=list)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    outputs: list[tuple[str, bytes]] = field(default_factory=list)
    event_ts: list[int] = field(default_factory=list)  # per output, for end-to-end latency


class Processor:
    """Consumes clicks, keeps sessions in RocksDB, publishes top-k lists. Run with `run()`."""

    def __init__(
        self,
        settings: ProcessorSettings,
        *,
        store: SessionStore | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = ProcessorMetrics(settings.group)
        self.health = Health(liveness_timeout_s=settings.liveness_timeout_s)
        self.source = BundleSource(settings.bundle)
        self.bundle = self.source.bundle
        self.scorer: Scorer = scorer or OnnxScorer(self.bundle, settings.onnx_threads)
        self._use_bundle(self.bundle, self.scorer)
        self.store: SessionStore = store or RocksSessionStore(settings.state_dir / "sessions")
        self.health.state_open = True
        self.stats = ProcessorStats()
        self.consumer: Consumer = make_consumer(
            settings.kafka,
            settings.group,
            **{"statistics.interval.ms": 1000, "stats_cb": self._on_stats},
        )
        self.delivery = DeliveryTracker(make_producer(settings.kafka))
        self.lag = LagTracker(self.consumer, self.metrics)
        self.assigned: set[tuple[str, int]] = set()
        self._applied: dict[tuple[str, int], int] = {}
        self._stop = threading.Event()
        self._last_log = self._last_reload_check = time.monotonic()
        # Bound now, so a busy port fails at start-up and the address is known at once.
        self._ops = (
            OpsServer(settings.metrics_addr, self.metrics, self.health)
            if settings.metrics_addr
            else None
        )

    def _use_bundle(self, bundle: Bundle, scorer: Scorer) -> None:
        self.bundle, self.scorer = bundle, scorer
        self.item_index = bundle.item_index()
        self.max_len = self.settings.session_max_len or bundle.max_len
        self.metrics.set_model(scorer.model_version)
        self.health.model_version = scorer.model_version

    @property
    def ops_address(self) -> str | None:
        """host:port of /metrics, /livez, /readyz once running (None when disabled)."""
        return None if self._ops is None else self._ops.address

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish its current batch and exit (safe from signal handlers)."""
        self._stop.set()

    def run(self) -> None:
        topic = self.settings.topics.clicks
        if self._ops is not None:
            self._ops.start()
        self.consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        logger.info(
            "processor started: group=%s topic=%s model=%s state=%s",
            self.settings.group,
            topic,
            self.bundle.model_version,
            self.settings.state_dir,
        )
        self.health.started = True
        try:
            while not self._stop.is_set():
                self.health.beat()
                self._maybe_reload()
                msgs = self._poll_batch()
                if msgs:
                    self.process_batch(msgs)
                if self.lag.maybe_update():
                    self.metrics.sessions.set(self.store.approx_sessions())
                self._maybe_log()
        except Exception:
            self.metrics.errors.labels("fatal").inc()
            raise
        finally:
            self.close()

    def _poll_batch(self) -> list[Message]:
        """Wait for the first record, then take whatever else is already fetched.

        consume(n, timeout) would hold a lone record until n arrive or the timeout passes,
        adding the timeout to every event's latency at low rates; under load the local queue
        is full and batches still grow to batch_max.
        """
        first = self.consumer.poll(self.settings.poll_timeout_s)
        if first is None:
            return []
        rest = self.consumer.consume(self.settings.batch_max - 1, timeout=0)
        return [first, *rest]

    def close(self) -> None:
        self.health.stopping = True
        # close() leaves the group at once; a vanished member stalls the next join for ~80 s.
        self.delivery.producer.flush(10)
        self.consumer.close()
        self.store.close()
        self.health.state_open = False
        if self._ops is not None:
            self._ops.stop()
        logger.info("processor stopped after %d events", self.stats.consumed)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.assigned.add((tp.topic, tp.partition))
            self._applied.pop((tp.topic, tp.partition), None)
        self.lag.on_assign(partitions)
        self.metrics.rebalances.labels("assign").inc()
        self.metrics.assigned.set(len(self.assigned))
        self.health.assigned = len(self.assigned)
        logger.info("assigned %s", sorted(p for _, p in self.assigned))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Batches are committed before the next poll, so nothing is pending here.
        for tp in partitions:
            self.assigned.discard((tp.topic, tp.partition))
        self.lag.on_revoke(partitions)
        self.metrics.rebalances.labels("revoke").inc()
        self.metrics.assigned.set(len(self.assigned))
        self.health.assigned = len(self.assigned)
        logger.info("revoked %s", sorted(tp.partition for tp in partitions))

    def _on_stats(self, raw: str) -> None:
        """librdkafka statistics (every second, from poll): is any broker connection up?"""
        try:
            brokers = orjson.loads(raw).get("brokers", {})
        except orjson.JSONDecodeError:
            return
        self.health.broker_up = any(
            b.get("state") == "UP" for b in brokers.values() if b.get("nodeid", -1) >= 0
        )

    def _maybe_reload(self) -> None:
        """Between batches: swap to a newly published bundle (models root + CURRENT)."""
        now = time.monotonic()
        if now - self._last_reload_check < self.settings.reload_check_s:
            return
        self._last_reload_check = now
        try:
            candidate = self.source.check()
        except ExportError as exc:
            self._refused(exc)
            return
        if candidate is None:
            return
        target, bundle = candidate
        try:
            scorer = OnnxScorer(bundle, self.settings.onnx_threads)
        except StreamError as exc:
            self.source.refuse(target)
            self._refused(exc)
            return
        old = self.bundle.model_version
        self.source.accept(target, bundle)
        self._use_bundle(bundle, scorer)
        self.metrics.model_reloads.labels("ok").inc()
        logger.info("model swapped between batches: %s -> %s", old, bundle.model_version)

    def _refused(self, exc: Exception) -> None:
        self.metrics.model_reloads.labels("refused").inc()
        logger.error(
            "refused the new model bundle; still serving %s: %s", self.bundle.model_version, exc
        )

    # -- the batch ---------------------------------------------------------------------------
    def _timed(self, stage: str) -> Timer:
        return Timer(self.stats, stage, self.metrics.stage_seconds.labels(stage).observe)

    def process_batch(self, msgs: Sequence[Message]) -> None:
        batch = _Batch()
        with self._timed("decode"):
            events = self._decode(msgs, batch)
        with self._timed("state"):
            self._apply(events, batch)
        with self._timed("score"):
            self._score(batch)
        with self._timed("produce"):
            self._produce(batch)
        with self._timed("commit"):
            commit_offsets(self.consumer, batch.next_offsets)
        self.lag.on_commit(batch.next_offsets)
        self.stats.end_batch(len(msgs))
        self.metrics.consumed.inc(len(msgs))
        self.metrics.batch_size.observe(len(msgs))

    def _decode(self, msgs: Sequence[Message], batch: _Batch) -> list[tuple[Message, ClickEvent]]:
        now = now_ms()
        limits = self.settings.limits
        events: list[tuple[Message, ClickEvent]] = []
        for msg in msgs:
            if msg.error() is not None:
                logger.warning("consume error: %s", msg.error())
                continue
            topic, partition, offset = source_of(msg)
            batch.next_offsets[(topic, partition)] = offset + 1
            result = decode_click(
                msg.key(), msg.value(), known_items=self.item_index, now_ms=now, limits=limits
            )
            if isinstance(result, Invalid):
                batch.dead.append((msg, result))
            else:
                events.append((msg, result))
        return events

    def _applied_offset(self, topic: str, partition: int) -> int:
        key = (topic, partition)
        if key not in self._applied:
            self._applied[key] = self.store.applied_offset(topic, partition)
        return self._applied[key]

    def _apply(self, events: list[tuple[Message, ClickEvent]], batch: _Batch) -> None:
        for msg, event in events:
            touched = batch.touched.get(event.user_id)
            if touched is None:
                session = self.store.get(event.user_id) or Session()
                touched = batch.touched[event.user_id] = _Touched(session, msg, event)
            else:
                touched.msg, touched.event = msg, event
            topic, partition, offset = source_of(msg)
            if offset <= self._applied_offset(topic, partition):
                # Redelivered after a crash between the store write and the commit.
                self.stats.replayed += 1
                self.metrics.replayed.inc()
                continue
            touched.session.append(event.item_id, event.ts, partition, offset, self.max_len)
            self.stats.applied += 1
            self.metrics.applied.inc()
        applied = {k: v - 1 for k, v in batch.next_offsets.items()}
        self.store.write({u: t.session for u, t in batch.touched.items()}, applied)
        self._applied.update(applied)

    def _score(self, batch: _Batch) -> None:
        if not batch.touched:
            return
        users = list(batch.touched)
        index = self.item_index
        # Items unknown to this bundle (a swap to a smaller catalogue) are left out of the window.
        windows = [[index[i] for i in batch.touched[u].session.items if i in index] for u in users]
        item_seq = left_pad(windows, self.scorer.max_len)
        try:
            scores = self.scorer.score(item_seq)
        except ScoringError:
            logger.exception("batch scoring failed; scoring users one by one")
            scores = self._score_rows(users, item_seq, batch)
        best, best_scores = top_k(scores, item_seq, self.settings.top_k)
        generated = now_ms()
        version = self.scorer.model_version
        item_ids = self.bundle.item_ids
        for row, user in enumerate(users):
            touched = batch.touched.get(user)
            if touched is None:  # dead-lettered by the fallback scorer
                continue
            items = [
                RecommendedItem(item_ids[int(i)], float(s), rank)
                for rank, (i, s) in enumerate(zip(best[row], best_scores[row], strict=True), 1)
                if i > 0
            ]
            _, partition, offset = source_of(touched.msg)
            value = encode_recommendation(
                user_id=user,
                items=items,
                model_version=version,
                partition=partition,
                offset=offset,
                event_ts=touched.event.ts,
                generated_ts=generated,
            )
            batch.outputs.append((user, value))
            batch.event_ts.append(touched.event.ts)
        self.metrics.scored.inc(len(batch.outputs))

    def _score_rows(self, users: list[str], item_seq: np.ndarray, batch: _Batch) -> np.ndarray:
        """Fallback after a failed batch call: a poison row goes to the DLQ, not the batch."""
        rows = []
        for row, user in enumerate(users):
            try:
                rows.append(self.scorer.score(item_seq[row : row + 1])[0])
            except ScoringError as exc:
                touched = batch.touched.pop(user)
                batch.dead.append((touched.msg, Invalid("scoring_failed", str(exc)[:200])))
                rows.append(np.full(len(self.bundle.item_ids), -np.inf, dtype=np.float32))
        return np.stack(rows)

    def _produce(self, batch: _Batch) -> None:
        topics = self.settings.topics
        for user, value in batch.outputs:
            self.delivery.produce(topics.recs, user.encode("utf-8"), value)
        for msg, invalid in batch.dead:
            headers = dead_letter_headers(msg, invalid)
            self.delivery.produce(topics.dlq, msg.key(), msg.value(), headers)
        try:
            self.delivery.flush()
        except DeliveryError:
            self.metrics.errors.labels("delivery").inc()
            raise
        acked = now_ms()
        for ts in batch.event_ts:
            self.metrics.end_to_end.observe((acked - ts) / 1000)
        self.stats.outputs += len(batch.outputs)
        self.metrics.produced.inc(len(batch.outputs))
        for _, invalid in batch.dead:
            self.stats.dead_letters[invalid.reason] += 1
            self.metrics.dead_letters.labels(invalid.reason).inc()

    def _maybe_log(self) -> None:
        if time.monotonic() - self._last_log < self.settings.log_every_s:
            return
        self._last_log = time.monotonic()
        summary = self.stats.summary()
        logger.info(
            "%.0f events/s, %.0f per batch, ms/batch decode %.2f state %.2f score %.2f "
            "produce %.2f commit %.2f; total %d consumed, %d outputs, %d dead letters, lag %d",
            summary["events_per_s"],
            summary["mean_batch"],
            summary["decode_ms_per_batch"],
            summary["state_ms_per_batch"],
            summary["score_ms_per_batch"],
            summary["produce_ms_per_batch"],
            summary["commit_ms_per_batch"],
            self.stats.consumed,
            self.stats.outputs,
            sum(self.stats.dead_letters.values()),
            self.lag.total,
        )


def dead_letter_headers(msg: Message, invalid: Invalid) -> list[tuple[str, str | bytes | None]]:
    """Why and where from: the value stays the original bytes (Kafka Connect's DLQ convention)."""
    return [
        ("streamrec.dlq.reason", invalid.reason.encode()),
        ("streamrec.dlq.detail", invalid.detail.encode("utf-8", "replace")),
        ("streamrec.dlq.topic", (msg.topic() or "").encode()),
        ("streamrec.dlq.partition", str(msg.partition()).encode()),
        ("streamrec.dlq.offset", str(msg.offset()).encode()),
        ("streamrec.dlq.ts", str(now_ms()).encode()),
    ]
