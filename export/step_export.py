"""Export the incremental pair (prefill.onnx, step.onnx) and check it against the full model.

The check replays sessions the way serving does: every row starts from a cache built by prefill
over a prefix (or from an empty cache), then grows one click per call, rows at different
positions in one batch, the cache right-padded with garbage. Each step's scores and hidden
state are compared with the full model's on the same window (model/incremental.py, bundle.py).
Time-aware models get click times with every call (graphs.parity_times), the step the new
click's time and the cached slots' times (`past_time`, garbage beyond the position as well).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.bundle import PREFILL, STEP, StepSpec, default_stride
from export.errors import ParityError
from export.graphs import (
    TOP_K,
    WINDOW_AXES,
    check_output,
    check_top_k,
    legacy_export,
    parity_times,
    parity_windows,
    short_windows,
)
from model.incremental import FullModel, Prefill, StepModel, uses_time
from model.sasrec import SASRec

logger = logging.getLogger(__name__)

# The float16 cache rounds keys/values to ~5e-4 relative; scores move by about 1e-4 of their
# own range (measured, ML-1M d=32 and synthetic models). Scores and hidden are held to
# STEP_RTOL * (1 + max |full-model value| of the batch); top-10 must agree outside ties.
STEP_RTOL = 2e-3
PREFILL_ATOL = 1e-4  # scores/hidden of prefill.onnx vs torch: the full model's float32 graph

Arrays = tuple[np.ndarray, ...]
# item_seq (B, L)[, time_seq (B, L)] -> scores, hidden[, kv]
SeqFn = Callable[..., Arrays]
# item, position, past_kv[, time (B,), past_time (B, P)] -> scores, hidden, new_kv
StepFn = Callable[..., Arrays]

PREFILL_INPUTS = ("item_seq", "time_seq")  # the second for time-aware models only
STEP_INPUTS = ("item", "position", "past_kv", "time", "past_time")  # the last two: time models


def export_prefill(model: SASRec, path: Path, *, opset: int = 17) -> Path:
    example = torch.ones(2, model.cfg.max_len, dtype=torch.int64)  # (B, L)
    timed = uses_time(model)
    args = (example, torch.arange(2 * model.cfg.max_len).reshape(example.shape) * 60)
    batch = {0: "batch"}
    return legacy_export(
        Prefill(model),
        args if timed else args[:1],
        path,
        input_names=list(PREFILL_INPUTS if timed else PREFILL_INPUTS[:1]),
        output_names=["scores", "hidden", "kv"],
        dynamic_axes={
            **{name: WINDOW_AXES for name in PREFILL_INPUTS},
            "scores": batch,
            "hidden": batch,
            "kv": {0: "batch", 3: "window"},
        },
        opset=opset,
    )


def export_step(model: SASRec, path: Path, *, opset: int = 17) -> Path:
    cfg = model.cfg
    item = torch.ones(2, dtype=torch.int64)  # (B,)
    position = torch.tensor([0, 2], dtype=torch.int64)  # (B,)
    past = torch.zeros(2, cfg.n_blocks, 2, 3, cfg.d_model, dtype=torch.float16)  # (B, nb, 2, P, D)
    timed = uses_time(model)
    times = (torch.tensor([4000, 9000]), torch.tensor([[0, 0, 0], [1000, 2000, 5000]]))
    batch = {0: "batch"}
    return legacy_export(
        StepModel(model),
        (item, position, past, *times) if timed else (item, position, past),
        path,
        input_names=list(STEP_INPUTS if timed else STEP_INPUTS[:3]),
        output_names=["scores", "hidden", "new_kv"],
        dynamic_axes={
            "item": batch,
            "position": batch,
            "past_kv": {0: "batch", 3: "past"},
            "time": batch,
            "past_time": {0: "batch", 1: "past"},
            "scores": batch,
            "hidden": batch,
            "new_kv": batch,
        },
        opset=opset,
    )


def step_spec(model: SASRec, stride: int | None = None) -> StepSpec:
    cfg = model.cfg
    return StepSpec(
        n_blocks=cfg.n_blocks,
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        stride=default_stride(cfg.max_len) if stride is None else stride,
    )


def export_step_pair(model: SASRec, out_dir: Path, *, opset: int = 17) -> dict[str, Path]:
    """Write prefill.onnx and step.onnx into out_dir: {file name: path}."""
    return {
        PREFILL: export_prefill(model, out_dir / PREFILL, opset=opset),
        STEP: export_step(model, out_dir / STEP, opset=opset),
    }


@dataclass
class Replay:
    """One step call of a replay: the rows stepped, and step vs full-model outputs."""

    rows: np.ndarray  # (b,) row indices into the replayed windows
    lengths: np.ndarray  # (b,) window length after the step
    expected: Arrays  # full model: scores (b, N + 1), hidden (b, D)
    actual: Arrays  # step model: scores, hidden


def replay(
    windows: np.ndarray,
    full: SeqFn,
    prefill: SeqFn,
    step: StepFn,
    *,
    from_empty: bool = False,
    seed: int = 0,
    times: np.ndarray | None = None,
) -> Iterator[Replay]:
    """Grow each row of `windows` (B, L) left-padded click by click through `step`, from a cache
    that `prefill` built over a random prefix (empty for about half the rows, for all of them
    with from_empty), and pair every step's outputs with `full` on the same window. `times`
    (B, L), aligned with `windows`, go with every call (time-aware models)."""
    rng = np.random.default_rng(seed)
    B, L = windows.shape
    lengths = (windows != 0).sum(axis=1)  # (B,)
    items = _left_align(windows, lengths)  # (B, L): items[r, t] = the row's t-th click
    clock = None if times is None else _left_align(times, lengths)  # (B, L) their times
    start = rng.integers(0, lengths + 1)  # (B,) positions already cached by prefill
    start[(rng.random(B) < 0.5) | from_empty] = 0
    with_prefix = np.flatnonzero(start > 0)
    kv = prefill(*_windows_of(items, clock, start))[2]  # (B, nb, 2, L, D)
    # Right padding with finite garbage: the step model must ignore slots >= position.
    cache = (rng.standard_normal(kv.shape) * 50).astype(np.float16)  # (B, nb, 2, L, D)
    for row in with_prefix:
        cache[row, :, :, : start[row]] = kv[row, :, :, L - start[row] :]
    position = start.copy()  # (B,)
    while np.any(active := position < lengths):
        rows = np.flatnonzero(active)
        if len(rows) > 2:  # a random subset per call: positions differ within a batch
            rows = rows[rng.random(len(rows)) < 0.7] if rng.random() < 0.5 else rows
        pos = position[rows]  # (b,)
        P = max(1, int(pos.max()))
        past = cache[rows, :, :, :P]  # (b, nb, 2, P, D)
        timing: tuple[np.ndarray, ...] = ()
        if clock is not None:  # the new click's time; the cached slots' times, garbage after
            past_time = clock[rows, :P].copy()  # (b, P)
            beyond = np.arange(P)[None, :] >= pos[:, None]
            past_time[beyond] = rng.integers(0, 2_000_000_000, size=int(beyond.sum()))
            timing = (clock[rows, pos], past_time)
        scores, hidden, new_kv = step(items[rows, pos], pos, past, *timing)
        cache[rows, :, :, pos] = new_kv
        position[rows] += 1
        grown = None if clock is None else clock[rows]
        expected = full(*_windows_of(items[rows], grown, position[rows]))[:2]
        yield Replay(rows, position[rows], expected, (scores, hidden))


def _left_align(windows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B, L) left-padded windows and their (B,) lengths -> (B, L) left-aligned."""
    out = np.zeros_like(windows)
    L = windows.shape[1]
    for r, n in enumerate(lengths):
        out[r, :n] = windows[r, L - n :]
    return out


