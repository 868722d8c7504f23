"""Top-k over item vectors outside the ONNX graph: exact (chunked) and approximate (HNSW).

A bundle's scores are `hidden @ V.T` (V = item_vectors.npy, row 0 padding). With a catalogue
of 100k items or more, computing every score for every touched user dominates a batch (about
1 ms per user at 100k items, 13 ms at 1M on this box); `AnnIndex` answers the same question
from a faiss HNSW graph over V by inner product, in a few hundred µs at 1M items.

Both return what `stream.scoring.top_k` returns: the best k item indices per row, best first,
never padding nor an item of the row's session (`seen`), padded with 0 / -inf when the
catalogue runs out. The index searches `k + margin` neighbours, drops the seen ones, searches
the rows left short again with room for all their seen items, and scores any row still short
exactly (`stats` counts how often each happened).

faiss-cpu was chosen by measurement against hnswlib and usearch (BENCHMARKS.md, "Catalogue
scaling"): at equal recall@10 it was as fast as hnswlib and 2× faster than usearch per query,
ships wheels (hnswlib builds from source), and saves and loads its index files.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stream.errors import ConfigError, ScoringError
from stream.itemtable import TableView

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

# One exact chunk's score matrix stays under this many floats (64 MB): rows x items.
_CHUNK_FLOATS = 16 << 20


def exact_top_k(
    hidden: FloatArray, vectors: FloatArray, seen: IntArray, k: int
) -> tuple[IntArray, FloatArray]:
    """hidden (B, D), vectors (N + 1, D), seen (B, S) -> best (B, k') indices and scores.

    Scores are computed a chunk of rows at a time, so a large catalogue never needs a
    (B, N + 1) matrix; k' = min(k, N).
    """
    from stream.scoring import top_k  # the one masking and ordering rule

    rows = max(1, _CHUNK_FLOATS // max(len(vectors), 1))
    k = min(k, len(vectors) - 1)
    best = np.zeros((len(hidden), k), dtype=np.int64)
    best_scores = np.full((len(hidden), k), -np.inf, dtype=np.float32)
    for lo in range(0, len(hidden), rows):
        scores = hidden[lo : lo + rows] @ vectors.T  # (rows, N + 1)
        best[lo : lo + rows], best_scores[lo : lo + rows] = top_k(scores, seen[lo : lo + rows], k)
    return best, best_scores


@dataclass(frozen=True)
class AnnParams:
    """HNSW settings; the defaults reached recall@10 0.967 at 1M items (benchmarks/catalogue.py).

    ef_construction 400 instead of 100: recall@10 at ef_search 256 went from 0.958 to 0.986 at
    300k items (same vectors, same µs per query) for 3.7x the build time, which is paid once:
    the index file is cached by the vectors' digest (BENCHMARKS.md)."""

    m: int = 32  # graph degree (2m links per item on the base layer): memory vs recall
    ef_construction: int = 400  # build-time beam: build time vs graph quality
    ef_search: int = 256  # query-time beam: µs per query vs recall
    margin: int = 16  # extra neighbours fetched so that seen items can be dropped
    threads: int = 1  # OpenMP threads of one batched search; the processor passes ann_threads


@dataclass
class AnnStats:
    queries: int = 0
    researched: int = 0  # rows searched again with room for all their seen items
    exact: int = 0  # rows scored exactly (catalogue too small for k + seen)
    search_s: float = field(default=0.0)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError(
            "approximate top-k needs faiss: pip install 'streamrec[ann]' (or faiss-cpu)"
        ) from exc
    return faiss


class AnnIndex:
    """faiss HNSW over item vectors 1..N by inner product (faiss id = item index - 1)."""

    def __init__(self, index: Any, vectors: FloatArray, params: AnnParams) -> None:
        self._index = index
        self.vectors = vectors  # (N + 1, D), kept for the exact fallback
        self.params = params
        self.stats = AnnStats()
        self.loaded_from: Path | None = None  # the cached index file it was read from

    @classmethod
    def build(cls, vectors: FloatArray, params: AnnParams | None = None) -> AnnIndex:
        """Index rows 1..N of `vectors` (N + 1, D); uses every core while building."""
        faiss = _faiss()
        params = params or AnnParams()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) < 2:
            raise ScoringError(f"item vectors must be (N + 1, D) with N >= 1, got {vectors.shape}")
        start = time.perf_counter()
        index = faiss.IndexHNSWFlat(vectors.shape[1], params.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
        index.add(vectors[1:])
        logger.info(
            "HNSW index over %d items built in %.1fs (m=%d, ef_construction=%d)",
            len(vectors) - 1,
            time.perf_counter() - start,
            params.m,
            params.ef_construction,
        )
        return cls(index, vectors, params)

    @classmethod
    def load_or_build(
        cls, vectors: FloatArray, cache_dir: Path | None, params: AnnParams | None = None
    ) -> AnnIndex:
        """An index file in `cache_dir` named by the vectors' and the build settings' digest
        is read instead of building again (a 1M-item build takes minutes)."""
        params = params or AnnParams()
        if cache_dir is None:
            return cls.build(vectors, params)
        faiss = _faiss()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        digest = hashlib.sha256(vectors.tobytes())
        digest.update(f"hnsw-ip m={params.m} efc={params.ef_construction}".encode())
        path = cache_dir / f"hnsw-{digest.hexdigest()[:24]}.faiss"
        if path.is_file():
            cached = cls(faiss.read_index(str(path)), vectors, params)
            cached.loaded_from = path
            return cached
        ann = cls.build(vectors, params)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        faiss.write_index(ann._index, str(tmp))
        tmp.replace(path)  # readers never see a half-written index
        return ann

    def _search(self, hidden: FloatArray, k: int) -> tuple[FloatArray, IntArray]:
        """(B, D) -> scores, item indices (B, k); index 0 where HNSW found fewer than k."""
        faiss = _faiss()
        ef = max(self.params.ef_search, k)
        faiss.omp_set_num_threads(self.params.threads)
        start = time.perf_counter()
        scores, ids = self._index.search(
            np.ascontiguousarray(hidden, dtype=np.float32),
            k,
            params=faiss.SearchParametersHNSW(efSearch=ef),
        )
        self.stats.search_s += time.perf_counter() - start
        return scores, ids + 1  # faiss's -1 (not found) becomes padding index 0

    def top_k(self, hidden: FloatArray, seen: IntArray, k: int) -> tuple[IntArray, FloatArray]:
        """hidden (B, D), seen (B, S) (0 = padding) -> best (B, k') and scores, as exact_top_k."""
        n_items = len(self.vectors) - 1
        k = min(k, n_items)
        best, best_scores = _unseen(*self._search(hidden, min(k + self.params.margin, n_items)),
                                    seen, k)  # fmt: skip
        self.stats.queries += len(hidden)
        short = np.flatnonzero(best_scores[:, -1] == -np.inf) if k else np.zeros(0, np.int64)
        if short.size:
            self.stats.researched += short.size
            wide = min(k + int((seen[short] > 0).sum(axis=1).max()), n_items)
            best[short], best_scores[short] = _unseen(
                *self._search(hidden[short], wide), seen[short], k
            )
            short = short[best_scores[short, -1] == -np.inf]
        if short.size:
            # Fewer than k unseen items reachable: only exact scoring can tell.
            self.stats.exact += short.size
            best[short], best_scores[short] = exact_top_k(
                hidden[short], self.vectors, seen[short], k
            )
        return best, best_scores

    def describe(self) -> dict[str, Any]:
        return {"library": "faiss", "index": "HNSWFlat", "metric": "ip", **asdict(self.params)}


def _unseen(
    scores: FloatArray, ids: IntArray, seen: IntArray, k: int
) -> tuple[IntArray, FloatArray]:
    """Candidates (B, C), best first -> the first k that are neither padding nor seen."""
    # (B, C, S) comparisons: C and S are small (k + margin, session length).
    drop = (ids[:, :, None] == seen[:, None, :]).any(axis=2) | (ids == 0)  # (B, C)
    scores = np.where(drop, np.float32(-np.inf), scores)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept first, in search order
    best = np.take_along_axis(ids, order, axis=1)
    best_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    best[best_scores == -np.inf] = 0
    return best.astype(np.int64), best_scores


class VectorRanker:
    """Top-k for a headless bundle (no score head in its graphs): the bundle's items by
    `index` (an AnnIndex over item_vectors.npy) or exactly when `index` is None, the item
    table's runtime items exactly, merged; removed items and the session's own never ranked.
    """

    def __init__(self, vectors: FloatArray, index: AnnIndex | None, biased: bool = False) -> None:
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N + 1, D [+ 1])
        self.index = index
        # The last column of `vectors` is the bundle's item_bias (see `with_bias`).
        self.biased = biased

    @staticmethod
    def with_bias(vectors: FloatArray, bias: FloatArray | None) -> FloatArray:
        """(N + 1, D) and item_bias (N + 1,) -> (N + 1, D + 1): [v, b] . [h, 1] = h . v + b,
        so exact and ANN search rank the biased scores by one inner product."""
        if bias is None:
            return vectors
        return np.hstack([vectors, np.asarray(bias, np.float32).reshape(-1, 1)])

    @classmethod
    def for_bundle(
        cls,
        vectors: FloatArray,
        mode: str,
        cache_dir: Path | None,
        params: AnnParams | None = None,
        bias: FloatArray | None = None,
    ) -> VectorRanker:
        """mode exact | ann | auto (ann when faiss is installed, else exact with a warning);
        `bias` (N + 1,) is added to each bundle item's score (text-aware novelty boost)."""
        biased = bias is not None
        vectors = cls.with_bias(vectors, bias)
        if mode == "exact":
            return cls(vectors, None, biased)
        if mode == "auto":
            try:
                _faiss()
            except ConfigError:
                logger.warning("faiss is not installed: exact top-k over %d items", len(vectors))
                return cls(vectors, None, biased)
        return cls(vectors, AnnIndex.load_or_build(vectors, cache_dir, params), biased)

    def top_k(
        self, hidden: FloatArray, seen: IntArray, view: TableView, k: int
    ) -> tuple[IntArray, FloatArray]:
        """hidden (B, D), seen (B, S) -> best (B, k') indices into the table and scores,
        best first, padded with 0 / -inf (stream.scoring.top_k's contract)."""
        n1 = len(self.vectors)  # N + 1
        mask = view.hidden_mask
        query = hidden
        if self.biased:  # (B, D + 1): the 1 that picks up each item's bias
            query = np.hstack([hidden, np.ones((len(hidden), 1), np.float32)])
        removed = np.zeros(0, np.int64) if mask is None else np.flatnonzero(mask[:n1])
        bundle_seen = np.where(seen < n1, seen, 0)  # (B, S) runtime items are not indexed
        if removed.size:  # removed bundle items are dropped like seen ones
            dropped = np.broadcast_to(removed, (len(seen), removed.size))
            bundle_seen = np.hstack([bundle_seen, dropped])
        if self.index is None:
            best, best_scores = exact_top_k(query, self.vectors, bundle_seen, k)
        else:
            best, best_scores = self.index.top_k(query, bundle_seen, k)
        if not len(view.runtime):
            return best, best_scores
        # Runtime items (index N + 1 + j): exactly, then one merge of k + M candidates per row.
        extra = view.runtime_scores(hidden)  # (B, M)
        if mask is not None:
            extra[:, mask[n1:]] = -np.inf
        rows, cols = np.nonzero(seen >= n1)
        extra[rows, seen[rows, cols] - n1] = -np.inf
        ids = np.hstack([best, np.broadcast_to(n1 + np.arange(extra.shape[1]), extra.shape)])
        scores = np.hstack([best_scores, extra])  # (B, k' + M)
        k = min(k, view.width - 1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(ids, order, axis=1).astype(np.int64)
        best_scores = np.take_along_axis(scores, order, axis=1)
        best[~np.isfinite(best_scores)] = 0
        return best, best_scores
