from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from model.data import load_dataset
from model.errors import EvaluationError
from model.evaluate import (
    MetricAccumulator,
    case_metric,
    case_ranks,
    evaluate_scores_fn,
    paired_bootstrap,
    pessimistic_ranks,
    popularity_score_fn,
)

NONE: list[np.ndarray] = [np.array([], dtype=np.int64)]


def ranks(scores: list[float], target: int, seen: list[int] | None = None) -> int:
    seen_arrays = [np.array(seen or [], dtype=np.int64)]
    row = np.array([scores], dtype=np.float32)
    return int(pessimistic_ranks(row, np.array([target]), seen_arrays)[0])


def test_rank_counts_items_scoring_higher():
    #        pad  1    2    3    4    5
    row = [0.0, 0.5, 0.9, 0.1, 0.7, 0.3]
    assert ranks(row, 4) == 1  # only item 2 beats it
    assert ranks(row, 2) == 0
    assert ranks(row, 3) == 4


def test_seen_items_are_masked():
    row = [0.0, 0.5, 0.9, 0.1, 0.7, 0.3]
    assert ranks(row, 4, seen=[2]) == 0
    assert ranks(row, 3, seen=[2, 4, 4]) == 2  # duplicates in a history are harmless


def test_padding_column_is_masked_even_when_it_scores_highest():
    assert ranks([99.0, 0.1, 0.2, 0.3], 3) == 0


def test_ties_are_pessimistic():
    assert ranks([0.0, 0.5, 0.5, 0.5, 0.1], 2) == 2  # both equal items count
    assert ranks([0.0, 0.5, 0.5, 0.5, 0.1], 2, seen=[3]) == 1


def test_a_target_in_the_history_is_ranked_by_its_own_score():
    assert ranks([0.0, 0.9, 0.5, 0.1], 1, seen=[1, 2]) == 0


def test_metrics_against_hand_computed_values():
    acc = MetricAccumulator()
    acc.add(np.array([0, 1, 4]))
    acc.add(np.array([10, 25]))
    m = acc.result()
    assert m["users"] == 5
    assert m["hr@5"] == pytest.approx(3 / 5)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["hr@20"] == pytest.approx(4 / 5)
    ndcg5 = (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5
    assert m["ndcg@5"] == pytest.approx(ndcg5)
    assert m["ndcg@10"] == pytest.approx(ndcg5)
    assert m["ndcg@20"] == pytest.approx(ndcg5 + 1 / math.log2(12) / 5)
    assert m["precision@5"] == pytest.approx(3 / 5 / 5)
    assert m["precision@20"] == pytest.approx(4 / 5 / 20)
    # Per user with a hit: P = 1/k, R = 1, F1 = 2PR/(P+R) = 2/(k+1).
    assert m["f1@5"] == pytest.approx(3 * (2 / 6) / 5)
    assert m["f1@20"] == pytest.approx(4 * (2 / 21) / 5)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11 + 1 / 26) / 5)


def test_empty_accumulator_and_nan_scores_raise():
    with pytest.raises(EvaluationError):
        MetricAccumulator().result()
    with pytest.raises(EvaluationError):
        pessimistic_ranks(np.array([[0.0, np.nan, 1.0]]), np.array([1]), NONE)
    with pytest.raises(EvaluationError):
        pessimistic_ranks(np.zeros((2, 3)), np.array([1]), NONE)


def test_evaluate_scores_fn_masks_the_whole_history_not_just_the_window(tmp_path: Path):
    path = tmp_path / "ml.txt"
    # One user: history 5 4 3 2, valid target 1, test target 6.
    path.write_text("".join(f"1 {i}\n" for i in (5, 4, 3, 2, 1, 6)), encoding="ascii")
    ds = load_dataset(f"ml-1m:{path}")
    windows: list[np.ndarray] = []

    def score_fn(window: np.ndarray) -> np.ndarray:
        windows.append(window.copy())
        # Items 2..5 (all seen) beat both targets; item 1 beats item 6.
        scores = np.array([[0.0, 0.5, 0.9, 0.9, 0.9, 0.9, 0.1]], dtype=np.float32)
        return np.repeat(scores, len(window), axis=0)

    valid = evaluate_scores_fn(score_fn, ds, "valid", max_len=2)
    assert windows[0].tolist() == [[3, 2]]  # the window is cut, the mask is not
    assert valid["hr@5"] == 1.0 and valid["mrr"] == 1.0
    test = evaluate_scores_fn(score_fn, ds, "test", max_len=2)
    assert windows[1].tolist() == [[2, 1]]
    assert test["mrr"] == 1.0  # 1 and 2..5 are all history: 6 ranks first


