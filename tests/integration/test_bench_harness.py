"""The broker-backed benchmark modules run end to end with tiny settings and write every key
the report and the plot read (never a speed: that is `make bench`'s business)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import catalogue, latency, pipeline, report, scaling


def _run(module: object, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", [getattr(module, "__name__", "bench"), *argv])
    assert module.main() == 0  # type: ignore[attr-defined]


def _measure(
    module: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> dict:
    """Run a benchmark module with `argv` + `--out`, check its result's keys, return it."""
    name = f"{getattr(module, '__name__', 'bench').rsplit('.', 1)[-1]}.json"
    _run(module, monkeypatch, [*argv, "--out", str(tmp_path / name)])
    return _keys(tmp_path / name, name)


def _keys(path: Path, name: str) -> dict:
    result = json.loads(path.read_text())
    for key in report.EXPECTED[name]:
        report._get(result, key)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("per_level", [True, False], ids=["broker-per-level", "shared-broker"])
def test_latency_module_measures_each_level_and_its_legs(
    bundle_dir: Path,
    synthetic_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    per_level: bool,
) -> None:
    out, drain = tmp_path / "latency.json", tmp_path / "pipeline.json"
    drain.write_text(json.dumps({"end_to_end": {"events_per_s": 300.0}}))
    argv = ["--bundle", str(bundle_dir), "--source", str(synthetic_dir), "--max-rate", "300",
            "--fractions", "0.25,0.5", "--warmup-s", "1", "--measure-s", "2",
            "--pipeline-json", str(drain), "--out", str(out),
            "--broker-per-level" if per_level else "--no-broker-per-level"]  # fmt: skip
    _run(latency, monkeypatch, argv)
    result = _keys(out, "latency.json")
    assert result["broker_per_level"] is per_level
    # Every level has its own window of outputs, whether its stack is fresh or shared.
    assert [level["fraction_of_max"] for level in result["levels"]] == [0.25, 0.5]
    brokers = {level["broker_pid"] for level in result["levels"]}
    assert len(brokers) == (2 if per_level else 1)
    for level in result["levels"]:
        assert level["end_to_end_ms"]["n"] > 0
        # The legs of one record add up: event -> generated -> arrival.
        assert level["end_to_end_ms"]["p50"] >= level["event_to_generated_ms"]["p50"]
        assert level["batch_size"]["n"] > 0


@pytest.mark.slow
def test_scaling_module_measures_each_store_size(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--bundle", str(bundle_dir), "--sizes", "200,500", "--batches", "1",
            "--batch-size", "50", "--fill-chunk", "100"]  # fmt: skip
    result = _measure(scaling, tmp_path, monkeypatch, argv)
    assert [lv["users"] for lv in result["levels"]] == [200, 500]


@pytest.mark.slow
def test_catalogue_module_drains_the_whole_processor_on_a_headless_bundle(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 600 items: twice the bundle's, so the headless bundle holds items its graph never
    # embeds (windows of those items would fail in onnxruntime; make bench's 1M level did).
    argv = ["--bundle", str(bundle_dir), "--sizes", "600", "--queries", "30",
            "--session-len", "4", "--ef", "16", "--model-seconds", "0.05",
            "--serving-rounds", "1", "--end-to-end-from", "600", "--users", "40"]  # fmt: skip
    result = _measure(catalogue, tmp_path, monkeypatch, argv)
    level = result["levels"][0]
    # Every click of the steady workload (2 per user) went through broker, store and HNSW.
    assert level["end_to_end"]["events"] == 80
    assert level["end_to_end"]["events_per_s"] > 0
    assert "not run" not in "\n".join(report.catalogue(result))


@pytest.mark.slow
def test_pipeline_module_repeats_each_run_and_reports_its_median_and_ceiling_share(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["--bundle", str(bundle_dir), "--events", "600", "--users", "200", "--no-faust",
            "--workload", "steady", "--inference", "full", "--repeat", "2"]  # fmt: skip
    result = _measure(pipeline, tmp_path, monkeypatch, argv)
    run = result["runs"]["full_steady"]
    assert run["events"] >= 600
    rates = run["repeats_events_per_s"]
    assert len(rates) == 2 and run["events_per_s"] == min(rates)  # the lower middle of two
    assert len(run["repeats_ceiling_share"]) == 2
    assert run["ceiling_batch_64_before"] > 0 and run["ceiling_batch_64_after"] > 0
    table = "\n".join(report.pipeline(result))
    assert run["ceiling_share_median"] == pytest.approx(sum(run["repeats_ceiling_share"]) / 2)
    assert "median of 2" in table and f"{run['ceiling_share_median']:.0%}" in table


def test_faust_ratios_pair_each_repeat_with_its_own_faust_drain() -> None:
    runs = {
        "full_time": [{"events_per_s": 30.0}, {"events_per_s": 60.0}, {"events_per_s": 40.0}],
        "full_steady": [{"events_per_s": 3.0}] * 3,
    }
    fausts = [{"events_per_s": 3.0}, {"events_per_s": 3.0}, {"events_per_s": 8.0}]
    result = pipeline.faust_comparison(fausts, runs)
    assert result["events_per_s"] == 3.0  # the median Faust drain
    assert result["speedup_repeats"] == {"full_time": [10.0, 20.0, 5.0]}
    assert result["speedup"] == {"full_time": 10.0}  # the median ratio, not 40 / 3


def test_broker_cost_times_each_request_kind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import broker_cost

    out = tmp_path / "broker_cost.json"
    argv = ["--seconds", "0.3", "--batch-sizes", "1,5", "--tail-rate", "500", "--out", str(out),
            "--growth-seconds", "1.2", "--growth-every", "0.5", "--growth-rate", "200"]  # fmt: skip
    _run(broker_cost, monkeypatch, argv)
    result = json.loads(out.read_text())
    kinds = result["kinds"]
    assert [(r["tailers"], r["linger_ms"], r["fetch_wait_ms"]) for r in result["tailing"]] == [
        tuple(setting) for setting in broker_cost.TAILING
    ]
    assert all(r["records_per_s"] > 0 and r["broker_cores"] >= 0 for r in result["tailing"])
    assert set(kinds) == {"produce_1_flush", "produce_5_flush", "commit_sync", "fetch"}
    assert kinds["fetch"]["records_per_s"] > 0  # it reads back what the produce kinds wrote
    growth = result["growth"]
    for samples, reads in ((growth["samples"], True), (growth["produce_only"], False)):
        assert len(samples) == 2  # one per 0.5 s of the 1.2 s
        stored = [s["batches_stored"] for s in samples]
        assert stored == sorted(stored) and stored[0] > 0  # the log grows
        assert all((s["received"] > 0) is reads for s in samples)
        assert all((s["fetches_per_s"] > 0) is reads for s in samples)
    for row in kinds.values():
        assert row["per_s"] > 0 and row["broker_cores"] >= 0
        assert row["broker_ms_per_request"] == pytest.approx(
            1000 * row["broker_cores"] / row["per_s"]
        )
        assert row["steal"] >= 0
