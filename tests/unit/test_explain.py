"""`because` explanations: the most similar item of the user's model window."""

from __future__ import annotations

import numpy as np

from stream.explain import SimilarityExplainer


def _vectors(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    v = rng.standard_normal((n + 1, d)).astype(np.float32)
    v[0] = 0.0  # padding
    return v


def test_because_is_the_window_item_with_the_highest_cosine() -> None:
    rng = np.random.default_rng(0)
    vectors = _vectors(rng, 50)
    window = np.array([[0, 0, 3, 7, 9], [0, 0, 0, 0, 4], [11, 12, 13, 14, 15]], dtype=np.int64)
    best = np.array([[20, 21, 0], [22, 23, 24], [30, 31, 32]], dtype=np.int64)
    because = SimilarityExplainer()(best, window, vectors)
    assert because.shape == best.shape and because.dtype == np.int64
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    for b in range(len(best)):
        candidates = [i for i in window[b] if i > 0]
        for k, rec in enumerate(best[b]):
            if rec == 0:
                assert because[b, k] == 0
                continue
            expected = max(candidates, key=lambda i: float(unit[rec] @ unit[i]))
            assert because[b, k] == expected


def test_every_because_names_an_item_of_its_own_window() -> None:
    """The property the output promises, on a random batch with repeats and padding."""
    rng = np.random.default_rng(1)
    vectors = _vectors(rng, 200, d=16)
    B, L, k = 64, 12, 10
    lengths = rng.integers(0, L + 1, size=B)
    window = np.zeros((B, L), dtype=np.int64)
    for b, n in enumerate(lengths):
        window[b, L - n :] = rng.integers(1, 201, size=n)
    best = rng.integers(1, 201, size=(B, k)).astype(np.int64)
    because = SimilarityExplainer()(best, window, vectors)
    for b in range(B):
        named = set(because[b].tolist())
        if lengths[b] == 0:
            assert named == {0}  # nothing to explain with
        else:
            assert named <= set(window[b].tolist()) - {0}


def test_a_recommendation_near_one_session_item_is_explained_by_it() -> None:
    vectors = np.zeros((6, 3), dtype=np.float32)
    vectors[1] = [1, 0, 0]  # a thriller
    vectors[2] = [0, 1, 0]  # a comedy
    vectors[3] = [0.9, 0.1, 0]  # recommended: close to the thriller
    vectors[4] = [0.1, 0.95, 0.1]  # recommended: close to the comedy
    best = np.array([[3, 4]], dtype=np.int64)
    window = np.array([[0, 1, 2]], dtype=np.int64)
    assert SimilarityExplainer()(best, window, vectors).tolist() == [[1, 2]]


def test_empty_batches_and_windows() -> None:
    vectors = _vectors(np.random.default_rng(2), 5)
    explain = SimilarityExplainer()
    assert explain(np.zeros((0, 3), np.int64), np.zeros((0, 4), np.int64), vectors).shape == (0, 3)
    none = explain(np.ones((2, 3), np.int64), np.zeros((2, 0), np.int64), vectors)
    assert none.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_the_explainer_normalises_a_table_once_and_follows_a_new_one() -> None:
    rng = np.random.default_rng(3)
    old, new = _vectors(rng, 20), _vectors(rng, 20)
    explainer = SimilarityExplainer()
    best, window = np.array([[5, 6]], np.int64), np.array([[1, 2, 3]], np.int64)
    first = explainer(best, window, old)
    unit = explainer._unit
    assert explainer(best, window, old).tolist() == first.tolist() and explainer._unit is unit
    assert (
        explainer(best, window, new).tolist() == SimilarityExplainer()(best, window, new).tolist()
    )
    assert explainer._unit is not unit
