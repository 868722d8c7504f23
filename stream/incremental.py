"""Incremental inference (issue 8): one step.onnx position per click instead of a re-encode.

For one poll batch, `IncrementalScorer.score_sessions` splits the touched users in two:
- step rows: the user's cached K/V is exactly their window minus its k newest clicks, 1 <= k <=
  max_catch_up (KVCache.steppable). Their pasts are gathered once into a (b, n_blocks, 2, P, D)
  float16 array right-padded to the batch's longest; step.onnx runs in k waves (wave j appends
  click j of every row that has one: usually one wave), each wave's new keys/values are
  scattered to the pool: numpy fancy-index operations, no per-user array work.
- prefill rows: everyone else (no entry, evicted and not in RocksDB, a model swap, more than
  max_catch_up clicks in one batch, a slid window, a click on a runtime item). prefill.onnx runs
  once over their windows and its K/V output becomes their new entries.
Both calls isolate poison rows by bisection (scoring.isolate_failures); a failed row scores
-inf, is dead-lettered by the processor and loses its entry.

Several clicks in one batch are caught up by steps rather than prefill (the brief allowed
prefill): a drained backlog puts ~4 clicks of each user of a partition in a batch, and a step
position costs about a twelfth of a prefill row.

The window is the one full re-encoding scores (scoring.session_inputs: the newest
`window_len(count, max_len, stride)` items, from the session's event counter), so with a full
window a click slides it by `stride` and the prefill rebuilds it; outputs equal model.onnx's
on the same window within the bundle's stated tolerance (fp16 cache).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from export.bundle import Bundle
from stream.ann import AnnParams, VectorRanker
from stream.config import ProcessorSettings
from stream.errors import ScoringError, StreamError
from stream.itemtable import TableView
from stream.kvcache import HalfArray, KVBacking, KVCache
from stream.scoring import (
    FloatArray,
    IntArray,
    ModelInputs,
    OnnxScorer,
    Scored,
    Scorer,
    check_hidden,
    check_scores,
    full_scores,
    isolate_failures,
    onnx_session,
    required_times,
    top_k,
    width_chunks,
    window_axis_free,
)
from stream.state import RocksSessionStore, Session

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]

_PREFILL_IO = ({"item_seq"}, ["scores", "hidden", "kv"])
_STEP_IO = ({"item", "position", "past_kv"}, ["scores", "hidden", "new_kv"])
# A time-aware bundle's graphs also read click times (epoch seconds): the windows' and, for the
# step, the new click's and the cached slots' (export/step_export.py).
_PREFILL_TIME, _STEP_TIME = {"time_seq"}, {"time", "past_time"}


def _io(io: tuple[set[str], list[str]], head: bool, times: set[str]) -> tuple[set[str], list[str]]:
    """A headless bundle's graphs have the same inputs and outputs less `scores`; a
    time-aware one's have the time inputs too."""
    return io[0] | times, io[1] if head else io[1][1:]


