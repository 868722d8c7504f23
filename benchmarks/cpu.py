"""Where the cores went during a measurement: CPU time of named processes, from /proc (Linux).

The latency benchmark runs the producer, the broker, the processor and a listener on the same
two cores; their CPU shares say whether the processor was starved or waiting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far; nan once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    # Fields after the command name, which is in parentheses and may hold spaces: utime and
    # stime are the 14th and 15th fields of the line, so the 12th and 13th after ")".
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent neither idle nor waiting for I/O."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / TICKS


class CpuMeter:
    """Cores used on average since `start()`, per named process and for the whole machine."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.start()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        self._busy0 = machine_busy_s()

    def cores(self) -> dict[str, float]:
        """{name: cores} for each process, `machine` (all of it) and `other` (the rest)."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        used = {
            name: (process_cpu_s(pid) - self._cpu0[name]) / elapsed
            for name, pid in self.pids.items()
        }
        machine = (machine_busy_s() - self._busy0) / elapsed
        named = sum(v for v in used.values() if v == v)  # nan (a process gone) counts as 0
        return {**used, "machine": machine, "other": max(machine - named, 0.0)}
