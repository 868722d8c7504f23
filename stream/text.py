"""Torch-free text encoder: `tokenizers` + onnxruntime over `streamrec export-text-encoder`'s
directory (layout in export/item_text.py).

    encoder = TextEncoder(Path("~/.cache/streamrec/text-encoder").expanduser())
    vectors = encoder.encode([item_text("Heat (1995)", "Action|Crime")])  # (1, 384) unit rows

Tokenization is the model's own (tokenizer.json, WordPiece, truncation at MAX_TOKENS), batches
are padded to their longest text; pooling and normalisation are inside the graph.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from tokenizers import Tokenizer

from export.bundle import verify_files
from export.errors import ExportError
from export.item_text import (
    ENCODER_FORMAT_VERSION,
    ENCODER_MANIFEST,
    ENCODER_ONNX,
    MAX_TOKENS,
    PARITY,
    TEXT_DIM,
    TOKENIZER,
)
from stream.errors import ConfigError, ScoringError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
EXPORT_HINT = "run `streamrec export-text-encoder --out DIR` (needs the text extra)"


class TextEncoder:
    """all-MiniLM-L6-v2 in ONNX: `encode(texts)` -> float32 (M, 384), rows of unit length."""

    def __init__(self, path: Path, *, threads: int = 1, batch_size: int = 64) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self.manifest = _read_manifest(self.path)
        try:
            verify_files(self.path, self.manifest["files"])
        except ExportError as exc:
            raise ConfigError(f"text encoder {self.path}: {exc}; {EXPORT_HINT}") from exc
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path / TOKENIZER))
        except Exception as exc:  # tokenizers raises plain Exception
            raise ConfigError(f"cannot read {self.path / TOKENIZER}: {exc}; {EXPORT_HINT}") from exc
        self._tokenizer.enable_truncation(MAX_TOKENS)
        pad = self._tokenizer.token_to_id("[PAD]")
        self._tokenizer.enable_padding(pad_id=0 if pad is None else pad, pad_token="[PAD]")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(
                str(self.path / ENCODER_ONNX), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's own error types
            raise ConfigError(f"onnxruntime cannot load {self.path / ENCODER_ONNX}: {exc}") from exc

    @property
    def dim(self) -> int:
        return TEXT_DIM

    def encode(self, texts: Sequence[str]) -> FloatArray:
        """(M, 384) float32 unit vectors, row j for texts[j]."""
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        if not texts:
            return out
        # Similar lengths share a batch, so padding (and wasted attention) stays small.
        order = sorted(range(len(texts)), key=lambda j: len(texts[j]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            out[rows] = self._encode_batch([texts[j] for j in rows])
        return out

    def _encode_batch(self, texts: list[str]) -> FloatArray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)  # (b, T)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)  # (b, T)
        try:
            (vectors,) = self._session.run(
                ["embedding"], {"input_ids": ids, "attention_mask": mask}
            )
        except Exception as exc:
            raise ScoringError(f"text encoder failed on {len(texts)} texts: {exc}") from exc
        return np.asarray(vectors, dtype=np.float32)  # (b, 384)

    def parity(self) -> float:
        """Min cosine between this encoder and sentence-transformers' vectors saved at export."""
        reference = np.load(self.path / PARITY)  # (P, 384), unit rows
        actual = self.encode(list(self.manifest["parity_texts"]))  # (P, 384), unit rows
        return float(np.min(np.sum(actual * reference, axis=1)))


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / ENCODER_MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(
            f"{path} is not a text encoder directory (no {ENCODER_MANIFEST}); {EXPORT_HINT}"
        )
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {manifest_path}: {exc}; {EXPORT_HINT}") from exc
    if not isinstance(raw, dict) or raw.get("format_version") != ENCODER_FORMAT_VERSION:
        raise ConfigError(
            f"{manifest_path} is not a text encoder manifest of format {ENCODER_FORMAT_VERSION}; "
            + EXPORT_HINT
        )
    if raw.get("dim") != TEXT_DIM or not isinstance(raw.get("files"), dict):
        raise ConfigError(f"{manifest_path} does not describe a {TEXT_DIM}-d encoder")
    return raw
