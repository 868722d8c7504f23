"""`because`: for each recommended item, the session item that best explains it.

The explanation is the item of the user's model window whose vector (the model's item
representation, item_vectors.npy plus runtime items) has the highest cosine similarity with the
recommended item's vector: "recommended because you watched X". It costs one batched
(B, k, D) x (B, L, D) product per batch, no extra model call, so it runs on every update.

Only items of the window the model read are candidates (a session may be longer than the
model's window; older items did not shape this list).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


def explain(best: IntArray, window: IntArray, vectors: FloatArray) -> IntArray:
    """Per recommended item, the index of its most similar window item (0 = no explanation).

    best (B, k): recommended item indices, 0 where a row has fewer than k items;
    window (B, L): the model's left-padded input, 0 = padding;
    vectors (W, D): row i is item index i's vector (W covers every index in best and window).
    Returns (B, k) int64 item indices, each one taken from the same row of `window`.
    """
    if best.size == 0 or window.shape[1] == 0:
        return np.zeros(best.shape, dtype=np.int64)
    recs = _unit(vectors[best])  # (B, k, D)
    seen = _unit(vectors[window])  # (B, L, D)
    sims = np.einsum("bkd,bld->bkl", recs, seen)  # (B, k, L)
    sims[np.broadcast_to((window == 0)[:, None, :], sims.shape)] = -np.inf
    pick = np.argmax(sims, axis=2)  # (B, k): slot in the window
    because = np.take_along_axis(window, pick, axis=1)  # (B, k)
    # A row with an empty window, or a padded slot of best, has no explanation.
    because[(best == 0) | ~np.any(window > 0, axis=1, keepdims=True)] = 0
    return because.astype(np.int64, copy=False)


def _unit(rows: FloatArray) -> FloatArray:
    """Rows scaled to unit length; zero rows (padding) stay zero."""
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)  # (..., 1)
    out = np.zeros_like(rows)
    np.divide(rows, norms, out=out, where=norms > 0)
    return out
