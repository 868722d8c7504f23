"""One PNG of the benchmark results: throughput, latency vs load, catalogue scaling.

Reads the JSON the benchmark modules wrote (pipeline.json, latency.json, catalogue.json in
--results); a panel whose file is missing says so instead of failing, so the quick profile
can plot what it ran.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

P99_TARGET_MS = 25.0


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


def _missing(ax: Axes, title: str, name: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, f"{name} not found", ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def throughput(ax: Axes, pipeline: dict[str, Any] | None) -> None:
    """End-to-end events/s per engine and mode (pipeline.json runs; Faust when measured)."""
    title = "end to end, events/s"
    if pipeline is None:
        return _missing(ax, title, "pipeline.json")
    runs = pipeline.get("runs") or {"default": pipeline["end_to_end"]}
    bars = {name.replace("_", "\n"): run["events_per_s"] for name, run in runs.items()}
    faust = pipeline.get("faust") or {}
    if "events_per_s" in faust:
        bars["faust"] = faust["events_per_s"]
    ax.bar(list(bars), list(bars.values()), color="tab:blue")
    for x, v in enumerate(bars.values()):
        ax.annotate(f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=8)
    ax.axhline(20_000, color="tab:red", ls="--", lw=1, label="target 20k")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=7)


def latency(ax: Axes, result: dict[str, Any] | None) -> None:
    """p50 / p95 / p99 end-to-end latency against the processed rate."""
    title = "latency vs load (event ts → consumer)"
    if result is None:
        return _missing(ax, title, "latency.json")
    levels = [lv for lv in result["levels"] if lv["end_to_end_ms"].get("n")]
    rate = [lv["processed_events_per_s"] for lv in levels]
    for p, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^-")):
        ax.plot(rate, [lv["end_to_end_ms"][p] for lv in levels], style, label=p)
    ax.axhline(P99_TARGET_MS, color="tab:red", ls="--", lw=1, label="p99 target")
    ax.set_yscale("log")
    ax.set_xlabel("processed events/s")
    ax.set_ylabel("ms")
    ax.set_title(title)
    ax.legend(fontsize=8)


def catalogue(ax: Axes, result: dict[str, Any] | None) -> None:
    """Top-k µs per query vs items, exact and HNSW (recall@10 annotated)."""
    title = "top-k cost vs catalogue size"
    if result is None:
        return _missing(ax, title, "catalogue.json")
    levels = result["levels"]
    items = [lv["items"] for lv in levels]
    ax.plot(items, [lv["exact_us_per_query"] for lv in levels], "o-", label="exact")
    efs = [a["ef_search"] for a in levels[0]["ann"]]
    for i, ef in enumerate(efs):
        us = [lv["ann"][i]["us_per_query"] for lv in levels]
        ax.plot(items, us, "s--", label=f"HNSW ef={ef}")
        for x, y, lv in zip(items, us, levels, strict=True):
            ax.annotate(f"{lv['ann'][i]['recall_at_10']:.3f}", (x, y), fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("items (annotations: recall@10)")
    ax.set_ylabel("µs per query")
    ax.set_title(title)
    ax.legend(fontsize=7)


def plot(results: Path, out: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    throughput(axes[0], _load(results, "pipeline.json"))
    latency(axes[1], _load(results, "latency.json"))
    catalogue(axes[2], _load(results, "catalogue.json"))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench.png"))
    args = parser.parse_args()
    print(plot(args.results, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
