"""Scoring: the Scorer protocol and OnnxScorer, which reads a model bundle.

The bundle's `model.onnx` maps a left-padded window of item indices (B, max_len) to scores for
every item index (B, num_items + 1). Top-k excludes padding and the items already in the window.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from export.bundle import KNOWN_INPUTS, Bundle
from stream.codec import RecommendedItem
from stream.errors import ScoringError

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


class Scorer(Protocol):
    model_version: str
    max_len: int

    def score(self, item_seq: IntArray) -> FloatArray: ...


class OnnxScorer:
    """onnxruntime session over a verified bundle."""

    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        self.bundle = bundle
        self.model_version = bundle.model_version
        self.max_len = bundle.max_len
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(bundle.model_path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ScoringError(f"onnxruntime cannot load {bundle.model_path}: {exc}") from exc
        self._check_contract()

    def _check_contract(self) -> None:
        """Refuse a model that does not follow the bundle contract when it is loaded, not on
        its first batch (a hot reload would otherwise dead-letter every event afterwards)."""
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        if "item_seq" not in inputs or "scores" not in outputs:
            raise ScoringError(
                f"model.onnx has inputs {sorted(inputs)} and outputs {list(outputs)}; the bundle "
                "contract needs input item_seq and output scores"
            )
        problems = []
        extra = sorted(set(inputs) - set(KNOWN_INPUTS))
        if extra:
            problems.append(f"inputs {extra} are not in the contract {list(KNOWN_INPUTS)}")
        for name in KNOWN_INPUTS:
            if name in inputs:
                problems += _tensor_problems(inputs[name], "tensor(int64)", self.max_len)
        problems += _tensor_problems(outputs["scores"], "tensor(float)", self.bundle.num_items + 1)
        if problems:
            raise ScoringError(
                f"{self.bundle.model_path} does not follow the bundle contract: "
                + "; ".join(problems)
            )
        self._uses_time = "time_seq" in inputs

    def score(self, item_seq: IntArray, time_seq: IntArray | None = None) -> FloatArray:
        """(B, max_len) int64 -> (B, num_items + 1) float32."""
        feeds = {"item_seq": item_seq}
        if self._uses_time:
            feeds["time_seq"] = time_seq if time_seq is not None else np.zeros_like(item_seq)
        try:
            (scores,) = self._session.run(["scores"], feeds)
        except Exception as exc:
            raise ScoringError(f"onnxruntime failed on a batch of {len(item_seq)}: {exc}") from exc
        width = self.bundle.num_items + 1
        if scores.shape != (len(item_seq), width):  # dims the model left symbolic
            raise ScoringError(
                f"model returned scores of shape {scores.shape} for a batch of {len(item_seq)}; "
                f"the contract says ({len(item_seq)}, {width})"
            )
        return np.asarray(scores, dtype=np.float32)


def _tensor_problems(arg: ort.NodeArg, dtype: str, width: int) -> list[str]:
    """(batch, width) of `dtype`; a symbolic or unknown dim is accepted (checked per batch)."""
    problems = []
    if arg.type != dtype:
        problems.append(f"{arg.name} is {arg.type}, the contract says {dtype}")
    shape = arg.shape
    if shape is not None and (len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != width)):
        problems.append(f"{arg.name} has shape {shape}, the contract says [batch, {width}]")
    return problems


def top_k(scores: FloatArray, item_seq: IntArray, k: int) -> tuple[IntArray, FloatArray]:
    """Best k item indices per row, best first, excluding padding and the row's own items.

    Rows with fewer than k candidates left are padded with index 0 / score -inf.
    Modifies `scores` in place (the caller's scratch array).
    """
    # Column 0 is padding; item_seq holds 0 for padding, so this masks it too.
    np.put_along_axis(scores, item_seq, -np.inf, axis=1)
    scores[:, 0] = -np.inf
    k = min(k, scores.shape[1] - 1)
    # argpartition is O(N) per row; only the k winners get sorted.
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    best_scores = np.take_along_axis(part_scores, order, axis=1)
    best[~np.isfinite(best_scores)] = 0
    return best.astype(np.int64), best_scores


def left_pad(sequences: list[list[int]], max_len: int) -> IntArray:
    """Left-padded (B, max_len) int64 window, most recent item last."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = seq[-max_len:]
        if tail:
            out[row, max_len - len(tail) :] = tail
    return out


def model_inputs(
    sessions: Sequence[Sequence[str]], index: Mapping[str, int], max_len: int
) -> tuple[IntArray, IntArray]:
    """(seen, item_seq): every session item as indices, and the model's window of them.

    Items unknown to the bundle (after a swap to a smaller catalogue) are left out. The model
    sees the last max_len items; `seen` (all of them) is what top_k excludes.
    """
    windows = [[index[i] for i in items if i in index] for items in sessions]
    seen = left_pad(windows, max(max_len, max(map(len, windows), default=0)))
    return seen, np.ascontiguousarray(seen[:, -max_len:])


def score_isolating_failures(
    scorer: Scorer, item_seq: IntArray, width: int
) -> tuple[FloatArray, dict[int, ScoringError]]:
    """One model call for the batch; if it fails, bisect to the rows the model rejects.

    Rejected rows score -inf and are returned with their error (the caller dead-letters
    them); bisection costs O(failures · log batch) calls instead of one per row.
    """
    try:
        return scorer.score(item_seq), {}
    except ScoringError:
        logger.exception("batch scoring failed; isolating the rows the model rejects")
    scores = np.full((len(item_seq), width), -np.inf, dtype=np.float32)
    failed: dict[int, ScoringError] = {}
    pending = [(0, len(item_seq))]
    while pending:
        lo, hi = pending.pop()
        try:
            scores[lo:hi] = scorer.score(item_seq[lo:hi])
        except ScoringError as exc:
            if hi - lo == 1:
                failed[lo] = exc
            else:
                mid = (lo + hi) // 2
                pending += [(lo, mid), (mid, hi)]
    return scores, failed


def ranked_items(
    best: IntArray, best_scores: FloatArray, item_ids: Sequence[str]
) -> list[RecommendedItem]:
    """One row of top_k's result as the output schema's items (padding dropped)."""
    return [
        RecommendedItem(item_ids[int(i)], float(s), rank)
        for rank, (i, s) in enumerate(zip(best, best_scores, strict=True), 1)
        if i > 0
    ]
