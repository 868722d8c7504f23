"""The pipeline as a faust-streaming app: `streamrec run --engine faust`.

The same work as stream/processor.py, written the way a Faust team would write it: one agent
over the clicks topic, sessions in a Faust Table on RocksDB, batches from
`stream.take_events(batch_max, within=poll_timeout_s)`. Per batch: decode every record with
the default engine's codec, apply the valid clicks to their users' sessions, score every
touched user in one onnxruntime call (stream.recommend, the default engine's score step),
publish one list per touched user (partition/offset of the user's last click applied) and
dead-letter the rest with the same headers. Faust acks the
batch's events when the loop body returns and commits acked offsets every
`broker_commit_interval`, after flushing its producer (outputs, changelog and dead letters):
at-least-once, like the default engine.

Faust engine
------------
`streamrec run --engine faust` runs the pipeline as a faust-streaming app: the peer the default
engine is measured against, and an option for teams that already run Faust (install the
`faust` extra). It takes the same flags and settings and writes the same `recs` records and
dead letters. `--group` is the Faust app id and its consumer group: do not share it with a
default-engine deployment. Differences:
- State: a Faust Table (`faust-sessions`, RocksDB under `<state-dir>/faust/`) whose changelog
  topic `<group>-faust-sessions-changelog` Faust creates, writes and restores from (one
  partition per input partition). Values are the default engine's session encoding.
- Redeliveries (a crash between a table write and Faust's next offset commit, every 2.8 s)
  are recognised per user: a session holds the input offset of its last event, and an event at
  or below it is not appended again (one user's events are all in one partition, in order).
- Throughput: 2.4–2.6k events/s draining 50k preloaded clicks on the embedded broker (2 shared
  cores, d=64, L=50, 2,000 items) against 28–33k for the default engine, in paired runs on
  the same data (~12x; 1.0–1.5k vs 12–18k when the box was busier). Batches are
  `take_events(--batch-max, within=poll_timeout_s)`, ~300 events each; Faust's per-event
  asyncio path (a task hand-off per record) costs far more than the model. `make bench`
  measures it beside the default engine on the same preloaded clicks (benchmarks/pipeline.py,
  `faust` in pipeline.json).
- Inference: always the full model (model.onnx re-encodes each touched user's window), as
  the default engine's `--inference full`; no step model or K/V cache. The window is the
  default engine's (session_inputs: the bundle's window rule), so both engines publish the
  same lists for the same sessions, also past max_len clicks.
- Not here: incremental inference, hot model reload, runtime items (the items topic),
  explanations (`because`), /metrics /livez /readyz (`--metrics-addr` is ignored),
  exactly-once, SASL/SSL. `forget` requests work (session deleted, tombstone to `recs`).
- A Faust race after table recovery, worked around (`hold_flow_until_seeked`): without the
  guard, about one restart in 20–30 that restored the table from its changelog left an input
  record unprocessed until the next restart (the restart test caught it here and in CI: 49 of
  50 new clicks, then nothing).
- Embedded-broker workaround: Tansu answers list-offsets with the start of a partition's last
  record batch + 1, not its end. On every start Faust checks that a table's persisted changelog
  offset is not above that answer, and a restart on the same state dir crashed with
  ConsistencyError (19 > 17). `producer_max_batch_size=1` (bytes) makes every produced record
  its own batch, so the answer is exact (restores also read the changelog up to it). It cost
  a fifth of the throughput in a paired run (2.3k vs 2.9k events/s); Apache Kafka does not
  need it: drop it in `faust_settings()`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import faust
from faust.streams import _current_event
from faust.types import EventT, StreamT

from stream.batch import (
    CONTROL_HEADER,
    Forget,
    dead_letter_headers_at,
    decode_control,
    now_ms,
)
from stream.codec import ClickEvent, Invalid, decode_click
from stream.config import ProcessorSettings
from stream.errors import ConfigError
from stream.kafka.admin import partition_count
from stream.recommend import recommend, recommendation_record
from stream.reload import BundleSource
from stream.scoring import OnnxScorer
from stream.state import Session

logger = logging.getLogger(__name__)
audit = logging.getLogger("streamrec.audit")

Event = EventT[bytes]  # the clicks topic's records, undecoded (Faust's "raw" codec)
TABLE = "faust-sessions"  # changelog: <group>-faust-sessions-changelog (not the default engine's)


def faust_settings(settings: ProcessorSettings, partitions: int) -> dict[str, Any]:
    """faust.App settings; each departure from Faust's defaults says why."""
    kafka = settings.kafka
    if kafka.security_protocol != "PLAINTEXT":
        raise ConfigError(
            f"--engine faust supports PLAINTEXT connections only, not {kafka.security_protocol}; "
            "use the default engine"
        )
    if settings.processing_guarantee != "at-least-once":
        raise ConfigError("--engine faust is at-least-once only; use the default engine")
    if kafka.extra:
        logger.warning("kafka.extra holds librdkafka settings; the faust engine ignores them")
    return {
        "broker": [f"kafka://{server}" for server in kafka.bootstrap_servers.split(",")],
        "store": "rocksdb://",
        "datadir": settings.state_dir / "faust",
        "topic_partitions": partitions,
        "topic_replication_factor": settings.topics.replication_factor,
        # The embedded broker's list-offsets defect (module docstring): one record per batch.
        "producer_max_batch_size": 1,
        "producer_acks": -1,  # acks=all, as the default engine's producer
        "consumer_auto_offset_reset": "earliest",
        # As KafkaSettings: a crashed member is noticed in seconds, not after Faust's 60 s.
        "broker_session_timeout": kafka.session_timeout_ms / 1000,
        "broker_heartbeat_interval": kafka.heartbeat_interval_ms / 1000,
        "broker_max_poll_records": settings.batch_max,
        "stream_buffer_maxsize": max(4096, 2 * settings.batch_max),
        "web_enabled": False,  # its port 6066 would clash between workers on one host
    }


