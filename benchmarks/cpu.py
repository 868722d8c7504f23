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


def machine_cpu_s() -> tuple[float, float]:
    """CPU seconds the whole machine has run work (not idle, not waiting for I/O), and the
    seconds its virtual CPUs wanted to run but the host ran something else (steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq) / TICKS, steal / TICKS


class CpuMeter:
    """Cores used on average since `start()`, per named process and for the whole machine."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self.start()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        self._busy0, self._steal0 = machine_cpu_s()

    def cores(self) -> dict[str, float]:
        """{name: cores} for each process, `machine` (all of it), `other` (the rest of it) and
        `steal` (cores the host withheld)."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        used = {
            name: (process_cpu_s(pid) - self._cpu0[name]) / elapsed
            for name, pid in self.pids.items()
        }
        busy, steal = machine_cpu_s()
        machine = (busy - self._busy0) / elapsed
        named = sum(v for v in used.values() if v == v)  # nan (a process gone) counts as 0
        # steal: a shared host slowing this box down (every figure of the window with it).
        return {
            **used,
            "machine": machine,
            "other": max(machine - named, 0.0),
            "steal": (steal - self._steal0) / elapsed,
        }
