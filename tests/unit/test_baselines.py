from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from model.baselines import ALS, ALSConfig, ItemKNN, ItemKNNConfig, Popularity
from model.data import load_dataset, train_sequences
from model.errors import ConfigError
from model.evaluate import evaluate_scores_fn


def seqs(*rows: list[int]) -> list[np.ndarray]:
    return [np.array(r, dtype=np.int64) for r in rows]


def window(*items: int, length: int = 4) -> np.ndarray:
    return np.array([[0] * (length - len(items)) + list(items)], dtype=np.int64)


def test_popularity_ranks_a_hand_made_data_set_as_expected(tmp_path: Path):
    # Users' training parts (all but the last two items): [3, 3, 1], [3, 2], [1, 4].
    path = tmp_path / "tiny.txt"
    rows = [(1, [3, 3, 1, 4, 2]), (2, [3, 2, 5, 1]), (3, [1, 4, 2, 5])]
    path.write_text("".join(f"{u} {i}\n" for u, items in rows for i in items), encoding="ascii")
    ds = load_dataset(f"ml-1m:{path}")
    pop = Popularity(train_sequences(ds), ds.num_items)
    scores = pop.score_fn(np.zeros((1, 1), dtype=np.int64))[0]
    assert scores.tolist() == [0.0, 2.0, 1.0, 3.0, 1.0, 0.0]  # item 3 > 1 > 2 = 4 > 5
    # Test targets 2, 1, 5 after histories {3, 1, 4}, {3, 2, 5}, {1, 4, 2}; unseen items by
    # score: user 1 -> [2 (1.0), 5 (0)], rank of 2 is 0; user 2 -> [1 (2.0), 4 (1.0)], rank
    # of 1 is 0; user 3 -> [3 (3.0), 5 (0)], rank of 5 is 1.
    test = evaluate_scores_fn(pop.score_fn, ds, "test", pop.max_len)
    assert test["mrr"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert test["ndcg@5"] == pytest.approx((1 + 1 + 1 / math.log2(3)) / 3)


def test_item_knn_last_item_scores_hand_computed_similarities():
    train = seqs([1, 2, 3], [1, 2, 4], [5, 2, 3])
    knn = ItemKNN(train, 5, ItemKNNConfig(window=1, alpha=0.5))
    scores = knn.score_fn(window(4, 2))[0]
    # Followers of 2: 3 twice, 4 once; counts n_2 = 3, n_3 = 2, n_4 = 1.
    assert scores[3] == pytest.approx(2 / math.sqrt(3 * 2))
    assert scores[4] == pytest.approx(1 / math.sqrt(3 * 1))
    assert scores[[0, 1, 2, 5]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert knn.max_len == 1 and knn.size == 4  # 1->2, 2->3, 2->4, 5->2


def test_item_knn_session_weights_recent_items_by_decay():
    train = seqs([1, 2, 3], [1, 2, 4], [5, 2, 3])
    last = ItemKNN(train, 5, ItemKNNConfig(window=1, alpha=0.5))
    session = ItemKNN(train, 5, ItemKNNConfig(window=1, alpha=0.5, session=2, decay=0.5))
    got = session.score_fn(window(1, 5))[0]
    expected = 0.5 * last.score_fn(window(1))[0] + last.score_fn(window(5))[0]
    assert got == pytest.approx(expected)
    assert got[2] > 0  # both 1 and 5 lead to 2
    # Padding in the session window adds nothing.
    assert session.score_fn(window(5))[0] == pytest.approx(last.score_fn(window(5))[0])


def test_item_knn_keeps_only_the_top_neighbours():
    train = seqs([1, 2], [1, 2], [1, 3], [1, 4], [1, 4], [1, 4])
    knn = ItemKNN(train, 4, ItemKNNConfig(window=1, alpha=1.0, neighbours=2))
    scores = knn.score_fn(window(1))[0]
    assert np.count_nonzero(scores) == 2 and scores[4] > scores[2] > 0 == scores[3]


def test_als_folds_users_in_from_their_history():
    # Two taste blocks: items 1-5 and 6-10; every user stays in one block.
    rng = np.random.default_rng(0)
    train = [rng.permutation(np.arange(1, 6) + 5 * (u % 2))[:4] for u in range(40)]
    als = ALS(train, 10, ALSConfig(factors=4, iterations=10, threads=1), max_len=8)
    scores = als.score_fn(np.array([[0, 0, 0, 0, 0, 1, 2, 3]], dtype=np.int64))[0]
    assert scores.shape == (11,) and scores.dtype == np.float32
    assert min(scores[4], scores[5]) > max(scores[6:])  # own block first
    assert als.size == 11 * 4


def test_baseline_configs_are_checked():
    with pytest.raises(ConfigError):
        ItemKNNConfig(window=0)
    with pytest.raises(ConfigError):
        ItemKNNConfig(decay=0.0)
    with pytest.raises(ConfigError):
        ALSConfig(factors=0)
