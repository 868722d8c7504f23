"""Approximate top-k (stream.ann): recall against exact scoring, seen items, fallbacks."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from stream.ann import AnnIndex, AnnParams, exact_top_k
from stream.scoring import top_k


def clustered(n_items: int, dim: int = 16, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """(n_items + 1, dim) item vectors around cluster centres; row 0 is padding (zeros)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    members = centres[rng.integers(0, clusters, n_items)]
    vectors = members + 0.3 * rng.normal(size=(n_items, dim)).astype(np.float32)
    return np.vstack([np.zeros((1, dim), np.float32), vectors])


def queries(vectors: np.ndarray, n: int, seed: int = 1) -> np.ndarray:
    """Users' hidden states: near a random item, as a trained model's are."""
    rng = np.random.default_rng(seed)
    picked = vectors[rng.integers(1, len(vectors), n)]
    return (picked + 0.3 * rng.normal(size=picked.shape)).astype(np.float32)


def sessions(n: int, length: int, n_items: int, seed: int = 2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, n_items + 1, size=(n, length)).astype(np.int64)


def test_exact_top_k_equals_scoring_top_k_on_the_full_matrix() -> None:
    vectors = clustered(500)
    hidden = queries(vectors, 40)
    seen = sessions(40, 8, 500)
    seen[:, :3] = 0  # left padding
    best, best_scores = exact_top_k(hidden, vectors, seen, 10)
    want, want_scores = top_k(hidden @ vectors.T, seen, 10)
    np.testing.assert_array_equal(best, want)
    np.testing.assert_allclose(best_scores, want_scores, rtol=1e-6)


def test_recall_at_10_is_high_on_clustered_items() -> None:
    vectors = clustered(5000)
    hidden = queries(vectors, 200)
    seen = sessions(200, 10, 5000)
    ann = AnnIndex.build(vectors, AnnParams(m=16, ef_search=64))
    best, _ = ann.top_k(hidden, seen, 10)
    exact, _ = exact_top_k(hidden, vectors, seen, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(best, exact, strict=True)])
    assert recall >= 0.95, recall


def test_seen_items_and_padding_never_come_back() -> None:
    vectors = clustered(2000)
    hidden = queries(vectors, 100)
    # Each session holds its user's 5 best items, so they would top an unfiltered search.
    exact_best, _ = exact_top_k(hidden, vectors, np.zeros((100, 1), np.int64), 5)
    seen = np.hstack([np.zeros((100, 2), np.int64), exact_best])
    ann = AnnIndex.build(vectors, AnnParams(m=16, margin=2))
    best, best_scores = ann.top_k(hidden, seen, 10)
    assert best.shape == (100, 10)
    for row, session in zip(best, seen, strict=True):
        assert not set(row) & set(session[session > 0])
        assert 0 not in row
        assert len(set(row)) == 10
    assert np.all(np.diff(best_scores, axis=1) <= 0)  # best first
    # margin 2 < 5 seen items in the way: every row needed the second, wider search.
    assert ann.stats.researched == 100
    assert ann.stats.exact == 0


def test_rows_the_catalogue_cannot_fill_fall_back_to_exact() -> None:
    vectors = clustered(12)
    hidden = queries(vectors, 3)
    seen = np.array([[0, 0, 0], [1, 2, 3], [0, 4, 5]], dtype=np.int64)
    seen = np.hstack([seen, np.tile(np.arange(6, 10), (3, 1))])  # 7 or 4 seen of 12 items
    ann = AnnIndex.build(vectors, AnnParams(m=4, margin=1))
    best, best_scores = ann.top_k(hidden, seen, 10)
    want, want_scores = exact_top_k(hidden, vectors, seen, 10)
    np.testing.assert_array_equal(best, want)
    np.testing.assert_allclose(best_scores, want_scores, rtol=1e-6)
    assert (best[1] == 0).sum() == 5  # 12 items - 7 seen = 5 left, padded with 0 / -inf
    assert np.isneginf(best_scores[1, 5:]).all()
    assert ann.stats.exact >= 1


