"""Scoring: the Scorer protocol, OnnxScorer (model.onnx of a bundle), the model's inputs for a
batch of sessions, top-k, and the failure isolation both engines and both inference modes use.

The bundle's `model.onnx` maps a left-padded window of item indices (B, max_len) to scores for
every item index (B, num_items + 1) and, when exported with it, the last hidden state (B, D).
The processor extends those columns with runtime items (stream.itemtable), then top-k excludes
padding and every item already in the session.

Which items the model sees: the newest `window_len(count, max_len, stride)` of the session
(export.bundle's window rule, stride from the bundle's step section; 1 without one, i.e. the
last max_len items). Full re-encoding and incremental inference use the same window, so they
return the same lists; the window length comes from the session's event counter, not from the
stored items (sessions keep only the last max_len of them).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from export.bundle import ITEM_BIAS, KNOWN_INPUTS, Bundle, window_len
from stream.ann import VectorRanker
from stream.codec import WireItem
from stream.errors import ScoringError
from stream.itemtable import ItemTable, TableView
from stream.state import Session

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


class Scorer(Protocol):
    model_version: str
    max_len: int

    def score(self, item_seq: IntArray) -> FloatArray: ...


def onnx_session(path: object, threads: int) -> ort.InferenceSession:
    """A CPU onnxruntime session with the processor's threading (one loop, `threads` intra-op)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Batch shapes vary every poll and a memory pattern is planned and kept per shape: off,
    # the processor's RSS at 1M users fell 1,568 -> 1,122 MB at no measured cost
    # (BENCHMARKS.md, RSS at 1M users).
    opts.enable_mem_pattern = False
    try:
        return ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ScoringError(f"onnxruntime cannot load {path}: {exc}") from exc


def load_item_table(bundle: Bundle) -> ItemTable:
    """The bundle's items, with item_vectors.npy when the bundle carries it, and a text-aware
    bundle's novelty boost (item_bias.npy, manifest config novelty_boost)."""
    path = bundle.item_vectors_path
    vectors = None if path is None else _read_array(path)
    bias = _read_array(bundle.path / ITEM_BIAS) if ITEM_BIAS in bundle.manifest.files else None
    boost = float(bundle.manifest.config.get("novelty_boost") or 0.0)
    return ItemTable(bundle.item_ids, vectors, bundle_bias=bias, runtime_boost=boost)


def _read_array(path: Path) -> FloatArray:
    try:
        array: FloatArray = np.load(path, allow_pickle=False).astype(np.float32, copy=False)
    except (OSError, ValueError) as exc:
        raise ScoringError(f"cannot read {path}: {exc}; re-export the bundle") from exc
    return array


