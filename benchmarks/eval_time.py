"""`make eval` section: does time help? The time-aware SASRec against the same model without time.

MovieLens users 1-2999 with their real timestamps (ml-1m/ratings_users1-2999.dat, ordered by
time per user, leave-one-out as everywhere). Both runs share every setting, the seed and the
budget (a fixed number of epochs, so a busy box cannot give one of them more); the only
difference is `time_buckets` (log2 interval and session-start inputs, time-bias attention).

    python -m benchmarks.eval --sections time [--quick]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.eval_cold import SPLITS, run_sasrec
from model.baselines import Popularity
from model.data import SequenceDataset, train_sequences
from model.evaluate import evaluate_model, evaluate_scores_fn


@dataclass(frozen=True)
class TimePlan:
    file: str  # under --data-root; "" = the synthetic data set
    kind: str
    model: dict[str, Any]  # SASRecConfig fields of both runs
    time: dict[str, Any]  # what the time-aware run adds
    train: dict[str, Any]  # TrainConfig fields of both runs


TIME = {"time_buckets": 28, "session_gap_s": 1800}  # 28 buckets: up to 2^27 s, ~4 years
FULL = TimePlan(
    "ml-1m/ratings_users1-2999.dat",
    "ml-1m-ratings",
    {"max_len": 200, "d_model": 64, "n_blocks": 2, "n_heads": 1, "dropout": 0.2},
    TIME,
    {
        "batch_size": 128,
        "schedule": "cosine",
        "warmup_epochs": 1.0,
        "windows": "all",
        "patience": 1000,
        "epochs": 10,  # ~20 s (no time) and ~30 s (time) each on 2 quiet cores
        "lr": 6e-3,
        "max_seconds": 1500.0,  # only a cap: both runs should get all their epochs
    },
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
    for name, extra in variants.items():
        tag = "time" if extra else "plain"
        model = {**plan.model, **extra}
        net, row = run_sasrec(name, ds, model, plan.train, work / f"time-{tag}", threads)
        rows.append({**row, **{s: evaluate_model(net, ds, s) for s in SPLITS}})
    plain, timed = rows[1]["test"], rows[2]["test"]
    return {
        "description": ds.description,
        "rows": rows,
        "time_minus_plain_test": {k: timed[k] - plain[k] for k in ("hr@10", "ndcg@10", "mrr")},
    }
