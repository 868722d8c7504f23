"""Cost per event as the catalogue grows (issue 8): ~3.4k → 100k → 1M items, exact vs ANN.

Item vectors: a trained bundle's item_vectors.npy (by default the benchmarks' synthetic bundle,
2,000 items; `--bundle .eval/bundles/ml-1m` for ML-1M's 3,416), grown to each size with new
items drawn from a Gaussian mixture fitted to the trained ones (`grow`: k-means clusters, each
with its members' mean and empirical covariance, weighted by size), so the grown catalogue
keeps the trained space's clusters, anisotropy and norms instead of isotropic noise.

Queries: the bundle's own model.onnx `hidden` state over sessions sampled from the model (each
next item drawn from its softmax over unseen items, from a uniformly random first item; lengths
uniform in 1..--session-len), so queries sit where real users' hidden states do; `seen` is
each session's items. Per size: exact top-10 (stream.ann.exact_top_k, chunked hidden @ V.T) is
the truth; the HNSW index (stream.ann.AnnIndex) is built (time, RSS growth) and searched at
several ef_search values (µs/query on 1 thread, recall@10 against exact, rows searched again
or scored exactly because seen items filled their candidates).

Scoring-stage events/s per size = 1e6 / (model µs per row + top-k µs per row): each event a
different user, as with uniform users; the model part is model.onnx / step.onnx reduced to
their hidden output (their in-graph score heads grow with the catalogue; see BENCHMARKS.md).

Serving stage per size (`serving`, skipped with --no-serving): the serving code itself on a
headless bundle — the small model's graphs without their score head, items.csv and
item_vectors.npy holding the grown catalogue (sessions click the trained items only: the
graphs embed those) — `IncrementalScorer.score_sessions` (step.onnx, K/V cache, 256 rows per
call) then `rank_batch` through `VectorRanker` (HNSW and exact), one click per user per
round after a prefill round; events/s = clicks / (score + rank seconds). HNSW indexes are
cached in ~/.cache/streamrec/ann by the vectors' digest (a 1M build takes minutes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.meta import run_metadata, write_result
from benchmarks.model_ceiling import session, step_feeds, timed
from benchmarks.pipeline import end_to_end, ensure_bundle
from benchmarks.scaling import vm_rss_mb
from export.bundle import ITEM_VECTORS, Bundle, load_bundle, write_bundle
from stream.ann import AnnIndex, AnnParams, VectorRanker, exact_top_k
from stream.config import ProcessorSettings
from stream.incremental import IncrementalScorer, rank_batch
from stream.scoring import session_inputs
from stream.state import Session

K = 10
ANN_THREADS: int = ProcessorSettings.model_fields["ann_threads"].default
INDEX_CACHE = Path.home() / ".cache" / "streamrec" / "ann"


def kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """Cluster label of each row (Lloyd's, squared Euclidean)."""
    centres = x[rng.choice(len(x), k, replace=False)].copy()
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(iters):
        d = (x**2).sum(1)[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None]  # (N, k)
        labels = d.argmin(1)
        for j in range(k):
            members = x[labels == j]
            if len(members):
                centres[j] = members.mean(0)
    return labels


def grow(base: np.ndarray, n: int, seed: int = 0, clusters: int = 64) -> np.ndarray:
    """base (N0, D) -> (n, D): base, then n - N0 items from a Gaussian mixture fitted to it."""
    rng = np.random.default_rng(seed)
    labels = kmeans(base, min(clusters, len(base)), rng)
    out = np.empty((max(n, len(base)), base.shape[1]), dtype=np.float32)
    out[: len(base)] = base
    # A new item's component is a random trained item's cluster: weights = cluster sizes.
    component = labels[rng.integers(0, len(base), len(out) - len(base))]
    for j in np.unique(labels):
        members = base[labels == j]
        # z @ dev ~ N(0, members' empirical covariance), without forming or factoring it.
        dev = (members - members.mean(0)) / np.sqrt(max(len(members) - 1, 1))  # (m, D)
        rows = np.flatnonzero(component == j)
        z = rng.standard_normal((len(rows), len(members))).astype(np.float32)  # (r, m)
        out[len(base) + rows] = members.mean(0) + z @ dev
    return out


def hidden_only(path: Path, keep: tuple[str, ...]) -> bytes:
    """The graph with outputs `keep` only; onnxruntime then drops the score head."""
    model = onnx.load(str(path))
    outputs = [o for o in model.graph.output if o.name in keep]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    return bytes(model.SerializeToString())


def sample_sessions(
    model: ort.InferenceSession, b: Bundle, n: int, max_steps: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """n sessions sampled from the model -> (hidden (n, D) after each session, seen (n, T))."""
    L, N = b.max_len, b.num_items
    seen = np.zeros((n, max_steps), dtype=np.int64)
    seen[:, -1] = rng.integers(1, N + 1, n)
    lengths = rng.integers(1, max_steps + 1, n)
    for t in range(1, max_steps):  # sessions grow on the right; row r stops at lengths[r]
        (scores,) = model.run(["scores"], {"item_seq": _window(seen[:, max_steps - t :], L)})
        np.put_along_axis(scores, seen, -np.inf, axis=1)
        scores[:, 0] = -np.inf
        nxt = np.argmax(scores + rng.gumbel(size=scores.shape), axis=1)  # softmax sample
        grow_rows = lengths > t
        seen[grow_rows, :-1] = seen[grow_rows, 1:]
        seen[grow_rows, -1] = nxt[grow_rows]
    (hidden,) = model.run(["hidden"], {"item_seq": _window(seen, L)})
    return hidden.astype(np.float32), seen


def _window(seen: np.ndarray, max_len: int) -> np.ndarray:
    """Left-padded (B, max_len) model input from right-aligned, left-padded sessions."""
    out = np.zeros((len(seen), max_len), dtype=np.int64)
    tail = seen[:, -max_len:]
    out[:, max_len - tail.shape[1] :] = tail
    return out


def model_cost(b: Bundle, batch: int, seconds: float) -> dict[str, float]:
    """µs per row of the model reduced to its hidden output, batch rows per call, 1 thread."""
    rng = np.random.default_rng(0)
    full = session(hidden_only(b.model_path, ("hidden",)), 1)
    seq = {"item_seq": rng.integers(1, b.num_items + 1, (batch, b.max_len)).astype(np.int64)}
    out = {
        "full_us_per_row": 1e6 / timed(lambda: full.run(None, seq), batch, seconds)["seqs_per_s"]
    }
    if b.step is not None and b.step_path is not None:
        step = session(hidden_only(b.step_path, ("hidden", "new_kv")), 1)
        sizes = {"num_items": b.num_items, "n_blocks": b.step.n_blocks, "d_model": b.step.d_model}
        feeds = step_feeds(sizes, batch, b.max_len // 2, rng)
        rate = timed(lambda: step.run(None, feeds), batch, seconds)["seqs_per_s"]
        out["step_us_per_row"] = 1e6 / rate
    return out


def per_query(call: Any, n: int) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, 1e6 * (time.perf_counter() - start) / n


def recall_at_k(got: np.ndarray, truth: np.ndarray) -> float:
    hits = [
        len(set(g[g > 0]) & set(t[t > 0])) / max((t > 0).sum(), 1)
        for g, t in zip(got, truth, strict=True)
    ]
    return float(np.mean(hits))


def measure_size(
    vectors: np.ndarray, hidden: np.ndarray, seen: np.ndarray, params: AnnParams, efs: list[int]
) -> dict[str, Any]:
    """Exact vs HNSW at one catalogue size; vectors (N + 1, D) with row 0 padding."""
    (truth, _), exact_us = per_query(lambda: exact_top_k(hidden, vectors, seen, K), len(hidden))
    rss0, start = vm_rss_mb(), time.perf_counter()
    ann = AnnIndex.load_or_build(vectors, INDEX_CACHE, params)  # build time 0 when cached
    level: dict[str, Any] = {
        "items": len(vectors) - 1,
        "exact_us_per_query": exact_us,
        "ann_build_s": time.perf_counter() - start,
        "ann_index_cached": ann.loaded_from is not None,  # read, not built: no build time
        "ann_rss_growth_mb": vm_rss_mb() - rss0,
        "ann": [],
    }
    for ef in efs:
        ann.params = AnnParams(**{**params.__dict__, "ef_search": ef})
        ann.top_k(hidden[:50], seen[:50], K)  # warm-up
        ann.stats.researched = ann.stats.exact = 0
        (best, _), us = per_query(lambda: ann.top_k(hidden, seen, K), len(hidden))
        level["ann"].append(
            {
                "ef_search": ef,
                "us_per_query": us,
                "recall_at_10": recall_at_k(best, truth),
                "rows_searched_again": ann.stats.researched,
                "rows_scored_exactly": ann.stats.exact,
            }
        )
        print(len(vectors) - 1, level["ann"][-1], flush=True)
    return level


def headless_bundle(b: Bundle, vectors: np.ndarray, out: Path) -> Bundle:
    """b's graphs without their score head, serving the catalogue `vectors` (n + 1, D)."""
    from export.graphs import drop_outputs  # torch: the benchmark environment has it

    work = out.parent / f"{out.name}-files"
    work.mkdir(parents=True)
    files = {}
    for name in ("model.onnx", b.step.prefill, b.step.step) if b.step else ():
        files[name] = drop_outputs(Path(shutil.copy(b.path / name, work / name)), ["scores"])
    np.save(work / ITEM_VECTORS, vectors, allow_pickle=False)
    ids = [*b.item_ids[1:], *(f"grown-{i}" for i in range(len(vectors) - 1 - b.num_items))]
    write_bundle(
        out, model_file=files.pop("model.onnx"), items=[(i, "") for i in ids],
        model_name="sasrec", model_version=f"{b.model_version}-headless-{len(ids)}",
        max_len=b.max_len, config={"score_head": False},
        extra_files={**files, ITEM_VECTORS: work / ITEM_VECTORS}, step=b.step,
    )  # fmt: skip
    return load_bundle(out)


def serving_stage(
    b: Bundle, vectors: np.ndarray, seen: np.ndarray, params: AnnParams, rounds: int, work: Path
) -> dict[str, Any]:
    """events/s of score_sessions + rank_batch on a headless bundle, HNSW and exact top-k."""
    if b.step is None:
        return {}
    hb = headless_bundle(b, vectors, work / f"headless-{len(vectors) - 1}")
    rng = np.random.default_rng(1)
    out: dict[str, Any] = {}
    for mode in ("ann", "exact"):
        scorer = IncrementalScorer(hb, 1, max_rows=256)
        scorer.ranker = VectorRanker.for_bundle(hb_vectors(hb), mode, INDEX_CACHE, params)
        view, users = scorer.items.view, [f"u{r}" for r in range(len(seen))]
        sessions = [Session() for _ in users]
        for s, row in zip(sessions, seen.tolist(), strict=True):
            for t, i in enumerate(j for j in row if j):
                s.append(hb.item_ids[i], ts=t, partition=0, offset=t, max_len=b.max_len)
        score_s = rank_s = 0.0
        for n in range(rounds + 1):  # round 0 prefills every user's cache: not timed
            clicks = rng.integers(1, b.num_items + 1, len(users))
            for s, i in zip(sessions, clicks.tolist(), strict=True):
                s.append(hb.item_ids[i], ts=99, partition=0, offset=len(s.offsets) + 1000,
                         max_len=b.max_len)  # fmt: skip
            t0 = time.perf_counter()
            inputs = session_inputs(sessions, view, b.max_len, b.step.stride)
            scored = scorer.score_sessions(users, sessions, inputs, view)
            t1 = time.perf_counter()
            rank_batch(scorer, scored, inputs.seen, view, K)
            t2 = time.perf_counter()
            if n:
                score_s, rank_s = score_s + t1 - t0, rank_s + t2 - t1
        events = rounds * len(users)
        out[mode] = {
            "events_per_s": events / (score_s + rank_s),
            "score_us_per_event": 1e6 * score_s / events,
            "rank_us_per_event": 1e6 * rank_s / events,
            "step_rows": scorer.rows["step"],
            "prefill_rows": scorer.rows["prefill"],
        }
        print(len(vectors) - 1, "serving", mode, out[mode], flush=True)
    return out


def end_to_end_stage(b: Bundle, headless: Path, users: int) -> dict[str, float]:
    """The whole processor (embedded broker, RocksDB, decode, state, produce, commit) on the
    headless bundle at its default settings (topk auto = HNSW): drain rate of the steady
    workload (users with warm sessions, one click per user per batch) over b's own items,
    the ones the graphs embed; the HNSW index comes from INDEX_CACHE (serving_stage built it)."""
    if not headless.is_dir():
        return {}
    out = end_to_end(
        headless, 2 * users, inference="incremental", workload="steady", users=users,
        click_bundle=b.path, ann_cache=INDEX_CACHE,
    )  # fmt: skip
    print(headless.name, "end to end", out, flush=True)
    return out


def hb_vectors(hb: Bundle) -> np.ndarray:
    assert hb.item_vectors_path is not None
    vectors: np.ndarray = np.load(hb.item_vectors_path)
    return vectors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/catalogue.json"))
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--train-seconds", type=float, default=20.0)
    parser.add_argument("--sizes", default="base,100000,1000000", help="'base' = the bundle's")
    parser.add_argument("--queries", type=int, default=1000, help="sessions (one query each)")
    parser.add_argument("--session-len", type=int, default=20)
    parser.add_argument("--ef", default="64,128,256,512", help="ef_search values to measure")
    parser.add_argument("--m", type=int, default=AnnParams.m)
    parser.add_argument("--ef-construction", type=int, default=AnnParams.ef_construction)
    parser.add_argument(
        "--search-threads", type=int, default=ANN_THREADS, help="HNSW search threads per batch"
    )
    parser.add_argument("--model-seconds", type=float, default=2.0)
    parser.add_argument("--serving-rounds", type=int, default=3, help="clicks per user timed")
    parser.add_argument("--no-serving", action="store_true", help="skip the serving stage")
    parser.add_argument(
        "--end-to-end-from", type=int, default=1_000_000,
        help="drain the whole processor on the headless bundle at sizes from this one up",
    )  # fmt: skip
    parser.add_argument("--users", type=int, default=12_000, help="users of the end-to-end run")
    args = parser.parse_args()
    params = AnnParams(m=args.m, ef_construction=args.ef_construction, threads=args.search_threads)
    efs = [int(e) for e in args.ef.split(",")]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        b = load_bundle(ensure_bundle(work, args.bundle, args.train_seconds))
        if b.item_vectors_path is None:
            raise SystemExit(f"{b.path} has no item_vectors.npy: re-export it")
        base = np.load(b.item_vectors_path)  # (N0 + 1, D)
        rng = np.random.default_rng(0)
        full = session(b.model_path, 1)
        hidden, seen = sample_sessions(full, b, args.queries, args.session_len, rng)
        model = model_cost(b, min(args.queries, 256), args.model_seconds)
        levels = []
        for size in args.sizes.split(","):
            n = b.num_items if size == "base" else int(size)
            grown = grow(base[1:], n)
            vectors = np.vstack([np.zeros((1, base.shape[1]), np.float32), grown])  # (n + 1, D)
            level = measure_size(vectors, hidden, seen, params, efs)
            if not args.no_serving:
                level["serving"] = serving_stage(
                    b, vectors, seen, params, args.serving_rounds, work
                )
            if n >= args.end_to_end_from and b.step is not None:
                level["end_to_end"] = end_to_end_stage(b, work / f"headless-{n}", args.users)
            levels.append(_events(level, model))
    result = {
        **run_metadata(),
        "bundle": {
            "path": str(args.bundle or "synthetic (trained here)"),
            "items": b.num_items,
            "max_len": b.max_len,
            "d_model": int(base.shape[1]),
        },
        "growth": "Gaussian mixture fitted to the bundle's item vectors (64 k-means clusters)",
        "queries": args.queries,
        "session_len_max": args.session_len,
        "ann_params": params.__dict__,
        "model_us_per_row": model,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "levels": levels,
    }
    write_result(args.out, result)
    return 0


def _events(level: dict[str, Any], model: dict[str, float]) -> dict[str, Any]:
    for path, us in model.items():
        name = path.removesuffix("_us_per_row")
        level[f"events_per_s_{name}_exact"] = 1e6 / (us + level["exact_us_per_query"])
        level[f"events_per_s_{name}_ann"] = {
            a["ef_search"]: 1e6 / (us + a["us_per_query"]) for a in level["ann"]
        }
    return level


if __name__ == "__main__":
    raise SystemExit(main())
