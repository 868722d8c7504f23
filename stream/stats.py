"""Running counters and per-stage timings of the processor, summarised in periodic logs."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

STAGES = ("decode", "state", "score", "produce", "commit")


@dataclass
class ProcessorStats:
    consumed: int = 0
    applied: int = 0
    replayed: int = 0  # events already in the store (at-least-once redelivery), not re-appended
    outputs: int = 0
    batches: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)
    stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    _window_start: float = field(default_factory=time.monotonic)
    _window_consumed: int = 0
    _window_batches: int = 0
    _window_stage_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    def add_stage(self, stage: str, seconds: float) -> None:
        self.stage_s[stage] += seconds
        self._window_stage_s[stage] += seconds

    def end_batch(self, size: int) -> None:
        self.batches += 1
        self.consumed += size
        self._window_batches += 1
        self._window_consumed += size

    def summary(self) -> dict[str, float]:
        """Rates over the window since the last summary; resets the window."""
        now = time.monotonic()
        elapsed = max(now - self._window_start, 1e-9)
        batches = max(self._window_batches, 1)
        out = {
            "events_per_s": self._window_consumed / elapsed,
            "batches": float(self._window_batches),
            "mean_batch": self._window_consumed / batches,
            **{f"{k}_ms_per_batch": 1000 * v / batches for k, v in self._window_stage_s.items()},
        }
        self._window_start = now
        self._window_consumed = 0
        self._window_batches = 0
        self._window_stage_s = dict.fromkeys(STAGES, 0.0)
        return out


class Timer:
    """`with Timer(stats, "score", observe):` adds the block's wall time to a stage (and to a
    histogram's `observe`, when given)."""

    __slots__ = ("_observe", "_stage", "_stats", "_t0")

    def __init__(
        self, stats: ProcessorStats, stage: str, observe: Callable[[float], None] | None = None
    ) -> None:
        self._stats = stats
        self._stage = stage
        self._observe = observe
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self._t0
        self._stats.add_stage(self._stage, elapsed)
        if self._observe is not None:
            self._observe(elapsed)