def test_an_index_is_saved_once_and_read_back(tmp_path) -> None:
    vectors = clustered(1000)
    hidden = queries(vectors, 20)
    seen = sessions(20, 4, 1000)
    first = AnnIndex.load_or_build(vectors, tmp_path)
    files = list(tmp_path.glob("hnsw-*.faiss"))
    assert len(files) == 1
    again = AnnIndex.load_or_build(vectors, tmp_path)
    np.testing.assert_array_equal(
        first.top_k(hidden, seen, 10)[0], again.top_k(hidden, seen, 10)[0]
    )
    other = vectors.copy()
    other[1] += 1.0
    AnnIndex.load_or_build(other, tmp_path)
    assert len(list(tmp_path.glob("hnsw-*.faiss"))) == 2  # new vectors, new file


@pytest.mark.parametrize("mode", ["exact", "ann"])
def test_the_vector_ranker_merges_runtime_items_and_drops_seen_and_removed_ones(
    mode: str, tmp_path
) -> None:
    from stream.ann import VectorRanker
    from stream.itemtable import ItemTable

    vectors = clustered(300)
    table = ItemTable(["", *(f"i{k}" for k in range(1, 301))], vectors)
    extra = clustered(5, seed=9)[1:] * 3  # (5, D) long vectors: runtime items rank high
    table.add_items([f"r{k}" for k in range(5)], extra)
    table.remove_items(["r1", "i7"])
    view = table.view
    hidden = queries(vectors, 30)
    seen = sessions(30, 6, 300)
    seen[:, 0] = 301 + 3  # every session clicked runtime item r3
    ranker = VectorRanker.for_bundle(vectors, mode, tmp_path)
    best, best_scores = ranker.top_k(hidden, seen, view, 10)
    scores = hidden @ view.vectors.T  # (B, 306): the truth over the whole table
    scores[:, view.hidden_mask] = -np.inf
    want, want_scores = top_k(scores, seen, 10)
    assert best.shape == (30, 10) and (best > 0).all()
    assert not np.isin(best, [0, 7, 302, 304]).any(), "padding, removed and seen never ranked"
    assert not (best[:, :, None] == seen[:, None, :]).any()
    if mode == "exact":
        np.testing.assert_array_equal(best, want)
        np.testing.assert_allclose(best_scores, want_scores, rtol=1e-5)
    else:
        hits = np.mean([len(set(b) & set(w)) / 10 for b, w in zip(best, want, strict=True)])
        assert hits >= 0.9
    assert (np.diff(best_scores, axis=1) <= 1e-6).all(), "best first"


@pytest.mark.parametrize("mode", ["exact", "ann"])
def test_the_novelty_boost_ranks_as_if_added_to_every_score(mode: str, tmp_path) -> None:
    """item_bias.npy on the bundle's items (inside the inner product) and the manifest's boost
    on runtime items give the ranking of hidden @ V.T + bias, as a score head would."""
    from stream.ann import VectorRanker
    from stream.itemtable import ItemTable

    vectors = clustered(300)
    boost = 1.5
    bias = np.zeros(301, np.float32)
    bias[250:] = boost  # the "untrained" items
    table = ItemTable(
        ["", *(f"i{k}" for k in range(1, 301))], vectors, bundle_bias=bias, runtime_boost=boost
    )
    table.add_items([f"r{k}" for k in range(5)], clustered(5, seed=9)[1:])
    view = table.view
    hidden, seen = queries(vectors, 30), sessions(30, 6, 300)
    truth = hidden @ view.vectors.T + np.concatenate([bias, np.full(5, boost, np.float32)])
    want, want_scores = top_k(truth.astype(np.float32), seen, 10)
    model_scores = (hidden @ vectors.T + bias).astype(np.float32)  # a score head's columns
    np.testing.assert_allclose(view.extend(model_scores, hidden), truth, rtol=1e-5, atol=1e-5)
    ranker = VectorRanker.for_bundle(vectors, mode, tmp_path, bias=bias)
    best, best_scores = ranker.top_k(hidden, seen, view, 10)
    assert (best >= 250).mean() > 0.2, "the boost must move boosted items into the top 10"
    if mode == "exact":
        np.testing.assert_array_equal(best, want)
        np.testing.assert_allclose(best_scores, want_scores, rtol=1e-5, atol=1e-5)
    else:
        hits = np.mean([len(set(b) & set(w)) / 10 for b, w in zip(best, want, strict=True)])
        assert hits >= 0.9
