"""The one evaluation: full ranking over all items, leave-one-out targets (DESIGN.md).

For each user, items of the history before the target and the padding index 0 are masked;
the target is ranked pessimistically among the remaining items: its 0-based rank is the number
of unmasked other items scoring >= the target. A target the user already had in the history is
still ranked by its own score (repeat clicks count as hits when ranked high).

The core works on numpy scores so that torch models, onnxruntime sessions and baselines all
pass through `evaluate_scores_fn`. Importing this module does not import torch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.data import (
    SequenceDataset,
    Split,
    batch_indices,
    eval_examples,
    eval_times,
    left_pad,
)
from model.data import train_sequences as _train_sequences
from model.errors import EvaluationError

if TYPE_CHECKING:
    from model.sasrec import SASRec

logger = logging.getLogger(__name__)

KS = (5, 10, 20)
ScoreFn = Callable[[np.ndarray], np.ndarray]  # (B, max_len) int64 -> (B, N + 1) float32
# Time-aware models: (item windows, time windows in epoch seconds), both (B, max_len) int64.
TimeScoreFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def pessimistic_ranks(
    scores: np.ndarray, targets: np.ndarray, seen: Sequence[np.ndarray]
) -> np.ndarray:
    """0-based rank of each target: (B, N+1) scores, (B,) targets, B seen-index arrays -> (B,)."""
    scores = np.asarray(scores)
    B = len(targets)
    if scores.ndim != 2 or scores.shape[0] != B or len(seen) != B:
        raise EvaluationError(
            f"scores {scores.shape} do not match {B} targets and {len(seen)} seen"
        )
    rows = np.arange(B)
    target_scores = scores[rows, targets]  # (B,)
    if not np.all(np.isfinite(target_scores)):
        raise EvaluationError("non-finite target scores: the model produced NaN or inf")
    masked = np.zeros(scores.shape, dtype=bool)  # (B, N + 1)
    masked[:, 0] = True
    lengths = [len(s) for s in seen]
    if sum(lengths):
        masked[np.repeat(rows, lengths), np.concatenate(seen)] = True
    masked[rows, targets] = True  # compared against, never counted
    beats = (scores >= target_scores[:, None]) & ~masked  # (B, N + 1)
    return np.asarray(beats.sum(axis=1), dtype=np.int64)


@dataclass
class MetricAccumulator:
    """Sums per-user metrics over batches of ranks; `result()` gives the means."""

    ks: tuple[int, ...] = KS
    count: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, ranks: np.ndarray) -> None:
        parts = {"mrr": case_metric(ranks, "mrr")}
        for k in self.ks:
            hit = parts[f"hr@{k}"] = case_metric(ranks, f"hr@{k}")
            parts[f"ndcg@{k}"] = case_metric(ranks, f"ndcg@{k}")
            parts[f"precision@{k}"] = hit / k
            # One relevant item: precision = hit / k, recall = hit, so F1 = 2 hit / (k + 1).
            parts[f"f1@{k}"] = 2.0 * hit / (k + 1)
        for name, values in parts.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.sum())
        self.count += len(ranks)

    def result(self) -> dict[str, float]:
        if not self.count:
            raise EvaluationError("no users to evaluate (every user has fewer than 3 items)")
        out = {name: total / self.count for name, total in sorted(self.sums.items())}
        out["users"] = float(self.count)
        return out


def evaluate_scores_fn(
    score_fn: ScoreFn,
    dataset: SequenceDataset,
    split: Split = "valid",
    max_len: int = 50,
    batch_size: int = 512,
    *,
    with_time: bool = False,
) -> dict[str, float]:
    """Metrics of score_fn on a leave-one-out split; the whole history is masked, not just the
    window the model sees. With `with_time`, score_fn is a TimeScoreFn and also gets the
    windows' click times (the data set's timestamps, in epoch seconds)."""
    acc = MetricAccumulator()
    acc.add(case_ranks(score_fn, dataset, split, max_len, batch_size, with_time=with_time))
    return acc.result()


def case_ranks(
    score_fn: ScoreFn,
    dataset: SequenceDataset,
    split: Split = "valid",
    max_len: int = 50,
    batch_size: int = 512,
    *,
    with_time: bool = False,
) -> np.ndarray:
    """(users,) int64: each evaluated user's 0-based target rank, in `eval_examples` order (what
    `evaluate_scores_fn` averages; per-case comparisons such as `paired_bootstrap` use it)."""
    histories, targets = eval_examples(dataset, split)
    times = eval_times(dataset, split) if with_time else []
    out = np.full(len(targets), -1, dtype=np.int64)
    # Users in order of history length, so a batch's windows share most of their padding and
    # torch_score_fn can cut it off; each rank goes back to its user's place.
    by_length = np.argsort([len(h) for h in histories], kind="stable")
    for idx in (by_length[b] for b in batch_indices(len(targets), batch_size)):
        batch_hist = [histories[i] for i in idx]
        windows = left_pad(batch_hist, max_len)  # (b, L)
        if with_time:
            scores = score_fn(windows, left_pad([times[i] for i in idx], max_len))  # type: ignore[call-arg]
        else:
            scores = score_fn(windows)  # (b, N + 1)
        if scores.shape[1] != dataset.num_items + 1:
            raise EvaluationError(
                f"scores have {scores.shape[1]} columns, the data set needs "
                f"{dataset.num_items + 1}: model and data set do not match"
            )
        out[idx] = pessimistic_ranks(scores, targets[idx], batch_hist)
    return out


def case_metric(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Per-case values of one metric ("hr@10", "ndcg@10", "mrr") from 0-based ranks."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if metric == "mrr":
        return 1.0 / (ranks + 1.0)
    name, _, k = metric.partition("@")
    if name not in ("hr", "ndcg") or not k.isdigit():
        raise EvaluationError(f"unknown per-case metric {metric!r} (hr@k, ndcg@k or mrr)")
    hit = (ranks < int(k)).astype(np.float64)
    return hit / np.log2(ranks + 2.0) if name == "ndcg" else hit


def paired_bootstrap(
    ranks_a: np.ndarray,
    ranks_b: np.ndarray,
    metric: str = "ndcg@10",
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """How sure is "a beats b" on the same cases: the mean difference of a per-case metric (a
    minus b), a 95 % percentile interval over `resamples` resamplings of the cases (both models
    on the same resampled cases), and the share of resamplings in which a is ahead."""
    a, b = case_metric(ranks_a, metric), case_metric(ranks_b, metric)
    if a.shape != b.shape or not len(a):
        raise EvaluationError(f"paired bootstrap needs equal, non-empty cases: {a.shape} {b.shape}")
    rng = np.random.default_rng(seed)
    diff = a - b
    means = np.array(
        [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)]
    )  # a loop, not a (resamples, cases) index matrix: memory stays O(cases)
    return {
        "diff": float(diff.mean()),
        "lo95": float(np.percentile(means, 2.5)),
        "hi95": float(np.percentile(means, 97.5)),
        "p_a_ahead": float((means > 0).mean()),
        "cases": float(len(diff)),
        "resamples": float(resamples),
    }


def torch_score_fn(model: SASRec) -> ScoreFn:
    """Scores of a torch model; a TimeScoreFn (windows, times) for time-aware models."""
    import torch

    def score(windows: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        # Padding every row shares is dropped: no position depends on the amount of it.
        width = max(int(np.count_nonzero(windows, axis=1).max(initial=0)), 1)
        time_seq = None if times is None else torch.from_numpy(times[:, -width:])
        with torch.no_grad():
            return model.score_last(torch.from_numpy(windows[:, -width:]), time_seq).numpy()

    return score


def evaluate_model(
    model: SASRec, dataset: SequenceDataset, split: Split = "valid", batch_size: int = 512
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        return evaluate_scores_fn(
            torch_score_fn(model),
            dataset,
            split,
            model.cfg.max_len,
            batch_size,
            with_time=bool(model.cfg.time_buckets),
        )
    finally:
        model.train(was_training)


def onnx_score_fn(model_path: Path, threads: int = 2) -> ScoreFn:
    """Score through onnxruntime, the way serving does (input item_seq, output scores); a
    TimeScoreFn (windows, times in epoch seconds) when the graph also reads time_seq."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    uses_time = any(i.name == "time_seq" for i in session.get_inputs())

    def score(windows: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        feeds = {"item_seq": windows}
        if uses_time:
            if times is None:
                raise ValueError(f"{model_path} reads time_seq: evaluate it with_time")
            feeds["time_seq"] = times
        return np.asarray(session.run(["scores"], feeds)[0])

    return score


def popularity_score_fn(dataset: SequenceDataset) -> ScoreFn:
    """The baseline: every user gets the training-split click counts as scores."""
    from model.baselines import Popularity

    return Popularity(_train_sequences(dataset), dataset.num_items).score_fn
