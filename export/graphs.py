"""What every ONNX graph of a bundle shares: the legacy exporter call and the parity helpers."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.errors import ParityError

TOP_K = 10
# item_seq / time_seq of model.onnx and prefill.onnx: any batch, any window width <= max_len.
WINDOW_AXES = {0: "batch", 1: "window"}


def legacy_export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
) -> Path:
    """torch.onnx.export with the legacy TorchScript exporter, module in eval mode; axes of
    names the graph does not have (a time input of a model without time) are left out."""
    module.eval()
    with warnings.catch_warnings():
        # dynamo=False is chosen on purpose (no onnxscript dependency, a plain static graph);
        # torch announces the legacy exporter's deprecation on every call.
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        # A strided Slice (time-aware models) is left unfolded; the graph is still correct.
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(
            module,
            example,
            str(path),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={
                name: dict(axes)
                for name, axes in dynamic_axes.items()
                if name in input_names or name in output_names
            },
            opset_version=opset,
            dynamo=False,
        )
    return path


def parity_windows(num_items: int, max_len: int, batch: int, seed: int = 0) -> np.ndarray:
    """(batch, max_len) int64 windows: all-padding, length 1, full, and random lengths whose items
    follow a Zipf-like law with repeats, as real sessions do."""
    rng = np.random.default_rng([seed, batch])
    out = np.zeros((batch, max_len), dtype=np.int64)
    lengths = rng.integers(0, max_len + 1, size=batch)
    lengths[: min(batch, 3)] = [max_len, 1, 0][: min(batch, 3)]
    popular = 1.0 / np.arange(1, num_items + 1)
    popular /= popular.sum()
    for row, length in enumerate(lengths):
        uniform = row % 2 == 0
        items = (
            rng.integers(1, num_items + 1, size=length)
            if uniform
            else rng.choice(num_items, size=length, p=popular) + 1
        )
        out[row, max_len - length :] = items
    return out


def short_windows(windows: np.ndarray, width: int) -> np.ndarray:
    """`windows` (B, L) with only their newest `width` slots kept (the rest padding): fed to a
    graph cut to those `width` columns, it must give what the full width gives."""
    out = windows.copy()
    out[:, : out.shape[1] - width] = 0
    return out


def parity_times(windows: np.ndarray, seed: int = 0) -> np.ndarray:
    """(B, L) int64 epoch seconds for `windows`: increasing gaps from seconds to weeks, 0 at
    padding, for time-aware models."""
    rng = np.random.default_rng([seed, len(windows), 7])
    gaps = np.exp(rng.uniform(0, np.log(3e6), size=windows.shape)).astype(np.int64)  # (B, L)
    times = 1_000_000_000 + np.cumsum(gaps, axis=1)  # (B, L)
    return np.where(windows != 0, times, 0).astype(np.int64)


def check_output(name: str, expected: np.ndarray, actual: np.ndarray, dtype: type) -> float:
    """Max abs difference; ParityError on another shape or dtype, or non-finite values."""
    if actual.shape != expected.shape or actual.dtype != dtype:
        raise ParityError(f"{name}: got {actual.shape} {actual.dtype}, want {expected.shape}")
    if not np.all(np.isfinite(actual)):
        raise ParityError(f"{name}: non-finite values")
    return float(np.max(np.abs(actual.astype(np.float32) - expected), initial=0.0))


def check_top_k(expected: np.ndarray, actual: np.ndarray, k: int, atol: float) -> None:
    """ParityError when the top-k differs where `expected` is not tied within atol at the cut."""
    k = min(k, expected.shape[1] - 1)
    want = np.argsort(-expected, axis=1, kind="stable")[:, :k]  # (B, k)
    got = np.argsort(-actual, axis=1, kind="stable")[:, :k]  # (B, k)
    for row in np.flatnonzero(np.any(want != got, axis=1)):
        ordered = np.sort(expected[row])[::-1]
        gaps = np.abs(np.diff(ordered[: k + 1]))
        if np.all(gaps > atol):
            raise ParityError(f"top-{k} differs in row {row}: want {want[row]}, got {got[row]}")


def drop_outputs(path: Path, names: Sequence[str]) -> Path:
    """Remove graph outputs `names` from the ONNX file at `path` in place, with every node and
    initializer that only they needed (a headless model's score head: the (D, N + 1) item
    table product), so onnxruntime never computes them."""
    model = onnx.load(str(path))
    graph = model.graph
    kept = [o for o in graph.output if o.name not in names]
    del graph.output[:]
    graph.output.extend(kept)
    needed = {o.name for o in kept}
    live = []
    for node in reversed(graph.node):  # topological order: consumers come after producers
        if any(out in needed for out in node.output):
            live.append(node)
            needed.update(node.input)
            for attr in node.attribute:  # subgraphs (If/Loop) read outer names too
                for sub in (*attr.g.node, *(n for g in attr.graphs for n in g.node)):
                    needed.update(sub.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
