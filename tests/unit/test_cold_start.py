"""Cold-start split, target subsets, text kNN, the timestamped MovieLens loader, time-aware
evaluation inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.baselines import TextKNN, TextKNNConfig
from model.data import (
    SequenceDataset,
    by_target,
    cold_start_split,
    eval_examples,
    eval_times,
    load_dataset,
    train_sequences,
    train_times,
)
from model.errors import DataError
from model.evaluate import evaluate_scores_fn


def dataset(num_users: int = 60, num_items: int = 40, seed: int = 3) -> SequenceDataset:
    rng = np.random.default_rng(seed)
    seqs = tuple(rng.integers(1, num_items + 1, size=rng.integers(3, 30)) for _ in range(num_users))
    times = tuple(np.sort(rng.integers(1, 10**9, size=len(s))) * 1000 for s in seqs)
    return SequenceDataset(
        item_ids=tuple(str(i) for i in range(1, num_items + 1)),
        titles=("",) * num_items,
        user_ids=tuple(str(u) for u in range(num_users)),
        sequences=seqs,
        timestamps=times,
        description={"name": "hand"},
    )


def test_cold_start_split_never_leaks_held_out_items_into_training():
    ds = dataset()
    cold, held = cold_start_split(ds, 0.1, seed=5)
    assert len(held) == 4 and len(set(held.tolist())) == 4 and held.min() >= 1
    assert ds.sequences[0].size > 0
    for seq in train_sequences(cold):
        assert not np.isin(seq, held).any()
    assert any(np.isin(s[:-2], held).any() for s in ds.sequences)  # there was something to drop
    for before, after, t_before, t_after in zip(
        ds.sequences, cold.sequences, ds.timestamps or (), cold.timestamps or (), strict=True
    ):
        np.testing.assert_array_equal(after[-2:], before[-2:])  # valid and test items stay
        np.testing.assert_array_equal(after[:-2], before[:-2][~np.isin(before[:-2], held)])
        np.testing.assert_array_equal(t_after[-2:], t_before[-2:])
        assert len(t_after) == len(after)
    _, held_again = cold_start_split(ds, 0.1, seed=5)
    np.testing.assert_array_equal(held, held_again)
    assert not np.array_equal(held, cold_start_split(ds, 0.1, seed=6)[1])
    assert cold.description["cold_start"]["held_out_items"] == 4


def test_by_target_partitions_the_evaluation_cases():
    ds = dataset()
    cold, held = cold_start_split(ds, 0.25, seed=1)
    for split, cut in (("valid", 2), ("test", 1)):
        inside = by_target(cold, split, held)  # type: ignore[arg-type]
        outside = by_target(cold, split, held, inside=False)  # type: ignore[arg-type]
        assert all(s[-cut] in set(held.tolist()) for s in inside.sequences)
        assert not any(s[-cut] in set(held.tolist()) for s in outside.sequences)
        evaluated = sum(len(s) >= 3 for s in cold.sequences)  # users with a valid and a test item
        assert len(inside.sequences) + len(outside.sequences) == evaluated
        assert len(inside.sequences) > 0 and len(inside.timestamps or ()) == len(inside.sequences)


def test_text_knn_ranks_by_session_text_similarity():
    emb = np.array([[0, 0], [1, 0], [0.8, 0.6], [0, 1], [-1, 0]], dtype=np.float32)
    last_only = TextKNN(emb, TextKNNConfig(session=1))
    scores = last_only.score_fn(np.array([[0, 3, 1]]))  # newest item 1 = (1, 0)
    np.testing.assert_allclose(scores[0], [0, 1, 0.8, 0, -1], atol=1e-6)
    session = TextKNN(emb, TextKNNConfig(session=2, decay=0.5))
    # 0.5 * e3 + 1.0 * e1 = (1, 0.5): item 2 -> 0.8 + 0.3, item 3 -> 0.5, item 4 -> -1
    np.testing.assert_allclose(
        session.score_fn(np.array([[0, 3, 1]]))[0], [0, 1, 1.1, 0.5, -1], atol=1e-6
    )
    np.testing.assert_allclose(session.score_fn(np.zeros((1, 3), np.int64)), 0.0)
    assert emb[0].tolist() == [0, 0]  # the caller's table is not modified
    with pytest.raises(Exception, match="out of range"):
        TextKNNConfig(session=0)


def test_ratings_loader_orders_each_user_by_time(tmp_path: Path):
    ratings = tmp_path / "ratings.dat"
    ratings.write_text(
        "1::20::5::300\n1::10::3::100\n2::30::4::50\n1::30::1::200\n2::10::2::50\n",
        encoding="ascii",
    )
    (tmp_path / "movies.dat").write_bytes(
        "10::Caf\xe9 (1990)::Drama\n20::B (1991)::Comedy|Drama\n".encode("iso-8859-1")
    )
    ds = load_dataset(f"ml-1m-ratings:{ratings}")
    assert ds.item_ids == ("10", "20", "30") and ds.titles == ("Café (1990)", "B (1991)", "")
    assert ds.user_ids == ("1", "2")
    assert ds.sequences[0].tolist() == [1, 3, 2]  # 10@100, 30@200, 20@300
    assert ds.sequences[1].tolist() == [3, 1]  # equal times keep the file order
    assert ds.timestamps is not None and ds.timestamps[0].tolist() == [100_000, 200_000, 300_000]
    assert ds.description["name"] == "ml-1m-ratings"
    bad = tmp_path / "bad.dat"
    bad.write_text("1::x::3\n", encoding="ascii")
    with pytest.raises(DataError):
        load_dataset(f"ml-1m-ratings:{bad}")


def test_eval_and_train_times_align_with_the_sequences():
    ds = dataset(num_users=5)
    for split in ("valid", "test"):
        histories, _ = eval_examples(ds, split)  # type: ignore[arg-type]
        times = eval_times(ds, split)  # type: ignore[arg-type]
        assert [len(h) for h in histories] == [len(t) for t in times]
    assert [len(s) for s in train_sequences(ds)] == [len(t) for t in train_times(ds)]
    assert (ds.timestamps or ())[0][0] // 1000 == train_times(ds)[0][0]


def test_time_aware_evaluation_passes_windows_and_their_times():
    ds = dataset(num_users=8, num_items=10)
    lookup = {}
    for seq, ts in zip(ds.sequences, ds.timestamps or (), strict=True):
        lookup.update({int(t) // 1000: int(i) for i, t in zip(seq, ts, strict=True)})
    seen_rows = []

    def score(windows: np.ndarray, times: np.ndarray) -> np.ndarray:
        assert windows.shape == times.shape
        assert np.array_equal(windows == 0, times == 0)
        pairs = zip(windows.ravel(), times.ravel(), strict=True)
        assert all(lookup[int(t)] == int(i) for i, t in pairs if t)
        seen_rows.append(len(windows))
        return np.zeros((len(windows), ds.num_items + 1), dtype=np.float32)

    result = evaluate_scores_fn(score, ds, "test", max_len=6, with_time=True)  # type: ignore[arg-type]
    assert sum(seen_rows) == result["users"] == 8


def test_among_held_out_ranks_against_the_held_out_items_only():
    from benchmarks.eval_cold import among

    def score(windows: np.ndarray) -> np.ndarray:
        return np.tile(np.arange(6, dtype=np.float32)[::-1], (len(windows), 1))  # 5, 4, ..., 0

    restricted = among(score, np.array([3, 5]), num_items=5)
    out = restricted(np.zeros((2, 4), np.int64))
    assert np.isneginf(out[:, [0, 1, 2, 4]]).all()
    np.testing.assert_array_equal(out[:, [3, 5]], [[2, 0], [2, 0]])
    assert score(np.zeros((1, 4), np.int64))[0, 1] == 4  # the wrapped function's output is kept


def test_the_novelty_boost_is_the_best_cold_one_within_the_warm_cap():
    from benchmarks.eval_cold import choose_boost

    def row(boost: float, cold: float, warm_hr: float, warm_ndcg: float) -> dict[str, object]:
        return {
            "boost": boost,
            "cold_valid": {"hr@10": cold, "ndcg@10": cold},
            "warm_valid": {"hr@10": warm_hr, "ndcg@10": warm_ndcg},
        }

    tried = [
        row(0.0, 0.010, 0.300, 0.200),
        row(0.1, 0.020, 0.299, 0.199),
        row(0.2, 0.030, 0.298, 0.1975),  # warm NDCG -1.25 %: over a 1 % cap
        row(0.5, 0.040, 0.250, 0.150),
    ]
    assert choose_boost(tried, cap=0.01) == 0.1
    assert choose_boost(tried, cap=0.02) == 0.2
    assert choose_boost(tried, cap=0.5) == 0.5
    assert choose_boost([row(0.0, 0.02, 0.3, 0.2), row(0.3, 0.01, 0.3, 0.2)], cap=0.01) == 0.0


def test_versus_compares_two_models_case_by_case_on_each_split():
    from benchmarks.eval_cold import versus

    ds = dataset()

    hits = np.bincount(eval_examples(ds, "test")[1], minlength=ds.num_items + 1)

    def oracle(windows: np.ndarray) -> np.ndarray:  # knows how often each item is a test target
        return np.tile(hits.astype(np.float32), (len(windows), 1))

    def flat(windows: np.ndarray) -> np.ndarray:  # every item tied: pessimistically last
        return np.zeros((len(windows), ds.num_items + 1), np.float32)

    out = versus((oracle, 4), (flat, 4), {"valid": ds, "test": ds})
    assert set(out) == {"valid", "test"} and set(out["test"]) == {"hr@10", "ndcg@10"}
    for split, by_metric in out.items():
        a, b = (evaluate_scores_fn(fn, ds, split, 4) for fn in (oracle, flat))
        for metric, boot in by_metric.items():
            assert boot["diff"] == pytest.approx(a[metric] - b[metric])
            assert boot["lo95"] <= boot["diff"] <= boot["hi95"]
        assert by_metric["hr@10"]["cases"] == len(eval_examples(ds, split)[1])
    assert out["test"]["hr@10"]["lo95"] > 0  # the oracle surely beats ties ranked last
    same = versus((flat, 4), (flat, 4), {"test": ds})["test"]["hr@10"]
    assert same["diff"] == 0.0 and same["lo95"] == 0.0


def test_pool_joins_every_seed_s_cold_cases_of_the_named_model():
    from benchmarks.eval_cold import pool

    hit, miss = np.array([0, 1]), np.array([50, 60])  # ranks: in the top 10, far out
    seed0 = {"text": {"valid": (hit, miss), "test": (hit, hit)}, "other": {}}
    seed1 = {"text": {"valid": (miss, miss), "test": (np.array([0]), np.array([70]))}}
    out = pool([seed0, seed1, {}], "text")  # a run without the model adds nothing
    assert out["seeds"] == 2 and out["model"] == "text"
    valid, test = out["vs_text_knn"]["valid"]["hr@10"], out["vs_text_knn"]["test"]["hr@10"]
    assert valid["cases"] == 4 and valid["diff"] == pytest.approx(0.5)  # 2 of 4 cases gained
    assert test["cases"] == 3 and test["diff"] == pytest.approx(1 / 3)


def test_seed_summary_keeps_each_row_s_headline_and_the_boost():
    from benchmarks.eval_cold import seed_summary

    m = {"hr@10": 0.3, "ndcg@10": 0.2, "mrr": 0.1}
    result = {
        "held_out_items": 5,
        "cases": {"cold": {"test": 2}},
        "rows": [
            {"model": "text-kNN", "cold": {"test": m}, "warm": {"test": m}, "config": {}},
            {"model": "text", "cold": {"test": m}, "warm": {"test": m}, "boost_value": 0.1},
        ],
    }
    out = seed_summary(result, 3)
    assert out["seed"] == 3 and out["held_out_items"] == 5
    assert set(out["rows"][0]) == {"model", "cold", "warm"}  # no config
    assert out["rows"][0]["cold"]["test"] == {"hr@10": 0.3, "ndcg@10": 0.2}  # no mrr
    assert out["rows"][1]["boost_value"] == 0.1
