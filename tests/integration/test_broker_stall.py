"""A processor far behind on a long log of small batches is never silently stuck.

On the embedded broker (Tansu 0.6.0) a fetch's cost grows with the record batches the broker
stores, and a consumer thousands of one-record batches behind on a log of tens of thousands
gets only empty fetches at a short fetch.wait.max.ms (README, embedded broker limits). The
processor must then say so (a warning and streamrec_errors_total{kind="stalled"}), and the README's
remedy, a longer fetch wait, must drain the backlog. Its own broker: the session's shared one
would carry the long log into every later test.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from stream.broker import EmbeddedBroker
from stream.config import KafkaSettings, ProcessorSettings, TopicSettings
from stream.kafka.admin import create_topics
from stream.processor import Processor
from tests.integration.conftest import RunningProcessor

BATCHES, BEHIND = 60_000, 20_000  # one record each; the group starts BEHIND from the end


def _stalled(processor: Processor) -> float:
    sample = processor.metrics.registry.get_sample_value
    return sample("streamrec_errors_total", {"kind": "stalled"}) or 0.0


@pytest.mark.slow
def test_a_stalled_processor_warns_and_a_longer_fetch_wait_drains(
    bundle_dir: Path, tmp_path: Path
) -> None:
    with EmbeddedBroker() as broker:
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers)
        topics = TopicSettings(partitions=1)
        create_topics(kafka, topics)
        producer = Producer(
            {"bootstrap.servers": broker.bootstrap_servers, "linger.ms": 0,
             "batch.num.messages": 1}
        )  # fmt: skip
        for i in range(BATCHES):  # not clicks: each is consumed and dead-lettered
            producer.produce(topics.clicks, key=f"u{i % 100}".encode(), value=b"{}")
            producer.poll(0)
            if i % 200 == 0:
                producer.flush()
        producer.flush()
        group = f"g-{uuid.uuid4().hex[:8]}"
        consumer = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": group})
        start = [TopicPartition(topics.clicks, 0, BATCHES - BEHIND)]
        consumer.commit(offsets=start, asynchronous=False)
        consumer.close()

        def settings(wait_ms: int, state: str) -> ProcessorSettings:
            return ProcessorSettings(
                kafka=kafka.model_copy(update={"fetch_wait_max_ms": wait_ms}), topics=topics,
                group=group, bundle=bundle_dir, state_dir=tmp_path / state, metrics_addr="",
                log_every_s=3600, stall_warn_s=2.0,
            )  # fmt: skip

        # The default 20 ms fetch wait: either the backlog flows, or the processor says it
        # is stalled (on Tansu 0.6.0 it stalls: nothing was consumed in every run here).
        with RunningProcessor(settings(20, "short")) as processor:
            deadline = time.monotonic() + 12
            while processor.stats.consumed < BEHIND and time.monotonic() < deadline:
                if processor.stats.consumed == 0 and _stalled(processor) >= 1:
                    break
                time.sleep(0.2)
            consumed, warned = processor.stats.consumed, _stalled(processor)
        assert consumed == BEHIND or warned >= 1, (consumed, warned)

        # The remedy the warning names: a longer fetch wait reads the whole backlog.
        with RunningProcessor(settings(500, "long")) as processor:
            deadline = time.monotonic() + 60
            while processor.stats.consumed < BEHIND - consumed:
                assert time.monotonic() < deadline, processor.stats.consumed
                time.sleep(0.2)
            assert _stalled(processor) == 0
        assert sum(processor.stats.dead_letters.values()) == BEHIND - consumed
