"""`streamrec export`: checkpoint -> verified model bundle.

Importing this module must not import torch (see model/cli.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from export.item_text import DEFAULT_ENCODER_DIR
from model.cli import torch_missing


def add_commands(subparsers: Any) -> None:
    """Register `export` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX, check parity, write a model bundle"
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="ckpt.pt from `streamrec train`")
    p.add_argument("--out", required=True, type=Path, help="bundle directory (replaced if present)")
    p.add_argument("--model-version", help="default: sasrec-<UTC time>-<weights sha256 prefix>")
    p.add_argument("--opset", type=int, default=17)
    head = p.add_mutually_exclusive_group()
    head.add_argument(
        "--no-score-head", dest="score_head", action="store_false", default=None,
        help="headless graphs (hidden only): serving ranks items by ANN or exactly "
        "(default above 200k items)",
    )  # fmt: skip
    head.add_argument("--score-head", dest="score_head", action="store_true")
    p.add_argument(
        "--novelty-boost", type=float, default=None,
        help="text-aware models: added to the score of items without a trained ID (new items); "
        "default: the checkpoint's (0 unless set)",
    )  # fmt: skip
    p.set_defaults(func=_export)

    p = subparsers.add_parser(
        "export-text-encoder",
        help="export all-MiniLM-L6-v2 to ONNX (pooling included) for torch-free serving",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_ENCODER_DIR, help="directory (replaced if present)"
    )
    p.add_argument("--opset", type=int, default=17)
    p.set_defaults(func=_export_text_encoder)


def _export(args: argparse.Namespace) -> int:
    if torch_missing():
        return 1
    from export.bundle import load_bundle
    from export.errors import ExportError
    from export.onnx_export import export_bundle
    from model.errors import ModelError

    try:
        path = export_bundle(
            args.checkpoint, args.out, model_version=args.model_version, opset=args.opset,
            score_head=args.score_head, novelty_boost=args.novelty_boost,
        )  # fmt: skip
        bundle = load_bundle(path)
    except (ExportError, ModelError) as exc:
        print(f"export: {exc}", file=sys.stderr)
        return 1
    summary = {
        "bundle": str(path),
        "model_version": bundle.model_version,
        "num_items": bundle.num_items,
        "max_len": bundle.max_len,
        "score_head": bundle.score_head,
        "onnx_parity_max_abs_diff": bundle.manifest.metrics.get("onnx_parity_max_abs_diff"),
    }
    print(json.dumps(summary, indent=2))
    return 0


def train_and_export(args: argparse.Namespace) -> tuple[Path, Path] | None:
    """`streamrec train --from-topic`'s training step on `args.data`: (checkpoint, bundle dir),
    None when training failed. stream/retrain.py gets it from the CLI, so serving code never
    imports torch or model/; they load here, when the subcommand runs."""
    from export.onnx_export import export_bundle
    from model.cli import train_from_args

    checkpoint = train_from_args(args)
    if checkpoint is None:
        return None
    out = args.bundle_out or Path(args.out) / "bundle"
    return checkpoint, export_bundle(checkpoint, out, model_version=args.model_version)


def _export_text_encoder(args: argparse.Namespace) -> int:
    if torch_missing():
        return 1
    from export.errors import ExportError
    from export.text_encoder import export_text_encoder

    try:
        path = export_text_encoder(args.out, opset=args.opset)
    except ExportError as exc:
        print(f"export-text-encoder: {exc}", file=sys.stderr)
        return 1
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    print(json.dumps({"text_encoder": str(path), **manifest["parity"]}, indent=2))
    return 0
