"""Learning-rate schedule and the time-fitted epoch horizon (see TrainConfig)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace

from model.config import TrainConfig

logger = logging.getLogger(__name__)


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate after `progress` epochs (fractional): linear warmup, then constant or a
    cosine decay that reaches 0 at cfg.epochs."""
    if progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    done = (progress - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def fit_point(cfg: TrainConfig) -> int:
    """The epoch after which fit_epochs sets the horizon: the end of the warmup, before the
    learning rate depends on cfg.epochs."""
    return max(1, int(cfg.warmup_epochs))


def fit_epochs(cfg: TrainConfig, done: int, elapsed: float, deadline: float) -> TrainConfig:
    """cfg with `epochs` cut to what the pace so far fits before the deadline (5% spare for
    validation and load swings). The run from here on is the one `--epochs N` would give."""
    pace = elapsed / done
    fits = done + int(0.95 * max(deadline - time.monotonic(), 0.0) / pace)
    epochs = max(done, min(cfg.epochs, fits))
    logger.info(
        "%.0f s per epoch so far: %d epochs fit in the %.0f s budget (of %d asked); "
        "repeat this run with --epochs %d",
        pace,
        epochs,
        cfg.max_seconds,
        cfg.epochs,
        epochs,
    )
    return replace(cfg, epochs=epochs, fit_epochs=False)