class IncrementalScorer:
    """model.onnx for full re-encodes (the Scorer protocol), prefill.onnx and step.onnx with a
    per-user K/V cache for `score_sessions`. `timings` (seconds) and `rows` count the work by
    stage for benchmarks and logs."""

    def __init__(
        self,
        bundle: Bundle,
        threads: int = 1,
        *,
        cache_bytes: int = 256 << 20,
        backing: KVBacking | None = None,
        max_catch_up: int = 8,
        max_rows: int | None = None,
    ) -> None:
        spec, prefill, step = bundle.step, bundle.prefill_path, bundle.step_path
        if spec is None or prefill is None or step is None:
            raise ScoringError(
                f"{bundle.path} has no step model; use inference=full or re-export the model "
                "with positions=first"
            )
        self.full = OnnxScorer(bundle, threads, max_rows=max_rows)
        self.max_rows = max_rows  # rows per onnxruntime call (None: the whole batch)
        self.bundle, self.items = bundle, self.full.items
        self.model_version, self.max_len = bundle.model_version, bundle.max_len
        self.stride = spec.stride
        self.score_head = bundle.score_head
        self.ranker: VectorRanker | None = None  # top-k of a headless bundle (make_scorer)
        self._prefill = onnx_session(prefill, threads)
        self._step = onnx_session(step, threads)
        self.uses_time = self.full.uses_time  # model.onnx reads time_seq: so must the pair
        timed = self.uses_time
        self._prefill_io = _io(_PREFILL_IO, self.score_head, _PREFILL_TIME if timed else set())
        self._step_io = _io(_STEP_IO, self.score_head, _STEP_TIME if timed else set())
        _check_io(self._prefill, prefill.name, self._prefill_io)
        _check_io(self._step, step.name, self._step_io)
        self._prefill_trims = window_axis_free(self._prefill)
        self.kv_shape = (spec.n_blocks, 2, spec.d_model)
        # Last: it drops RocksDB's entries of another model, so only once the model loaded.
        self.cache = KVCache(
            n_blocks=spec.n_blocks, d_model=spec.d_model, max_len=bundle.max_len,
            model_version=bundle.model_version, budget_bytes=cache_bytes, backing=backing,
        )  # fmt: skip
        # Clicks of one user in one batch that are stepped rather than re-encoded by prefill: a
        # step position costs ~1/12 of a prefill row (benchmarks/results/model_ceiling.json).
        self.max_catch_up = max_catch_up
        self.timings: defaultdict[str, float] = defaultdict(float)
        self.rows: Counter[str] = Counter()

    # -- the Scorer protocol and the item table seam ------------------------------------------
    def score(self, item_seq: IntArray, time_seq: IntArray | None = None) -> FloatArray:
        return self.full.score(item_seq, time_seq)

    def score_hidden(
        self, item_seq: IntArray, time_seq: IntArray | None = None
    ) -> tuple[FloatArray | None, FloatArray | None]:
        return self.full.score_hidden(item_seq, time_seq)

    def add_items(
        self, item_ids: Sequence[str], vectors: FloatArray, bias: FloatArray | None = None
    ) -> int:
        return self.full.add_items(item_ids, vectors, bias)

    def remove_items(self, item_ids: Sequence[str]) -> None:
        self.full.remove_items(item_ids)

    # -- the two ONNX calls (tests wrap these to simulate model defects) ----------------------
    def run_prefill(
        self, item_seq: IntArray, time_seq: IntArray | None = None
    ) -> tuple[FloatArray | None, FloatArray, HalfArray]:
        """(b, W)[, time_seq (b, W) for a time-aware bundle] -> scores (b, N + 1) (None when
        headless), hidden (b, D), kv (b, nb, 2, W, D); W is max_len, or less when the graph's
        window axis is free (`_prefill_trims`)."""
        feeds: dict[str, Array] = {"item_seq": item_seq}
        if self.uses_time:
            feeds["time_seq"] = required_times(time_seq, "time_seq")
        scores, hidden, kv = self._outputs(self._prefill, self._prefill_io, feeds)
        nb, two, d = self.kv_shape
        self._check(scores, hidden, kv, (len(item_seq), nb, two, item_seq.shape[1], d))
        return scores, hidden, kv

    def run_step(
        self,
        item: IntArray,
        position: IntArray,
        past_kv: HalfArray,
        click_time: IntArray | None = None,
        past_time: IntArray | None = None,
    ) -> tuple[FloatArray | None, FloatArray, HalfArray]:
        """item (b,), position (b,), past_kv (b, nb, 2, P, D)[, click_time (b,) and past_time
        (b, P) epoch seconds for a time-aware bundle] -> scores (None when headless), hidden,
        new_kv (b, nb, 2, D)."""
        feeds: dict[str, Array] = {"item": item, "position": position, "past_kv": past_kv}
        if self.uses_time:
            feeds["time"] = required_times(click_time, "time")
            feeds["past_time"] = required_times(past_time, "past_time")
        scores, hidden, new_kv = self._outputs(self._step, self._step_io, feeds)
        self._check(scores, hidden, new_kv, (len(item), *self.kv_shape))
        return scores, hidden, new_kv

    def _outputs(
        self, session: ort.InferenceSession, io: tuple[set[str], list[str]], feeds: dict[str, Array]
    ) -> tuple[Any, Any, Any]:
        out = _run(session, io[1], feeds)
        return (out[0], out[1], out[2]) if self.score_head else (None, out[0], out[1])

    def _check(
        self, scores: FloatArray | None, hidden: FloatArray, kv: HalfArray, shape: tuple[int, ...]
    ) -> None:
        if scores is None:
            check_hidden(hidden, shape[0])
        else:
            check_scores(scores, shape[0], self.bundle.num_items + 1)
        if kv.shape != shape or kv.dtype != np.float16:
            raise ScoringError(
                f"model returned K/V {kv.dtype} {kv.shape}; expected float16 {shape}"
            )

    # -- one batch ------------------------------------------------------------------------------
    def score_sessions(
        self,
        users: Sequence[str],
        sessions: Sequence[Session],
        inputs: ModelInputs,
        view: TableView,
    ) -> Scored:
        """Scores of every row (B, N + 1 + M) and hidden (B, D); failed rows -inf / zero."""
        t0 = time.perf_counter()
        B = len(users)
        cache = self.cache
        slots = cache.lookup(users)  # (B,)
        # Clicks the entry lacks; the event just before them must be the entry's newest.
        pending = np.where(slots >= 0, inputs.lengths - cache.length[np.maximum(slots, 0)], 0)
        prev = np.fromiter(
            (s.offsets[-k - 1] if 0 < k < len(s.offsets) else -1
             for s, k in zip(sessions, pending.tolist(), strict=True)),
            np.int64, B,
        )  # fmt: skip
        last = np.fromiter((s.offsets[-1] if s.offsets else -1 for s in sessions), np.int64, B)
        parts = np.fromiter((s.partition for s in sessions), np.int64, B)
        stepping = cache.steppable(slots, inputs.starts, pending, prev, parts, self.max_catch_up)
        width = view.num_model if self.score_head else 0  # headless: ranked from hidden
        scores = np.full((B, width), -np.inf, dtype=np.float32)
        hidden = np.zeros((B, self.kv_shape[2]), dtype=np.float32)
        self.timings["lookup"] += time.perf_counter() - t0
        out = _Outputs(scores, hidden, last, parts)
        failed = self._steps(np.flatnonzero(stepping), slots, pending, inputs, out)
        failed |= self._prefills(np.flatnonzero(~stepping), users, inputs, out)
        if failed:
            cache.drop([users[r] for r in failed])
        cache.write_back()
        if not self.score_head:
            return Scored(None, hidden, failed)
        return Scored(view.extend(scores, hidden), hidden, failed)

    def _steps(
        self, rows: IntArray, slots: IntArray, pending: IntArray, inputs: ModelInputs, out: _Outputs
    ) -> dict[int, ScoringError]:
        """Waves of step.onnx: wave j appends click j of every row that has one; rows sorted
        by clicks pending, so a wave's rows are a prefix and its past a contiguous slice."""
        if not len(rows):
            return {}
        t0 = time.perf_counter()
        rows = rows[np.argsort(-pending[rows], kind="stable")]
        slots, k = slots[rows], pending[rows]  # (b,), (b,) descending
        n0 = self.cache.length[slots]  # (b,) cached positions before this batch
        L = self.max_len
        # Gathered once; a wave's new K/V go here (for the next wave) and to the pool.
        P = max(1, int((n0 + k - 1).max()))
        work = self.cache.gather(slots, P)  # (b, nb, 2, P, D)
        times = None if inputs.time_seq is None else inputs.time_seq[rows]  # (b, L)
        past_time = None
        if times is not None and self.uses_time:  # slot s of a row's window is column L - n + s
            cols = (L - inputs.lengths[rows])[:, None] + np.arange(P)[None, :]  # (b, P)
            past_time = np.take_along_axis(times, np.minimum(cols, L - 1), axis=1)  # (b, P)
        self.timings["gather"] += time.perf_counter() - t0

        def call(lo: int, hi: int) -> None:
            self.cache.length[slots[lo:hi]] = n0[lo:hi]  # a bisection retry starts over
            for j in range(int(k[lo])):
                t1 = time.perf_counter()
                b = lo + int((k[lo:hi] > j).sum())  # rows lo:b have a click at wave j
                positions = n0[lo:b] + j  # (w,)
                column = L - k[lo:b] + j  # (w,) the wave's click in the left-padded window
                items = inputs.item_seq[rows[lo:b], column]  # (w,)
                click_time = None if times is None else times[np.arange(lo, b), column]
                past = None if past_time is None else past_time[lo:b]  # slots >= position: unread
                scores, hidden, new_kv = self.run_step(
                    items, positions, work[lo:b], click_time, past
                )
                t2 = time.perf_counter()
                more = lo + int((k[lo:hi] > j + 1).sum())  # rows with a later wave
                work[np.arange(lo, more), :, :, positions[: more - lo]] = new_kv[: more - lo]
                self.cache.append(slots[lo:b], new_kv, out.last[rows[lo:b]])
                out.keep(rows[more:b], scores, hidden, more - lo)
                self.timings["step"] += t2 - t1
                self.timings["scatter"] += time.perf_counter() - t2
                self.rows["step_positions"] += b - lo

        self.rows["step"] += len(rows)
        return _in_batch(rows, isolate_failures(call, len(rows), self.max_rows))

    def _prefills(
        self, rows: IntArray, users: Sequence[str], inputs: ModelInputs, out: _Outputs
    ) -> dict[int, ScoringError]:
        """prefill.onnx over the rows' windows; a graph with a free window axis runs on rows
        sorted by window length, each call cut to its longest window (a first-seen user's few
        clicks cost a few positions, not max_len)."""
        if not len(rows):
            return {}
        chunks = None
        if self._prefill_trims:
            rows = rows[np.argsort(inputs.lengths[rows], kind="stable")]
            chunks = width_chunks(inputs.lengths[rows], self.max_rows)
        item_seq = inputs.item_seq[rows]  # (b, L)
        time_seq = None if inputs.time_seq is None else inputs.time_seq[rows]  # (b, L)
        L = self.max_len

        def call(lo: int, hi: int) -> None:
            t1 = time.perf_counter()
            seq, times = item_seq[lo:hi], None if time_seq is None else time_seq[lo:hi]
            if self._prefill_trims:
                width = max(1, int(inputs.lengths[rows[lo:hi]].max()))
                seq, times = seq[:, L - width :], None if times is None else times[:, L - width :]
            scores, hidden, kv = self.run_prefill(seq, times)
            t2 = time.perf_counter()
            r = rows[lo:hi]
            out.keep(r, scores, hidden)
            self.cache.put(
                [users[i] for i in r], kv, inputs.lengths[r], inputs.starts[r], out.last[r],
                out.parts[r],
            )  # fmt: skip
            self.timings["prefill"] += t2 - t1
            self.timings["put"] += time.perf_counter() - t2

        self.rows["prefill"] += len(rows)
        return _in_batch(rows, isolate_failures(call, len(rows), self.max_rows, chunks=chunks))


