"""End-to-end latency (issue 8): event `ts` → the output record's arrival at a recs consumer.

One in-process processor (as benchmarks/pipeline.py: 1 onnxruntime thread, no metrics server)
runs on a fresh embedded broker; by default every level (and the max-rate step) gets its own
broker, processor and listener (`Stack`), because Tansu's fetches get dearer with every record
batch it stores and a shared broker makes later levels pay for earlier ones. For each load
level (25 / 50 / 75 % of the max rate: --max-rate, by default pipeline.json's
end_to_end.events_per_s, a drain rate with no live producer; with `--max-rate measure`, the
processed rate while a producer offers that drain rate, i.e. the saturation throughput with a
live producer on the same box) a producer process (spawned, so it
does not share the processor's GIL) replays the synthetic clicks, cycled, at the target rate,
re-stamping each event's ts at send time. A listener process (spawned too) assigned to every
recs partition stamps each record's arrival the moment its poll returns and keeps arrival −
the record's `event_ts` (the user's last click in the batch). Records whose event_ts falls in
the warm-up are dropped; with a shared broker the backlog is drained between levels.

Where the time goes, per level: the processor is probed (a subclass, nothing changed in it)
for each click's wait from its produce time to the poll that handed it over (fetch wait plus
queueing behind the batch in progress), and each batch's decode→score, produce+flush and
commit times; outputs give event→generated and generated→arrival.
Producer, processor and listener share the machine's clock; event ts has 1 ms resolution.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Consumer, Message, TopicPartition

from benchmarks.child import die_with_parent
from benchmarks.cpu import CpuMeter
from benchmarks.meta import run_metadata, write_result
from benchmarks.pipeline import ensure_bundle
from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, ProcessorSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.kafka.clients import DeliveryTracker, make_producer
from stream.processor import Processor
from stream.producer import ClickProducer
from stream.replay import iter_source, replay
from stream.stats import STAGES

PARTITIONS = 6


def _ms() -> float:
    return time.time_ns() / 1e6


@dataclass(frozen=True)
class Source:
    """What the replaying client sends: clicks of `path` (stream.replay.iter_source), cycled."""

    path: str = "synthetic"
    linger_ms: int | None = None  # the client's own batching (None: ClickProducer's)


def _produce(bootstrap: str, topic: str, rate: float, seconds: float, source: Source,
             out: mp.Queue) -> None:  # fmt: skip
    """In a spawned process: replay the source's clicks (cycled) at `rate` for `seconds`."""
    die_with_parent()
    events = list(iter_source(source.path))
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    with ClickProducer(kafka, topic) as producer:
        if source.linger_ms is not None:
            linger = {"linger.ms": source.linger_ms}
            producer._delivery = DeliveryTracker(make_producer(kafka, **linger))
        report = replay(itertools.cycle(events), producer, rate=rate, limit=int(rate * seconds))
    out.put({"sent": report.sent, "seconds": report.seconds})


def _listen(bootstrap: str, topic: str, fetch_wait_ms: int, stop: Any, path: str) -> None:
    """In a spawned process: (arrival_ms, event_ts, generated_ts) of every recs record.

    Arrival is stamped when poll() hands over the first record; consume(timeout=0) then takes
    only records already fetched, so no record waits for a batch to fill before its stamp.
    """
    die_with_parent()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "latency-bench",
            "enable.auto.commit": False,
            "fetch.wait.max.ms": fetch_wait_ms,
            "fetch.min.bytes": 1,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])  # fresh topic
    rows: list[tuple[float, int, int]] = []
    while not stop.is_set():
        first = consumer.poll(0.05)
        if first is None:
            continue
        arrival = _ms()
        for msg in [first, *consumer.consume(10_000, timeout=0)]:
            if msg.error() is None and msg.value() is not None:
                body = orjson.loads(msg.value())
                rows.append((arrival, body["event_ts"], body["generated_ts"]))
    consumer.close()
    np.save(path, np.array(rows, dtype=np.float64).reshape(-1, 3))


