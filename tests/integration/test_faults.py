"""Crash and fault tests with real processes, a real broker, real RocksDB and ONNX.

Each checks exactly: after the stream drains, every user's stored session (in the changelog
and in the store that owns the user's partition) equals the user's valid events in order
(0 lost, 0 duplicated), and the user's last output reflects the whole session.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Message

from export.bundle import load_bundle
from stream.broker import EmbeddedBroker, free_port
from stream.config import KafkaSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.producer import ClickProducer
from stream.state.changelog import changelog_topic
from tests.integration.kafka_utils import Timeout, TopicReader, wait_for
from tests.integration.procs import (
    ProcessorProcess,
    changelog_sessions,
    committed_total,
    owner_sessions,
    wait_drained,
)

BASE_TS = 1_767_225_600_000
Events = dict[str, list[tuple[str, int]]]


def plan(bundle_dir: Path, users: int, total: int, seed: int) -> list[tuple[str, str, int]]:
    """`total` clicks of `users` users in a random interleaving; ts strictly increasing."""
    rng = random.Random(seed)
    catalogue = list(load_bundle(bundle_dir).item_ids[1:])
    return [
        (f"u{rng.randrange(users):05d}", rng.choice(catalogue), BASE_TS + k) for k in range(total)
    ]


class Replayer(threading.Thread):
    """Sends planned clicks at a steady rate from a background thread."""

    def __init__(self, kafka: KafkaSettings, topic: str, clicks: list[tuple[str, str, int]],
                 rate: float) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.kafka, self.topic, self.clicks, self.rate = kafka, topic, clicks, rate
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            start = time.monotonic()
            producer = ClickProducer(self.kafka, self.topic)
            for n, (user, item, ts) in enumerate(self.clicks):
                ahead = start + n / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)  # pacing, not waiting for a condition
                producer.send(user, item, ts=ts)
            producer.flush(timeout_s=120)  # rides out a paused broker
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout_s: float = 120) -> None:
        self.join(timeout_s)
        assert not self.is_alive(), "replay did not finish"
        if self.error is not None:
            raise self.error


def expected_of(clicks: list[tuple[str, str, int]]) -> Events:
    out: Events = {}
    for user, item, ts in clicks:
        out.setdefault(user, []).append((item, ts))
    return out


def latest_outputs(
    kafka: KafkaSettings, topic: str, expected: Events
) -> dict[str, dict[str, object]]:
    """Each user's latest output once every user's reflects their last click (bounded wait)."""
    latest: dict[str, dict[str, object]] = {}

    def fold(messages: list[Message]) -> bool:
        for msg in messages[len(seen) :]:
            record = orjson.loads(msg.value() or b"null")
            if record is not None:
                latest[(msg.key() or b"").decode()] = record
        seen[:] = messages
        return all(
            latest.get(u, {}).get("event_ts") == events[-1][1] for u, events in expected.items()
        )

    seen: list[Message] = []
    with TopicReader(kafka, topic) as reader:
        reader.read_until(fold, timeout_s=60)
    return latest


def assert_exact(
    expected: Events,
    kafka: KafkaSettings,
    topics: TopicSettings,
    group: str,
    state_dirs: list[Path],
) -> None:
    changelog = changelog_sessions(kafka, changelog_topic(group), topics.partitions)
    owners = owner_sessions(state_dirs, topics.clicks, topics.partitions)
    outputs = latest_outputs(kafka, topics.recs, expected)
    lost = duplicated = 0
    for user, events in expected.items():
        session = changelog.get(user)
        assert session is not None, f"{user}: no changelog session"
        items, stamps = [i for i, _ in events], [t for _, t in events]
        lost += max(len(events) - session.count, 0)
        duplicated += max(session.count - len(events), 0)
        assert (session.items, session.ts, session.count) == (items, stamps, len(events)), user
        assert session.offsets == sorted(set(session.offsets)), f"{user}: offsets repeat"
        owned = owners[session.partition][user]
        assert (owned.items, owned.ts, owned.count) == (items, stamps, len(events)), user
        record = outputs[user]
        assert record["event_ts"] == stamps[-1], f"{user}: last output is stale"
        assert record["offset"] == session.offsets[-1]
        recommended = {e["item_id"] for e in record["items"]}  # type: ignore[attr-defined]
        assert not recommended & set(items)
    assert (lost, duplicated) == (0, 0)


def fresh_topics(kafka: KafkaSettings, partitions: int = 6) -> TopicSettings:
    suffix = uuid.uuid4().hex[:8]
    topics = TopicSettings(
        clicks=f"clicks-{suffix}", recs=f"recs-{suffix}", dlq=f"dlq-{suffix}",
        partitions=partitions,
    )  # fmt: skip
    create_topics(kafka, topics)
    return topics


def test_kill9_at_random_points_loses_and_duplicates_nothing(
    kafka: KafkaSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    topics = fresh_topics(kafka)
    group = f"kill-{uuid.uuid4().hex[:6]}"
    clicks = plan(bundle_dir, users=400, total=20_000, seed=21)
    # Slow enough that the stream is still flowing through every kill and restart (a restart
    # waits out the dead member's 6 s session timeout).
    replayer = Replayer(kafka, topics.clicks, clicks, rate=350)
    proc = ProcessorProcess(
        kafka, topics, group, bundle_dir, tmp_path / "state", tmp_path / "processor.log"
    ).start()
    rng = random.Random(7)
    replayer.start()
    try:
        done = kills = 0
        while kills < 4:
            assert replayer.is_alive(), "the replay ended before four kills"
            wait_for(
                lambda: committed_total(kafka, group, topics.clicks) > done,  # noqa: B023
                90,
                what="progress before the next kill",
            )
            kill_at = Timeout(rng.uniform(0.2, 2.0))
            wait_for(lambda: kill_at.expired, 5, what="a random point")  # noqa: B023
            proc.kill9()
            kills += 1
            done = committed_total(kafka, group, topics.clicks)
            proc.start()
        replayer.finish()
        wait_drained(kafka, group, topics.clicks, len(clicks), timeout_s=180)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    assert_exact(expected_of(clicks), kafka, topics, group, [tmp_path / "state"])


def test_partitions_move_between_processes_and_restore_from_the_changelog(
    kafka: KafkaSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    topics = fresh_topics(kafka)
    group = f"scale-{uuid.uuid4().hex[:6]}"
    clicks = plan(bundle_dir, users=300, total=9000, seed=22)
    dirs = [tmp_path / n for n in ("a", "b", "c")]
    a, b, c = (
        ProcessorProcess(kafka, topics, group, bundle_dir, d, tmp_path / f"{d.name}.log")
        for d in dirs
    )
    replayer = Replayer(kafka, topics.clicks, clicks, rate=250)  # ~36 s of stream
    b_log, c_log = tmp_path / "b.log", tmp_path / "c.log"
    try:
        a.start()
        b.start()
        replayer.start()
        wait_for(lambda: committed_total(kafka, group, topics.clicks) > 1500, 90, what="progress")
        a.kill9()  # its partitions move to b after the session timeout and are restored there
        wait_for(lambda: "restored" in b_log.read_text(), 60, what="b to restore a's partitions")
        c.start()  # empty state dir: whatever it is given, it restores from the changelog
        wait_for(lambda: "restored" in c_log.read_text(), 60, what="c to restore its partitions")
        assert replayer.is_alive(), "c must join while the stream still flows"
        replayer.finish()
        wait_drained(kafka, group, topics.clicks, len(clicks), timeout_s=180)
        assert c.stop() == 0
        assert b.stop() == 0
    finally:
        for proc in (a, b, c):
            if proc.alive():
                proc.kill9()
    assert_exact(expected_of(clicks), kafka, topics, group, dirs[1:])


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)
    except OSError:
        return -1


def test_broker_paused_for_30s_processor_goes_unready_then_catches_up(
    bundle_dir: Path, tmp_path: Path
) -> None:
    broker = EmbeddedBroker().start()
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        topics = fresh_topics(kafka, partitions=3)
        group = "pause"
        port = free_port()
        proc = ProcessorProcess(
            kafka, topics, group, bundle_dir, tmp_path / "state", tmp_path / "p.log",
            "--metrics-addr", f"127.0.0.1:{port}",
        ).start()  # fmt: skip
        readyz = f"http://127.0.0.1:{port}/readyz"
        clicks = plan(bundle_dir, users=100, total=3000, seed=23)
        first, second = clicks[:1500], clicks[1500:]
        try:
            replay = Replayer(kafka, topics.clicks, first, rate=5000)
            replay.start()
            replay.finish()
            wait_drained(kafka, group, topics.clicks, len(first), timeout_s=90)
            wait_for(lambda: _http_status(readyz) == 200, 30, what="ready")
            paused_at = time.monotonic()
            broker.pause()
            later = Replayer(kafka, topics.clicks, second, rate=5000)
            later.start()  # the producer buffers and retries while the broker is frozen
            wait_for(lambda: _http_status(readyz) == 503, 30, what="not ready while paused")
            resume_at = Timeout(30 - (time.monotonic() - paused_at))
            wait_for(lambda: resume_at.expired, 35, what="30 s of pause")
            broker.resume()
            later.finish()
            wait_drained(kafka, group, topics.clicks, len(clicks), timeout_s=180)
            wait_for(lambda: _http_status(readyz) == 200, 60, what="ready again")
            assert proc.alive(), "the processor must ride out the pause"
            assert proc.stop() == 0
        finally:
            broker.resume()
            if proc.alive():
                proc.kill9()
        assert_exact(expected_of(clicks), kafka, topics, group, [tmp_path / "state"])
    finally:
        broker.stop()


def test_deleted_state_dir_is_restored_from_the_changelog(
    kafka: KafkaSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    topics = fresh_topics(kafka, partitions=3)
    group = f"lostdisk-{uuid.uuid4().hex[:6]}"
    clicks = plan(bundle_dir, users=150, total=4000, seed=24)
    state = tmp_path / "state"
    proc = ProcessorProcess(kafka, topics, group, bundle_dir, state, tmp_path / "p.log")
    try:
        proc.start()
        replay = Replayer(kafka, topics.clicks, clicks[:2000], rate=5000)
        replay.start()
        replay.finish()
        wait_drained(kafka, group, topics.clicks, 2000, timeout_s=90)
        assert proc.stop() == 0
        shutil.rmtree(state)
        proc.start()
        replay = Replayer(kafka, topics.clicks, clicks[2000:], rate=5000)
        replay.start()
        replay.finish()
        wait_drained(kafka, group, topics.clicks, len(clicks), timeout_s=90)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    assert "restored" in (tmp_path / "p.log").read_text()
    assert_exact(expected_of(clicks), kafka, topics, group, [state])


@pytest.fixture
def forget_topics(kafka: KafkaSettings) -> TopicSettings:
    return fresh_topics(kafka, partitions=2)


def test_forget_deletes_the_session_and_tombstones_changelog_and_output(
    kafka: KafkaSettings, forget_topics: TopicSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    topics = forget_topics
    group = f"forget-{uuid.uuid4().hex[:6]}"
    clicks = [c for c in plan(bundle_dir, users=10, total=200, seed=25)]
    proc = ProcessorProcess(kafka, topics, group, bundle_dir, tmp_path / "s", tmp_path / "p.log")
    victim = clicks[0][0]
    try:
        proc.start()
        replay = Replayer(kafka, topics.clicks, clicks, rate=5000)
        replay.start()
        replay.finish()
        with ClickProducer(kafka, topics.clicks) as producer:
            producer.forget(victim)
        wait_drained(kafka, group, topics.clicks, len(clicks) + 1, timeout_s=90)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    changelog = changelog_sessions(kafka, changelog_topic(group), topics.partitions)
    assert victim in changelog and changelog[victim] is None
    with TopicReader(kafka, topics.recs) as recs:
        messages = recs.read_until(
            lambda ms: any(m.key() == victim.encode() and m.value() is None for m in ms)
        )
    last = [m for m in messages if m.key() == victim.encode()][-1]
    assert last.value() is None, "the victim's latest output must be a tombstone"
    owners = owner_sessions([tmp_path / "s"], topics.clicks, topics.partitions)
    assert all(victim not in sessions for sessions in owners.values())
    assert "forget user " + victim in (tmp_path / "p.log").read_text()
    survivors = {u: e for u, e in expected_of(clicks).items() if u != victim}
    for user, events in survivors.items():
        assert changelog[user] is not None
        assert changelog[user].items == [i for i, _ in events]  # type: ignore[union-attr]


def test_exactly_once_mode_commits_outputs_changelog_and_offsets_in_one_transaction(
    kafka: KafkaSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    """What the embedded broker can show: the transactional path works end to end (outputs,
    changelog and offsets all committed, sessions exact). Abort isolation cannot be shown on
    it: it leaves aborted records visible to read_committed consumers (README)."""
    topics = fresh_topics(kafka, partitions=3)
    group = f"eos-{uuid.uuid4().hex[:6]}"
    clicks = plan(bundle_dir, users=60, total=1500, seed=26)
    state = tmp_path / "state"
    proc = ProcessorProcess(
        kafka, topics, group, bundle_dir, state, tmp_path / "p.log",
        "--processing-guarantee", "exactly-once",
    )  # fmt: skip
    try:
        proc.start()
        replay = Replayer(kafka, topics.clicks, clicks, rate=3000)
        replay.start()
        replay.finish()
        wait_drained(kafka, group, topics.clicks, len(clicks), timeout_s=90)
        proc.kill9()  # no graceful shutdown: everything needed is in committed transactions
        proc.start()
        wait_for(lambda: (tmp_path / "p.log").read_text().count("assign [") == 2, 60)
        assert proc.stop() == 0
    finally:
        if proc.alive():
            proc.kill9()
    assert "guarantee=exactly-once" in (tmp_path / "p.log").read_text()
    assert_exact(expected_of(clicks), kafka, topics, group, [state])
