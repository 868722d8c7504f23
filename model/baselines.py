"""Baselines scored through the one evaluation (model/evaluate.py): same windows, same masking
of seen items, same pessimistic ties as SASRec.

    popularity      training-split click counts, the same list for everyone
    item-kNN        item-to-item similarity from co-occurrence in training sequences: an item
                    scores by its similarity to the last item ("last") or to the recent items
                    of the session, weighted by recency ("session")
    ALS             implicit-feedback matrix factorisation (the `implicit` library); a user's
                    vector is folded in from the history it is scored on, so the model needs
                    no user ids and serves new users like known ones
    text-kNN        pure content: an item scores by the cosine similarity of its text embedding
                    to those of the session's recent items (recency-weighted); no clicks are
                    used at all, so items never seen in training score like any other

Every baseline exposes `score_fn` (left-padded (B, L) windows -> (B, N + 1) scores), `max_len`
(the window it needs: the whole history for ALS) and `size` (stored numbers). Only numpy is
imported at module level: scipy and implicit come with the train extra.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from model.errors import ConfigError

logger = logging.getLogger(__name__)


def _counts(sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    clicks = np.concatenate([*sequences, np.zeros(0, dtype=np.int64)])
    return np.bincount(clicks, minlength=num_items + 1).astype(np.float32)  # (N + 1,)


class Popularity:
    """Everyone gets the training click counts as scores."""

    name = "popularity"
    max_len = 1

    def __init__(self, sequences: Sequence[np.ndarray], num_items: int) -> None:
        self.counts = _counts(sequences, num_items)  # (N + 1,)
        self.size = len(self.counts)
        self.config: dict[str, Any] = {}

    def score_fn(self, windows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(windows), len(self.counts)))


@dataclass(frozen=True)
class ItemKNNConfig:
    # A pair (i, j) co-occurs when j follows i within `window` steps of a training sequence;
    # weight 1 / distance, so the next item counts most.
    window: int = 3
    symmetric: bool = False  # also count j -> i (order-free similarity)
    alpha: float = 0.5  # similarity C_ij / (n_i^alpha n_j^(1 - alpha)); 0.5 = cosine
    neighbours: int = 200  # similarities kept per item; the rest are dropped
    session: int = 1  # most recent items whose neighbours are summed; 1 = last item only
    decay: float = 0.7  # weight of the k-th most recent item is decay^k

    def __post_init__(self) -> None:
        if min(self.window, self.neighbours, self.session) < 1 or not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"item-kNN settings out of range: {self}")


class ItemKNN:
    """Item-to-item co-occurrence kNN over training sequences (sparse, top neighbours only)."""

    def __init__(self, sequences: Sequence[np.ndarray], num_items: int, cfg: ItemKNNConfig) -> None:
        from scipy import sparse

        self.cfg, self.config = cfg, asdict(cfg)
        self.name = "item-kNN (last item)" if cfg.session == 1 else "item-kNN (session)"
        self.max_len = cfg.session
        n = num_items + 1
        rows, cols, weights = [], [], []
        for gap in range(1, cfg.window + 1):
            for seq in sequences:
                if len(seq) > gap:
                    rows.append(seq[:-gap])
                    cols.append(seq[gap:])
                    weights.append(np.full(len(seq) - gap, 1.0 / gap, dtype=np.float32))
        src, dst = np.concatenate([*rows, [0]]), np.concatenate([*cols, [0]])
        w = np.concatenate([*weights, np.zeros(1, np.float32)])
        if cfg.symmetric:
            src, dst, w = np.concatenate([src, dst]), np.concatenate([dst, src]), np.tile(w, 2)
        co = sparse.csr_matrix((w, (src, dst)), shape=(n, n), dtype=np.float32)
        co.sum_duplicates()
        co.eliminate_zeros()  # the (0, 0) entry that keeps empty inputs well-formed
        counts = np.maximum(_counts(sequences, num_items), 1.0)
        norm_rows = sparse.diags(counts**-cfg.alpha)
        norm_cols = sparse.diags(counts ** -(1.0 - cfg.alpha))
        self.sim = _top_per_row((norm_rows @ co @ norm_cols).tocsr(), cfg.neighbours)
        self.size = int(self.sim.nnz)

    def score_fn(self, windows: np.ndarray) -> np.ndarray:
        from scipy import sparse

        recent = windows[:, -self.cfg.session :]  # (B, S), newest last
        S = recent.shape[1]
        weights = np.broadcast_to(self.cfg.decay ** np.arange(S - 1, -1, -1.0), recent.shape)
        keep = recent != 0
        rows = np.broadcast_to(np.arange(len(recent))[:, None], recent.shape)
        query = sparse.csr_matrix(
            (weights[keep], (rows[keep], recent[keep])),
            shape=(len(recent), self.sim.shape[0]),
            dtype=np.float32,
        )  # (B, N + 1)
        return np.asarray((query @ self.sim).toarray(), dtype=np.float32)  # (B, N + 1)


def _top_per_row(matrix: Any, k: int) -> Any:
    """CSR matrix with only the k largest entries of each row."""
    from scipy import sparse

    indptr, indices, data = matrix.indptr, matrix.indices, matrix.data
    keep_rows, keep_cols, keep_vals = [], [], []
    for row in range(matrix.shape[0]):
        lo, hi = indptr[row], indptr[row + 1]
        top = lo + (np.argpartition(-data[lo:hi], k - 1)[:k] if hi - lo > k else np.arange(hi - lo))
        keep_rows.append(np.full(len(top), row))
        keep_cols.append(indices[top])
        keep_vals.append(data[top])
    return sparse.csr_matrix(
        (np.concatenate(keep_vals), (np.concatenate(keep_rows), np.concatenate(keep_cols))),
        shape=matrix.shape,
        dtype=np.float32,
    )


@dataclass(frozen=True)
class ALSConfig:
    factors: int = 64  # latent dimensions
    regularization: float = 0.1  # L2 on both factor matrices
    alpha: float = 10.0  # confidence of an observed click (unobserved pairs weigh 1)
    iterations: int = 15  # alternating sweeps
    seed: int = 0  # factor initialisation
    threads: int = 2  # implicit's own threads (BLAS is held at 1, as implicit asks)

    def __post_init__(self) -> None:
        if min(self.factors, self.iterations, self.threads) < 1 or self.regularization < 0:
            raise ConfigError(f"ALS settings out of range: {self}")


class ALS:
    """Implicit ALS (Hu, Koren & Volinsky, 2008) fitted by `implicit`, users folded in."""

    name = "ALS (implicit MF)"

    def __init__(
        self, sequences: Sequence[np.ndarray], num_items: int, cfg: ALSConfig, max_len: int
    ) -> None:
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

        self.cfg, self.config, self.max_len = cfg, asdict(cfg), max_len
        self.num_columns = num_items + 1
        with threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(
                factors=cfg.factors,
                regularization=cfg.regularization,
                alpha=cfg.alpha,
                iterations=cfg.iterations,
                random_state=cfg.seed,
                num_threads=cfg.threads,
            )
            self.model.fit(self._user_items(sequences), show_progress=False)
        self.size = int(self.model.item_factors.size)  # user factors are folded in, not kept

    def _user_items(self, sequences: Sequence[np.ndarray]) -> Any:
        from scipy import sparse

        rows = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
        cols = np.concatenate([*sequences, np.zeros(0, dtype=np.int64)])
        matrix = sparse.csr_matrix(
            (np.ones(len(cols), dtype=np.float32), (rows, cols)),
            shape=(len(sequences), self.num_columns),
        )
        matrix.data[:] = 1.0  # repeated clicks count once
        return matrix

    def score_fn(self, windows: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        history = [row[row != 0] for row in windows]
        with threadpool_limits(1, "blas"):
            users = self.model.recalculate_user(np.arange(len(history)), self._user_items(history))
        scores = users @ self.model.item_factors.T  # (B, N + 1)
        return np.asarray(scores, dtype=np.float32)


@dataclass(frozen=True)
class TextKNNConfig:
    session: int = 10  # most recent items whose text is compared with each candidate
    decay: float = 0.8  # weight of the k-th most recent item is decay^k

    def __post_init__(self) -> None:
        if self.session < 1 or not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"text-kNN settings out of range: {self}")


class TextKNN:
    """Session-to-item text similarity: score(c) = sum_k decay^k cos(text(s_k), text(c))."""

    name = "text-kNN (session)"

    def __init__(self, text_emb: np.ndarray, cfg: TextKNNConfig) -> None:
        """text_emb (N + 1, T): unit-norm text embeddings, row 0 (padding) zeros."""
        self.emb = np.array(text_emb, dtype=np.float32)  # (N + 1, T), a copy
        self.emb[0] = 0.0
        self.cfg, self.config, self.max_len = cfg, asdict(cfg), cfg.session
        self.size = int(self.emb.size)

    def score_fn(self, windows: np.ndarray) -> np.ndarray:
        recent = windows[:, -self.cfg.session :]  # (B, S), newest last
        S = recent.shape[1]
        weights = (self.cfg.decay ** np.arange(S - 1, -1, -1.0)).astype(np.float32)  # (S,)
        query = np.einsum("s,bst->bt", weights, self.emb[recent])  # (B, T); padding rows are 0
        return np.asarray(query @ self.emb.T)  # (B, N + 1)
