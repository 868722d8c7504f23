"""A headless bundle (no score head in its graphs) served on the real broker: top-k from the
hidden state by exact scoring or the faiss HNSW index over item_vectors.npy (stream.ann)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.bundle import load_bundle
from stream.config import ProcessorSettings
from stream.incremental import IncrementalScorer
from stream.scoring import OnnxScorer, session_inputs, top_k
from stream.state import Session
from tests.integration.conftest import RunningProcessor
from tests.integration.kafka_utils import TopicReader
from tests.integration.test_pipeline import caught_up, latest_by_user, make_clicks, send


@pytest.fixture(scope="module")
def headless_dir(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.onnx_export import export_bundle

    (ckpt,) = bundle_dir.parent.glob("*.pt")
    return export_bundle(ckpt, tmp_path_factory.mktemp("headless") / "bundle", score_head=False)


def exact_lists(bundle_dir: Path, clicks: dict[str, list[tuple[str, int]]]) -> dict[str, list[str]]:
    """Each user's top-10 from the full bundle's model.onnx scores (the score head)."""
    bundle = load_bundle(bundle_dir)
    scorer = OnnxScorer(bundle)
    view = scorer.items.view
    sessions = []
    for u, events in enumerate(clicks.values()):
        s = Session()
        for k, (item, ts) in enumerate(events):
            s.append(item, ts=ts, partition=0, offset=100 * u + k, max_len=bundle.max_len)
        sessions.append(s)
    assert bundle.step is not None
    inputs = session_inputs(sessions, view, bundle.max_len, bundle.step.stride)
    best, _ = top_k(scorer.score(inputs.item_seq), inputs.seen, 10)
    return {
        user: [view.ids[i] for i in row] for user, row in zip(clicks, best.tolist(), strict=True)
    }


@pytest.mark.parametrize("topk", ["exact", "ann"])
def test_a_headless_bundle_serves_valid_lists_close_to_the_score_heads(
    settings: ProcessorSettings, bundle_dir: Path, headless_dir: Path, topk: str
) -> None:
    if topk == "ann":
        pytest.importorskip("faiss")
    clicks = make_clicks(bundle_dir, users=40, per_user=6, seed=5)
    send(settings.kafka, settings.topics.clicks, clicks, 0, 6)
    served = settings.model_copy(update={"bundle": headless_dir, "topk": topk})
    runner = RunningProcessor(served)
    scorer = runner.processor.scorer
    assert isinstance(scorer, IncrementalScorer) and scorer.score_head is False
    assert scorer.ranker is not None and (scorer.ranker.index is None) == (topk == "exact")
    with runner, TopicReader(settings.kafka, settings.topics.recs) as recs:
        messages = recs.read_until(caught_up(clicks, 6))
    latest = latest_by_user(messages)
    want = exact_lists(bundle_dir, clicks)
    catalogue = set(load_bundle(bundle_dir).item_ids[1:])
    recall = []
    for user, record in latest.items():
        items = record["items"]
        got = [e["item_id"] for e in items]  # type: ignore[attr-defined]
        assert len(got) == 10 and len(set(got)) == 10 and set(got) <= catalogue
        assert not set(got) & {item for item, _ in clicks[user]}, "seen items excluded"
        scores = [e["score"] for e in items]  # type: ignore[attr-defined]
        assert scores == sorted(scores, reverse=True)
        recall.append(len(set(got) & set(want[user])) / 10)
    # exact: the same lists as the score head but for float16-cache near-ties at the cut.
    assert np.mean(recall) >= (0.97 if topk == "exact" else 0.9), recall
    if topk == "ann":
        assert (Path(served.state_dir) / "ann").is_dir(), "the index is cached beside the state"
