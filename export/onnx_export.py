"""Export a trained SASRec checkpoint to ONNX, check parity with onnxruntime, write a bundle.

The ONNX graph takes `item_seq` int64 [batch, max_len] (left-padded, 0 = padding) and returns
`scores` float32 [batch, num_items + 1], the contract in export/bundle.py.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.bundle import write_bundle
from export.errors import ExportError, ParityError
from model.sasrec import SASRec
from model.train import load_checkpoint, model_from_checkpoint

logger = logging.getLogger(__name__)

ATOL = 1e-4  # float32 scores of magnitude ~10: kernel differences stay near 1e-6
TOP_K = 10
PARITY_BATCHES = (1, 17)


class _ScoreLast(nn.Module):
    """What serving runs: the next-item scores after the newest item of each window."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq: torch.Tensor) -> torch.Tensor:
        return self.model.score_last(item_seq)  # (B, N + 1)


def export_onnx(model: SASRec, path: Path, *, opset: int = 17) -> Path:
    """Write model.score_last as ONNX with a dynamic batch axis."""
    model.eval()
    example = torch.ones(2, model.cfg.max_len, dtype=torch.int64)  # (B, L)
    with warnings.catch_warnings():
        # dynamo=False is chosen on purpose (no onnxscript dependency, a plain static graph);
        # torch announces the legacy exporter's deprecation on every call.
        warnings.filterwarnings(
            "ignore", "You are using the legacy TorchScript", DeprecationWarning
        )
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        torch.onnx.export(
            _ScoreLast(model),
            (example,),
            str(path),
            input_names=["item_seq"],
            output_names=["scores"],
            dynamic_axes={"item_seq": {0: "batch"}, "scores": {0: "batch"}},
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


def check_parity(
    model: SASRec,
    onnx_path: Path,
    windows: list[np.ndarray] | None = None,
    *,
    atol: float = ATOL,
    top_k: int = TOP_K,
) -> float:
    """Max abs score difference torch vs onnxruntime; ParityError beyond atol or when the top-k
    differs where torch's own scores are not tied within atol at the cut."""
    model.eval()
    if windows is None:
        windows = [
            parity_windows(model.cfg.num_items, model.cfg.max_len, b) for b in PARITY_BATCHES
        ]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for batch in windows:
        with torch.no_grad():
            expected = model.score_last(torch.from_numpy(batch)).numpy()  # (B, N + 1)
        actual = np.asarray(session.run(["scores"], {"item_seq": batch})[0])
        if actual.shape != expected.shape or actual.dtype != np.float32:
            raise ParityError(f"onnx scores {actual.shape} {actual.dtype}, torch {expected.shape}")
        if not np.all(np.isfinite(actual)):
            raise ParityError("onnxruntime produced non-finite scores")
        worst = max(worst, float(np.max(np.abs(actual - expected))))
        _check_top_k(expected, actual, top_k, atol)
    if worst > atol:
        raise ParityError(f"torch and onnxruntime scores differ by {worst:.2e} > {atol:.0e}")
    return worst


def _check_top_k(expected: np.ndarray, actual: np.ndarray, k: int, atol: float) -> None:
    k = min(k, expected.shape[1] - 1)
    want = np.argsort(-expected, axis=1, kind="stable")[:, :k]  # (B, k)
    got = np.argsort(-actual, axis=1, kind="stable")[:, :k]  # (B, k)
    for row in np.flatnonzero(np.any(want != got, axis=1)):
        ordered = np.sort(expected[row])[::-1]
        gaps = np.abs(np.diff(ordered[: k + 1]))
        if np.all(gaps > atol):
            raise ParityError(f"top-{k} differs in row {row}: torch {want[row]}, onnx {got[row]}")


def state_digest(model: nn.Module) -> str:
    """sha256 over the parameter names and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_bundle(
    checkpoint: Path,
    out_dir: Path,
    *,
    model_version: str | None = None,
    metrics: dict[str, Any] | None = None,
    opset: int = 17,
) -> Path:
    """Export the checkpoint's model, check parity, and write a verified bundle at out_dir."""
    ckpt = load_checkpoint(Path(checkpoint))
    model = model_from_checkpoint(ckpt)
    version = model_version or _default_version(model)
    with tempfile.TemporaryDirectory(prefix="streamrec-export-") as tmp:
        onnx_path = export_onnx(model, Path(tmp) / "model.onnx", opset=opset)
        diff = check_parity(model, onnx_path)
        logger.info("onnx parity: max abs diff %.2e (tolerance %.0e)", diff, ATOL)
        titles = list(ckpt.get("titles") or [""] * len(ckpt["item_ids"]))
        if len(titles) != len(ckpt["item_ids"]):
            raise ExportError("checkpoint titles and item_ids differ in length")
        bundle_metrics = {**dict(ckpt.get("metrics", {})), **(metrics or {})}
        bundle_metrics["onnx_parity_max_abs_diff"] = diff
        write_bundle(
            Path(out_dir),
            model_file=onnx_path,
            items=list(zip(ckpt["item_ids"], titles, strict=True)),
            model_name="sasrec",
            model_version=version,
            max_len=model.cfg.max_len,
            inputs=("item_seq",),
            training_data=dict(ckpt.get("dataset", {})),
            metrics=bundle_metrics,
            config={**model.cfg.to_dict(), "opset": opset, "best_epoch": ckpt.get("epoch")},
        )
    logger.info("wrote bundle %s (model_version %s)", out_dir, version)
    return Path(out_dir)


def _default_version(model: nn.Module) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"sasrec-{stamp}-{state_digest(model)[:8]}"
