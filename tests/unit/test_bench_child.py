"""benchmarks.child.die_with_parent: a spawned benchmark process does not outlive a killed
harness (real processes, SIGKILL; Linux)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from benchmarks.child import die_with_parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


def _sleeper(pidfile: str, protect: bool) -> None:
    if protect:
        die_with_parent()
    Path(pidfile).write_text(str(os.getpid()))
    time.sleep(60)


def _harness(pidfile: str, protect: bool) -> None:
    child = mp.get_context("spawn").Process(target=_sleeper, args=(pidfile, protect))
    child.start()
    child.join()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper in a container may be slow to reap)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("protect", [True, False], ids=["die-with-parent", "unprotected"])
def test_a_spawned_child_dies_with_its_killed_harness_only_when_protected(
    tmp_path: Path, protect: bool
) -> None:
    pidfile = tmp_path / "child.pid"
    harness = mp.get_context("spawn").Process(target=_harness, args=(str(pidfile), protect))
    harness.start()
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.05)
    child = int(pidfile.read_text())
    try:
        os.kill(harness.pid, signal.SIGKILL)  # type: ignore[arg-type]
        harness.join()
        deadline = time.monotonic() + 3  # the unprotected case waits all of it
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _running(child) is not protect
    finally:
        if _running(child):
            os.kill(child, signal.SIGKILL)