class _Outputs:
    """The batch's result arrays, filled by row as calls succeed."""

    __slots__ = ("hidden", "last", "parts", "scores")

    def __init__(
        self, scores: FloatArray, hidden: FloatArray, last: IntArray, parts: IntArray
    ) -> None:
        self.scores, self.hidden, self.last, self.parts = scores, hidden, last, parts

    def keep(
        self, rows: IntArray, scores: FloatArray | None, hidden: FloatArray, skip: int = 0
    ) -> None:
        """Rows `rows` take the call's outputs from its row `skip` on."""
        if scores is not None:
            self.scores[rows] = scores[skip:]
        self.hidden[rows] = hidden[skip:]


def _in_batch(rows: IntArray, failed: dict[int, ScoringError]) -> dict[int, ScoringError]:
    return {int(rows[k]): exc for k, exc in failed.items()}


def _run(session: ort.InferenceSession, names: list[str], feeds: dict[str, Array]) -> list[Array]:
    try:
        out: list[Any] = session.run(names, feeds)
        return out
    except Exception as exc:  # onnxruntime's own error types
        raise ScoringError(f"onnxruntime failed on a batch: {exc}") from exc


def _check_io(session: ort.InferenceSession, name: str, io: tuple[set[str], list[str]]) -> None:
    inputs = {i.name for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    if inputs != io[0] or not set(io[1]) <= outputs:
        raise ScoringError(
            f"{name} has inputs {sorted(inputs)} and outputs {sorted(outputs)}; the bundle "
            f"contract needs inputs {sorted(io[0])} and outputs {io[1]}"
        )


def make_scorer(
    bundle: Bundle, settings: ProcessorSettings, store: object = None
) -> OnnxScorer | IncrementalScorer:
    """The scorer `settings.inference` asks for (auto: incremental when the bundle can); the
    K/V cache persists in `store` when it is a RocksSessionStore."""
    mode = settings.inference
    scorer: OnnxScorer | IncrementalScorer
    if mode == "full" or (mode == "auto" and bundle.step is None):
        scorer = OnnxScorer(bundle, settings.onnx_threads, max_rows=settings.onnx_max_rows)
    else:
        backing = store if isinstance(store, RocksSessionStore) else None
        scorer = IncrementalScorer(
            bundle, settings.onnx_threads, cache_bytes=int(settings.kv_cache_mb * (1 << 20)),
            backing=backing, max_rows=settings.onnx_max_rows,
        )  # fmt: skip
    if not bundle.score_head:
        view = scorer.items.view
        assert view.bundle_vectors is not None  # a headless bundle must carry item_vectors.npy
        params = AnnParams(ef_search=settings.ann_ef_search, threads=settings.ann_threads)
        scorer.ranker = VectorRanker.for_bundle(
            view.bundle_vectors, settings.topk, settings.state_dir / "ann", params,
            bias=view.bundle_bias,
        )  # fmt: skip
    return scorer


def score_batch(
    scorer: Scorer, users: list[str], sessions: list[Session], inputs: ModelInputs, view: TableView
) -> Scored:
    """Incremental (step/prefill with the K/V cache) when the scorer has a step model, else a
    full re-encode; both isolate the rows the model rejects."""
    if isinstance(scorer, IncrementalScorer):
        return scorer.score_sessions(users, sessions, inputs, view)
    return full_scores(scorer, inputs, view)


def rank_batch(
    scorer: Scorer, scored: Scored, seen: IntArray, view: TableView, k: int
) -> tuple[IntArray, FloatArray]:
    """Best k item indices per row and their scores (stream.scoring.top_k's contract): from
    the scores when the model has a score head, else from the hidden states by the scorer's
    VectorRanker (ANN or exact over item_vectors.npy, runtime items merged exactly)."""
    if scored.scores is not None:
        return top_k(scored.scores, seen, k)
    ranker = getattr(scorer, "ranker", None)
    if not isinstance(ranker, VectorRanker) or scored.hidden is None:
        raise ScoringError("a headless model needs a ranker: build the scorer with make_scorer")
    return ranker.top_k(scored.hidden, seen, view, k)


def kv_cache_of(scorer: Scorer) -> KVCache | None:
    return scorer.cache if isinstance(scorer, IncrementalScorer) else None


def release_kv(scorer: Scorer, partitions: set[int] | None) -> None:
    """Write changed K/V entries back to RocksDB: of these partitions (revoked or lost; their
    memory is freed), or all of them (None: on close)."""
    cache = kv_cache_of(scorer)
    if cache is None:
        return
    try:
        cache.flush() if partitions is None else cache.release(partitions)
    except StreamError:
        # Derived data: prefill rebuilds it on the users' next clicks.
        logger.exception("could not write the K/V cache back to the session store")