def _windows_of(
    items: np.ndarray, clock: np.ndarray | None, lengths: np.ndarray
) -> tuple[np.ndarray, ...]:
    """The left-padded windows of the first `lengths` clicks (and their times, if any)."""
    out = (_left_pad(items, lengths),)
    return out if clock is None else (*out, _left_pad(clock, lengths))


def _left_pad(items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(B, L) left-aligned items and (B,) lengths -> (B, L) left-padded windows."""
    out = np.zeros_like(items)
    L = items.shape[1]
    for r, n in enumerate(lengths):
        out[r, L - n :] = items[r, :n]
    return out


def torch_fns(model: SASRec) -> tuple[SeqFn, SeqFn, StepFn]:
    """(full, prefill, step) through PyTorch, numpy in and out."""
    full_m, prefill_m, step_m = FullModel(model).eval(), Prefill(model), StepModel(model).eval()

    def run(module: torch.nn.Module, *args: np.ndarray) -> Arrays:
        with torch.no_grad():
            return tuple(t.numpy() for t in module(*(torch.from_numpy(a) for a in args)))

    return (
        lambda *seq: run(full_m, *seq),
        lambda *seq: run(prefill_m, *seq),
        lambda *step_in: run(step_m, *step_in),
    )


def onnx_fns(prefill_path: Path, step_path: Path) -> tuple[SeqFn, StepFn]:
    """(prefill, step) through onnxruntime; times are fed when given (time-aware graphs)."""
    prefill_s = ort.InferenceSession(str(prefill_path), providers=["CPUExecutionProvider"])
    step_s = ort.InferenceSession(str(step_path), providers=["CPUExecutionProvider"])

    def prefill(*seq: np.ndarray) -> Arrays:
        feeds = dict(zip(PREFILL_INPUTS, seq, strict=False))
        return tuple(np.asarray(a) for a in prefill_s.run(None, feeds))

    def step(*step_in: np.ndarray) -> Arrays:
        feeds = dict(zip(STEP_INPUTS, step_in, strict=False))
        return tuple(np.asarray(a) for a in step_s.run(None, feeds))

    return prefill, step


def check_replay(
    windows: np.ndarray,
    full: SeqFn,
    prefill: SeqFn,
    step: StepFn,
    *,
    rtol: float = STEP_RTOL,
    from_empty: bool = False,
    times: np.ndarray | None = None,
) -> float:
    """Max relative difference (to 1 + max |full|) of step vs full scores/hidden over a replay;
    ParityError beyond rtol, on a top-10 that differs outside ties, or on a bad shape/dtype."""
    worst = 0.0
    for call in replay(windows, full, prefill, step, from_empty=from_empty, times=times):
        for name, want, got in zip(("scores", "hidden"), call.expected, call.actual, strict=True):
            scale = 1.0 + float(np.max(np.abs(want)))
            diff = check_output(f"step {name}", want, got, np.float32) / scale
            if diff > rtol:
                raise ParityError(
                    f"step {name} differs from the full model by {diff:.2e} of the range at "
                    f"window lengths {call.lengths.tolist()} (tolerance {rtol:.0e})"
                )
            worst = max(worst, diff)
        scale = 1.0 + float(np.max(np.abs(call.expected[0])))
        check_top_k(call.expected[0], call.actual[0], TOP_K, rtol * scale)
    return worst


def check_step_parity(
    model: SASRec, prefill_path: Path, step_path: Path, *, batch: int = 17, seed: int = 0
) -> dict[str, float]:
    """prefill.onnx vs torch (scores, hidden, kv) and an onnxruntime replay vs the torch full
    model: {"prefill_max_abs_diff", "step_max_rel_diff"}; ParityError beyond the tolerances."""
    model.eval()
    cfg = model.cfg
    windows = parity_windows(cfg.num_items, cfg.max_len, batch, seed)
    timed = uses_time(model)
    full, torch_prefill, _ = torch_fns(model)
    prefill, step = onnx_fns(prefill_path, step_path)
    L = cfg.max_len
    times = parity_times(windows, seed) if timed else None

    def with_times(batch_in: np.ndarray, width: int) -> tuple[np.ndarray, ...]:
        if times is None:
            return (batch_in[:, L - width :],)
        return batch_in[:, L - width :], np.where(batch_in != 0, times, 0)[:, L - width :]

    kv_limit = (
        PREFILL_ATOL + float(np.abs(torch_prefill(*with_times(windows, L))[2]).max()) * 2.0**-9
    )
    worst_prefill = 0.0
    # At max_len, then cut to a quarter of it as serving cuts a call to its longest window
    # (torch at full width: its outputs must not depend on the cut).
    for width in (L, max(1, L // 4)):
        batch_in = windows if width == L else short_windows(windows, width)
        want, got = torch_prefill(*with_times(batch_in, L)), prefill(*with_times(batch_in, width))
        want = (want[0], want[1], want[2][:, :, :, L - width :])
        for name, w, g, limit in zip(
            ("scores", "hidden", "kv"), want, got, (PREFILL_ATOL, PREFILL_ATOL, kv_limit),
            strict=True,
        ):  # fmt: skip
            diff = check_output(f"prefill {name} at width {width}", w.astype(np.float32), g,
                                w.dtype.type)  # fmt: skip
            if diff > limit:
                raise ParityError(
                    f"prefill {name} at window width {width} differs from torch by {diff:.2e} "
                    f"> {limit:.1e}"
                )
            worst_prefill = max(worst_prefill, diff if name != "kv" else 0.0)
    worst_step = check_replay(windows, full, prefill, step, times=times)
    return {"prefill_max_abs_diff": worst_prefill, "step_max_rel_diff": worst_step}
