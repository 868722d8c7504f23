"""Export a trained SASRec checkpoint to ONNX, check parity with onnxruntime, write a bundle.

model.onnx takes `item_seq` int64 [batch, W], any window width W <= max_len (left-padded, 0 =
padding; time-aware models also `time_seq`) and returns `scores` float32 [batch, num_items + 1]
and `hidden` float32 [batch, d_model]; models with positions counted from the window's first
item also get the incremental pair (export/step_export.py). The contract is in export/bundle.py.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from export.bundle import PREFILL, SCORE_HEAD_MAX_ITEMS, STEP, write_bundle
from export.errors import ExportError, ParityError
from export.graphs import (
    TOP_K,
    WINDOW_AXES,
    check_output,
    check_top_k,
    drop_outputs,
    legacy_export,
    parity_times,
    parity_windows,
    short_windows,
)
from export.step_export import STEP_RTOL, check_step_parity, export_step_pair, step_spec
from model.incremental import FullModel, supports_step, uses_time
from model.sasrec import SASRec, TextSASRec
from model.train import load_checkpoint, model_from_checkpoint

logger = logging.getLogger(__name__)

ATOL = 1e-4  # float32 scores of magnitude ~10: kernel differences stay near 1e-6
PARITY_BATCHES = (1, 17)


def export_onnx(model: SASRec, path: Path, *, opset: int = 17) -> Path:
    """Write the full model (scores and hidden of the newest slot) with dynamic batch and window
    axes: a window may be cut to its longest row (left padding only), up to max_len."""
    model.eval()
    inputs = model_inputs(model)
    example = torch.ones(2, model.cfg.max_len, dtype=torch.int64)  # (B, L)
    batch = {0: "batch"}
    return legacy_export(
        FullModel(model),
        (example,) * len(inputs),
        path,
        input_names=inputs,
        output_names=["scores", "hidden"],
        dynamic_axes={
            **{name: WINDOW_AXES for name in inputs},
            **{name: batch for name in ("scores", "hidden")},
        },
        opset=opset,
    )


def model_inputs(model: SASRec) -> tuple[str, ...]:
    """The model.onnx inputs of the bundle contract this model needs."""
    return ("item_seq", "time_seq") if uses_time(model) else ("item_seq",)


def check_parity(
    model: SASRec,
    onnx_path: Path,
    windows: list[np.ndarray] | None = None,
    *,
    atol: float = ATOL,
    top_k: int = TOP_K,
) -> float:
    """Max abs score/hidden difference torch vs onnxruntime; ParityError beyond atol or when the
    top-k differs where torch's own scores are not tied within atol at the cut. A graph without
    the `hidden` output (an older export) is checked on its scores alone."""
    model.eval()
    if windows is None:
        windows = [
            parity_windows(model.cfg.num_items, model.cfg.max_len, b) for b in PARITY_BATCHES
        ]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs() if o.name in ("scores", "hidden")]
    if "scores" not in names:
        raise ParityError(f"{onnx_path.name} has no output named scores")
    worst = 0.0
    L = windows[-1].shape[1]
    # The last batch again with windows of at most L // 4 items, fed to the graph cut to that
    # width (serving trims each call to its longest window); torch sees the full width.
    short = short_windows(windows[-1], max(1, L // 4))
    for batch, width in [*((w, L) for w in windows), (short, max(1, L // 4))]:
        feeds = {"item_seq": batch, "time_seq": parity_times(batch)}
        feeds = {name: feeds[name] for name in model_inputs(model)}
        with torch.no_grad():
            args = (torch.from_numpy(a) for a in feeds.values())
            scores, hidden = (t.numpy() for t in FullModel(model)(*args))
        expected = {"scores": scores, "hidden": hidden}  # (B, N + 1), (B, D)
        cut = {name: a[:, a.shape[1] - width :] for name, a in feeds.items()}
        actual = dict(zip(names, session.run(names, cut), strict=True))
        for name in names:
            diff = check_output(name, expected[name], np.asarray(actual[name]), np.float32)
            worst = max(worst, diff)
        check_top_k(scores, np.asarray(actual["scores"]), top_k, atol)
    if worst > atol:
        raise ParityError(f"torch and onnxruntime outputs differ by {worst:.2e} > {atol:.0e}")
    return worst


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
    score_head: bool | None = None,
    novelty_boost: float | None = None,
) -> Path:
    """Export the checkpoint's model, check parity, and write a verified bundle at out_dir.

    `novelty_boost` (text-aware models) replaces the checkpoint's: added to the score of every
    item without a trained ID, in the graphs, in item_bias.npy and (manifest config) for the
    items serving adds at run time.

    `score_head=False` writes headless graphs (`hidden`, no `scores`; serving ranks items
    outside onnxruntime); None = headless above SCORE_HEAD_MAX_ITEMS items. Parity is checked
    on the full graphs before their score head is dropped.
    """
    ckpt = load_checkpoint(Path(checkpoint))
    model = model_from_checkpoint(ckpt)
    if novelty_boost is not None:
        if not isinstance(model, TextSASRec):
            raise ExportError("--novelty-boost needs a text-aware model (trained with --text)")
        model.with_novelty_boost(novelty_boost)
    if score_head is None:
        score_head = model.cfg.num_items <= SCORE_HEAD_MAX_ITEMS
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
        extra_files = write_arrays(model, Path(tmp))
        step = None
        if supports_step(model):
            extra_files |= export_step_pair(model, Path(tmp), opset=opset)
            step_diffs = check_step_parity(model, extra_files[PREFILL], extra_files[STEP])
            logger.info("step parity: %s (step tolerance %.0e relative)", step_diffs, STEP_RTOL)
            bundle_metrics.update(step_diffs)
            step = step_spec(model)
        if not score_head:
            for path in (onnx_path, extra_files.get(PREFILL), extra_files.get(STEP)):
                if path is not None:
                    drop_outputs(path, ["scores"])
        write_bundle(
            Path(out_dir),
            model_file=onnx_path,
            items=list(zip(ckpt["item_ids"], titles, strict=True)),
            model_name="sasrec",
            model_version=version,
            max_len=model.cfg.max_len,
            inputs=model_inputs(model),
            training_data=dict(ckpt.get("dataset", {})),
            metrics=bundle_metrics,
            config={
                **model.cfg.to_dict(),
                "opset": opset,
                "best_epoch": ckpt.get("epoch"),
                "score_head": score_head,
            },
            extra_files=extra_files,
            step=step,
        )
    logger.info("wrote bundle %s (model_version %s)", out_dir, version)
    return Path(out_dir)


def write_arrays(model: SASRec, out_dir: Path) -> dict[str, Path]:
    """item_vectors.npy and the model's `bundle_extras()` arrays as `<name>.npy` in out_dir."""
    with torch.no_grad():
        arrays = {"item_vectors": model.item_vectors().detach().float().numpy()}  # (N + 1, D)
    extras = getattr(model, "bundle_extras", None)
    for name, array in (extras() if callable(extras) else {}).items():
        if not name.isidentifier() or name in arrays:
            raise ExportError(f"bundle_extras() name {name!r} is not a usable, unique file stem")
        arrays[name] = np.asarray(array)
    paths = {}
    for name, array in arrays.items():
        paths[f"{name}.npy"] = out_dir / f"{name}.npy"
        np.save(paths[f"{name}.npy"], np.ascontiguousarray(array), allow_pickle=False)
    return paths


def _default_version(model: nn.Module) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    return f"sasrec-{stamp}-{state_digest(model)[:8]}"
