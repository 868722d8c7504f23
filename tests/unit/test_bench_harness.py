"""The benchmark harness's own logic (never its speed): catalogue growth and recall, the
latency legs, the report's markers and key check, the plot. `make bench-quick` runs it all
end to end on a broker."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import catalogue, report
from benchmarks.latency import summarise
from benchmarks.plot import plot

pytest.importorskip("faiss")


def test_grown_catalogue_keeps_the_trained_items_and_their_scale() -> None:
    rng = np.random.default_rng(0)
    base = np.vstack([rng.normal(c, 0.2, size=(50, 8)) for c in (-2.0, 0.0, 3.0)])
    base = base.astype(np.float32)
    grown = catalogue.grow(base, 2000, clusters=3)
    assert grown.shape == (2000, 8)
    np.testing.assert_array_equal(grown[:150], base)
    new = grown[150:]
    # New items stay in the trained clusters: each near one of the three centres.
    nearest = np.min(np.abs(new.mean(axis=1)[:, None] - np.array([-2.0, 0.0, 3.0])), axis=1)
    assert np.quantile(nearest, 0.99) < 0.5
    assert 0.5 < new.std() / base.std() < 2.0


def test_recall_at_k_counts_real_items_only() -> None:
    truth = np.array([[1, 2, 3], [4, 5, 0]])
    assert catalogue.recall_at_k(np.array([[3, 2, 9], [5, 4, 0]]), truth) == pytest.approx(
        (2 / 3 + 1.0) / 2
    )


def test_catalogue_module_writes_every_key_the_report_reads(trained, tmp_path, monkeypatch):
    _, _, bundle = trained
    out = tmp_path / "catalogue.json"
    argv = ["catalogue", "--bundle", str(bundle), "--sizes", "base,300", "--queries", "30",
            "--session-len", "4", "--ef", "16,32", "--model-seconds", "0.05",
            "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert catalogue.main() == 0
    result = json.loads(out.read_text())
    for key in report.EXPECTED["catalogue.json"]:
        report._get(result, key)
    assert [lv["items"] for lv in result["levels"]] == [15, 300]
    assert all(0.0 <= a["recall_at_10"] <= 1.0 for lv in result["levels"] for a in lv["ann"])
    serving = result["levels"][1]["serving"]  # headless bundle through IncrementalScorer
    assert serving["ann"]["step_rows"] == serving["exact"]["step_rows"] == 3 * 30
    assert all(serving[m]["events_per_s"] > 0 for m in ("ann", "exact"))


def test_latency_legs_are_taken_from_the_measured_window_only() -> None:
    # rows: arrival, event_ts, generated_ts; two inside the window [1000, 2000), one before.
    rows = np.array([[1030.0, 1000, 1010], [1540.0, 1500, 1520], [600.0, 500, 550]])
    probe = SimpleNamespace(
        waits=[np.array([[1005.0, 5.0], [1504.0, 4.0], [505.0, 99.0]])],
        # poll ms, size, decode / state / score / produce / commit ms, poll to end of batch
        batches=[
            (1005.0, 10, 1.0, 1.0, 1.0, 2.0, 1.0, 6.0),
            (505.0, 10, 1.0, 1.0, 1.0, 2.0, 1.0, 6.0),
        ],
    )
    level: dict = {"window_ms": (1000.0, 2000.0)}
    summarise(level, rows, probe)  # type: ignore[arg-type]
    assert level["end_to_end_ms"]["n"] == 2
    assert level["end_to_end_ms"]["max"] == 40.0
    assert level["produce_to_poll_ms"]["max"] == 5.0
    assert level["generated_to_arrival_ms"]["p50"] == pytest.approx(20.0)
    assert level["batch_size"]["n"] == 1
    assert level["batch_produce_ms"]["mean"] == 2.0
    assert level["processor_busy_fraction"] == pytest.approx(0.006)


def test_report_rewrites_only_its_block_and_check_names_what_is_missing(tmp_path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    meta = {"command": "python -m x", "machine": "m", "date": "d", "commit": "c"}
    (results / "scaling.json").write_text(json.dumps({**meta, "levels": [
        {"users": 10, "total_us_per_event_mean": 5.0, "implied_events_per_s": 2e5,
         "vm_rss_mb": 100.0}]}))  # fmt: skip
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# b\n\nhand-written\n")
    report.replace_block(md, report.render(results, None))
    report.replace_block(md, report.render(results, None))  # idempotent
    text = md.read_text()
    assert text.count(report.BEGIN) == 1 and "hand-written" in text
    assert "| 10 | 5 | 200,000 | 100 |" in text
    problems = report.check(results)
    assert "pipeline.json: missing" in problems
    assert not any(p.startswith("scaling.json") for p in problems)


def test_plot_draws_what_exists_and_says_what_does_not(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "pipeline.json").write_text(json.dumps({"end_to_end": {"events_per_s": 1000.0},
        "runs": {"full_time": {"events_per_s": 900.0}}}))  # fmt: skip
    out = plot(results, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_table_shows_the_cpu_split_and_a_dash_for_older_results() -> None:
    cores = {"processor": 0.93, "producer": 0.41, "broker": 0.38, "listener": 0.05, "other": 0.1}
    assert report._cores(cores) == "0.93 / 0.41 / 0.38 / 0.05 / 0.10"
    assert report._cores(None) == "–"


def test_latency_table_says_whether_levels_shared_a_broker() -> None:
    level = {"fraction_of_max": 0.5, "processed_events_per_s": 10.0, "batch_size": {"mean": 3},
             "end_to_end_ms": {"p50": 1, "p95": 2, "p99": 3, "max": 4},
             "processor_busy_fraction": 0.5, "produce_to_poll_ms": {}, "event_to_generated_ms": {},
             "generated_to_arrival_ms": {}}  # fmt: skip
    result = {"max_rate_events_per_s": 20.0, "max_rate_source": "measure", "levels": [level]}
    assert "fresh broker" in report.latency({**result, "broker_per_level": True})[-1]
    assert "one broker" in report.latency(result)[-1]  # older results: no key


def test_model_ceiling_measures_the_time_aware_pair_with_click_times(tmp_path) -> None:
    """`model_ceiling --time`: the random time-aware model's full and step graphs are fed click
    times at every point (a graph missing an input would raise), and the report titles it."""
    from benchmarks import model_ceiling

    models = model_ceiling.export_models(tmp_path, None, with_time=True)
    assert models["time"]
    feeds = model_ceiling.step_feeds(models, 3, 5, np.random.default_rng(0))
    assert feeds["past_time"].shape == (3, 5) and (feeds["time"] > feeds["past_time"][:, -1]).all()
    out = model_ceiling.measure(models, 0.01, 5)
    for part in ("full", "step"):
        assert set(out[part]) == {f"threads_{t}_batch_{b}" for t in (1, 2) for b in (1, 64, 256)}
        assert all(point["seqs_per_s"] > 0 for point in out[part].values())
    lines = report.model_ceiling({**out, "model": {"time": True}})
    assert lines[0] == "### Bare model ceiling, time-aware model"
