"""Prometheus metrics of one processor (a private registry, so tests can run several).

Names follow Prometheus conventions; lag uses the name and labels of kafka_exporter
(`kafka_consumergroup_lag{consumergroup,topic,partition}`) so existing dashboards and alerts
work unchanged.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from stream.stats import STAGES

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class ProcessorMetrics:
    def __init__(self, group: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.group = group
        self.consumed = Counter(
            "streamrec_events_consumed", "Input records consumed (valid or not).", registry=r
        )
        self.applied = Counter(
            "streamrec_events_applied", "Valid events appended to a session.", registry=r
        )
        self.replayed = Counter(
            "streamrec_events_replayed",
            "Redelivered events recognised by the store's applied offset and not re-appended.",
            registry=r,
        )
        self.scored = Counter("streamrec_users_scored", "User sessions scored.", registry=r)
        self.produced = Counter(
            "streamrec_recommendations_produced", "Output records acknowledged.", registry=r
        )
        self.dead_letters = Counter(
            "streamrec_dead_letters", "Records sent to the DLQ.", ["reason"], registry=r
        )
        self.batch_size = Histogram(
            "streamrec_batch_size", "Records per poll batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "streamrec_stage_seconds",
            "Wall time per batch stage.",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.end_to_end = Histogram(
            "streamrec_end_to_end_latency_seconds",
            "From the click's event ts to its output record being produced.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "kafka_consumergroup_lag",
            "Records not yet committed by the group (fetch high watermark - committed offset).",
            ["consumergroup", "topic", "partition"],
            registry=r,
        )
        self.assigned = Gauge(
            "streamrec_assigned_partitions", "Input partitions assigned.", registry=r
        )
        self.sessions = Gauge(
            "streamrec_sessions", "Sessions in the local store (RocksDB estimate).", registry=r
        )
        self.model_info = Gauge(
            "streamrec_model_info", "The serving model (value 1).", ["model_version"], registry=r
        )
        self.model_reloads = Counter(
            "streamrec_model_reloads",
            "Model bundle swaps by result (ok, refused).",
            ["result"],
            registry=r,
        )
        self.rebalances = Counter(
            "streamrec_rebalances", "Partition assignment changes.", ["kind"], registry=r
        )
        self.errors = Counter("streamrec_errors", "Errors by kind.", ["kind"], registry=r)
        self.ready = Gauge("streamrec_ready", "1 when /readyz answers 200.", registry=r)
        self.restoring = Gauge(
            "streamrec_restoring_partitions",
            "Partitions being restored from the changelog (readiness waits for 0).",
            registry=r,
        )
        self.restored_records = Counter(
            "streamrec_restore_records", "Changelog records read while restoring.", registry=r
        )
        self.restore_seconds = Histogram(
            "streamrec_restore_seconds",
            "Time to restore one partition from the changelog.",
            buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.runtime_items = Gauge(
            "streamrec_runtime_items",
            "Items from the items topic that the bundle lacks and that are recommendable now.",
            registry=r,
        )
        self.items_unplaced = Counter(
            "streamrec_items_unplaced",
            "New catalogue items that could not be placed in the model's item space (an "
            "ID-only bundle, or no text encoder).",
            registry=r,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for result in ("ok", "refused"):
            self.model_reloads.labels(result)

    def set_model(self, version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version).set(1)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.lag.labels(self.group, topic, str(partition)).set(lag)

    def drop_lag(self, topic: str, partition: int) -> None:
        with contextlib.suppress(KeyError):  # never set: nothing to drop
            self.lag.remove(self.group, topic, str(partition))
