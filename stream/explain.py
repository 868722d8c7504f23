"""`because`: for each recommended item, the session item that best explains it.

The explanation is the item of the user's model window whose vector (the model's item
representation, item_vectors.npy plus runtime items) has the highest cosine similarity with the
recommended item's vector: "recommended because you watched X". It costs one batched
(B, k, D) x (B, D, L) product per batch and no extra model call, so it runs on every update
(8-13 µs per user at k=10, L=50, D=64, 3.4k items on this 2-core box under load;
`explain: false` turns it off).

Only items of the window the model read are candidates (a session may be longer than the
model's window; older items did not shape this list).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


class SimilarityExplainer:
    """The processor's explain hook: `explainer(best, window, vectors) -> because`.

    Keeps the unit-length copy of the last item table it saw, so a table that did not change
    (the same array) is normalised once, not once per batch.
    """

    def __init__(self) -> None:
        self._table: FloatArray | None = None
        self._unit: FloatArray | None = None

    def __call__(self, best: IntArray, window: IntArray, vectors: FloatArray) -> IntArray:
        if self._unit is None or vectors is not self._table:
            self._table, self._unit = vectors, unit_rows(vectors)
        return explain(best, window, self._unit)


def explain(best: IntArray, window: IntArray, unit: FloatArray) -> IntArray:
    """Per recommended item, the index of its most similar window item (0 = no explanation).

    best (B, k): recommended item indices, 0 where a row has fewer than k items;
    window (B, L): the model's left-padded input, 0 = padding;
    unit (W, D): row i is item index i's vector scaled to unit length (`unit_rows`), W covering
    every index in best and window.
    Returns (B, k) int64 item indices, each one taken from the same row of `window`.
    """
    if best.size == 0 or window.shape[1] == 0:
        return np.zeros(best.shape, dtype=np.int64)
    recs = unit[best]  # (B, k, D)
    seen = unit[window]  # (B, L, D)
    sims = np.matmul(recs, seen.transpose(0, 2, 1))  # (B, k, L): cosines
    sims[np.broadcast_to((window == 0)[:, None, :], sims.shape)] = -np.inf
    pick = np.argmax(sims, axis=2)  # (B, k): slot in the window
    because = np.take_along_axis(window, pick, axis=1)  # (B, k)
    # A row with an empty window, or a padded slot of best, has no explanation.
    because[(best == 0) | ~np.any(window > 0, axis=1, keepdims=True)] = 0
    return because.astype(np.int64, copy=False)


def unit_rows(vectors: FloatArray) -> FloatArray:
    """(W, D) rows scaled to unit length; zero rows (padding) stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)  # (W, 1)
    out = np.zeros_like(vectors)
    np.divide(vectors, norms, out=out, where=norms > 0)
    return out
