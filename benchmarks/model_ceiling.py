"""Bare model ceiling (issue 8): onnxruntime sequences/s of the full model and the step model.

The model is the issue's d=64, 2-block, L=50 SASRec over a 3,416-item catalogue (random weights:
the cost does not depend on them; `--time` for its time-aware variant, 28 buckets), or a given
bundle's. Time-aware graphs are fed click times (a minute to a day apart). Per point: batch 1,
64 and 256 on 1 and 2 intra-op threads; the full model re-encodes windows of 50 items, the step
model adds one item to a cache of `--past` positions (float16). Each point repeats one ONNX call for
`--seconds` and reports sequences/s (the mean over the run) and µs per call.

Also measured, for the top-k decision: numpy `argpartition` (stream.scoring.top_k, seen items
masked) after step.onnx, against the same masking (ScatterElements) and TopK inside the graph.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from benchmarks.meta import run_metadata, write_result
from stream.scoring import top_k

TOP_K = 10
Feeds = dict[str, np.ndarray]


def export_models(work: Path, bundle: Path | None, with_time: bool = False) -> dict[str, Any]:
    """model.onnx and step.onnx paths and sizes, from a bundle or a random issue-sized model."""
    if bundle is not None:
        from export.bundle import load_bundle

        b = load_bundle(bundle)
        if b.step is None or b.step_path is None:
            raise SystemExit(
                f"{bundle} has no step model (positions='slot', or exported before it could)"
            )
        return {
            "model": b.model_path,
            "step": b.step_path,
            "num_items": b.num_items,
            "max_len": b.max_len,
            "n_blocks": b.step.n_blocks,
            "d_model": b.step.d_model,
            "time": "time_seq" in b.manifest.inputs,
        }
    import torch

    from export.onnx_export import export_onnx
    from export.step_export import export_step
    from model.config import SASRecConfig
    from model.sasrec import SASRec

    torch.manual_seed(0)
    cfg = SASRecConfig(
        num_items=3416, max_len=50, d_model=64, n_blocks=2, n_heads=1,
        time_buckets=28 if with_time else 0,
    )  # fmt: skip
    model = SASRec(cfg).eval()
    return {
        "model": export_onnx(model, work / "model.onnx"),
        "step": export_step(model, work / "step.onnx"),
        "num_items": cfg.num_items,
        "max_len": cfg.max_len,
        "n_blocks": cfg.n_blocks,
        "d_model": cfg.d_model,
        "time": with_time,
    }


def session(path: Path | bytes, threads: int) -> ort.InferenceSession:
    """As stream.scoring.OnnxScorer opens it."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"])


def timed(call: Callable[[], object], batch: int, seconds: float) -> dict[str, float]:
    call()  # warm-up: first-run allocations
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        call()
        calls += 1
    return {"seqs_per_s": round(calls * batch / elapsed, 1), "us_per_call": 1e6 * elapsed / calls}


