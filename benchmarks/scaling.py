"""Cost per event as the session store grows (issue 8): 10k → 100k → 1M users.

The RocksDB session store is pre-filled in big WriteBatches (20-event sessions of catalogue
items), growing in place; at each size, random batches of 2,000 valid clicks drawn uniformly
over all stored users go through the processor's real batch steps, `_decode` → `_apply` →
`_write_state` → `_score` (as process_batch runs them; nothing is produced or committed;
1 onnxruntime thread). Reported: µs/event per step (mean over batches, and the median batch),
and the process RSS before filling and after each size.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time
import zlib
from pathlib import Path

import orjson
from confluent_kafka import Message

from benchmarks.meta import run_metadata, write_result
from benchmarks.pipeline import ensure_bundle
from export.bundle import load_bundle
from stream.batch import Batch, in_offset_order
from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, ProcessorSettings, TopicSettings
from stream.processor import Processor
from stream.state import RocksSessionStore, Session

PARTITIONS = 6
SESSION_EVENTS = 20
STEPS = ("decode", "apply", "write_state", "score")


def user_id(u: int) -> str:
    return f"u{u:07d}"


def partition_of(user: str) -> int:
    return zlib.crc32(user.encode()) % PARTITIONS


def vm_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill(store: RocksSessionStore, items: list[str], lo: int, hi: int, chunk: int) -> float:
    """Write users [lo, hi) in WriteBatches of `chunk` sessions; returns seconds."""
    start = time.perf_counter()
    base_ts = time.time_ns() // 1_000_000 - 3_600_000
    for c in range(lo, hi, chunk):
        sessions: dict[str, Session | bytes | None] = {}
        for u in range(c, min(c + chunk, hi)):
            s = Session()
            user = user_id(u)
            for k in range(SESSION_EVENTS):
                s.append(
                    items[(u * 7 + k * 13) % len(items)], base_ts + k, partition_of(user), k, 50
                )
            sessions[user] = s.to_bytes()
        store.write(sessions, {})
    return time.perf_counter() - start


class Batches:
    """Random valid clicks over users [0, n); offsets increase per partition across batches."""

    def __init__(self, topic: str, items: list[str], seed: int = 0) -> None:
        self.topic, self.items = topic, items
        self.rng = random.Random(seed)
        self.next_offset = dict.fromkeys(range(PARTITIONS), 1_000_000)

    def make(self, users: int, size: int) -> list[Message]:
        now = time.time_ns() // 1_000_000
        out = []
        for _ in range(size):
            user = user_id(self.rng.randrange(users))
            p = partition_of(user)
            offset = self.next_offset[p]
            self.next_offset[p] = offset + 1
            item = self.rng.choice(self.items)
            value = orjson.dumps({"user_id": user, "item_id": item, "ts": now})
            out.append(
                Message(
                    topic=self.topic, partition=p, offset=offset, key=user.encode(), value=value
                )
            )
        return out


def time_batches(processor: Processor, batches: Batches, users: int, n: int, size: int) -> dict:
    per_step: dict[str, list[float]] = {s: [] for s in STEPS}
    touched = 0
    for _ in range(n):
        msgs = batches.make(users, size)
        batch = Batch()
        t0 = time.perf_counter()
        events = processor._decode(in_offset_order(msgs), batch)
        t1 = time.perf_counter()
        processor._apply(events, batch)
        t2 = time.perf_counter()
        processor._write_state(batch)
        t3 = time.perf_counter()
        processor._score(batch)
        t4 = time.perf_counter()
        assert not batch.dead, batch.dead[:3]
        touched += len(batch.touched)
        for step, dt in zip(STEPS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            per_step[step].append(1e6 * dt / size)
    out: dict[str, float] = {"batches": n, "mean_touched_users": touched / n}
    for step, values in per_step.items():
        values.sort()
        out[f"{step}_us_per_event_mean"] = sum(values) / len(values)
        out[f"{step}_us_per_event_median"] = values[len(values) // 2]
    out["total_us_per_event_mean"] = sum(out[f"{s}_us_per_event_mean"] for s in STEPS)
    out["implied_events_per_s"] = 1e6 / out["total_us_per_event_mean"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scaling.json"))
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--train-seconds", type=float, default=20.0)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--fill-chunk", type=int, default=20_000)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = os.getloadavg()
    levels = []
    with (
        tempfile.TemporaryDirectory() as work,
        EmbeddedBroker() as broker,
        tempfile.TemporaryDirectory() as state,
    ):
        bundle = ensure_bundle(Path(work), args.bundle, args.train_seconds)
        items = list(load_bundle(bundle).item_ids[1:])
        settings = ProcessorSettings(
            kafka=KafkaSettings(bootstrap_servers=broker.bootstrap_servers),
            topics=TopicSettings(partitions=PARTITIONS), bundle=bundle,
            state_dir=Path(state), log_every_s=3600, metrics_addr="",
        )  # fmt: skip
        store = RocksSessionStore(Path(state) / "sessions")
        processor = Processor(settings, store=store)
        batches = Batches(settings.topics.clicks, items)
        filled = 0
        rss_before_fill = vm_rss_mb()  # processor, model and an empty store
        try:
            for users in sizes:
                fill_s = fill(store, items, filled, users, args.fill_chunk)
                filled = users
                time_batches(processor, batches, users, 2, args.batch_size)  # warm-up
                level = {
                    "users": users,
                    "fill_s": fill_s,
                    **time_batches(processor, batches, users, args.batches, args.batch_size),
                    "approx_sessions": store.approx_sessions(),
                    "vm_rss_mb": vm_rss_mb(),
                    "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
                print(level, flush=True)
                levels.append(level)
        finally:
            processor.close()
    result = {
        **run_metadata(),
        "batch_size": args.batch_size,
        "vm_rss_mb_before_fill": rss_before_fill,
        "session_events": SESSION_EVENTS,
        "loadavg_before": load_before,  # the box is shared: other work skews every figure
        "loadavg_after": os.getloadavg(),
        "levels": levels,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
