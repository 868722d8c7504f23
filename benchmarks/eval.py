"""`make eval`: model quality of SASRec and every baseline on ML-1M and Amazon Video.

One protocol for all (model/evaluate.py): leave-one-out, full ranking over all items, seen
items and padding masked, pessimistic ties. Baseline settings and SASRec's best epoch are
chosen on the validation split; the test split is reported. The ML-1M SASRec is exported to a
bundle and scored again through onnxruntime (the serving path) to state the difference.

    python -m benchmarks.eval --data-root ../shared/data --out benchmarks/results/eval.json
    python -m benchmarks.eval --quick ...   # CI-sized: synthetic data + a short ML-1M smoke
    python -m benchmarks.eval --sections cold time   # only issue 5's sections

Sections: "models" (every model and baseline, eval.json), "cold" (cold-start items and the
text-aware SASRec, benchmarks/eval_cold.py, eval_cold.json), "time" (time-aware against plain
SASRec on timestamped MovieLens, benchmarks/eval_time.py, eval_time.json). Each writes its own
JSON, PNG and BENCHMARKS.md block, so one can be re-run without touching the others.

The data stay where they are (GroupLens forbids redistribution): runs, checkpoints and
bundles go under --work (default .eval/, git-ignored); only metrics land in the repo.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import eval_cold, eval_time
from benchmarks.eval_report import (
    plot_curves,
    plot_section,
    update_benchmarks_md,
    update_section_md,
)
from benchmarks.meta import run_metadata
from model.baselines import ALS, ALSConfig, ItemKNN, ItemKNNConfig, Popularity
from model.config import SASRecConfig, TrainConfig
from model.data import SequenceDataset, load_dataset, train_sequences
from model.evaluate import ScoreFn, evaluate_scores_fn
from model.train import load_checkpoint, model_from_checkpoint, train

logger = logging.getLogger(__name__)

SECTIONS = ("models", "cold", "time")

KNN_LAST = [{"window": w, "alpha": a} for w in (1, 3) for a in (0.5, 0.8, 1.0)]
KNN_SESSION = [{"session": s, "decay": d, "alpha": 0.8} for s in (5, 10, 20) for d in (0.6, 0.8)]
ALS_GRID = [{"factors": f, "alpha": a} for f in (64, 128) for a in (0.5, 1.0, 4.0)]


@dataclass(frozen=True)
class Plan:
    """What one data set runs: SASRec settings and the baseline grids (chosen on valid)."""

    file: str  # under --data-root, or a directory for synthetic data
    kind: str  # data spec kind: ml-1m, video, synthetic
    model: dict[str, Any]  # SASRecConfig fields besides num_items
    train: dict[str, Any]  # TrainConfig fields
    knn_last: list[dict[str, Any]] = field(default_factory=lambda: KNN_LAST)
    knn_session: list[dict[str, Any]] = field(default_factory=lambda: KNN_SESSION)
    als: list[dict[str, Any]] = field(default_factory=lambda: ALS_GRID)
    export: bool = False  # export a bundle and score it through onnxruntime


# The reported configuration. BENCHMARKS.md lists what was compared on validation to get here.
# The box is shared: fit_epochs sets the cosine's horizon after the warmup epoch to what fits in
# max_seconds at the measured pace (the log names the --epochs that repeats the run exactly).
BUDGETED = {  # batch 128, warmup + cosine, every window, no early stop, horizon fitted to time
    "batch_size": 128,
    "schedule": "cosine",
    "warmup_epochs": 1.0,
    "windows": "all",
    "patience": 1000,
    "fit_epochs": True,
}
# Dropout 0.1, not 0.2: at 900 s side by side it led validation NDCG@10 by 0.0075. FFN 1 x d_model:
# 4 x led one 900 s probe by 0.0022, lost a second seed's by 0.0100 (it stalled for 3 epochs)
# and tied the full run on validation (0.1973 against 0.1972), so it is not adopted (BENCHMARKS.md).
# Post-LN: ahead of pre-LN at 900 s side by side with both seeds tried (+0.0020, +0.0055).
# Weight decay 0.1 (matrices only): it tied none at 900 s and led over 30 fixed epochs with both
# seeds tried (+0.0007, +0.0017 best valid), but the full run with it (results/eval_wd0.1.json)
# was 0.0010 below this one on validation and tied it on test, so there is none. Video keeps
# pre-LN: the comparisons were made on ML-1M only.
# max_len 50, not 200: over 30 fixed epochs it led 200 by +0.0061 and +0.0060 best valid with
# seeds 42 and 43, and 100 and 25 lay between (BENCHMARKS.md). Shorter windows give more of
# them per epoch (22,532 against 8,617), so the horizon cap is raised for fit_epochs to set.
ML1M_MODEL = {
    "max_len": 50, "d_model": 64, "n_blocks": 2, "n_heads": 1, "dropout": 0.1, "norm": "post",
}  # fmt: skip
# Windows overlapping by 25 (each target counted once, where it sees >= 25 clicks): over 30
# fixed epochs it led windows 50 apart by +0.0032 and +0.0040 best valid with seeds 42 and 43,
# at the same seconds per epoch (BENCHMARKS.md). Video keeps windows 50 apart.
ML1M_TRAIN = {
    **BUDGETED, "epochs": 150, "lr": 6e-3, "max_seconds": 1780.0, "window_overlap": 25,
}  # fmt: skip
VIDEO_MODEL = {"max_len": 50, "d_model": 64, "n_blocks": 2, "n_heads": 1, "dropout": 0.5}
VIDEO_TRAIN = {**BUDGETED, "epochs": 40, "lr": 4e-3, "max_seconds": 600.0}

FULL = {
    "ml-1m": Plan("sasrec/ml-1m.txt", "ml-1m", ML1M_MODEL, ML1M_TRAIN, export=True),
    "video": Plan("sasrec/Video.txt", "video", VIDEO_MODEL, VIDEO_TRAIN),
}
SMOKE_GRID: dict[str, list[dict[str, Any]]] = {
    "knn_last": [{"alpha": 0.8}],
    "knn_session": [{"session": 10, "decay": 0.8, "alpha": 0.8}],
    "als": [{"factors": 32, "alpha": 1.0, "iterations": 5}],
}
QUICK = {
    "synthetic": Plan(
        "", "synthetic", {"max_len": 50, "d_model": 32, "dropout": 0.2},
        {"epochs": 4, "lr": 3e-3, "max_seconds": 25.0}, **SMOKE_GRID, export=True,
    ),
    "ml-1m": Plan(
        "sasrec/ml-1m.txt", "ml-1m", {"max_len": 50, "d_model": 32, "dropout": 0.2},
        {"epochs": 2, "lr": 3e-3, "max_seconds": 30.0}, **SMOKE_GRID,
    ),
}  # fmt: skip


def evaluate_both(
    score_fn: ScoreFn, ds: SequenceDataset, max_len: int, *, with_time: bool = False
) -> dict[str, Any]:
    return {
        s: evaluate_scores_fn(score_fn, ds, s, max_len, with_time=with_time)
        for s in ("valid", "test")
    }


def run_grid(
    name: str, build: Any, grid: list[dict[str, Any]], ds: SequenceDataset
) -> dict[str, Any]:
    """Fit every setting of the grid, keep the best validation NDCG@10, report its test."""
    tried, best = [], None
    for params in grid:
        started = time.monotonic()
        model = build(params)
        seconds = time.monotonic() - started
        valid = evaluate_scores_fn(model.score_fn, ds, "valid", model.max_len)
        tried.append({"config": params, "valid_ndcg@10": valid["ndcg@10"], "fit_s": seconds})
        if best is None or valid["ndcg@10"] > best[1]["ndcg@10"]:
            best = (model, valid, seconds)
    assert best is not None
    model, valid, seconds = best
    test = evaluate_scores_fn(model.score_fn, ds, "test", model.max_len)
    logger.info("%s: valid ndcg@10 %.4f, test %.4f", name, valid["ndcg@10"], test["ndcg@10"])
    return {
        "model": name,
        "config": model.config,
        "valid": valid,
        "test": test,
        "train_seconds": seconds,
        "parameters": model.size,
        "bytes": 4 * model.size,
        "tried": tried,
    }


def run_baselines(ds: SequenceDataset, plan: Plan) -> list[dict[str, Any]]:
    seqs = train_sequences(ds)
    n = ds.num_items
    longest = max(len(s) for s in ds.sequences)
    return [
        run_grid("popularity", lambda _: Popularity(seqs, n), [{}], ds),
        run_grid(
            "item-kNN (last item)",
            lambda p: ItemKNN(seqs, n, ItemKNNConfig(**p)),
            plan.knn_last,
            ds,
        ),
        run_grid(
            "item-kNN (session)",
            lambda p: ItemKNN(seqs, n, ItemKNNConfig(**p)),
            plan.knn_session,
            ds,
        ),
        run_grid(
            "ALS (implicit MF)", lambda p: ALS(seqs, n, ALSConfig(**p), longest), plan.als, ds
        ),
    ]


def run_sasrec(ds: SequenceDataset, plan: Plan, work: Path, threads: int) -> dict[str, Any]:
    model_cfg = SASRecConfig(num_items=ds.num_items, **plan.model)
    train_cfg = TrainConfig(threads=threads, **plan.train)
    started = time.monotonic()
    path = train(ds, model_cfg, train_cfg, work, progress=sys.stderr.isatty())
    wall = time.monotonic() - started
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    params = sum(p.numel() for p in model.parameters())
    metrics = ckpt["metrics"]
    return {
        "model": "SASRec (streamrec)",
        # The checkpoint's train config: with fit_epochs its epochs are the fitted horizon.
        "config": {**model_cfg.to_dict(), **ckpt["train_config"]},
        "valid": metrics["valid"],
        "test": metrics["test"],
        "train_seconds": metrics["total_train_seconds"],
        "wall_seconds": wall,
        "best_epoch": ckpt["epoch"],
        "epochs_run": len(metrics["history"]),
        "parameters": params,
        "bytes": 4 * params,
        "history": metrics["history"],
        "checkpoint": str(path),
    }


def check_bundle(ds: SequenceDataset, row: dict[str, Any], out: Path) -> dict[str, Any]:
    """Export, then score the bundle through onnxruntime exactly as `streamrec evaluate` does."""
    from export.bundle import load_bundle
    from export.onnx_export import export_bundle
    from model.evaluate import onnx_score_fn

    bundle = load_bundle(export_bundle(Path(row["checkpoint"]), out))
    with_time = "time_seq" in bundle.manifest.inputs  # fed the data set's click times
    via_onnx = evaluate_both(
        onnx_score_fn(bundle.model_path, 2), ds, bundle.max_len, with_time=with_time
    )
    diffs = {
        split: max(abs(via_onnx[split][k] - row[split][k]) for k in row[split])
        for split in ("valid", "test")
    }
    return {
        "bundle": str(out),
        "model_version": bundle.model_version,
        "onnx_test": via_onnx["test"],
        "onnx_valid": via_onnx["valid"],
        "max_abs_metric_diff": diffs,
        "score_parity_max_abs_diff": bundle.manifest.metrics.get("onnx_parity_max_abs_diff"),
    }


def data_spec(name: str, plan: Plan, data_root: Path, work: Path) -> str | None:
    if plan.kind == "synthetic":
        return f"synthetic:{synthetic_dir(work / 'synthetic')}"
    path = data_root / plan.file
    if not path.is_file():
        print(f"eval: {path} not found, skipping {name}", file=sys.stderr)
        return None
    return f"{plan.kind}:{path}"


def synthetic_dir(out: Path) -> Path:
    from stream.synthetic import SyntheticConfig, generate, write_dataset

    if not (out / "clicks.csv").is_file():
        config = SyntheticConfig()
        items, clicks = generate(config)
        write_dataset(out, items, clicks, config)
    return out


def machine() -> dict[str, Any]:
    """What run_metadata leaves out and a shared 2-core box needs: CPU model, torch, load."""
    names = []
    if Path("/proc/cpuinfo").is_file():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    return {
        "cpu": f"{len(names)} x {names[0]}" if names else platform.processor(),
        "torch": torch.__version__,
        "load_average": list(_loadavg()),
    }


def _loadavg() -> tuple[float, ...]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return ()


def _dirty() -> bool:
    """Whether the code that produces the numbers differs from the commit."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", "model", "export"],
        capture_output=True,
        text=True,
        check=False,
    )
    return bool(status.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/eval.json"))
    p.add_argument("--work", type=Path, default=Path(".eval"), help="runs and bundles go here")
    p.add_argument("--quick", action="store_true", help="CI-sized: synthetic + ML-1M smoke")
    p.add_argument("--only", nargs="*", help="data set names to run (default: all of the plan)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-md", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.quick:  # never overwrite the full run's checkpoints and bundles
        args.work = args.work / "quick"
    written: list[Path | None] = []
    if "models" in args.sections:
        written += run_models(args)
    for name in ("cold", "time"):
        if name in args.sections:
            written += run_section(name, args)
    print(f"eval: wrote {', '.join(str(p) for p in written if p is not None)}")
    return 0


def run_models(args: argparse.Namespace) -> list[Path | None]:
    plans = QUICK if args.quick else FULL
    started = time.time()
    report: dict[str, Any] = {
        **run_metadata(),
        "quick": args.quick,
        "dirty": _dirty(),
        "cpu": machine(),
        "datasets": {},
    }
    for name, plan in plans.items():
        if args.only and name not in args.only:
            continue
        spec = data_spec(name, plan, args.data_root, args.work)
        if spec is None:
            report["datasets"][name] = {"skipped": f"{args.data_root / plan.file} not found"}
            continue
        report["datasets"][name] = run_dataset(name, spec, plan, args)
    report["cpu"]["load_average_end"] = list(_loadavg())
    report["total_seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    curves = args.out.with_name(args.out.stem + "_curves.png")
    written = [args.out, plot_curves(report, curves)]
    if not args.quick and not args.no_md:
        update_benchmarks_md(report, Path("BENCHMARKS.md"), args.out, curves)
        written.append(Path("BENCHMARKS.md"))
    logger.info("models section done in %.0f s", report["total_seconds"])
    return written


def run_section(name: str, args: argparse.Namespace) -> list[Path | None]:
    """One of issue 5's sections: its own JSON (OUT_<name>.json), PNG and BENCHMARKS.md block."""
    module: Any = eval_cold if name == "cold" else eval_time
    plan = module.QUICK if args.quick else module.FULL
    started = time.time()
    report: dict[str, Any] = {
        **run_metadata(),
        "section": name,
        "threads": args.threads,
        "quick": args.quick,
        "dirty": _dirty(),
        "cpu": machine(),
    }
    spec = data_spec(name, plan, args.data_root, args.work)
    if spec is None:
        report["skipped"] = f"{args.data_root / plan.file} not found"
    else:
        work = args.work / "runs" / name
        runner = module.run_cold if name == "cold" else module.run_time
        report["result"] = runner(load_dataset(spec), plan, work, args.threads)
    report["cpu"]["load_average_end"] = list(_loadavg())
    report["total_seconds"] = time.time() - started
    out = args.out.with_name(f"{args.out.stem}_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    png = plot_section(report, out.with_suffix(".png"))
    written = [out, png]
    if not args.quick and not args.no_md and "result" in report:
        update_section_md(report, Path("BENCHMARKS.md"), out, png)
        written.append(Path("BENCHMARKS.md"))
    return written


def run_dataset(name: str, spec: str, plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    ds = load_dataset(spec)
    rows = run_baselines(ds, plan)
    sasrec = run_sasrec(ds, plan, args.work / "runs" / name, args.threads)
    rows.append(sasrec)
    out: dict[str, Any] = {"description": ds.description, "rows": rows}
    if plan.export:
        out["onnx"] = check_bundle(ds, sasrec, args.work / "bundles" / name)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