def click_times(batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """(batch, length) int64 epoch seconds, clicks a minute to a day apart."""
    gaps = rng.integers(60, 86_400, size=(batch, length))
    return (1_767_225_600 + np.cumsum(gaps, axis=1)).astype(np.int64)


def seq_feeds(m: dict[str, Any], batch: int, rng: np.random.Generator) -> Feeds:
    L = m["max_len"]
    feeds = {"item_seq": rng.integers(1, m["num_items"] + 1, size=(batch, L)).astype(np.int64)}
    if m.get("time"):  # benchmarks.catalogue builds m without the key
        feeds["time_seq"] = click_times(batch, L, rng)
    return feeds


def step_feeds(m: dict[str, Any], batch: int, past: int, rng: np.random.Generator) -> Feeds:
    kv_shape = (batch, m["n_blocks"], 2, max(1, past), m["d_model"])
    feeds = {
        "item": rng.integers(1, m["num_items"] + 1, size=batch).astype(np.int64),
        "position": np.full(batch, past, dtype=np.int64),
        "past_kv": rng.standard_normal(kv_shape).astype(np.float16),
    }
    if m.get("time"):  # benchmarks.catalogue builds m without the key
        times = click_times(batch, max(1, past) + 1, rng)  # (B, P + 1): the cache's, then new
        feeds["past_time"], feeds["time"] = times[:, :-1], times[:, -1]
    return feeds


def topk_model(step: Path, num_items: int) -> bytes:
    """step.onnx with the seen items masked (ScatterElements of -inf) and TopK in the graph:
    inputs item, position, past_kv, seen int64 [B, S] -> top_scores, top_items [B, k]."""
    width = num_items + 1
    nodes = [
        helper.make_node("Shape", ["seen"], ["seen_shape"]),
        helper.make_node("Expand", ["neg_inf", "seen_shape"], ["seen_fill"]),
        helper.make_node("ScatterElements", ["scores", "seen", "seen_fill"], ["masked"], axis=1),
        helper.make_node("TopK", ["masked", "k"], ["top_scores", "top_items"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mask_topk",
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("seen", TensorProto.INT64, ["batch", "seen_len"]),
        ],
        [
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["batch", TOP_K]),
            helper.make_tensor_value_info("top_items", TensorProto.INT64, ["batch", TOP_K]),
        ],
        initializer=[
            helper.make_tensor("neg_inf", TensorProto.FLOAT, [], [float("-inf")]),
            helper.make_tensor("k", TensorProto.INT64, [1], [TOP_K]),
        ],
    )
    base = onnx.load(str(step))
    tail = helper.make_model(graph, opset_imports=list(base.opset_import))
    tail.ir_version = base.ir_version
    merged = onnx.compose.merge_models(
        base, tail, io_map=[("scores", "scores")], outputs=["top_scores", "top_items"]
    )
    return bytes(merged.SerializeToString())


def measure(m: dict[str, Any], seconds: float, past: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    N = m["num_items"]
    out: dict[str, Any] = {"full": {}, "step": {}, "topk": {}}
    fused = topk_model(m["step"], N)
    for threads in (1, 2):
        full, step, step_topk = (session(p, threads) for p in (m["model"], m["step"], fused))
        for batch in (1, 64, 256):
            key = f"threads_{threads}_batch_{batch}"
            seq = seq_feeds(m, batch, rng)
            feeds = step_feeds(m, batch, past, rng)
            seen = rng.integers(1, N + 1, size=(batch, past + 1)).astype(np.int64)
            out["full"][key] = timed(partial(full.run, ["scores"], seq), batch, seconds)
            out["step"][key] = timed(partial(step.run, ["scores"], feeds), batch, seconds)
            out["topk"][key] = {
                "step_then_numpy_argpartition": timed(
                    partial(_step_numpy_topk, step, feeds, seen), batch, seconds
                ),
                "step_with_topk_in_graph": timed(
                    partial(step_topk.run, None, {**feeds, "seen": seen}), batch, seconds
                ),
            }
            print(key, out["full"][key], out["step"][key], out["topk"][key], flush=True)
    return out


def _step_numpy_topk(step: ort.InferenceSession, feeds: Feeds, seen: np.ndarray) -> None:
    (scores,) = step.run(["scores"], feeds)
    top_k(scores, seen, TOP_K)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="a bundle with step.onnx (default: random)")
    parser.add_argument("--seconds", type=float, default=2.0, help="per measured point")
    parser.add_argument("--past", type=int, default=25, help="cached positions for the step")
    parser.add_argument("--time", action="store_true", help="the time-aware random model")
    parser.add_argument("--short", action="store_true", help="0.2 s per point (harness check)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/model_ceiling.json"))
    args = parser.parse_args()
    seconds = 0.2 if args.short else args.seconds
    load_before = os.getloadavg()[0]  # other work on the box skews every number, 2 threads most
    with tempfile.TemporaryDirectory(prefix="streamrec-ceiling-") as tmp:
        models = export_models(Path(tmp), args.bundle, args.time)
        sizes = {k: v for k, v in models.items() if k not in ("model", "step")}
        results = measure(models, seconds, args.past)
    write_result(
        args.out,
        {
            **run_metadata(),
            "model": {**sizes, "past": args.past, "cache_dtype": "float16", "top_k": TOP_K},
            "seconds_per_point": seconds,
            "loadavg_1min": {"before": load_before, "after": os.getloadavg()[0]},
            **results,
        },
    )


if __name__ == "__main__":
    main()
