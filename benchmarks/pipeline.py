"""`make bench` (foundation profile): the bare model ceiling and the end-to-end drain rate.

End to end: N clicks are preloaded on a fresh embedded broker, then one processor (same
process, 1 onnxruntime thread) drains them; the rate is events / time from the first batch to
the last commit. Results go to JSON; BENCHMARKS.md summarises them with command, machine, date.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.meta import run_metadata, write_result
from export.bundle import load_bundle
from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, ProcessorSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.processor import Processor
from stream.producer import ClickProducer
from stream.replay import iter_source
from stream.scoring import OnnxScorer


def _streamrec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "stream", *args], check=True)


def ensure_bundle(work: Path, bundle: Path | None, train_seconds: float) -> Path:
    if bundle is not None:
        return bundle
    data = work / "data"
    _streamrec("generate", "--out", str(data))
    _streamrec(
        "train", "--data", f"synthetic:{data}", "--out", str(work / "train"),
        "--max-seconds", str(train_seconds),
    )  # fmt: skip
    _streamrec("export", "--checkpoint", str(work / "train" / "ckpt.pt"), "--out", str(work / "b"))
    return work / "b"


def model_ceiling(bundle: Path, seconds: float = 3.0) -> dict[str, float]:
    """Sequences/s of the bare ONNX call (full re-encode) at several batch sizes, 1 thread."""
    b = load_bundle(bundle)
    scorer = OnnxScorer(b, threads=1)
    rng = np.random.default_rng(0)
    out = {}
    for batch in (1, 64, 256):
        seq = rng.integers(1, b.num_items + 1, size=(batch, b.max_len)).astype(np.int64)
        scorer.score(seq)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            scorer.score(seq)
            n += batch
        out[f"batch_{batch}"] = n / (time.perf_counter() - start)
    return out


def end_to_end(bundle: Path, events: int, partitions: int = 6) -> dict[str, float]:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as state:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        topics = TopicSettings(partitions=partitions)
        create_topics(kafka, topics)
        source = iter_source("synthetic")
        with ClickProducer(kafka, topics.clicks) as producer:
            for _, event in zip(range(events), source, strict=False):
                producer.send_event(event)
        settings = ProcessorSettings(
            kafka=kafka,
            topics=topics,
            bundle=bundle,
            state_dir=Path(state),
            log_every_s=3600,
            metrics_addr="",
        )
        processor = Processor(settings)
        thread = threading.Thread(target=processor.run)
        thread.start()
        while processor.stats.consumed == 0:
            time.sleep(0.001)
        start = time.perf_counter()
        deadline = time.monotonic() + 600
        while processor.stats.consumed < events and time.monotonic() < deadline:
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        stats = processor.stats
        processor.stop()
        thread.join()
        batches = max(stats.batches, 1)
        return {
            "events": float(stats.consumed),
            "events_per_s": stats.consumed / elapsed,
            "batches": float(stats.batches),
            "mean_batch": stats.consumed / batches,
            **{f"{k}_ms_per_batch": 1000 * v / batches for k, v in stats.stage_s.items()},
        }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pipeline.json"))
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--train-seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        bundle = ensure_bundle(Path(work), args.bundle, args.train_seconds)
        result = {
            **run_metadata(),
            "model": load_bundle(bundle).manifest.config,
            "model_ceiling_seq_per_s": model_ceiling(bundle),
            "end_to_end": end_to_end(bundle, args.events),
        }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
