"""Where the scoring path's time goes, per event, without Kafka (issue 8: "write down where
the time goes").

Steady state of the incremental path: `users` distinct users with 30-80 clicks of history
each, their caches warm, then rounds of one new click per user, each round one batch through
the processor's own functions (session_inputs, IncrementalScorer.score_sessions with its
lookup/gather/step/scatter/prefill/put timings, top_k, the explain hook, ranked_items +
encode_recommendation). The same windows through model.onnx give the full re-encode's cost.
Reported as the minimum over rounds (the box is shared), µs per event.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from export.bundle import load_bundle
from stream.codec import encode_recommendation
from stream.explain import SimilarityExplainer
from stream.incremental import IncrementalScorer
from stream.scoring import OnnxScorer, full_scores, ranked_items, session_inputs, top_k
from stream.state import Session


def score_stages(bundle_dir: Path, users: int = 2000, rounds: int = 5) -> dict[str, float]:
    bundle = load_bundle(bundle_dir)
    scorer, full = IncrementalScorer(bundle, 1), OnnxScorer(bundle, 1)
    view, L, N = scorer.items.view, bundle.max_len, bundle.num_items
    explain = SimilarityExplainer()
    rng = random.Random(0)
    names = [f"user-{u}" for u in range(users)]
    sessions = [Session() for _ in names]
    offset = 0

    def click(s: Session) -> None:
        nonlocal offset
        s.append(bundle.item_ids[rng.randint(1, N)], 0, 0, offset, L)
        offset += 1

    for s in sessions:
        for _ in range(rng.randint(30, 80)):
            click(s)
    inputs = session_inputs(sessions, view, L, scorer.stride)
    scorer.score_sessions(names, sessions, inputs, view)  # caches warm
    scorer.rows.clear()
    spent: defaultdict[str, list[float]] = defaultdict(list)

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        spent[name].append(time.perf_counter() - t0)

    for _ in range(rounds):
        for s in sessions:
            click(s)
        scorer.timings.clear()
        with stage("inputs"):
            inputs = session_inputs(sessions, view, L, scorer.stride)
        with stage("model"):
            scored = scorer.score_sessions(names, sessions, inputs, view)
        for name, seconds in scorer.timings.items():
            spent[f"model.{name}"].append(seconds)
        with stage("top_k"):
            best, best_scores = top_k(scored.scores, inputs.seen, 10)
        with stage("explain"):
            because = explain(best, inputs.item_seq, view.vectors)
        with stage("encode"):
            ids, scores, why = best.tolist(), best_scores.tolist(), because.tolist()
            for row, user in enumerate(names):
                items = ranked_items(ids[row], scores[row], view.ids, why[row])
                encode_recommendation(
                    user_id=user, items=items, model_version="v", partition=0, offset=0,
                    event_ts=0, generated_ts=0,
                )  # fmt: skip
        with stage("full_model"):
            full_scores(full, inputs, view)
    out = {f"{k}_us_per_event": 1e6 * min(v) / users for k, v in spent.items()}
    steps, prefills = scorer.rows["step"], scorer.rows["prefill"]
    out["step_share"] = steps / max(1, steps + prefills)  # the rest: slid windows
    return out