class ProbedProcessor(Processor):
    """The processor, with each click's produce→poll wait and each batch's stage times kept."""

    def __init__(self, settings: ProcessorSettings) -> None:
        super().__init__(settings)
        self.waits: list[np.ndarray] = []  # (poll_ms, ms from produce to poll) per click
        # poll_ms, size, ms per stage (STAGES order), ms from poll to the end of the batch
        self.batches: list[tuple[float, ...]] = []
        self._polled = 0.0

    def _poll_batch(self) -> list[Message]:
        msgs = super()._poll_batch()
        self._polled = _ms()
        return msgs

    def process_batch(self, msgs: Any) -> None:
        before = dict(self.stats.stage_s)
        super().process_batch(msgs)
        stages = (1000 * (self.stats.stage_s[k] - before[k]) for k in STAGES)
        created = np.fromiter((m.timestamp()[1] for m in msgs), np.float64, len(msgs))
        self.waits.append(np.stack([np.full(len(msgs), self._polled), self._polled - created], 1))
        self.batches.append((self._polled, len(msgs), *stages, _ms() - self._polled))


def _pct(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(values.max()),
    }


def prime(
    kafka: KafkaSettings, topics: TopicSettings, processor: ProbedProcessor, source: Source
) -> int:
    """A few clicks through a processor that has joined its group, so that no level's window
    starts while the processor is still starting (group join, restore, items bootstrap)."""
    item = next(iter_source(source.path)).item_id
    with ClickProducer(kafka, topics.clicks) as producer:
        for u in range(20):
            producer.send(f"prime-{u}", item)
    deadline = time.monotonic() + 120
    while processor.stats.consumed < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    return 20


def _scorer_work(processor: Processor) -> dict[str, float]:
    scorer = processor.scorer
    rows = {f"rows_{k}": float(v) for k, v in getattr(scorer, "rows", {}).items()}
    return rows | {f"{k}_ms": 1000 * v for k, v in getattr(scorer, "timings", {}).items()}


