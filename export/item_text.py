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

A model trained with item features (`manifest.config["item_features"]` true) reads, besides
the text embedding, a few features parsed from the same item text (`item_features` below:
the release-year bucket of the title's "(YYYY)" and the genres, over the genre vocabulary in
`manifest.config["feature_genres"]`). Its text projection then takes [text_emb, features]
(TEXT_DIM + feature_dim rows), and it may also carry

    text_bias.npy      float32 [TEXT_DIM + F + 1]  a score bias of an item without a trained
                                               ID: [text_emb, features] @ w[:-1] + w[-1]

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

import bisect
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final

TEXT_FORMAT: Final = "title-genres/1"  # the rule of item_text below
TEXT_DIM: Final = 384  # all-MiniLM-L6-v2's embedding width
MAX_TOKENS: Final = 128  # truncation, as in the model's tokenizer.json
TEXT_PROJ_W: Final = "text_proj_w.npy"
TEXT_PROJ_B: Final = "text_proj_b.npy"
ITEM_TEXT_EMB: Final = "item_text_emb.npy"
TEXT_BIAS: Final = "text_bias.npy"
GENRES_SEP: Final = ". Genres: "  # between the title and the genre list in `item_text`
# Release-year buckets of item_features: [< 1950], [1950, 1960), ..., [1999, 2000), [>= 2000].
# Fine where most clicks are (recent releases), coarse for the old catalogue.
YEAR_EDGES: Final = (1950, 1960, 1970, 1980, 1985, 1990, 1993, 1995, 1996, 1997, 1998, 1999, 2000)
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
    return f"{title}{GENRES_SEP}{', '.join(names)}" if names else title


def _genres_of(text: str) -> list[str]:
    _, sep, tail = text.rpartition(GENRES_SEP)
    return [g.strip() for g in tail.split(",") if g.strip()] if sep else []


def _year_of(text: str) -> int | None:
    """The last "(YYYY)" of the title part, if any (titles may hold other parentheses)."""
    title = text.rpartition(GENRES_SEP)[0] or text
    found = [int(m) for m in re.findall(r"\((\d{4})\)", title)]
    return found[-1] if found else None


def genre_vocabulary(texts: Sequence[str]) -> tuple[str, ...]:
    """The sorted genres named by item texts: the feature vocabulary of a training catalogue."""
    return tuple(sorted({g for text in texts for g in _genres_of(text)}))


def feature_dim(genres: Sequence[str]) -> int:
    return len(YEAR_EDGES) + 1 + len(genres)


def item_features(text: str, genres: Sequence[str]) -> list[float]:
    """Features parsed from an item text (`item_text`'s rule): a one-hot release-year bucket
    (all zero without a year) and a multi-hot over `genres` (a genre outside it is ignored).

    >>> f = item_features("Toy Story (1995). Genres: Comedy, Animation", ("Animation", "Drama"))
    >>> [i for i, v in enumerate(f) if v]  # the bucket [1995, 1996), then "Animation"
    [8, 14]
    """
    out = [0.0] * feature_dim(genres)
    year = _year_of(text)
    if year is not None:
        out[bisect.bisect_right(YEAR_EDGES, year)] = 1.0
    slot = {g: len(YEAR_EDGES) + 1 + i for i, g in enumerate(genres)}
    for genre in _genres_of(text):
        if genre in slot:
            out[slot[genre]] = 1.0
    return out