class OnnxScorer:
    """onnxruntime session over a verified bundle, and the bundle's scoring table.

    `add_items` / `remove_items` (the runtime item seam, see stream.itemtable) act on
    `self.items`; the processor picks them up at its next batch.
    """

    def __init__(self, bundle: Bundle, threads: int = 1, *, max_rows: int | None = None) -> None:
        self.bundle = bundle
        self.max_rows = max_rows  # rows per onnxruntime call (None: the whole batch)
        self.ranker: VectorRanker | None = None  # top-k of a headless bundle (make_scorer)
        self.model_version = bundle.model_version
        self.max_len = bundle.max_len
        self._session = onnx_session(bundle.model_path, threads)
        self.score_head = bundle.score_head  # False: hidden only, items ranked outside ONNX
        self._check_contract()
        self.trims = window_axis_free(self._session)  # each call cut to its longest window
        self.items = load_item_table(bundle)

    def add_items(
        self, item_ids: Sequence[str], vectors: FloatArray, bias: FloatArray | None = None
    ) -> int:
        if "hidden" not in self._outputs:
            raise ScoringError("model.onnx has no hidden output; re-export it to add items")
        return self.items.add_items(item_ids, vectors, bias)

    def remove_items(self, item_ids: Sequence[str]) -> None:
        self.items.remove_items(item_ids)

    def _check_contract(self) -> None:
        """Refuse a model that does not follow the bundle contract when it is loaded, not on
        its first batch (a hot reload would otherwise dead-letter every event afterwards)."""
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        head = "scores" if self.score_head else "hidden"
        if "item_seq" not in inputs or head not in outputs:
            raise ScoringError(
                f"model.onnx has inputs {sorted(inputs)} and outputs {list(outputs)}; the bundle "
                f"contract needs input item_seq and output {head}"
            )
        problems = []
        extra = sorted(set(inputs) - set(KNOWN_INPUTS))
        if extra:
            problems.append(f"inputs {extra} are not in the contract {list(KNOWN_INPUTS)}")
        for name in KNOWN_INPUTS:
            if name in inputs:
                problems += tensor_problems(inputs[name], "tensor(int64)", self.max_len)
        if self.score_head:
            width = self.bundle.num_items + 1
            problems += tensor_problems(outputs["scores"], "tensor(float)", width)
        if "hidden" in outputs:
            problems += tensor_problems(outputs["hidden"], "tensor(float)", None)
        if problems:
            raise ScoringError(
                f"{self.bundle.model_path} does not follow the bundle contract: "
                + "; ".join(problems)
            )
        # A time-aware model: the processor feeds each window's click times (session_inputs).
        self.uses_time = "time_seq" in inputs
        self._outputs = [
            n
            for n in ("scores", "hidden")
            if n in outputs and (n, self.score_head) != ("scores", False)
        ]

    def score_hidden(
        self, item_seq: IntArray, time_seq: IntArray | None = None
    ) -> tuple[FloatArray | None, FloatArray | None]:
        """(B, max_len) int64 -> scores (B, num_items + 1) (None when headless), hidden (B, D)
        (None when the model has no hidden output)."""
        if self.trims:
            item_seq = trimmed(item_seq)
            time_seq = None if time_seq is None else time_seq[:, -item_seq.shape[1] :]
        feeds = {"item_seq": item_seq}
        if self.uses_time:
            feeds["time_seq"] = required_times(time_seq, "time_seq")
        try:
            out = self._session.run(self._outputs, feeds)
        except Exception as exc:
            raise ScoringError(f"onnxruntime failed on a batch of {len(item_seq)}: {exc}") from exc
        if not self.score_head:
            check_hidden(out[0], len(item_seq))
            return None, out[0]
        check_scores(out[0], len(item_seq), self.bundle.num_items + 1)
        return out[0], (out[1] if len(out) > 1 else None)

    def score(self, item_seq: IntArray, time_seq: IntArray | None = None) -> FloatArray:
        """(B, max_len) int64 -> (B, num_items + 1) float32 (a headless model's hidden @ V.T:
        every item, for callers outside the hot path)."""
        scores, hidden = self.score_hidden(item_seq, time_seq)
        if scores is None:
            view = self.items.view
            vectors = view.bundle_vectors  # a headless bundle always has them
            assert hidden is not None and vectors is not None
            scores = (hidden @ vectors.T).astype(np.float32, copy=False)  # (B, N + 1)
            return scores if view.bundle_bias is None else scores + view.bundle_bias
        return scores


def check_scores(scores: FloatArray, batch: int, width: int) -> None:
    """The contract's (batch, num_items + 1) float32, for dims the model left symbolic."""
    if scores.shape != (batch, width) or scores.dtype != np.float32:
        raise ScoringError(
            f"model returned scores {scores.dtype} {scores.shape} for a batch of {batch}; "
            f"the contract says float32 ({batch}, {width})"
        )


def check_hidden(hidden: FloatArray, batch: int) -> None:
    """A headless model's (batch, D) float32 hidden state, finite (a NaN ranks anything)."""
    if hidden.ndim != 2 or len(hidden) != batch or hidden.dtype != np.float32:
        raise ScoringError(
            f"model returned hidden {hidden.dtype} {hidden.shape} for a batch of {batch}; "
            f"the contract says float32 ({batch}, d_model)"
        )
    if not np.isfinite(hidden).all():
        raise ScoringError("model returned a non-finite hidden state")


def tensor_problems(arg: ort.NodeArg, dtype: str, width: int | None) -> list[str]:
    """(batch, width) of `dtype`; a symbolic or unknown dim is accepted (checked per batch)."""
    problems = []
    if arg.type != dtype:
        problems.append(f"{arg.name} is {arg.type}, the contract says {dtype}")
    shape = arg.shape
    wrong_width = width is not None and len(shape or ()) == 2 and isinstance(shape[1], int)
    if shape is not None and (len(shape) != 2 or (wrong_width and shape[1] != width)):
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
    # argpartition is O(N) per row; only the k winners get sorted. (The k largest are the last
    # k after partitioning at width - k: no negated copy of the whole score array.)
    part = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    best_scores = np.take_along_axis(part_scores, order, axis=1)
    best[~np.isfinite(best_scores)] = 0
    return best.astype(np.int64), best_scores


