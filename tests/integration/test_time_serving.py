"""A time-aware bundle served end to end: the processor feeds each window's click times.

The time-aware SASRec (`time_buckets`, issue 5) reads the bundle contract's `time_seq`. It is
trained for a few seconds on the synthetic data's timestamps, exported through the real path,
and served by the processor on the real broker. Two users click the same items, one seconds
apart and one days apart: each published list must be the one onnxruntime gives for that
user's own click times, and the two lists' scores must differ (the times reach the model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from confluent_kafka import Message

from export.bundle import Bundle, load_bundle
from stream.config import ProcessorSettings
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


def test_the_processor_scores_a_time_aware_bundle_with_each_users_click_times(
    settings: ProcessorSettings, time_bundle: Bundle
) -> None:
    assert time_bundle.manifest.inputs == ("item_seq", "time_seq")
    assert time_bundle.manifest.step is None, "time-aware models are re-encoded, never stepped"
    items = list(time_bundle.item_ids[1:7])
    stamps = {u: [BASE_TS + 1000 * gap * n for n in range(len(items))] for u, gap in GAPS_S.items()}
    with ClickProducer(settings.kafka, settings.topics.clicks) as producer:
        for user, ts in stamps.items():
            for item, t in zip(items, ts, strict=True):
                producer.send(user, item, ts=t)

    def latest(messages: list[Message]) -> dict[str, dict]:
        return {(m.key() or b"").decode(): orjson.loads(m.value() or b"{}") for m in messages}

    def caught_up(messages: list[Message]) -> bool:
        last = latest(messages)
        return all(last.get(u, {}).get("event_ts") == t[-1] for u, t in stamps.items())

    served = settings.model_copy(update={"bundle": time_bundle.path})
    with RunningProcessor(served), TopicReader(settings.kafka, settings.topics.recs) as recs:
        messages = recs.read_until(caught_up)
    records = latest(messages)
    lists = {}
    for user, ts in stamps.items():
        got = [(e["item_id"], e["score"]) for e in records[user]["items"]]
        want = expected_list(time_bundle, items, ts, settings.top_k)
        assert [i for i, _ in got] == [i for i, _ in want], user
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-4, atol=1e-5)
        lists[user] = got
    fast, slow = (np.array([s for _, s in lists[u]]) for u in GAPS_S)
    assert not np.allclose(fast, slow, atol=1e-4), "the same items at other times must score apart"
