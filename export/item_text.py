"""The item-text contract shared by training (model/) and serving (stream/).

Both sides must embed an item from the same string, or a new item's vector at run time would
not match what the model learnt from its catalogue. This module is standard library only and
imports nothing from model/ or stream/, so both may import it (as they do export.bundle).

A text-aware bundle carries, besides the files of export/bundle.py:

    text_proj_w.npy    float32 [TEXT_DIM, D]   affine map from a normalised text embedding
    text_proj_b.npy    float32 [D]             to the model's item space: an item the model
                                               never saw gets the vector  text_emb @ W + b
    item_text_emb.npy  float32 [N + 1, TEXT_DIM]  (optional) the bundle items' embeddings,
                                               row 0 (padding) zero

and names the rule its item texts were built with in `manifest.config["text_format"]`.

The text encoder itself (`streamrec export-text-encoder`, export/text_encoder.py) is a
directory read by stream/text.py:

    text_encoder.onnx   input  input_ids, attention_mask int64 [batch, tokens]
                        output embedding float32 [batch, TEXT_DIM] (mean pooling over the
                        attention mask, then L2 normalisation, inside the graph)
    tokenizer.json      the model's WordPiece tokenizer (Hugging Face `tokenizers` format)
    parity.npy          float32 [P, TEXT_DIM]: sentence-transformers' own embeddings of the
                        manifest's `parity_texts`, to re-check any encoder against
    manifest.json       format_version, model, dims, parity figures, sha256 of every file
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

TEXT_FORMAT: Final = "title-genres/1"  # the rule of item_text below
TEXT_DIM: Final = 384  # all-MiniLM-L6-v2's embedding width
MAX_TOKENS: Final = 128  # truncation, as in the model's tokenizer.json
TEXT_PROJ_W: Final = "text_proj_w.npy"
TEXT_PROJ_B: Final = "text_proj_b.npy"
ITEM_TEXT_EMB: Final = "item_text_emb.npy"
# Where `streamrec export-text-encoder` writes by default and the processor looks by default:
# a derived artifact (90 MB), never inside the repository.
DEFAULT_ENCODER_DIR: Final = Path.home() / ".cache" / "streamrec" / "text-encoder"
ENCODER_FORMAT_VERSION: Final = 1
ENCODER_ONNX: Final = "text_encoder.onnx"
TOKENIZER: Final = "tokenizer.json"
PARITY: Final = "parity.npy"
ENCODER_MANIFEST: Final = "manifest.json"


def item_text(title: str, genres: str = "") -> str:
    """The text an item is embedded from: "Title (year). Genres: A, B" (genres pipe-separated).

    >>> item_text("Toy Story (1995)", "Animation|Children's|Comedy")
    "Toy Story (1995). Genres: Animation, Children's, Comedy"
    """
    names = [g.strip() for g in genres.split("|") if g.strip()]
    title = title.strip()
    return f"{title}. Genres: {', '.join(names)}" if names else title
