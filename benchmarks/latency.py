"""End-to-end latency (issue 8): event `ts` → the output record's arrival at a recs consumer.

One in-process processor (as benchmarks/pipeline.py: 1 onnxruntime thread, no metrics server)
runs on a fresh embedded broker. For each load level (25 / 50 / 75 % of the max rate: --max-rate,
by default pipeline.json's end_to_end.events_per_s, a drain rate with no live producer; with
`--max-rate measure`, the processed rate while a producer offers that drain rate, i.e. the
saturation throughput with a live producer on the same box) a producer process (spawned, so it
does not share the processor's GIL) replays the synthetic clicks, cycled, at the target rate,
re-stamping each event's ts at send time. A separate consumer, assigned to every recs
partition (fetch.wait.max.ms small), records arrival time − the record's `event_ts` (the
user's last click in the batch). Records whose event_ts falls in the warm-up are dropped; the
backlog is drained between levels.
Producer and consumer share the machine's clock; event ts has 1 ms resolution.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Consumer, TopicPartition

from benchmarks.meta import run_metadata, write_result
from benchmarks.pipeline import ensure_bundle
from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, ProcessorSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.processor import Processor
from stream.producer import ClickProducer
from stream.replay import iter_source, replay

PARTITIONS = 6


def _produce(bootstrap: str, topic: str, rate: float, seconds: float, out: mp.Queue) -> None:
    """In a spawned process: replay synthetic clicks (cycled) at `rate` for `seconds`."""
    events = list(iter_source("synthetic"))
    kafka = KafkaSettings(bootstrap_servers=bootstrap)
    with ClickProducer(kafka, topic) as producer:
        report = replay(itertools.cycle(events), producer, rate=rate, limit=int(rate * seconds))
    out.put({"sent": report.sent, "seconds": report.seconds})


class RecsListener:
    """Consumes every recs partition from the start; keeps (arrival_ms, event_ts, generated_ts)."""

    def __init__(self, kafka: KafkaSettings, topic: str, fetch_wait_ms: int) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": kafka.bootstrap_servers,
                "group.id": "latency-bench",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": fetch_wait_ms,
                "fetch.min.bytes": 1,
            }
        )
        self.consumer.assign(
            [TopicPartition(topic, p, 0) for p in range(PARTITIONS)]  # fresh topic: offset 0
        )
        self.rows: list[tuple[float, int, int]] = []
        self.sent = 0  # clicks produced so far (all levels)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for msg in self.consumer.consume(1000, timeout=0.05):
                arrival = time.time_ns() / 1e6
                if msg.error() is not None or msg.value() is None:
                    continue
                body = orjson.loads(msg.value())
                self.rows.append((arrival, body["event_ts"], body["generated_ts"]))

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.consumer.close()


def _pct(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"n": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "n": int(values.size),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(values.max()),
    }


def run_level(
    bootstrap: str, topics: TopicSettings, processor: Processor, listener: RecsListener,
    rate: float, warmup_s: float, measure_s: float,
) -> dict[str, object]:  # fmt: skip
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(
        target=_produce, args=(bootstrap, topics.clicks, rate, warmup_s + measure_s, out)
    )
    begin = len(listener.rows)
    proc.start()
    # The spawned producer needs ~1-2 s to import and build the synthetic data; the window
    # starts at its first delivered output.
    while len(listener.rows) == begin and proc.is_alive():
        time.sleep(0.01)
    t0 = time.time_ns() / 1e6
    window_start, window_end = t0 + warmup_s * 1000, t0 + (warmup_s + measure_s) * 1000
    time.sleep(warmup_s)
    consumed0, perf0 = processor.stats.consumed, time.perf_counter()
    time.sleep(measure_s)
    consumed1, perf1 = processor.stats.consumed, time.perf_counter()
    report = out.get(timeout=600)
    proc.join()
    # Drain whatever backlog is left, so the next level starts from an empty input topic.
    listener.sent += report["sent"]
    deadline = time.monotonic() + 300
    while processor.stats.consumed < listener.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # let the last outputs arrive
    rows = np.array(listener.rows[begin:], dtype=np.float64).reshape(-1, 3)
    keep = rows[(rows[:, 1] >= window_start) & (rows[:, 1] < window_end)]
    processed = (consumed1 - consumed0) / (perf1 - perf0)
    produced = report["sent"] / report["seconds"]
    return {
        "target_events_per_s": rate,
        "sustained": processed >= 0.95 * produced,
        "producer_events_per_s": produced,
        "processed_events_per_s": processed,
        "outputs_per_s": keep.shape[0] / measure_s,
        "end_to_end_ms": _pct(keep[:, 0] - keep[:, 1]),
        "event_to_generated_ms": _pct(keep[:, 2] - keep[:, 1]),
        "generated_to_arrival_ms": _pct(keep[:, 0] - keep[:, 2]),
    }


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
    parser.add_argument("--fetch-wait-ms", type=int, default=5)
    args = parser.parse_args()
    pipeline = json.loads(Path("benchmarks/results/pipeline.json").read_text())
    drain_rate = float(pipeline["end_to_end"]["events_per_s"])
    levels: list[dict[str, object]] = []
    saturation: dict[str, object] | None = None
    with (
        tempfile.TemporaryDirectory() as work,
        EmbeddedBroker() as broker,
        tempfile.TemporaryDirectory() as state,
    ):
        bundle = ensure_bundle(Path(work), args.bundle, args.train_seconds)
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        topics = TopicSettings(partitions=PARTITIONS)
        create_topics(kafka, topics)
        settings = ProcessorSettings(
            kafka=kafka, topics=topics, bundle=bundle, state_dir=Path(state),
            log_every_s=3600, metrics_addr="",
        )  # fmt: skip
        processor = Processor(settings)
        thread = threading.Thread(target=processor.run)
        thread.start()
        listener = RecsListener(kafka, topics.recs, args.fetch_wait_ms)
        try:
            if args.max_rate == "measure":
                saturation = run_level(
                    broker.bootstrap_servers, topics, processor, listener, drain_rate, 3.0, 10.0
                )
                print(json.dumps(saturation), flush=True)
                max_rate = float(saturation["processed_events_per_s"])  # type: ignore[arg-type]
            else:
                max_rate = drain_rate if args.max_rate is None else float(args.max_rate)
            for fraction in (float(f) for f in args.fractions.split(",")):
                level = run_level(
                    broker.bootstrap_servers, topics, processor, listener,
                    fraction * max_rate, args.warmup_s, args.measure_s,
                )  # fmt: skip
                level["fraction_of_max"] = fraction
                print(json.dumps(level), flush=True)
                levels.append(level)
        finally:
            listener.close()
            processor.stop()
            thread.join()
    result = {
        **run_metadata(),
        "pipeline_drain_events_per_s": drain_rate,
        "max_rate_source": args.max_rate or "pipeline.json",
        "max_rate_events_per_s": max_rate,
        "saturation": saturation,
        "fetch_wait_max_ms": args.fetch_wait_ms,
        "warmup_s": args.warmup_s,
        "measure_s": args.measure_s,
        "levels": levels,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