def run_level(
    bootstrap: str, topics: TopicSettings, processor: ProbedProcessor, rate: float,
    warmup_s: float, measure_s: float, source: Source, sent: list[int],
    pids: Mapping[str, int],
) -> dict[str, Any]:  # fmt: skip
    """Offer `rate` events/s; returns the measured window and what was processed in it.

    `pids`: the processes besides the producer whose CPU use is measured in the window.
    """
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(
        target=_produce,
        args=(bootstrap, topics.clicks, rate, warmup_s + measure_s, source, out),
    )
    begin = processor.stats.consumed
    proc.start()
    # The spawned producer needs ~1-2 s to import and build the synthetic data; the window
    # starts at its first consumed click.
    while processor.stats.consumed == begin and proc.is_alive():
        time.sleep(0.01)
    t0 = _ms()
    window = (t0 + warmup_s * 1000, t0 + (warmup_s + measure_s) * 1000)
    time.sleep(warmup_s)
    consumed0, perf0 = processor.stats.consumed, time.perf_counter()
    work0 = _scorer_work(processor)
    cpu = CpuMeter({**pids, "producer": proc.pid or 0})
    time.sleep(measure_s)
    consumed1, perf1 = processor.stats.consumed, time.perf_counter()
    work1 = _scorer_work(processor)
    cores = cpu.cores()
    report = out.get(timeout=600)
    proc.join()
    # Drain whatever backlog is left, so the next level starts from an empty input topic.
    sent[0] += report["sent"]
    deadline = time.monotonic() + 300
    while processor.stats.consumed < sent[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    processed = (consumed1 - consumed0) / (perf1 - perf0)
    produced = report["sent"] / report["seconds"]
    return {
        "target_events_per_s": rate,
        "sustained": processed >= 0.95 * produced,
        "producer_events_per_s": produced,
        "processed_events_per_s": processed,
        # The incremental scorer's rows and ms in the window (step vs prefill), when it has them.
        "scorer_work": {k: work1[k] - work0.get(k, 0) for k in work1},
        # Cores each process used on average in the window; "processor" is the harness's own
        # process (the processor's thread with its Kafka and onnxruntime threads).
        "cpu_cores": cores,
        "window_ms": window,
    }


def summarise(level: dict[str, Any], rows: np.ndarray, processor: ProbedProcessor) -> None:
    """Percentiles of the level's window: end to end and each leg of the path."""
    lo, hi = level.pop("window_ms")
    keep = rows[(rows[:, 1] >= lo) & (rows[:, 1] < hi)]
    waits = np.concatenate(processor.waits) if processor.waits else np.zeros((0, 2))
    waits = waits[(waits[:, 0] >= lo) & (waits[:, 0] < hi), 1]
    batches = np.array(processor.batches, dtype=np.float64).reshape(-1, 3 + len(STAGES))
    batches = batches[(batches[:, 0] >= lo) & (batches[:, 0] < hi)]
    seconds = (hi - lo) / 1000
    level.update(
        outputs_per_s=keep.shape[0] / seconds,
        end_to_end_ms=_pct(keep[:, 0] - keep[:, 1]),
        event_to_generated_ms=_pct(keep[:, 2] - keep[:, 1]),
        generated_to_arrival_ms=_pct(keep[:, 0] - keep[:, 2]),
        produce_to_poll_ms=_pct(waits),
        batch_size=_pct(batches[:, 1]),
        # produce: encode, produce and flush until the broker acknowledged every record
        **{f"batch_{stage}_ms": _pct(batches[:, 2 + i]) for i, stage in enumerate(STAGES)},
        processor_busy_fraction=float(batches[:, -1].sum() / 1000 / seconds),
    )


class Stack:
    """A broker, a processor (in this process, on a thread) and a listener (spawned) for one
    or more levels. `fresh(dir)` gives the stack a level runs on: a new one (broker, topics,
    processor state, listener) with --broker-per-level, else this one, started on first use
    and kept. When a stack is left, each level run on it gets its percentiles."""

    settings: ProcessorSettings  # of the latest stack started

    def __init__(self, args: argparse.Namespace, bundle: Path, work: Path) -> None:
        self.args, self.bundle, self.work = args, bundle, work
        self.running: ExitStack | None = None  # what start() opened, closed in reverse
        self.levels: list[dict[str, Any]] = []

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.running is None:
            return
        self.running.close()
        if self.levels:
            rows = np.load(self.rows_path)
            for level in self.levels:
                summarise(level, rows, self.processor)

    @contextmanager
    def fresh(self, work: Path) -> Iterator[Stack]:
        if self.args.broker_per_level:
            with Stack(self.args, self.bundle, work) as stack:
                yield stack.start()
            self.settings = stack.settings
        else:
            yield self if self.running is not None else self.start()

    def start(self) -> Stack:
        args, ctx = self.args, mp.get_context("spawn")
        self.work.mkdir(parents=True, exist_ok=True)
        self.running = running = ExitStack()
        self.broker = running.enter_context(EmbeddedBroker())
        kafka = KafkaSettings(bootstrap_servers=self.broker.bootstrap_servers)
        if args.fetch_wait_ms is not None:
            kafka = kafka.model_copy(update={"fetch_wait_max_ms": args.fetch_wait_ms})
        self.topics = TopicSettings(partitions=PARTITIONS)
        create_topics(kafka, self.topics)
        overrides = {} if args.batch_max is None else {"batch_max": args.batch_max}
        self.settings = ProcessorSettings(
            kafka=kafka, topics=self.topics, bundle=self.bundle, state_dir=self.work / "state",
            log_every_s=3600, metrics_addr="", **overrides,
        )  # fmt: skip
        self.processor = ProbedProcessor(self.settings)
        thread = threading.Thread(target=self.processor.run)
        thread.start()
        running.callback(thread.join)
        running.callback(self.processor.stop)
        stop, self.rows_path = ctx.Event(), str(self.work / "arrivals.npy")
        listener = ctx.Process(
            target=_listen,
            args=(self.broker.bootstrap_servers, self.topics.recs, args.listener_fetch_wait_ms,
                  stop, self.rows_path),
        )  # fmt: skip
        listener.start()
        running.callback(listener.join, 60)
        running.callback(stop.set)
        running.callback(time.sleep, 1.0)  # first, let the last outputs arrive
        self.sent = [prime(kafka, self.topics, self.processor, Source(args.source))]
        self.pids = {
            "processor": os.getpid(), "broker": self.broker.pid, "listener": listener.pid or 0,
        }  # fmt: skip
        return self

    def level(
        self, rate: float, warmup_s: float, measure_s: float, source: Source
    ) -> dict[str, Any]:
        level = run_level(
            self.broker.bootstrap_servers, self.topics, self.processor, rate, warmup_s,
            measure_s, source, self.sent, pids=self.pids,
        )  # fmt: skip
        level["broker_pid"] = self.broker.pid  # which broker it ran on (one per level, or shared)
        self.levels.append(level)
        return level


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency.json"))
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--train-seconds", type=float, default=20.0)
    parser.add_argument(
        "--max-rate",
        help="events/s; 'measure': the processed rate while a producer offers pipeline.json's "
        "drain rate (3 s warm-up, 10 s); default: pipeline.json's drain rate",
    )
    parser.add_argument("--fractions", default="0.25,0.5,0.75")
    parser.add_argument("--warmup-s", type=float, default=5.0)
    parser.add_argument("--measure-s", type=float, default=20.0)
    parser.add_argument("--listener-fetch-wait-ms", type=int, default=5)
    parser.add_argument("--fetch-wait-ms", type=int, help="processor's (default: KafkaSettings)")
    parser.add_argument("--batch-max", type=int, help="processor's (default: ProcessorSettings)")
    parser.add_argument("--producer-linger-ms", type=int, help="the replaying client's linger.ms")
    parser.add_argument(
        "--source", default="synthetic", help="clicks to replay (as streamrec replay)"
    )
    parser.add_argument(
        "--pipeline-json", type=Path, default=Path("benchmarks/results/pipeline.json")
    )
    parser.add_argument(
        "--broker-per-level",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start each level on a fresh embedded broker, processor and listener (default); "
        "Tansu's fetches get dearer as its log grows, so a shared broker makes later levels pay "
        "for earlier ones",
    )
    args = parser.parse_args()
    pipeline = json.loads(args.pipeline_json.read_text())
    drain_rate = float(pipeline["end_to_end"]["events_per_s"])
    levels: list[dict[str, Any]] = []
    saturation: dict[str, Any] | None = None
    load_before = os.getloadavg()
    source = Source(args.source, args.producer_linger_ms)
    with tempfile.TemporaryDirectory() as work:
        bundle = ensure_bundle(Path(work), args.bundle, args.train_seconds)
        with Stack(args, bundle, Path(work) / "shared") as shared:
            if args.max_rate == "measure":
                with shared.fresh(Path(work) / "saturation") as stack:
                    saturation = stack.level(drain_rate, 3.0, 10.0, source)
                max_rate = float(saturation["processed_events_per_s"])
            else:
                max_rate = drain_rate if args.max_rate is None else float(args.max_rate)
            for i, fraction in enumerate(float(f) for f in args.fractions.split(",")):
                with shared.fresh(Path(work) / f"level{i}") as stack:
                    level = stack.level(fraction * max_rate, args.warmup_s, args.measure_s, source)
                level["fraction_of_max"] = fraction
                levels.append(level)
        settings = shared.settings
    for level in [saturation, *levels] if saturation else levels:
        print(json.dumps(level), flush=True)
    result = {
        **run_metadata(),
        "pipeline_drain_events_per_s": drain_rate,
        "max_rate_source": args.max_rate or "pipeline.json",
        "max_rate_events_per_s": max_rate,
        "saturation": saturation,
        "processor_fetch_wait_max_ms": settings.kafka.fetch_wait_max_ms,
        "processor_batch_max": settings.batch_max,
        "producer_linger_ms": args.producer_linger_ms,
        "listener_fetch_wait_max_ms": args.listener_fetch_wait_ms,
        # A fresh broker (and processor, listener) for every level, or one for all of them:
        # the embedded broker's fetches get dearer as its log grows (BENCHMARKS.md).
        "broker_per_level": args.broker_per_level,
        "warmup_s": args.warmup_s,
        "measure_s": args.measure_s,
        "loadavg_before": load_before,  # the box is shared: other work skews every figure
        "loadavg_after": os.getloadavg(),
        "levels": levels,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
