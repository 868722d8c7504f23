"""The processor loop: poll → decode → update sessions → score batch → produce → commit.

One poll batch is the unit of work. Every touched user is scored once per batch and gets one
output record, whose partition/offset are those of the user's last click applied.

at-least-once (default): the batch's sessions and the last input offset applied per partition
go to RocksDB in one WriteBatch, and the changelog records to the producer, while the model
scores the first chunk of users on the model thread; each chunk's outputs are produced as it
is ranked, then the dead letters; once every record is acknowledged, offsets are committed.
A redelivered event (offset ≤ the store's marker) is recognised and not appended twice.
exactly-once: outputs, changelog and offsets go in one Kafka transaction; RocksDB is written
after it commits (a crash in between restores the partition from the changelog).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing

import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from export.bundle import Bundle
from stream.assignment import Assignment
from stream.batch import (
    Batch,
    Forget,
    Touched,
    control_in,
    dead_letter_headers,
    decode_control,
    in_offset_order,
    now_ms,
    source_of,
)
from stream.catalogue import CatalogueFollower, follow_items
from stream.codec import ClickEvent, Invalid, decode_click_checked, valid_click
from stream.config import ProcessorSettings
from stream.errors import DeliveryError
from stream.explain import SimilarityExplainer
from stream.incremental import kv_cache_of, make_scorer, release_kv
from stream.itemtable import ItemTable
from stream.kafka.admin import partition_count
from stream.kafka.clients import DeliveryTracker, commit_offsets, make_consumer, make_producer
from stream.kafka.lag import LagTracker, StallWatch
from stream.metrics import ProcessorMetrics
from stream.ops import Health, OpsServer
from stream.recommend import Recommended, recommend, recommendation_record
from stream.reload import BundleSource
from stream.scoring import Explainer, Scorer
from stream.state import RocksSessionStore, Session, SessionStore
from stream.state.changelog import ChangelogWriter, changelog_topic, ensure_changelog
from stream.stats import ProcessorStats, Timer
from stream.swap import next_model

logger = logging.getLogger(__name__)
audit = logging.getLogger("streamrec.audit")

# A decoded record: the record, its event, and (topic, partition, offset).
Decoded = tuple[Message, ClickEvent | Forget, tuple[str, int, int]]


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
        self.exactly_once = settings.processing_guarantee == "exactly-once"
        self.metrics = ProcessorMetrics(settings.group)
        self.health = Health(liveness_timeout_s=settings.liveness_timeout_s)
        self.source = BundleSource(settings.bundle)
        # The store first: the incremental path's K/V cache persists in it.
        self.store: SessionStore = store or RocksSessionStore(settings.state_dir / "sessions")
        try:
            self.scorer: Scorer = scorer or make_scorer(self.source.bundle, settings, self.store)
        except BaseException:
            self.store.close()
            raise
        # The items topic: new items enter the scoring table between batches.
        self.items_follower: CatalogueFollower | None = follow_items(settings, self.metrics)
        self._use_bundle(self.source.bundle, self.scorer)
        self.health.state_open = True
        self.stats = ProcessorStats()
        self.consumer: Consumer = make_consumer(
            settings.kafka,
            settings.group,
            **{"statistics.interval.ms": 1000, "stats_cb": self._on_stats},
        )
        producer_conf = {}
        if self.exactly_once:
            producer_conf["transactional.id"] = f"{settings.group}-{settings.state_dir.resolve()}"
        self.delivery = DeliveryTracker(make_producer(settings.kafka, **producer_conf))
        self.changelog = ChangelogWriter(changelog_topic(settings.group), self.delivery)
        self.lag = LagTracker(self.consumer, self.metrics)
        self.stall = StallWatch(settings.stall_warn_s)
        self.assignment = Assignment(
            settings.kafka, self.changelog.topic, self.store, self.lag, self.metrics, self.health
        )
        # The model's thread: a batch's next chunk is scored there while this one's is ranked.
        self._model_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="streamrec-model")
            if settings.score_overlap
            else None
        )
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
        # The scoring table (bundle items + runtime items: add_items/remove_items on it or on
        # the scorer); a swap starts a fresh one, in the new model's item space.
        self.items: ItemTable = getattr(scorer, "items", None) or ItemTable(bundle.item_ids, None)
        self.stride = bundle.step.stride if bundle.step is not None else 1  # the window rule
        self.max_len = self.settings.session_max_len or bundle.max_len
        # Seam: when set, explain(best, item_seq, item_vectors) -> because (B, k) runs after
        # top-k and each recommended item carries the window item that explains it.
        has_vectors = self.items.view.bundle_vectors is not None
        wanted = self.settings.explain and has_vectors
        self.explain: Explainer | None = SimilarityExplainer() if wanted else None
        if self.items_follower is not None:
            self.items_follower.catalogue.attach(bundle, self.items)
        self.metrics.set_model(scorer.model_version)
        self.health.model_version = scorer.model_version

    @property
    def item_index(self) -> dict[str, int]:
        """item id -> index of every item a click may name (bundle and runtime items)."""
        return self.items.view.index

    @property
    def ops_address(self) -> str | None:
        """host:port of /metrics, /livez, /readyz (None when disabled)."""
        return None if self._ops is None else self._ops.address

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish its current batch and exit (safe from signal handlers)."""
        self._stop.set()

    def run(self) -> None:
        topic = self.settings.topics.clicks
        if self._ops is not None:
            self._ops.start()
        ensure_changelog(
            self.settings.kafka,
            self.changelog.topic,
            partition_count(self.settings.kafka, topic),
            self.settings.topics.replication_factor,
        )
        if self.exactly_once:
            self.delivery.producer.init_transactions(30)
        if self.items_follower is not None:
            self.items_follower.bootstrap(self.settings.items_bootstrap_s)
        self.consumer.subscribe(
            [topic],
            on_assign=self.assignment.on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        logger.info(
            "processor started: group=%s topic=%s model=%s state=%s guarantee=%s",
            self.settings.group,
            topic,
            self.bundle.model_version,
            self.settings.state_dir,
            self.settings.processing_guarantee,
        )
        self.health.started = True
        try:
            while not self._stop.is_set():
                self.health.beat()
                self._maybe_reload()
                if self.items_follower is not None:
                    self.items_follower.poll()
                msgs = self._poll_batch()
                if msgs:
                    self.process_batch(msgs)
                if self.lag.maybe_update():
                    self.metrics.sessions.set(self.store.approx_sessions())
                self._check_stall(len(msgs))
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

    def _check_stall(self, consumed: int) -> None:
        stalled = self.stall.observe(consumed, self.lag.total, time.monotonic())
        if stalled is None:
            return
        self.metrics.errors.labels("stalled").inc()
        logger.warning(
            "no record fetched for %.0f s while %d wait on the assigned partitions (lag from "
            "fetch responses). On the embedded Tansu broker a consumer far behind on a log of "
            "many small batches gets only empty fetches at a short fetch.wait.max.ms (README, "
            "embedded broker limits): restart with STREAMREC_KAFKA__FETCH_WAIT_MAX_MS=500 to "
            "drain the backlog, or use a fresh broker",
            stalled,
            self.lag.total,
        )

    def close(self) -> None:
        self.health.stopping = True
        # close() leaves the group at once; a vanished member stalls the next join for ~80 s.
        self.delivery.producer.flush(10)
        self.consumer.close()
        if self.items_follower is not None:
            self.items_follower.close()
        if self._model_thread is not None:
            self._model_thread.shutdown()
        release_kv(self.scorer, None)
        self.store.close()
        self.health.state_open = False
        if self._ops is not None:
            self._ops.stop()
        logger.info("processor stopped after %d events", self.stats.consumed)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        release_kv(self.scorer, {tp.partition for tp in partitions})
        self.assignment.on_revoke(consumer, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        release_kv(self.scorer, {tp.partition for tp in partitions})
        self.assignment.on_lost(consumer, partitions)

    def _on_stats(self, raw: str) -> None:
        """librdkafka statistics (every second, from poll): is any broker connection up?"""
        try:
            brokers = orjson.loads(raw).get("brokers", {})
        except orjson.JSONDecodeError:
            return
        self.health.broker_up = any(
            b.get("state") == "UP" for b in brokers.values() if b.get("nodeid", -1) >= 0
        )

    # -- model reload --------------------------------------------------------------------------
    def _maybe_reload(self) -> None:
        """Between batches: swap to a newly published bundle (models root + CURRENT)."""
        now = time.monotonic()
        if now - self._last_reload_check < self.settings.reload_check_s:
            return
        self._last_reload_check = now
        swap = next_model(
            self.source, self.settings, self.store, self.metrics, self.bundle.model_version
        )
        if swap is not None:
            self._use_bundle(*swap)

    # -- the batch -------------------------------------------------------------------------------
    def _timed(self, stage: str) -> Timer:
        return Timer(self.stats, stage, self.metrics.stage_seconds.labels(stage).observe)

    def process_batch(self, msgs: Sequence[Message]) -> None:
        batch = Batch()
        with self._timed("decode"):
            events = self._decode(in_offset_order(msgs), batch)
        with self._timed("state"):
            self._apply(events, batch)
        if self.exactly_once:
            self.delivery.producer.begin_transaction()
        # The score stage also writes the batch's sessions (RocksDB, at-least-once) and their
        # changelog records, and hands each output to the producer as its chunk is ranked:
        # that work overlaps the model's (Processor._score).
        with self._timed("score"):
            self._score(batch, send=True)
        with self._timed("produce"):
            self._produce(batch)
        with self._timed("commit"):
            self._commit(batch)
        self.stats.end_batch(len(msgs))
        self.metrics.consumed.inc(len(msgs))
        self.metrics.batch_size.observe(len(msgs))

    def _decode(self, msgs: Sequence[Message], batch: Batch) -> list[Decoded]:
        """Each record's event, or its dead letter. The loop runs once per record (a fifth of a
        batch's time at full speed), so it reads each accessor once and gives a valid click
        the straight path; a refused record then takes the rule-by-rule decoder."""
        now = now_ms()
        limits = self.settings.limits
        events: list[Decoded] = []
        known = self.item_index
        next_offsets = batch.next_offsets
        for msg in msgs:
            if msg.error() is not None:
                logger.warning("consume error: %s", msg.error())
                self.metrics.errors.labels("consume").inc()
                continue
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            assert topic is not None and partition is not None and offset is not None
            next_offsets[topic, partition] = offset + 1
            key, value, headers = msg.key(), msg.value(), msg.headers()
            control = control_in(headers) if headers else None
            result: ClickEvent | Forget | Invalid | None
            if control is not None:
                result = decode_control(control, key, value)
            else:  # decode_click's two steps, positional: its keywords cost ~1 µs a record
                result = valid_click(key, value, known, now, limits)
                if result is None:  # refused by the straight path: find the rule it breaks
                    result = decode_click_checked(
                        key, value, known_items=known, now_ms=now, limits=limits
                    )
            if isinstance(result, Invalid):
                batch.dead.append((msg, result))
            else:
                events.append((msg, result, (topic, partition, offset)))
        return events

    def _apply(self, events: list[Decoded], batch: Batch) -> None:
        applied = 0
        for msg, event, (topic, partition, offset) in events:
            user = event.user_id
            touched = batch.touched.get(user)
            if touched is None:
                touched = batch.touched[user] = Touched(self.store.get(user), msg, event)
            else:
                touched.msg, touched.event = msg, event
            if offset <= self.assignment.applied_offset(topic, partition):
                # Redelivered after a crash between the store write and the commit.
                self.stats.replayed += 1
                self.metrics.replayed.inc()
                continue
            if isinstance(event, Forget):
                touched.session = None
                audit.info("forget user %s (request at %s[%d]@%d)", user, topic, partition, offset)
                continue
            if touched.session is None:
                touched.session = Session()
            touched.session.append(event.item_id, event.ts, partition, offset, self.max_len)
            applied += 1
        self.stats.applied += applied
        self.metrics.applied.inc(applied)

    def _write_state(self, batch: Batch) -> None:
        # A marker never moves back: a batch of nothing but replays must not lower it.
        applied = {
            k: max(v - 1, self.assignment.applied_offset(*k)) for k, v in batch.next_offsets.items()
        }
        self.store.write(batch.encoded_sessions(), applied)
        self.assignment.note_applied(applied)

    def _score(self, batch: Batch, *, send: bool = False) -> None:
        """Every touched user once (stream.recommend); a forgotten user gets a tombstone.

        With `send` (process_batch): while the model scores the first chunk of users (on the
        model thread), this thread writes the sessions and their changelog records
        (`_persist`), and each output goes to the producer as soon as its chunk is ranked.
        Nothing is committed before `_produce` has every record acknowledged, so the order of
        these writes is free. Without (benchmarks.scaling), outputs are only collected.
        """
        users, sessions = [], []
        for user, touched in batch.touched.items():
            if touched.session is None:
                self._output(batch, user, None, send)  # a tombstone: the user was forgotten
                if (cache := kv_cache_of(self.scorer)) is not None:
                    cache.drop([user])  # derived from the forgotten history: it goes too
            else:
                users.append(user)
                sessions.append(touched.session)
        meanwhile = (lambda: self._persist(batch)) if send else None
        if not users:
            if meanwhile is not None:
                meanwhile()
            return
        chunks = recommend(
            self.scorer, users, sessions, self.items.view, stride=self.stride,
            k=self.settings.top_k, explain=self.explain, executor=self._model_thread,
            meanwhile=meanwhile,
        )  # fmt: skip
        version = self.scorer.model_version
        # closing: if this loop fails, the chunk still in the model is waited for at once,
        # not when the traceback lets go of the generator.
        with closing(chunks):
            self._collect(batch, users, chunks, version, send)

    def _collect(
        self,
        batch: Batch,
        users: list[str],
        chunks: Iterable[tuple[list[int], Recommended]],
        version: str,
        send: bool,
    ) -> None:
        """Each ranked chunk's outputs (or dead letters for the rows the model refused)."""
        for rows, done in chunks:
            self.metrics.scored.inc(len(rows) - len(done.failed))
            for j, row in enumerate(rows):
                user = users[row]
                touched = batch.touched[user]
                items = done.lists[j]
                if items is None:
                    # The session keeps the (valid) event; only this user's output is skipped.
                    batch.failed.add(user)
                    self.metrics.errors.labels("scoring").inc()
                    reason = str(done.failed[j])[:200]
                    batch.dead.append((touched.msg, Invalid("scoring_failed", reason)))
                    continue
                _, partition, offset = source_of(touched.msg)
                value, event_ts = recommendation_record(
                    user, items, version, (partition, offset), touched.event
                )
                self._output(batch, user, value, send)
                batch.event_ts.append(event_ts)

    def _output(self, batch: Batch, user: str, value: bytes | None, send: bool) -> None:
        batch.outputs.append((user, value))
        if send:
            self.delivery.produce(self.settings.topics.recs, user.encode("utf-8"), value)

    def _persist(self, batch: Batch) -> None:
        """The batch's sessions to RocksDB (at-least-once: exactly-once writes them after its
        transaction commits) and to the changelog."""
        if not self.exactly_once:
            self._write_state(batch)
        encoded = batch.encoded_sessions()
        for user, touched in batch.touched.items():
            _, partition, offset = source_of(touched.msg)
            # The header must cover the session's content: after a replay the stored session
            # may already hold events beyond this batch's records.
            covered = max(offset, touched.session.offset) if touched.session else offset
            self.changelog.write(user, encoded[user], partition, covered)

    def _produce(self, batch: Batch) -> None:
        """The dead letters, then every record of the batch acknowledged (at-least-once)."""
        for msg, invalid in batch.dead:
            headers = dead_letter_headers(msg, invalid)
            self.delivery.produce(self.settings.topics.dlq, msg.key(), msg.value(), headers)
        if not self.exactly_once:
            try:
                self.delivery.flush(timeout_s=300, beat=self.health.beat)
            except DeliveryError:
                self.metrics.errors.labels("delivery").inc()
                raise
            self._delivered(batch)

    def _delivered(self, batch: Batch) -> None:
        acked = now_ms()
        for ts in batch.event_ts:
            self.metrics.end_to_end.observe((acked - ts) / 1000)
        self.stats.outputs += len(batch.outputs)
        self.metrics.produced.inc(len(batch.outputs))
        for _, invalid in batch.dead:
            self.stats.dead_letters[invalid.reason] += 1
            self.metrics.dead_letters.labels(invalid.reason).inc()

    def _commit(self, batch: Batch) -> None:
        if self.exactly_once:
            self._commit_transaction(batch)
            return
        if not commit_offsets(self.consumer, batch.next_offsets, beat=self.health.beat):
            self.metrics.errors.labels("commit_lost").inc()
        self.lag.on_commit(batch.next_offsets)

    def _commit_transaction(self, batch: Batch) -> None:
        """Outputs, changelog, dead letters and offsets commit together, or none of them does.

        Any failure raises: the process restarts, the transaction is aborted by the broker,
        and the batch is replayed from the last committed offsets.
        """
        producer = self.delivery.producer
        offsets = [TopicPartition(t, p, o) for (t, p), o in batch.next_offsets.items()]
        producer.send_offsets_to_transaction(offsets, self.consumer.consumer_group_metadata(), 30)
        producer.commit_transaction(60)
        self.delivery.flush(timeout_s=60, beat=self.health.beat)
        self._delivered(batch)
        self._write_state(batch)
        self.lag.on_commit(batch.next_offsets)

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