def hold_flow_until_seeked(app: faust.App) -> None:
    """Keep fetched records out of the stream queues until Faust has seeked after a rebalance.

    Faust's `Recovery.on_recovery_completed` (faust-streaming 0.15.3) sends
    `on_rebalance_complete`, resumes the stream partitions, seeks them to their committed
    offsets (a broker round trip) and only then resumes app flow control, which clears every
    stream queue. After a recovery that read a changelog, flow control is already active and
    the fetcher running, so records fetched inside that round trip reach a queue and advance the
    consumer's read offset; the clear drops a record still queued, and the fetch after the seek
    skips it as already read. It stays unprocessed (and its offset uncommitted) until the next
    restart. faust-streaming/faust#216 fixed the same order in the path without tables.

    Suspending flow control when the rebalance completes holds such a record in Faust's
    conductor, before the queue, until the clear is over. Every sender of
    `on_rebalance_complete` resumes flow control after its seek, or a newer rebalance does.

    Measured with Faust instrumented (queue clears, read offsets at the seek; 2026-11-24), the
    restart test's third phase (a new state dir restored from the changelog): without the
    guard, records reached the stream before the seek in 7 of 20 runs, and one run lost a click
    (cleared at the committed offset; 47 refetched records then skipped as read). With it, in
    36 runs none did and none was lost; 12 held a fetched record until after the clear.
    """

    def suspend_flow(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        app.flow_control.suspend()

    app.on_rebalance_complete.connect(suspend_flow)


@contextmanager
def event_context(event: Event) -> Iterator[None]:
    """Run table reads and writes as if `event` were being processed.

    Faust stores a table key in the RocksDB partition (and changelog partition) of the "current
    event", a context variable its per-event iterator sets. take_events() sets none in the
    agent's task (faust-streaming/faust#497), so a batch sets it per user: that user's event.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


@dataclass
class Touched:
    """A user updated in this batch: the session (None once forgotten) and the last event."""

    session: Session | None
    event: Event
    click: ClickEvent | Forget


@dataclass
class FaustBatch:
    touched: dict[str, Touched] = field(default_factory=dict)
    dead: list[tuple[Event, Invalid]] = field(default_factory=list)
    outputs: list[tuple[str, bytes | None]] = field(default_factory=list)
    replayed: int = 0


@dataclass
class EngineStats:
    """Totals since start; `first_batch` (monotonic s) dates the rate."""

    consumed: int = 0
    batches: int = 0
    outputs: int = 0
    dead_letters: int = 0
    replayed: int = 0
    first_batch: float | None = None
    last_batch: float | None = None

    def add(self, events: int, batch: FaustBatch) -> None:
        self.last_batch = time.monotonic()
        if self.first_batch is None:
            self.first_batch = self.last_batch
        self.consumed += events
        self.batches += 1
        self.outputs += len(batch.outputs)
        self.dead_letters += len(batch.dead)
        self.replayed += batch.replayed


def control_header(event: Event) -> bytes | None:
    """The control header's value if the record is a control request (see stream.batch)."""
    headers = event.message.headers
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    for name, value in items:
        if name == CONTROL_HEADER:
            return value if isinstance(value, bytes) else str(value or "").encode()
    return None


class FaustEngine:
    """A faust.App with one agent; `run()` blocks until SIGTERM/SIGINT and returns 0."""

    def __init__(self, settings: ProcessorSettings, *, stop_after: int | None = None) -> None:
        self.settings = settings
        # Benchmarks: stop as on SIGTERM once this many events are consumed (a drained topic).
        self.stop_after = stop_after
        self.bundle = BundleSource(settings.bundle).bundle
        # The full model over the same window as the default engine (session_inputs and the
        # bundle's window rule): the same lists, without incremental inference.
        self.scorer = OnnxScorer(self.bundle, settings.onnx_threads)
        self.items = self.scorer.items
        self.stride = self.bundle.step.stride if self.bundle.step is not None else 1
        self.max_len = settings.session_max_len or self.bundle.max_len
        topics = settings.topics
        # The table must have the clicks topic's partition count (Faust checks co-partitioning).
        partitions = partition_count(settings.kafka, topics.clicks)
        conf = faust_settings(settings, partitions)
        conf["datadir"].mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
        self.app = faust.App(settings.group, **conf)
        hold_flow_until_seeked(self.app)
        raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
        self.clicks = self.app.topic(topics.clicks, key_type=bytes, value_type=bytes, **raw)
        self.recs = self.app.topic(topics.recs, key_type=bytes, value_type=bytes, **raw)
        self.dlq = self.app.topic(topics.dlq, key_type=bytes, value_type=bytes, **raw)
        # bytes keys and values: Faust stores and logs them as they are (its "raw" codec).
        self.sessions = self.app.Table(
            TABLE, partitions=partitions, key_type=bytes, value_type=bytes
        )
        self.app.agent(self.clicks, name="streamrec.clicks", concurrency=1)(self._agent)
        self.app.timer(settings.log_every_s)(self._log)
        self.stats = EngineStats()

    def run(self) -> int:
        logger.info(
            "faust engine starting: app=%s topic=%s model=%s state=%s",
            self.settings.group,
            self.settings.topics.clicks,
            self.bundle.model_version,
            self.settings.state_dir,
        )
        # The worker installs its own SIGTERM/SIGINT handlers on the event loop: stop the
        # agent, commit acked offsets, flush the producer, close the tables, leave the group.
        worker = faust.Worker(self.app, quiet=True, override_logging=False, redirect_stdouts=False)
        worker.spinner = None  # a progress spinner for terminals, drawn on stdout
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            logger.info("faust engine stopped after %d events", self.stats.consumed)
            return code
        return 0  # pragma: no cover (execute_from_commandline always raises SystemExit)

    async def _agent(self, stream: StreamT[bytes]) -> None:
        # take_events() is on the Stream class, not on the StreamT protocol agents are typed with.
        batches = cast(faust.Stream[bytes], stream).take_events(
            self.settings.batch_max, within=self.settings.poll_timeout_s
        )
        async for events in batches:
            # No await inside a batch: a stop (SIGTERM cancels the agent at an await) falls
            # between batches, never between a batch's table writes and its outputs.
            try:
                batch = self.process(events)
                self._produce(batch)
            except Exception:
                # take_events() acks a batch's events even when the body raises (its finally
                # runs when the generator is closed), and Faust would commit them unprocessed.
                # Exit at once instead, as after kill -9: the batch is redelivered on restart.
                logger.critical("batch failed; exiting without committing it", exc_info=True)
                os._exit(70)
            self.stats.add(len(events), batch)
            if self.stop_after is not None and self.stats.consumed >= self.stop_after:
                self.stop_after = None
                os.kill(os.getpid(), signal.SIGTERM)  # the worker's own graceful stop

    def _produce(self, batch: FaustBatch) -> None:
        """Into Faust's producer buffer, which it flushes before it commits offsets."""
        for user, value in batch.outputs:
            self.recs.send_soon(key=user.encode("utf-8"), value=value)
        for event, invalid in batch.dead:
            msg = event.message
            headers = dead_letter_headers_at(msg.topic, msg.partition, msg.offset, invalid)
            self.dlq.send_soon(key=msg.key, value=msg.value, headers=headers)

    async def _log(self) -> None:
        stats = self.stats
        logger.info(
            "%.0f events/s, %.0f per batch; total %d consumed, %d outputs, %d dead letters, "
            "%d redelivered",
            stats.consumed / max(time.monotonic() - (stats.first_batch or time.monotonic()), 1e-9),
            stats.consumed / max(stats.batches, 1),
            stats.consumed,
            stats.outputs,
            stats.dead_letters,
            stats.replayed,
        )

    # -- the batch (synchronous: no other batch can interleave) -----------------------------
    def process(self, events: Sequence[Event]) -> FaustBatch:
        batch = FaustBatch()
        self._apply(self._decode(events, batch), batch)
        self._write_state(batch)
        self._score(batch)
        return batch

    def _decode(
        self, events: Sequence[Event], batch: FaustBatch
    ) -> list[tuple[Event, ClickEvent | Forget]]:
        now = now_ms()
        decoded: list[tuple[Event, ClickEvent | Forget]] = []
        for event in events:
            msg = event.message
            control = control_header(event)
            result: ClickEvent | Forget | Invalid
            if control is not None:
                result = decode_control(control, msg.key, msg.value)
            else:
                result = decode_click(
                    msg.key,
                    msg.value,
                    known_items=self.items.view.index,
                    now_ms=now,
                    limits=self.settings.limits,
                )
            if isinstance(result, Invalid):
                batch.dead.append((event, result))
            else:
                decoded.append((event, result))
        return decoded

    def _apply(self, decoded: list[tuple[Event, ClickEvent | Forget]], batch: FaustBatch) -> None:
        for event, click in decoded:
            msg = event.message
            user = click.user_id
            touched = batch.touched.get(user)
            if touched is None:
                touched = batch.touched[user] = Touched(self._load(user, event), event, click)
            else:
                touched.event, touched.click = event, click
            session = touched.session
            if _applied(session, msg.partition, msg.offset):
                batch.replayed += 1
                continue
            if isinstance(click, Forget):
                touched.session = None
                audit.info("forget user %s (request at %s[%d]@%d)", user, *_where(event))
                continue
            if session is None:
                session = touched.session = Session()
            session.append(click.item_id, click.ts, msg.partition, msg.offset, self.max_len)

    def _load(self, user: str, event: Event) -> Session | None:
        with event_context(event):
            raw = self.sessions.get(user.encode("utf-8"))
        return None if raw is None else Session.from_bytes(raw)

    def _write_state(self, batch: FaustBatch) -> None:
        """Each touched user's session, in the table partition of that user's last event."""
        for user, touched in batch.touched.items():
            key = user.encode("utf-8")
            with event_context(touched.event):
                if touched.session is not None:
                    self.sessions[key] = touched.session.to_bytes()
                elif key in self.sessions:
                    del self.sessions[key]

    def _score(self, batch: FaustBatch) -> None:
        """The default engine's score step (stream.recommend) with the full model."""
        users = [u for u, t in batch.touched.items() if t.session is not None]
        batch.outputs += [(u, None) for u, t in batch.touched.items() if t.session is None]
        if not users:
            return
        sessions = [cast(Session, batch.touched[u].session) for u in users]
        chunks = recommend(
            self.scorer, users, sessions, self.items.view, stride=self.stride,
            k=self.settings.top_k,
        )  # fmt: skip
        for rows, done in chunks:
            for j, row in enumerate(rows):
                user = users[row]
                touched = batch.touched[user]
                items = done.lists[j]
                if items is None:
                    reason = str(done.failed[j])[:200]
                    batch.dead.append((touched.event, Invalid("scoring_failed", reason)))
                    continue
                _, partition, offset = _where(touched.event)
                value, _ = recommendation_record(
                    user, items, self.scorer.model_version, (partition, offset), touched.click
                )
                batch.outputs.append((user, value))


def _applied(session: Session | None, partition: int, offset: int) -> bool:
    """A redelivery (a crash after the table write, before Faust committed the offset)."""
    return session is not None and session.partition == partition and offset <= session.offset


def _where(event: Event) -> tuple[str, int, int]:
    msg = event.message
    return msg.topic, msg.partition, msg.offset


def run(settings: ProcessorSettings) -> int:
    """`streamrec run --engine faust`."""
    return FaustEngine(settings).run()
