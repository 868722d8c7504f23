"""benchmarks.cpu: a busy process reads as busy, a sleeping one as idle (real processes, /proc)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from benchmarks.cpu import CpuMeter, process_cpu_s

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_a_spinning_process_uses_a_core_and_a_sleeping_one_none() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    sleep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # past the interpreters' start
        meter = CpuMeter({"spin": spin.pid, "sleep": sleep.pid})
        time.sleep(1.5)
        cores = meter.cores()
    finally:
        spin.kill()
        sleep.kill()
        spin.wait()
        sleep.wait()
    # A shared box may give the spinner less than a core, never nothing; the sleeper ~0.
    assert 0.2 < cores["spin"] <= 1.05
    assert cores["sleep"] < 0.05
    assert cores["machine"] >= cores["spin"] - 0.05  # the machine's total includes it
    assert cores["other"] >= 0.0 and cores["steal"] >= 0.0


def test_a_process_that_is_gone_reads_nan() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert process_cpu_s(proc.pid) != process_cpu_s(proc.pid)  # nan
