"""The generated Model quality block states the issue-4 target per metric, without rounding a
near miss into a pass."""

from __future__ import annotations

from typing import Any

from benchmarks.eval_report import _target_lines


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
