"""Topic creation (idempotent) and topic inspection."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from stream.config import KafkaSettings, TopicSettings
from stream.errors import KafkaError

logger = logging.getLogger(__name__)


def topic_specs(topics: TopicSettings) -> list[NewTopic]:
    rf = topics.replication_factor
    return [
        NewTopic(topics.clicks, topics.partitions, rf),
        # Keyed by user: compaction keeps each user's latest list (downstream bootstraps from it).
        NewTopic(topics.recs, topics.partitions, rf, config={"cleanup.policy": "compact"}),
        NewTopic(topics.dlq, topics.partitions, rf),
        # Keyed by item: compaction keeps each item's latest record; processors read it all.
        NewTopic(topics.items, topics.partitions, rf, config={"cleanup.policy": "compact"}),
    ]


def create_topics(
    kafka: KafkaSettings, topics: TopicSettings, timeout_s: float = 15.0
) -> dict[str, str]:
    """Create the input, output and dead-letter topics; existing topics are left as they are.

    Returns topic -> "created" | "exists".
    """
    admin = AdminClient(kafka.librdkafka())
    futures = admin.create_topics(topic_specs(topics), operation_timeout=timeout_s)
    result: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
            result[name] = "created"
        except KafkaException as exc:
            err = exc.args[0]
            if err.name() != "TOPIC_ALREADY_EXISTS":
                raise KafkaError(f"cannot create topic {name}: {err.str()}", err.name()) from exc
            result[name] = "exists"
    for name, outcome in result.items():
        logger.info("topic %s: %s", name, outcome)
    return result


def partition_count(kafka: KafkaSettings, topic: str, timeout_s: float = 10.0) -> int:
    admin = AdminClient(kafka.librdkafka())
    md = admin.list_topics(topic=topic, timeout=timeout_s)
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None:
        raise KafkaError(f"topic {topic} does not exist; run `streamrec topics create`")
    return len(meta.partitions)
