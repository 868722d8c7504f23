"""Bounded waits and topic readers for the integration tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from stream.config import KafkaSettings
from stream.kafka.admin import partition_count


class Timeout:
    """A deadline; every wait in the tests goes through one (never a bare sleep)."""

    DEFAULT = 60.0

    def __init__(self, seconds: float = DEFAULT) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline


class TopicReader:
    """Reads a whole topic from the beginning, all partitions, without a consumer group."""

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self.topic = topic
        self.messages: list[Message] = []
        self._consumer = Consumer(
            {
                **kafka.librdkafka(),
                "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
            }
        )
        n = partition_count(kafka, topic)
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)])

    def read_until(
        self, done: Callable[[list[Message]], bool], timeout_s: float = Timeout.DEFAULT
    ) -> list[Message]:
        timeout = Timeout(timeout_s)
        while not done(self.messages):
            if timeout.expired:
                raise AssertionError(
                    f"{self.topic}: condition not met within {timeout_s}s "
                    f"({len(self.messages)} records read)"
                )
            for msg in self._consumer.consume(1000, timeout=0.2):
                if msg.error() is None:
                    self.messages.append(msg)
        return self.messages

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(
    condition: Callable[[], bool], timeout_s: float = Timeout.DEFAULT, what: str = ""
) -> None:
    timeout = Timeout(timeout_s)
    while not condition():
        if timeout.expired:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}")
        time.sleep(0.05)
