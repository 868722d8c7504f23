"""`streamrec train` and `streamrec evaluate`.

Importing this module must not import torch: `streamrec --help` works in a serving install,
and the handlers import the training stack only when they run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any

TRAIN_EXTRA = "this command needs the training extra: pip install 'streamrec[train]'"
BASELINES = ("popularity", "knn-last", "knn-session", "als")


def add_commands(subparsers: Any) -> None:
    """Register `train` and `evaluate` on an argparse subparsers object."""
    _add_train(subparsers)
    _add_evaluate(subparsers)


def _add_train(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train SASRec on a data set, keep the best checkpoint")
    p.add_argument(
        "--data",
        help="synthetic:DIR, ml-1m:PATH, ml-1m-ratings:PATH or video:PATH",
    )
    p.add_argument("--out", required=True, type=Path, help="run directory (ckpt.pt goes here)")
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--ffn-mult", type=int, default=1, help="FFN width as a multiple of d_model")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument(
        "--norm", choices=("pre", "post"), default="pre", help="LayerNorm before or after residuals"
    )
    p.add_argument("--positions", choices=("first", "slot"), default="first")
    p.add_argument(
        "--text", action="store_true", help="text-aware items: MiniLM text embedding + ID"
    )
    p.add_argument("--text-combine", choices=("sum", "gate", "unseen"), default="sum")
    p.add_argument("--id-dropout", type=float, default=0.0, help="share of ID parts dropped")
    p.add_argument(
        "--id-dropout-side", choices=("both", "output"), default="both",
        help="drop IDs in the input windows and the softmax, or in the softmax only",
    )  # fmt: skip
    p.add_argument(
        "--item-features", action="store_true",
        help="text models: also read the year and genres parsed from each item's text",
    )  # fmt: skip
    p.add_argument(
        "--text-bias", action="store_true",
        help="text models: a learned score bias for items without a trained ID, from their text",
    )  # fmt: skip
    p.add_argument(
        "--text-only-loss", type=float, default=0.0,
        help="weight of a second softmax over every item's text-alone form (text models)",
    )  # fmt: skip
    p.add_argument(
        "--time-buckets", type=int, default=0, help="time-aware with this many log2 buckets"
    )
    p.add_argument("--session-gap", type=int, default=1800, help="seconds that start a session")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--windows", choices=("last", "all"), default="last", help="per user per epoch")
    p.add_argument(
        "--window-overlap", type=int, default=0,
        help="with --windows all: items older windows share with newer ones (more context)",
    )  # fmt: skip
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--future", type=int, default=1, help="upcoming items each position learns")
    p.add_argument("--future-decay", type=float, default=0.5, help="weight ratio per step ahead")
    p.add_argument("--max-seconds", type=float, default=None, help="wall-clock budget")
    p.add_argument(
        "--fit-epochs",
        action="store_true",
        help="after the warmup, cut --epochs to what fits in --max-seconds",
    )
    p.add_argument("--eval-every", type=int, default=1, help="epochs between validations")
    p.add_argument("--patience", type=int, default=10, help="validations without improvement")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    p.add_argument(
        "--init-from", type=Path, default=None,
        help="start from this ckpt.pt's weights (a head it lacks keeps its init)",
    )  # fmt: skip
    p.add_argument(
        "--trainable", default="",
        help="comma-separated parameter prefixes to train, the rest frozen "
        "(text_proj,unknown,text_bias)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _add_evaluate(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "evaluate", help="full-ranking metrics of a checkpoint, a bundle or popularity, as JSON"
    )
    p.add_argument("--data", required=True, help="synthetic:DIR, ml-1m:PATH or video:PATH")
    p.add_argument("--checkpoint", type=Path, help="a ckpt.pt written by `streamrec train`")
    p.add_argument("--bundle", type=Path, help="a bundle directory, scored through onnxruntime")
    p.add_argument(
        "--baseline",
        action="append",
        choices=BASELINES,
        help="also score a baseline with its default settings (repeatable)",
    )
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=_evaluate)


def torch_missing() -> bool:
    if importlib.util.find_spec("torch") is None:
        print(TRAIN_EXTRA, file=sys.stderr)
        return True
    return False


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def _train(args: argparse.Namespace) -> int:
    if args.data is None:
        print("train: give --data (or --from-topic)", file=sys.stderr)
        return 2
    return 0 if train_from_args(args) is not None else 1


def train_from_args(args: argparse.Namespace) -> Path | None:
    """Train as the `train` flags say, print the summary; the checkpoint, None on failure.
    `streamrec train --from-topic` (stream/retrain.py) calls this after writing its data."""
    if torch_missing():
        return None
    from model.config import SASRecConfig, TrainConfig
    from model.data import load_dataset
    from model.errors import ModelError
    from model.text import TEXT_DIM, TEXT_ENCODER, TEXT_FORMAT
    from model.train import load_checkpoint, train

    _setup_logging()
    text: dict[str, Any] = {
        "text_dim": TEXT_DIM,
        "text_encoder": TEXT_ENCODER,
        "text_format": TEXT_FORMAT,
    }
    try:
        dataset = load_dataset(args.data)
        model_cfg = SASRecConfig(
            num_items=dataset.num_items,
            max_len=args.max_len,
            d_model=args.d_model,
            n_blocks=args.blocks,
            n_heads=args.heads,
            ffn_mult=args.ffn_mult,
            norm=args.norm,
            dropout=args.dropout,
            positions=args.positions,
            text_combine=args.text_combine,
            id_dropout=args.id_dropout,
            id_dropout_side=args.id_dropout_side,
            text_only_loss=args.text_only_loss,
            item_features=args.item_features,
            text_bias=args.text_bias,
            time_buckets=args.time_buckets,
            session_gap_s=args.session_gap,
            **(text if args.text else {}),
        )
        train_cfg = TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            windows=args.windows,
            window_overlap=args.window_overlap,
            schedule=args.schedule,
            warmup_epochs=args.warmup_epochs,
            label_smoothing=args.label_smoothing,
            future=args.future,
            future_decay=args.future_decay,
            seed=args.seed,
            threads=args.threads,
            max_seconds=args.max_seconds,
            fit_epochs=args.fit_epochs,
            eval_every=args.eval_every,
            patience=args.patience,
            init_from=str(args.init_from or ""),
            trainable=args.trainable,
        )
        path = train(
            dataset,
            model_cfg,
            train_cfg,
            args.out,
            progress=not args.no_progress,
            resume=args.resume,
        )
        ckpt = load_checkpoint(path)
    except ModelError as exc:
        print(f"train: {exc}", file=sys.stderr)
        return None
    summary = {"checkpoint": str(path), "best_epoch": ckpt["epoch"], **ckpt["metrics"]}
    print(json.dumps(summary, indent=2, sort_keys=True))
    return path


def _evaluate(args: argparse.Namespace) -> int:
    if args.checkpoint is None and args.bundle is None and args.baseline is None:
        print("evaluate: give --checkpoint, --bundle and/or --baseline", file=sys.stderr)
        return 2
    if args.checkpoint is not None and torch_missing():
        return 1
    from export.errors import ExportError
    from model.data import load_dataset
    from model.errors import ModelError

    _setup_logging()
    try:
        dataset = load_dataset(args.data)
        results = {name: score(dataset, args, name) for name, score in _sources(args).items()}
    except (ModelError, ExportError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"split": args.split, **results}, indent=2, sort_keys=True))
    return 0


def _sources(args: argparse.Namespace) -> dict[str, Any]:
    sources: dict[str, Any] = {}
    if args.checkpoint is not None:
        sources["checkpoint"] = _score_checkpoint
    if args.bundle is not None:
        sources["bundle"] = _score_bundle
    for name in args.baseline or ():
        sources[name] = _score_baseline
    return sources


def _score_checkpoint(dataset: Any, args: argparse.Namespace, _: str) -> dict[str, float]:
    import torch

    from model.errors import CheckpointError
    from model.evaluate import evaluate_model
    from model.train import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    if list(ckpt["item_ids"]) != list(dataset.item_ids):
        raise CheckpointError(f"{args.checkpoint} was trained on another item catalogue")
    return evaluate_model(model_from_checkpoint(ckpt), dataset, args.split, args.batch_size)


def _score_bundle(dataset: Any, args: argparse.Namespace, _: str) -> dict[str, float]:
    from export.bundle import load_bundle
    from export.errors import BundleError
    from model.evaluate import evaluate_scores_fn, onnx_score_fn

    bundle = load_bundle(args.bundle)
    if bundle.item_ids[1:] != tuple(dataset.item_ids):
        raise BundleError(f"{args.bundle} lists another item catalogue than {args.data}")
    score_fn = onnx_score_fn(bundle.model_path, args.threads)
    with_time = "time_seq" in bundle.manifest.inputs  # the data set must carry timestamps
    return evaluate_scores_fn(
        score_fn, dataset, args.split, bundle.max_len, args.batch_size, with_time=with_time
    )


def _score_baseline(dataset: Any, args: argparse.Namespace, name: str) -> dict[str, float]:
    from model import baselines as b
    from model.data import train_sequences
    from model.evaluate import evaluate_scores_fn

    seqs, n = train_sequences(dataset), dataset.num_items
    model: b.Popularity | b.ItemKNN | b.ALS
    if name == "popularity":
        model = b.Popularity(seqs, n)
    elif name == "knn-last":
        model = b.ItemKNN(seqs, n, b.ItemKNNConfig(alpha=0.8))
    elif name == "knn-session":
        model = b.ItemKNN(seqs, n, b.ItemKNNConfig(alpha=0.8, session=10, decay=0.8))
    else:
        model = b.ALS(seqs, n, b.ALSConfig(alpha=1.0), max(len(s) for s in dataset.sequences))
    return evaluate_scores_fn(model.score_fn, dataset, args.split, model.max_len, args.batch_size)
