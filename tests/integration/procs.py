"""Processors as real OS processes (`python -m stream run`), for crash and scale-out tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from stream.config import KafkaSettings, TopicSettings
from stream.kafka.lag import LagProbe
from stream.state import RocksSessionStore, Session
from stream.state.changelog import restore_partitions
from tests.integration.kafka_utils import wait_for


class ProcessorProcess:
    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        group: str,
        bundle: Path,
        state_dir: Path,
        log: Path,
        *extra: str,
    ) -> None:
        self.cmd = [
            sys.executable, "-m", "stream", "run",
            "--bootstrap-servers", kafka.bootstrap_servers,
            "--clicks-topic", topics.clicks, "--recs-topic", topics.recs,
            "--dlq-topic", topics.dlq, "--group", group, "--bundle", str(bundle),
            "--state-dir", str(state_dir), "--metrics-addr", "127.0.0.1:0",
            "--batch-max", "200", *extra,
        ]  # fmt: skip
        self.state_dir = state_dir
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ProcessorProcess:
        env = {**os.environ, "STREAMREC_SESSION_MAX_LEN": "200", "STREAMREC_LOG_EVERY_S": "2"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM: finish the batch, commit, leave the group. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"processor did not stop on SIGTERM; log: {self.log}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def committed_total(kafka: KafkaSettings, group: str, topic: str) -> int:
    with LagProbe(kafka, group, topic) as probe:
        return sum(p.committed or 0 for p in probe.snapshot())


def wait_drained(
    kafka: KafkaSettings, group: str, topic: str, total: int, timeout_s: float
) -> None:
    wait_for(
        lambda: committed_total(kafka, group, topic) == total,
        timeout_s,
        what=f"group {group} to commit all {total} records",
    )


def changelog_sessions(
    kafka: KafkaSettings, topic: str, partitions: int
) -> dict[str, Session | None]:
    """The latest changelog value per user, uncut (everything is committed once drained)."""
    out: dict[str, Session | None] = {}

    def collect(partition: int, sessions: dict[str, Session | bytes | None]) -> None:
        for user, s in sessions.items():
            out[user] = Session.from_bytes(s) if isinstance(s, bytes) else s

    restore_partitions(kafka, topic, dict.fromkeys(range(partitions), 2**62), collect)
    return out


def owner_sessions(
    state_dirs: list[Path], topic: str, partitions: int
) -> dict[int, dict[str, Session]]:
    """Per input partition, the sessions of the store that applied that partition furthest."""
    best: dict[int, tuple[int, dict[str, Session]]] = {}
    for state_dir in state_dirs:
        store = RocksSessionStore(state_dir / "sessions")
        try:
            sessions = dict(store.iter_sessions())
            for p in range(partitions):
                applied = store.applied_offset(topic, p)
                if applied >= 0 and applied > best.get(p, (-1, {}))[0]:
                    best[p] = (applied, sessions)
        finally:
            store.close()
    return {p: sessions for p, (_, sessions) in best.items()}
