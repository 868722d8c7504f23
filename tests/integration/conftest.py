"""Integration fixtures: one real broker per session, uuid topics per test, a real bundle.

Every wait is bounded; the broker process is stopped in `finally` even when a test fails.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, ProcessorSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.processor import Processor
from tests.integration.kafka_utils import Timeout


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker()
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def kafka(broker: EmbeddedBroker) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=broker.bootstrap_servers)


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stream.synthetic import SyntheticConfig, generate, write_dataset

    config = SyntheticConfig(num_users=400, num_items=300, num_genres=8, mean_clicks_per_user=30)
    items, clicks = generate(config)
    return write_dataset(tmp_path_factory.mktemp("synthetic"), items, clicks, config)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """A real SASRec, trained briefly on synthetic data and exported through the real path."""
    from export.onnx_export import export_bundle
    from model.config import SASRecConfig, TrainConfig
    from model.data import load_dataset
    from model.train import train

    dataset = load_dataset(f"synthetic:{synthetic_dir}")
    model_cfg = SASRecConfig(num_items=dataset.num_items, max_len=20, d_model=32)
    train_cfg = TrainConfig(epochs=3, batch_size=64, max_seconds=20, threads=1)
    work = tmp_path_factory.mktemp("train")
    ckpt = train(dataset, model_cfg, train_cfg, work, progress=False)
    return export_bundle(ckpt, work / "bundle")


@pytest.fixture
def topics(kafka: KafkaSettings) -> TopicSettings:
    suffix = uuid.uuid4().hex[:8]
    t = TopicSettings(
        clicks=f"clicks-{suffix}", recs=f"recs-{suffix}", dlq=f"dlq-{suffix}", partitions=3
    )
    create_topics(kafka, t)
    return t


@pytest.fixture
def settings(
    kafka: KafkaSettings, topics: TopicSettings, bundle_dir: Path, tmp_path: Path
) -> ProcessorSettings:
    return ProcessorSettings(
        kafka=kafka,
        topics=topics,
        group=f"g-{uuid.uuid4().hex[:8]}",
        bundle=bundle_dir,
        state_dir=tmp_path / "state",
        top_k=10,
        batch_max=500,
        log_every_s=3600,
        metrics_addr="127.0.0.1:0",  # an ephemeral port: tests run several processors
    )


class RunningProcessor:
    """A Processor on a background thread; `stop()` finishes the batch, commits and closes."""

    def __init__(self, settings: ProcessorSettings) -> None:
        self.processor = Processor(settings)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.processor.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Processor:
        self.thread.start()
        return self.processor

    def __exit__(self, *exc: object) -> None:
        self.processor.stop()
        self.thread.join(timeout=Timeout.DEFAULT)
        assert not self.thread.is_alive(), "processor did not stop"
        if self.error is not None:
            raise self.error
