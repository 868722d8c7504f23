from __future__ import annotations

import numpy as np

from stream.scoring import left_pad, top_k


def test_left_pad_keeps_the_most_recent_items_last() -> None:
    out = left_pad([[1, 2, 3], [], [4, 5, 6, 7, 8]], 4)
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [5, 6, 7, 8]]
    assert out.dtype == np.int64


def test_top_k_excludes_padding_and_seen_items_and_sorts() -> None:
    scores = np.array([[9.0, 1.0, 8.0, 3.0, 7.0, 2.0]], dtype=np.float32)
    seen = np.array([[0, 0, 4]], dtype=np.int64)
    best, best_scores = top_k(scores.copy(), seen, 3)
    assert best.tolist() == [[2, 3, 5]]
    assert best_scores.tolist() == [[8.0, 3.0, 2.0]]


def test_top_k_with_fewer_candidates_than_k_pads_with_zero() -> None:
    scores = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    seen = np.array([[1, 2]], dtype=np.int64)
    best, best_scores = top_k(scores.copy(), seen, 3)
    assert best.tolist() == [[3, 0, 0]]
    assert best_scores[0, 0] == 3.0
    assert not np.isfinite(best_scores[0, 1:]).any()


def test_top_k_matches_a_full_sort_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((32, 500)).astype(np.float32)
    seen = rng.integers(0, 500, size=(32, 20))
    best, _ = top_k(scores.copy(), seen, 10)
    for row in range(32):
        masked = scores[row].copy()
        masked[seen[row]] = -np.inf
        masked[0] = -np.inf
        assert best[row].tolist() == np.argsort(-masked, kind="stable")[:10].tolist()