def left_pad(sequences: Sequence[Sequence[int]], max_len: int) -> IntArray:
    """Left-padded (B, max_len) int64 window, most recent item last."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))  # (B,)
    if len(sequences) and lengths.max() > max_len:
        sequences = [seq[len(seq) - max_len :] if len(seq) > max_len else seq for seq in sequences]
        lengths = np.minimum(lengths, max_len)
    flat = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, int(lengths.sum()))
    # Row-major boolean assignment fills each row's real slots left to right, in order.
    out[np.arange(max_len) >= (max_len - lengths)[:, None]] = flat  # (B, max_len)
    return out


@dataclass(frozen=True, eq=False)
class ModelInputs:
    """One batch's model inputs, row r = the r-th session."""

    seen: IntArray  # (B, S) every session item's index, left-padded: what top_k excludes
    item_seq: IntArray  # (B, L) the model's window, left-padded
    lengths: IntArray  # (B,) real items in item_seq
    starts: IntArray  # (B,) session event number of the window's first item (count - window)
    # (B, L) each window item's click time in epoch seconds, 0 = padding (the bundle
    # contract's time_seq); None unless the model reads time.
    time_seq: IntArray | None = None


def session_window(s: Session, max_len: int, stride: int) -> tuple[int, int]:
    """(events seen, model window length) of a session: the window rule on its event counter,
    capped by the items it still holds."""
    count = max(s.count, len(s.items))
    return count, min(window_len(count, max_len, stride), len(s.items))


def session_inputs(
    sessions: Sequence[Session],
    view: TableView,
    max_len: int,
    stride: int,
    *,
    with_time: bool = False,
) -> ModelInputs:
    """Seen items and the model's window of each session (the window rule in the docstring).

    Items the model cannot embed (unknown to the bundle after a swap, or runtime items) are
    left out of the window; runtime items stay in `seen`. `with_time` (a model with a time_seq
    input) also gives each window item's click time, epoch ms in the session -> seconds.
    """
    index, n_model = view.index, view.num_model
    lookup = index.get
    plain = view.width == n_model  # no runtime items: every known index embeds
    seen_rows: list[list[int]] = []
    windows: list[list[int]] = []
    times: list[list[int]] = []
    starts = np.empty(len(sessions), dtype=np.int64)
    for row, s in enumerate(sessions):
        items = s.items
        found = list(map(lookup, items))  # one C-level pass; None only after a swap
        known = cast(list[int], found) if None not in found else [j for j in found if j]
        count, w = session_window(s, max_len, stride)
        first = len(items) - w
        if plain and len(known) == len(items):
            window = known[first:]
            if with_time:
                times.append(s.ts[first:])
        elif with_time:  # an item that leaves the window takes its time with it
            stamped = zip(map(lookup, items[first:]), s.ts[first:], strict=True)
            pairs = [(j, t) for j, t in stamped if j is not None and j < n_model]
            window = [j for j, _ in pairs]
            times.append([t for _, t in pairs])
        else:
            tail = map(lookup, items[first:])
            window = [j for j in tail if j is not None and j < n_model]
        seen_rows.append(known)
        windows.append(window)
        starts[row] = count - w
    lengths = np.fromiter(map(len, windows), dtype=np.int64, count=len(windows))
    width = max(max_len, max(map(len, seen_rows), default=0))
    return ModelInputs(
        left_pad(seen_rows, width),
        left_pad(windows, max_len),
        lengths,
        starts,
        left_pad(times, max_len) // 1000 if with_time else None,  # ms -> s; padding stays 0
    )


def required_times(times: IntArray | None, name: str) -> IntArray:
    """The click times a time-aware graph reads as input `name`; ScoringError when the caller
    has none (never zeros: the model would see one gap for every click)."""
    if times is None:
        raise ScoringError(f"this model reads click times: pass {name} with the items")
    return times


