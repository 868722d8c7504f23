"""Recovery figures (issue 7): restore time from the changelog, and a kill-loop soak.

restore: N users' sessions (20 events each) are written to a fresh changelog (6 partitions) on
the embedded broker; the timed part is what a processor does on assignment: read every
partition to its end, cut sessions at the committed offsets, write them into a fresh RocksDB.
soak: a processor process is killed with SIGKILL at random intervals while clicks are replayed
for the whole duration, restarted each time; afterwards every user's changelog session is
compared with the user's events: lost and duplicated events are counted (must be 0/0).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer

from benchmarks.meta import run_metadata, write_result
from benchmarks.pipeline import ensure_bundle
from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.state import RocksSessionStore, Session
from stream.state.changelog import (
    SOURCE_OFFSET,
    changelog_topic,
    ensure_changelog,
    restore_partitions,
)
from tests.integration.procs import (
    ProcessorProcess,
    changelog_sessions,
    committed_total,
    wait_drained,
)
from tests.integration.test_faults import Replayer, expected_of, plan

PARTITIONS = 6


def bench_restore(users: int) -> dict[str, float]:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        topic = "bench-sessions-changelog"
        ensure_changelog(kafka, topic, PARTITIONS)
        producer = Producer({**kafka.producer_config(), "linger.ms": 50})
        for u in range(users):
            session = Session()
            for k in range(20):
                session.append(f"i{(u * 7 + k) % 3416:05d}", 1_767_225_600_000 + k, u % 6, k, 50)
            while True:
                try:
                    producer.produce(
                        topic, session.to_bytes(), f"u{u:07d}".encode(),
                        partition=u % PARTITIONS, headers=[(SOURCE_OFFSET, b"19")],
                    )  # fmt: skip
                    break
                except BufferError:
                    producer.poll(0.1)
            if u % 10_000 == 0:
                producer.poll(0)
        producer.flush(120)
        store = RocksSessionStore(Path(tmp) / "sessions")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        results = restore_partitions(
            kafka, topic, dict.fromkeys(range(PARTITIONS), 2**62),
            lambda p, sessions: store.write(sessions, {}),
        )  # fmt: skip
        seconds = time.perf_counter() - start
        restored = len(store.iter_sessions()) if users <= 200_000 else store.approx_sessions()
        store.close()
    records = sum(r.records for r in results.values())
    return {
        "users": users,
        "records": records,
        "sessions_in_store": restored,
        "seconds": round(seconds, 2),
        "records_per_s": round(records / seconds),
        "peak_rss_growth_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                     - rss_before) / 1024),
    }  # fmt: skip


def bench_soak(bundle: Path, minutes: float, rate: float) -> dict[str, float]:
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as tmp:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        suffix = uuid.uuid4().hex[:6]
        topics = TopicSettings(clicks=f"c-{suffix}", recs=f"r-{suffix}", dlq=f"d-{suffix}")
        create_topics(kafka, topics)
        group = "soak"
        clicks = plan(bundle, users=2000, total=int(minutes * 60 * rate), seed=31)
        proc = ProcessorProcess(kafka, topics, group, bundle, Path(tmp) / "s", Path(tmp) / "log")
        rng = random.Random(5)
        kills = 0
        replay = Replayer(kafka, topics.clicks, clicks, rate)
        proc.start()
        replay.start()
        try:
            while replay.is_alive():
                time.sleep(rng.uniform(5, 25))
                if replay.is_alive():
                    proc.kill9()
                    kills += 1
                    proc.start()
            replay.finish()
            wait_drained(kafka, group, topics.clicks, len(clicks), timeout_s=300)
            proc.stop()
        finally:
            if proc.alive():
                proc.kill9()
        sessions = changelog_sessions(kafka, changelog_topic(group), PARTITIONS)
        committed = committed_total(kafka, group, topics.clicks)
    lost = duplicated = 0
    for user, events in expected_of(clicks).items():
        session = sessions.get(user)
        got = [] if session is None else list(zip(session.items, session.ts, strict=True))
        lost += sum(1 for e in events if e not in got)
        duplicated += max(len(got) - len(set(got)), 0) + max(
            (session.count if session else 0) - len(events), 0
        )
    return {
        "minutes": minutes,
        "events": len(clicks),
        "kills": kills,
        "committed": committed,
        "lost": lost,
        "duplicated": duplicated,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recovery.json"))
    parser.add_argument("--users", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--soak-minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--bundle", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = dict(run_metadata())
    result["restore"] = [bench_restore(n) for n in args.users]
    print(json.dumps(result["restore"], indent=2), flush=True)
    if args.soak_minutes > 0:
        with tempfile.TemporaryDirectory() as work:
            bundle = ensure_bundle(Path(work), args.bundle, 20)
            result["soak"] = bench_soak(bundle, args.soak_minutes, args.rate)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
