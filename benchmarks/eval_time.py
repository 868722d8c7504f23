"""`make eval` section: does time help? The time-aware SASRec against the same model without time.

MovieLens users 1-2999 with their real timestamps (ml-1m/ratings_users1-2999.dat, ordered by
time per user, leave-one-out as everywhere). Both runs of a pair share every setting, the seed
and the budget (a fixed number of epochs, so a busy box cannot give one of them more); the only
difference is `time_buckets` (log2 interval and session-start inputs, time-bias attention). The
pair is trained once per seed: one seed's difference is within the seed-to-seed spread of
either model, so the verdict needs the same sign from every seed.

    python -m benchmarks.eval --sections time [--quick]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.eval_cold import SPLITS, run_sasrec
from model.baselines import Popularity
from model.data import SequenceDataset, train_sequences
from model.evaluate import (
    MetricAccumulator,
    case_ranks,
    evaluate_scores_fn,
    paired_bootstrap,
    torch_score_fn,
)

METRICS = ("hr@10", "ndcg@10", "mrr")


@dataclass(frozen=True)
class TimePlan:
    file: str  # under --data-root; "" = the synthetic data set
    kind: str
    model: dict[str, Any]  # SASRecConfig fields of both runs
    time: dict[str, Any]  # what the time-aware run adds
    train: dict[str, Any]  # TrainConfig fields of both runs
    seeds: tuple[int, ...] = (42,)  # one pair of runs per seed


TIME = {"time_buckets": 28, "session_gap_s": 1800}  # 28 buckets: up to 2^27 s, ~4 years
FULL = TimePlan(
    "ml-1m/ratings_users1-2999.dat",
    "ml-1m-ratings",
    # Issue 4's ML-1M recipe (max_len 50, post-LN, dropout 0.1), so "without time" is the model
    # `make eval` reports, on a shorter budget.
    {"max_len": 50, "d_model": 64, "n_blocks": 2, "n_heads": 1, "dropout": 0.1, "norm": "post"},
    TIME,
    {
        "batch_size": 128,
        "schedule": "cosine",
        "warmup_epochs": 1.0,
        "windows": "all",
        "patience": 1000,
        "epochs": 20,
        "lr": 6e-3,
        "max_seconds": 1500.0,  # only a cap: every run should get all its epochs
    },
    seeds=(42, 43, 44),
)
QUICK = TimePlan(
    "",
    "synthetic",
    {"max_len": 50, "d_model": 32, "dropout": 0.2},
    TIME,
    {"epochs": 3, "lr": 3e-3, "max_seconds": 90.0},
)


def run_time(ds: SequenceDataset, plan: TimePlan, work: Path, threads: int) -> dict[str, Any]:
    pop = Popularity(train_sequences(ds), ds.num_items)
    rows: list[dict[str, Any]] = [
        {"model": "popularity", **{s: evaluate_scores_fn(pop.score_fn, ds, s, 1) for s in SPLITS}}
    ]
    variants = {"SASRec (no time)": {}, "SASRec + time": plan.time}
    from benchmarks.eval import check_bundle  # eval imports this module

    seeds: list[dict[str, Any]] = []
    onnx: dict[str, Any] | None = None
    for seed in plan.seeds:
        ranks = {}
        for name, extra in variants.items():
            tag = "time" if extra else "plain"
            train_cfg = {**plan.train, "seed": seed}
            net, row = run_sasrec(
                name, ds, {**plan.model, **extra}, train_cfg, work / f"time-{tag}-s{seed}", threads
            )
            net.eval()
            fn = torch_score_fn(net)
            ranks[tag] = {
                s: case_ranks(fn, ds, s, net.cfg.max_len, with_time=bool(extra)) for s in SPLITS
            }
            rows.append({**row, "seed": seed, **{s: _metrics(ranks[tag][s]) for s in SPLITS}})
            if extra and onnx is None:  # the first seed's time-aware model, as served
                onnx = {"seed": seed, **check_bundle(ds, rows[-1], work / "bundle-time")}
        seeds.append(
            {
                "seed": seed,
                "time_minus_plain": {
                    s: {
                        m: paired_bootstrap(ranks["time"][s], ranks["plain"][s], m) for m in METRICS
                    }
                    for s in SPLITS
                },
            }
        )
    return {
        "description": ds.description,
        "rows": rows,
        "seeds": seeds,
        "onnx": onnx,
        **{f"time_minus_plain_{s}": mean_difference(seeds, s) for s in SPLITS},
    }


def _metrics(ranks: np.ndarray) -> dict[str, float]:
    acc = MetricAccumulator()
    acc.add(ranks)
    return acc.result()


def mean_difference(seeds: list[dict[str, Any]], split: str) -> dict[str, float]:
    """Time minus no time, averaged over the seeds' pairs."""
    return {
        m: float(np.mean([s["time_minus_plain"][split][m]["diff"] for s in seeds])) for m in METRICS
    }