def isolate_failures(
    call: Callable[[int, int], None],
    rows: int,
    max_rows: int | None = None,
    *,
    chunks: Sequence[tuple[int, int]] | None = None,
) -> dict[int, ScoringError]:
    """`call(lo, hi)` scores rows lo:hi and keeps its results itself; if a call fails, bisect
    to the rows the model rejects and return them with their error.

    Calls cover at most `max_rows` rows (None: the whole batch at once): onnxruntime keeps
    the activations of ~256 rows in cache and its arena stays small (BENCHMARKS.md, RSS at 1M
    users: 145 MB instead of 529 MB for the bare model, 1.3-1.8x the sequences/s). `chunks`
    (ranges covering 0..rows, e.g. from `width_chunks`) sets the calls instead. Bisection
    works within each chunk and costs O(failures · log chunk) calls; a call's results must
    only be kept when it succeeds (the step path's cache update included).
    """
    if chunks is None and max_rows is not None and 0 < max_rows < rows:
        chunks = [(lo, min(lo + max_rows, rows)) for lo in range(0, rows, max_rows)]
    if chunks is not None and len(chunks) > 1:
        in_chunks: dict[int, ScoringError] = {}
        for lo, hi in chunks:
            part = isolate_failures(functools.partial(_shifted, call, lo), hi - lo)
            in_chunks |= {lo + row: exc for row, exc in part.items()}
        return in_chunks
    if rows == 0:
        return {}
    try:
        call(0, rows)
        return {}
    except ScoringError as exc:
        if rows == 1:
            return {0: exc}
        logger.exception("batch scoring failed; isolating the rows the model rejects")
    failed: dict[int, ScoringError] = {}
    pending = [(0, rows // 2), (rows // 2, rows)]
    while pending:
        lo, hi = pending.pop()
        try:
            call(lo, hi)
        except ScoringError as exc:
            if hi - lo == 1:
                failed[lo] = exc
            else:
                mid = (lo + hi) // 2
                pending += [(lo, mid), (mid, hi)]
    return failed


def _shifted(call: Callable[[int, int], None], start: int, lo: int, hi: int) -> None:
    call(start + lo, start + hi)


# One onnxruntime call's fixed cost in row-positions of the d=64 model (~0.1 ms against ~3 µs
# per row-position at batch 64; BENCHMARKS.md, "windows cut to their length").
CALL_COST_POSITIONS = 32


def width_chunks(
    widths: IntArray, max_rows: int | None = None, call_cost: int = CALL_COST_POSITIONS
) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) for model calls trimmed to their longest window, over rows sorted by
    window width (ascending): rows of one power-of-two width class share a call, a class joins
    the previous call while padding that call's rows to its width costs less than a call of
    its own, and no range has more than `max_rows` rows."""
    n = len(widths)
    if n == 0:
        return []
    w = np.maximum(np.asarray(widths, dtype=np.int64), 1)
    classes = np.ceil(np.log2(w)).astype(np.int64)  # 1 -> 0, 2 -> 1, 3..4 -> 2, 5..8 -> 3
    starts = [0, *(np.flatnonzero(np.diff(classes)) + 1).tolist()]
    merged: list[tuple[int, int]] = []
    for lo, hi in zip(starts, [*starts[1:], n], strict=True):
        if merged:
            plo, phi = merged[-1]
            if (phi - plo) * int(w[hi - 1] - w[phi - 1]) < call_cost:
                merged[-1] = (plo, hi)
                continue
        merged.append((lo, hi))
    if not max_rows or max_rows <= 0:
        return merged
    return [
        (start, min(start + max_rows, hi)) for lo, hi in merged for start in range(lo, hi, max_rows)
    ]


def window_axis_free(session: ort.InferenceSession) -> bool:
    """Whether the graph's item_seq takes any window width (symbolic axis 1): then each call
    is trimmed to its longest window. Bundles exported before that need exactly max_len."""
    shape = next(i.shape for i in session.get_inputs() if i.name == "item_seq")
    return shape is not None and len(shape) == 2 and not isinstance(shape[1], int)


def trimmed(item_seq: IntArray) -> IntArray:
    """The left-padded window without its all-padding leading columns (at least one column):
    causal attention over left padding makes the outputs the same at any width."""
    real = (item_seq != 0).any(axis=0)  # (L,)
    first = int(real.argmax()) if real.any() else item_seq.shape[1] - 1
    return item_seq[:, first:]


# The explanation seam: explain(best (B, k), item_seq (B, L), item_vectors (N + 1 + M, D)) ->
# because (B, k): for each recommended index, the index of the window item that explains it
# (0 = none). The processor calls it after top-k when set (Processor.explain).
Explainer = Callable[[IntArray, IntArray, FloatArray], IntArray]


@dataclass(frozen=True, eq=False)
class Scored:
    """One batch's scores over the item table, and the model's hidden state per row."""

    scores: FloatArray | None  # (B, N + 1 + M), failed rows -inf; None when headless
    hidden: FloatArray | None  # (B, D); None when model.onnx has no hidden output
    failed: dict[int, ScoringError]


def full_scores(scorer: Scorer, inputs: ModelInputs, view: TableView) -> Scored:
    """Full re-encode of every window (model.onnx), failures isolated, runtime items added.

    A scorer with `score_hidden` (OnnxScorer, IncrementalScorer) also gives the hidden states;
    a plain Scorer (a test's wrapper) gives scores only.
    """
    with_hidden: (
        Callable[[IntArray, IntArray | None], tuple[FloatArray | None, FloatArray | None]] | None
    )
    with_hidden = getattr(scorer, "score_hidden", None)
    head = getattr(scorer, "score_head", True)
    B = len(inputs.item_seq)
    scores = np.full((B, view.num_model if head else 0), -np.inf, dtype=np.float32)
    hidden: FloatArray | None = None
    max_rows = getattr(scorer, "max_rows", None)
    # A scorer that trims its calls (OnnxScorer.trims) gets rows of similar window width
    # together: a call costs about its rows x its longest window.
    order, chunks = np.arange(B), None
    if getattr(scorer, "trims", False):
        order = np.argsort(inputs.lengths, kind="stable")
        chunks = width_chunks(inputs.lengths[order], max_rows)
    item_seq = inputs.item_seq[order]
    time_seq = None if inputs.time_seq is None else inputs.time_seq[order]

    def call(lo: int, hi: int) -> None:
        nonlocal hidden
        rows = order[lo:hi]
        if with_hidden is None:
            scores[rows] = scorer.score(item_seq[lo:hi])
            return
        part, part_hidden = with_hidden(
            item_seq[lo:hi], None if time_seq is None else time_seq[lo:hi]
        )
        if part is not None:
            scores[rows] = part
        if part_hidden is not None:
            if hidden is None:
                hidden = np.zeros((B, part_hidden.shape[1]), dtype=np.float32)
            hidden[rows] = part_hidden

    failed = {
        int(order[row]): exc
        for row, exc in isolate_failures(call, B, max_rows, chunks=chunks).items()
    }
    if not head:
        return Scored(None, hidden, failed)
    return Scored(view.extend(scores, hidden), hidden, failed)


def ranked_items(
    best: Sequence[int] | IntArray,
    best_scores: Sequence[float] | FloatArray,
    item_ids: Sequence[str],
    because: Sequence[int] | IntArray | None = None,
) -> list[WireItem]:
    """One row of top_k's result as the output schema's items (padding dropped), in their
    wire form: the dicts encode_recommendation writes (RecommendedItem.to_dict's), built
    directly because this runs for every output (3 µs per list of 10 instead of 12).

    `because` (k,) is the explanation seam: for each recommended item, the index of the
    window item that explains it (from the processor's `explain` hook; 0 = none), mapped to its
    id here. Rows may be numpy rows or lists (the processor converts the batch once: faster).
    """
    best = best.tolist() if isinstance(best, np.ndarray) else best
    scores = best_scores.tolist() if isinstance(best_scores, np.ndarray) else best_scores
    if because is None:
        return [
            {"item_id": item_ids[i], "score": s, "rank": rank}
            for rank, (i, s) in enumerate(zip(best, scores, strict=True), 1)
            if i > 0
        ]
    why = because.tolist() if isinstance(because, np.ndarray) else because
    return [
        {"item_id": item_ids[i], "score": s, "rank": rank, "because": item_ids[b]}
        if b > 0
        else {"item_id": item_ids[i], "score": s, "rank": rank}
        for rank, (i, s, b) in enumerate(zip(best, scores, why, strict=True), 1)
        if i > 0
    ]
