"""The generated Model quality block states the issue-4 target per metric, without rounding a
near miss into a pass; the time block reports every seed's pair and needs all of them to agree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.eval_report import (
    _seed_lines,
    _target_lines,
    cold_verdict,
    render_time,
    time_verdict,
)


def _report(hr: float, ndcg: float, seconds: float = 1610.0) -> dict[str, Any]:
    row = {"test": {"hr@10": hr, "ndcg@10": ndcg}, "train_seconds": seconds}
    return {"datasets": {"ml-1m": {"rows": [row]}}}


def test_near_miss_is_printed_as_a_miss_with_its_gap() -> None:
    line = _target_lines(_report(hr=0.33013, ndcg=0.19498))[0]
    assert "not met" in line
    assert "NDCG@10 0.19498 (-0.00002, missed)" in line
    assert "HR@10 0.33013 (+0.00013, met)" in line


def test_all_three_conditions_make_it_met() -> None:
    assert "): met:" in _target_lines(_report(hr=0.331, ndcg=0.196))[0]
    assert "not met" in _target_lines(_report(hr=0.331, ndcg=0.196, seconds=1900.0))[0]


def test_missing_ml1m_says_so() -> None:
    assert _target_lines({"datasets": {}}) == ["Targets: ML-1M was not run."]


# -- the time section: one pair of runs per seed, and a verdict that needs every seed ----------


def _seed(seed: int, valid: float, test: float) -> dict[str, Any]:
    def b(diff: float) -> dict[str, float]:
        return {"diff": diff, "lo95": diff - 0.01, "hi95": diff + 0.01}

    pair = {m: b(test) for m in ("hr@10", "ndcg@10", "mrr")}
    return {
        "seed": seed,
        "time_minus_plain": {"valid": {**pair, "ndcg@10": b(valid)}, "test": pair},
    }


def test_time_helps_only_when_every_seed_and_split_agree() -> None:
    assert time_verdict([_seed(42, 0.002, 0.004), _seed(43, 0.001, 0.003)]).startswith("time helps")
    assert time_verdict([_seed(42, -0.002, -0.004)]).startswith("time does not help")
    mixed = [_seed(42, 0.002, 0.004), _seed(43, -0.001, 0.003)]
    assert time_verdict(mixed).startswith("no clear difference")
    # Intervals are diff +- 0.01 here: only a difference of 0.02 excludes 0.
    assert "(1 of 2 intervals exclude 0; 1 seed(s))" in time_verdict([_seed(42, 0.02, 0.004)])


def test_time_block_lists_each_seed_with_its_interval_and_the_mean() -> None:
    metrics = {"hr@10": 0.25, "ndcg@10": 0.14, "mrr": 0.12}
    rows = [{"model": "popularity", "valid": metrics, "test": metrics}] + [
        {"model": m, "seed": s, "valid": metrics, "test": metrics, "train_seconds": 100.0}
        for s in (42, 43)
        for m in ("SASRec (no time)", "SASRec + time")
    ]
    seeds = [_seed(42, 0.002, 0.004), _seed(43, -0.001, 0.003)]
    mean = {"hr@10": 0.0035, "ndcg@10": 0.0035, "mrr": 0.0035}
    report = {
        "result": {
            "description": {"num_users": 2999, "num_items": 3615, "num_interactions": 487650},
            "rows": rows,
            "seeds": seeds,
            "time_minus_plain_valid": {**mean, "ndcg@10": 0.0005},
            "time_minus_plain_test": mean,
        },
        "command": "make eval",
        "total_seconds": 60.0,
        "machine": "test",
        "cpu": {"cpu": "x", "torch": "2", "load_average": [0.0]},
        "date": "2026-11-24",
        "commit": "abc",
        "dirty": False,
    }
    text = render_time(report, Path("eval_time.json"), None)
    assert "| SASRec + time | 43 | 0.2500 |" in text
    assert "| 42 | +0.0040 [-0.0060, +0.0140] | +0.0020 [-0.0080, +0.0120] |" in text
    assert "| mean | +0.0035 | +0.0005 | +0.0035 |" in text
    assert "no clear difference" in text
    assert "ONNX bundle" not in text  # a run without the check says nothing of it
    report["result"]["onnx"] = {  # type: ignore[index]
        "seed": 42,
        "model_version": "sasrec-x",
        "max_abs_metric_diff": {"test": 2e-9, "valid": 0.0},
        "score_parity_max_abs_diff": 4e-6,
    }
    text = render_time(report, Path("eval_time.json"), None)
    assert "(seed 42, `sasrec-x`)" in text and "2.0e-09 on test, 0.0e+00 on valid" in text


def _boot(diff: float, half: float = 0.01, cases: float = 650.0) -> dict[str, float]:
    return {"diff": diff, "lo95": diff - half, "hi95": diff + half, "p_a_ahead": 0.5,
            "cases": cases}  # fmt: skip


def _pooled(valid: float, test: float) -> dict[str, dict[str, dict[str, float]]]:
    return {s: {m: _boot(d) for m in ("hr@10", "ndcg@10")} for s, d in (("valid", valid),
            ("test", test))}  # fmt: skip


def test_cold_verdict_needs_every_pooled_interval_on_one_side() -> None:
    assert cold_verdict(_pooled(0.02, 0.03)).startswith("above")
    assert cold_verdict(_pooled(-0.02, -0.03)).startswith("behind")
    assert "(2 of 4 above 0, 0 below 0)" in cold_verdict(_pooled(0.005, 0.03))
    assert cold_verdict(_pooled(0.005, 0.03)).startswith("not shown above")


def test_cold_seed_block_lists_each_seed_and_the_pooled_verdict() -> None:
    def rows(text_ndcg: float) -> list[dict[str, Any]]:
        m = {"hr@10": 0.05, "ndcg@10": 0.025}
        return [
            {"model": "text-kNN (session)", "cold": {"test": m}, "warm": {"test": m}},
            {"model": "SASRec (ID only)", "cold": {"test": m}, "warm": {"test": m}},
            {
                "model": "head",
                "boost_value": 0.1,
                "warm": {"test": m},
                "cold": {"test": {"hr@10": 0.06, "ndcg@10": text_ndcg}},
            },
        ]

    seeds = {
        "per_seed": [
            {"seed": s, "cases": {"cold": {"test": 640 + s}}, "rows": rows(0.03 + s / 100)}
            for s in (0, 1)
        ],
        "pooled": {"model": "head", "seeds": 2, "vs_text_knn": _pooled(0.02, 0.03)},
    }
    text = "\n".join(_seed_lines(seeds))
    assert "**2 split seeds**" in text
    assert "| 1 | 641 | 0.1 | 0.0600 / 0.0400 | 0.0500 / 0.0250 | 0.0250 / 0.0250 |" in text
    assert "valid HR@10 +0.0200 [+0.0100, +0.0300], ahead in 50% (650 cases)" in text
    assert "Verdict, above text-kNN on cold items: above" in text
    assert _seed_lines(None) == []  # a single-seed run prints no seed block