def test_evaluate_scores_fn_rejects_scores_of_another_catalogue(tmp_path: Path):
    path = tmp_path / "ml.txt"
    path.write_text("1 1\n1 2\n1 3\n", encoding="ascii")
    ds = load_dataset(f"ml-1m:{path}")
    with pytest.raises(EvaluationError, match="columns"):
        evaluate_scores_fn(lambda w: np.zeros((len(w), 9), np.float32), ds, "valid", 4)


def test_popularity_counts_training_clicks_only(tmp_path: Path):
    path = tmp_path / "ml.txt"
    path.write_text("1 1\n1 1\n1 2\n1 3\n2 2\n2 3\n2 3\n", encoding="ascii")
    ds = load_dataset(f"ml-1m:{path}")
    scores = popularity_score_fn(ds)(np.zeros((2, 4), dtype=np.int64))
    assert scores.shape == (2, 4)
    assert scores[0].tolist() == [0.0, 2.0, 1.0, 0.0]  # train: [1, 1] and [2]


def test_case_ranks_are_the_ranks_the_metrics_come_from(tmp_path: Path):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 21, size=rng.integers(3, 12)) for _ in range(30)]
    path = tmp_path / "ml.txt"
    path.write_text("".join(f"{u} {i}\n" for u, s in enumerate(seqs, 1) for i in s), "ascii")
    ds = load_dataset(f"ml-1m:{path}")
    table = rng.normal(size=(21, 21)).astype(np.float32)

    def score_fn(windows: np.ndarray) -> np.ndarray:
        return table[windows[:, -1]]  # a last-item model

    got = case_ranks(score_fn, ds, "test", max_len=5, batch_size=7)  # batches cut the order
    assert got.shape == (len(ds.sequences),) and (got >= 0).all()
    acc = MetricAccumulator()
    acc.add(got)
    assert acc.result() == pytest.approx(evaluate_scores_fn(score_fn, ds, "test", 5, 7))
    # eval_examples order: user u's rank is that of their own test target
    u = 4
    hist, target = seqs[u][:-1], seqs[u][-1]
    assert got[u] == ranks(table[hist[-1]].tolist(), int(target), hist.tolist())


def test_case_metric_matches_hand_values():
    r = np.array([0, 1, 9, 10])
    np.testing.assert_allclose(case_metric(r, "hr@10"), [1, 1, 1, 0])
    ndcg = [1, 1 / math.log2(3), 1 / math.log2(11), 0]
    np.testing.assert_allclose(case_metric(r, "ndcg@10"), ndcg)
    np.testing.assert_allclose(case_metric(r, "mrr"), [1, 0.5, 0.1, 1 / 11])
    with pytest.raises(EvaluationError, match="per-case metric"):
        case_metric(r, "recall")


def test_paired_bootstrap_tells_a_sure_win_from_a_tie():
    rng = np.random.default_rng(0)
    b = rng.integers(0, 40, size=600)
    same = paired_bootstrap(b, b, "ndcg@10", resamples=500)
    assert same["diff"] == same["lo95"] == same["hi95"] == 0.0 and same["p_a_ahead"] == 0.0
    better = np.maximum(b - 15, 0)  # every case ranked 15 places higher
    win = paired_bootstrap(better, b, "hr@10", resamples=500)
    assert win["diff"] > 0 and win["lo95"] > 0 and win["p_a_ahead"] == 1.0
    noise = rng.permutation(b)  # the same ranks on other cases: no real difference
    tie = paired_bootstrap(noise, b, "hr@10", resamples=500)
    assert tie["lo95"] < 0 < tie["hi95"]
    assert paired_bootstrap(better, b, resamples=200, seed=3) == paired_bootstrap(
        better, b, resamples=200, seed=3
    )
    with pytest.raises(EvaluationError, match="equal"):
        paired_bootstrap(b, b[:-1])
