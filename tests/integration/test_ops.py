"""Operators' view on the real broker: /metrics, /livez, /readyz, lag, hot model reload."""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, ProcessorSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.kafka.lag import LagProbe
from stream.producer import ClickProducer
from stream.reload import publish, set_current
from stream.scoring import OnnxScorer
from tests.integration.conftest import RunningProcessor
from tests.integration.kafka_utils import TopicReader, wait_for
from tests.integration.test_pipeline import caught_up, make_clicks, send


def get(address: str | None, path: str) -> tuple[int, bytes]:
    assert address is not None
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
        exc.close()
        return exc.code, body


def samples(address: str | None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(address, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def lag_by_partition(address: str | None) -> dict[str, float]:
    return {
        dict(labels)["partition"]: value
        for (name, labels), value in samples(address).items()
        if name == "kafka_consumergroup_lag"
    }


def total(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in metrics.items() if n == name)


def test_metrics_and_health_report_a_healthy_processor(
    settings: ProcessorSettings, bundle_dir: Path
) -> None:
    clicks = make_clicks(bundle_dir, users=10, per_user=4, seed=5)
    sent = send(settings.kafka, settings.topics.clicks, clicks, 0, 4)
    with (
        RunningProcessor(settings) as processor,
        TopicReader(settings.kafka, settings.topics.recs) as recs,
    ):
        recs.read_until(caught_up(clicks, 4))
        address = processor.ops_address
        wait_for(lambda: get(address, "/readyz")[0] == 200, what="readiness")
        wait_for(lambda: lag_by_partition(address) == {"0": 0, "1": 0, "2": 0}, what="lag 0")
        _, body = get(address, "/readyz")
        ready = json.loads(body)
        assert all(ready["checks"].values()) and ready["assigned_partitions"] == 3
        assert get(address, "/livez")[0] == 200
        assert get(address, "/nope")[0] == 404
        m = samples(address)
    assert total(m, "streamrec_events_consumed_total") == sent
    assert total(m, "streamrec_events_applied_total") == sent
    assert total(m, "streamrec_recommendations_produced_total") >= len(clicks)
    assert total(m, "streamrec_assigned_partitions") == 3
    assert total(m, "streamrec_end_to_end_latency_seconds_count") >= len(clicks)
    assert total(m, "streamrec_stage_seconds_count") > 0
    version = [dict(labels) for (n, labels), v in m.items() if n == "streamrec_model_info"]
    assert version == [{"model_version": processor.bundle.model_version}]
    lag_labels = {dict(labels)["partition"] for (n, labels) in m if n == "kafka_consumergroup_lag"}
    assert lag_labels == {"0", "1", "2"}


class GatedScorer:
    """The real ONNX scorer, held at a gate after `open_calls` calls (to freeze the loop)."""

    def __init__(self, scorer: OnnxScorer, open_calls: int) -> None:
        self._scorer = scorer
        self.model_version, self.max_len = scorer.model_version, scorer.max_len
        self.calls = 0
        self.open_calls = open_calls
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def score(self, item_seq: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls > self.open_calls:
            self.waiting.set()
            self.gate.wait(timeout=120)
        return self._scorer.score(item_seq)


def test_reported_lag_equals_the_true_number_of_unconsumed_events(
    settings: ProcessorSettings, bundle_dir: Path
) -> None:
    clicks = make_clicks(bundle_dir, users=40, per_user=10, seed=6)
    sent = send(settings.kafka, settings.topics.clicks, clicks, 0, 10)
    slow = settings.model_copy(update={"batch_max": 25, "liveness_timeout_s": 1.0})
    runner = RunningProcessor(slow)
    gated = GatedScorer(runner.processor.scorer, open_calls=3)  # type: ignore[arg-type]
    runner.processor.scorer = gated
    runner.processor.lag.every_s = 0.0
    with (
        runner as processor,
        LagProbe(settings.kafka, settings.group, settings.topics.clicks) as probe,
    ):
        assert gated.waiting.wait(60), "the processor never reached the gate"
        committed = sum(p.committed or 0 for p in probe.snapshot())
        assert 0 < committed < sent
        reported = total(samples(processor.ops_address), "kafka_consumergroup_lag")
        assert reported == sent - committed
        # The loop is stuck inside scoring: liveness must say so.
        wait_for(lambda: get(processor.ops_address, "/livez")[0] == 503, what="livez 503")
        gated.gate.set()
        wait_for(lambda: processor.stats.consumed == sent, what="drain")
        wait_for(lambda: get(processor.ops_address, "/livez")[0] == 200, what="livez 200")
        wait_for(
            lambda: set(lag_by_partition(processor.ops_address).values()) == {0},
            what="lag back to 0",
        )


def test_readiness_flips_when_the_broker_goes_away(bundle_dir: Path, tmp_path: Path) -> None:
    broker = EmbeddedBroker().start()
    try:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        topics = TopicSettings(partitions=2)
        create_topics(kafka, topics)
        settings = ProcessorSettings(
            kafka=kafka, topics=topics, bundle=bundle_dir, state_dir=tmp_path,
            metrics_addr="127.0.0.1:0", group="ready-test",
        )  # fmt: skip
        with RunningProcessor(settings) as processor:
            wait_for(lambda: get(processor.ops_address, "/readyz")[0] == 200, what="ready")
            broker.stop()
            wait_for(lambda: get(processor.ops_address, "/readyz")[0] == 503, what="not ready")
            body = json.loads(get(processor.ops_address, "/readyz")[1])
            assert body["checks"]["broker_connected"] is False
            assert get(processor.ops_address, "/livez")[0] == 200, "alive, only not ready"
    finally:
        broker.stop()


def _copy_as_version(bundle_dir: Path, root: Path, version: str) -> Path:
    target = root / version
    shutil.copytree(bundle_dir, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["model_version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_hot_reload_switches_versions_at_one_offset_boundary_per_partition(
    settings: ProcessorSettings, bundle_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    publish(_copy_as_version(bundle_dir, tmp_path / "staging", "v1"), root)
    live = settings.model_copy(update={"bundle": root, "reload_check_s": 0.1})
    clicks = make_clicks(bundle_dir, users=30, per_user=6, seed=7)
    send(settings.kafka, settings.topics.clicks, clicks, 0, 3)
    with (
        RunningProcessor(live) as processor,
        TopicReader(settings.kafka, settings.topics.recs) as recs,
    ):
        recs.read_until(caught_up(clicks, 3))
        publish(_copy_as_version(bundle_dir, tmp_path / "staging", "v2"), root)
        wait_for(lambda: processor.bundle.model_version == "v2", what="swap to v2")
        # A bundle whose model does not match its manifest is refused; v2 keeps serving.
        bad = _copy_as_version(bundle_dir, root, "v3-tampered")
        (bad / "model.onnx").write_bytes((bad / "model.onnx").read_bytes()[:-10])
        set_current(root, "v3-tampered")
        wait_for(
            lambda: total(samples(processor.ops_address), "streamrec_model_reloads_total") == 2,
            what="the refusal to be counted",
        )
        send(settings.kafka, settings.topics.clicks, clicks, 3, 6)
        messages = recs.read_until(caught_up(clicks, 6))
        m = samples(processor.ops_address)
    assert m[("streamrec_model_reloads_total", (("result", "ok"),))] == 1
    assert m[("streamrec_model_reloads_total", (("result", "refused"),))] == 1
    assert processor.bundle.model_version == "v2"
    by_partition: dict[int, list[tuple[int, str]]] = {}
    for msg in messages:
        record = orjson.loads(msg.value() or b"")
        by_partition.setdefault(record["partition"], []).append(
            (record["offset"], record["model_version"])
        )
    for partition, outputs in by_partition.items():
        versions = [v for _, v in sorted(outputs)]
        switches = sum(1 for a, b in itertools.pairwise(versions) if a != b)
        assert versions[0] == "v1" and versions[-1] == "v2", partition
        assert switches == 1, f"partition {partition}: {versions}"


@pytest.fixture
def unique_topics(kafka: KafkaSettings) -> TopicSettings:
    suffix = uuid.uuid4().hex[:8]
    t = TopicSettings(clicks=f"c-{suffix}", recs=f"r-{suffix}", dlq=f"d-{suffix}", partitions=2)
    create_topics(kafka, t)
    return t


def test_producer_api_refuses_invalid_events_before_sending(
    kafka: KafkaSettings, unique_topics: TopicSettings
) -> None:
    from stream.errors import InvalidEventError

    with ClickProducer(kafka, unique_topics.clicks) as producer:
        with pytest.raises(InvalidEventError) as info:
            producer.send("u1", "", ts=5)
        assert info.value.reason == "empty_field"
        with pytest.raises(InvalidEventError, match="ts_negative"):
            producer.send("u1", "i1", ts=-1)
        producer.send("u1", "i1")
    with LagProbe(kafka, "nobody", unique_topics.clicks) as probe:
        assert probe.wait_until_fetched(15)
        assert sum(p.lag or 0 for p in probe.snapshot()) == 1
