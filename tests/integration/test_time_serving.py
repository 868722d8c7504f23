"""A time-aware bundle served end to end: the processor feeds each window's click times.

The time-aware SASRec (`time_buckets`, issue 5) reads the bundle contract's `time_seq`. It is
trained for a few seconds on the synthetic data's timestamps, exported through the real path,
and served by the processor on the real broker, re-encoded (inference=full) and stepped
(inference=incremental: the step graph also takes the new click's time and the cached slots'
times). Two users click the same items, one seconds apart and one days apart, one click per
round: each published list must be the one model.onnx gives for that user's window and click
times, through a window slide, and the two lists' scores must differ (the times reach the
model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from confluent_kafka import Message

from export.bundle import Bundle, load_bundle, window_len
from export.step_export import STEP_RTOL
from stream.config import ProcessorSettings
from stream.incremental import IncrementalScorer
from stream.producer import ClickProducer
from stream.scoring import left_pad, top_k
from tests.integration.conftest import RunningProcessor
from tests.integration.kafka_utils import TopicReader

BASE_TS = 1_767_225_600_000  # 2026-01-01, epoch ms
GAPS_S = {"user-fast": 5, "user-slow": 3 * 86_400}


@pytest.fixture(scope="module")
def time_bundle(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Bundle:
    from export.onnx_export import export_bundle
    from model.config import SASRecConfig, TrainConfig
    from model.data import load_dataset
    from model.train import train

    dataset = load_dataset(f"synthetic:{synthetic_dir}")
    model_cfg = SASRecConfig(
        num_items=dataset.num_items, max_len=20, d_model=32, time_buckets=28, session_gap_s=1800
    )
    work = tmp_path_factory.mktemp("time")
    ckpt = train(dataset, model_cfg, TrainConfig(epochs=2, batch_size=64, threads=1), work,
                 progress=False)  # fmt: skip
    return load_bundle(export_bundle(ckpt, work / "bundle"))


def expected_list(bundle: Bundle, items: list[str], stamps_ms: list[int], k: int) -> list[tuple]:
    """(item id, score) of the top k, from model.onnx fed the window and its times."""
    index = {item: j for j, item in enumerate(bundle.item_ids)}
    item_seq = left_pad([[index[i] for i in items]], bundle.max_len)
    time_seq = left_pad([[t // 1000 for t in stamps_ms]], bundle.max_len)
    session = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    scores = session.run(["scores"], {"item_seq": item_seq, "time_seq": time_seq})[0]
    best, best_scores = top_k(scores, item_seq, k)
    return [(bundle.item_ids[j], float(s)) for j, s in zip(best[0], best_scores[0], strict=True)]


@pytest.mark.parametrize("inference", ["full", "incremental"])
def test_the_processor_scores_a_time_aware_bundle_with_each_users_click_times(
    settings: ProcessorSettings, time_bundle: Bundle, inference: str
) -> None:
    assert time_bundle.manifest.inputs == ("item_seq", "time_seq")
    step = time_bundle.manifest.step
    assert step is not None, "a time-aware bundle carries the step pair too"
    L = time_bundle.max_len
    clicks = L + 5  # one slide of the window (stride max_len // 2) on the way
    items = [time_bundle.item_ids[1 + (7 * n) % 30] for n in range(clicks)]
    stamps = {u: [BASE_TS + 1000 * gap * n for n in range(clicks)] for u, gap in GAPS_S.items()}

    def latest(messages: list[Message]) -> dict[str, dict]:
        return {(m.key() or b"").decode(): orjson.loads(m.value() or b"{}") for m in messages}

    served = settings.model_copy(update={"bundle": time_bundle.path, "inference": inference})
    lists: dict[str, list[tuple]] = {}
    with (
        RunningProcessor(served) as processor,
        ClickProducer(settings.kafka, settings.topics.clicks) as producer,
        TopicReader(settings.kafka, settings.topics.recs) as recs,
    ):
        for n in range(clicks):  # one click per user per round: every click after the first
            for user, ts in stamps.items():  # of a window is a step when incremental
                producer.send(user, items[n], ts=ts[n])
            producer.flush()
            records = latest(recs.read_until(
                lambda m, n=n: all(latest(m).get(u, {}).get("event_ts") == t[n]
                                   for u, t in stamps.items())
            ))  # fmt: skip
            w = window_len(n + 1, L, step.stride)
            for user, ts in stamps.items():
                got = [(e["item_id"], e["score"]) for e in records[user]["items"]]
                want = expected_list(time_bundle, items[n + 1 - w : n + 1],
                                     ts[n + 1 - w : n + 1], settings.top_k)  # fmt: skip
                assert_same(got, want, inference, (user, n))
                lists[user] = got
        scorer = processor.scorer
        if inference == "incremental":
            assert isinstance(scorer, IncrementalScorer) and scorer.uses_time
            assert scorer.rows["step"] >= 2 * (clicks - 3), scorer.rows  # not all re-encoded
            assert scorer.rows["prefill"] >= 4, scorer.rows  # first clicks and the slide
        else:
            assert not isinstance(scorer, IncrementalScorer)
    fast, slow = (np.array([s for _, s in lists[u]]) for u in GAPS_S)
    assert not np.allclose(fast, slow, atol=1e-4), "the same items at other times must score apart"


def assert_same(got: list[tuple], want: list[tuple], inference: str, where: object) -> None:
    """Ids and scores rank by rank: to float32 rounding re-encoded; within the export's step
    tolerance when stepped (its float16 cache), where one near-tie may swap two ids."""
    scores = np.array([s for _, s in want])
    if inference == "full":
        assert [i for i, _ in got] == [i for i, _ in want], where
        np.testing.assert_allclose([s for _, s in got], scores, rtol=1e-4, atol=1e-5)
        return
    tol = STEP_RTOL * (1 + np.abs(scores).max())
    assert np.abs(np.array([s for _, s in got]) - scores).max() <= tol, (where, got, want)
    assert sum(a != b for (a, _), (b, _) in zip(got, want, strict=True)) <= 2, (where, got, want)
