"""Settings: one frozen object per concern, read from flags, `STREAMREC_*` env vars or a file.

Precedence (highest first): CLI flags, environment (`STREAMREC_...`, nested with `__`, e.g.
`STREAMREC_KAFKA__BOOTSTRAP_SERVERS`), a JSON config file (`--config`), then the defaults here.
Only the CLI reads the environment; everything below receives these objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from export.item_text import DEFAULT_ENCODER_DIR


class KafkaSettings(BaseModel):
    """Connection settings. The only place where dotted librdkafka keys appear."""

    model_config = ConfigDict(frozen=True)

    bootstrap_servers: str = "127.0.0.1:9092"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_ca_location: str | None = None
    # A crashed member is noticed in seconds rather than the default 45 s; a first group join
    # on the embedded broker took 23 s with defaults and 3 s with these.
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 500
    # The embedded broker answers a fetch only when fetch.wait.max.ms expires, even when data
    # arrived earlier (measured: p50 delivery 232 ms at librdkafka's 500, 1.2 ms at 20). Apache
    # Kafka answers as soon as data is there, so the low value only costs idle fetch requests.
    fetch_wait_max_ms: int = 20
    # A request unanswered this long fails and the connection is re-established: a frozen
    # broker is noticed (and /readyz flips) in seconds instead of librdkafka's 60.
    socket_timeout_ms: int = 10_000
    # Anything else librdkafka understands, passed through verbatim; never logged (secrets).
    extra: dict[str, str] = Field(default_factory=dict)

    def librdkafka(self) -> dict[str, Any]:
        """The client config shared by consumers, producers and admin clients."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "security.protocol": self.security_protocol,
            "socket.timeout.ms": self.socket_timeout_ms,
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
        if self.sasl_username:
            conf["sasl.username"] = self.sasl_username
        if self.sasl_password is not None:
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        conf.update(self.extra)
        return conf

    def consumer_config(self, group_id: str) -> dict[str, Any]:
        return {
            **self.librdkafka(),
            "group.id": group_id,
            # Offsets are committed by the processor after its outputs are delivered.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": self.heartbeat_interval_ms,
            "fetch.wait.max.ms": self.fetch_wait_max_ms,
            # Partitions that stay put keep flowing while others move between processes.
            "partition.assignment.strategy": "cooperative-sticky",
        }

    def producer_config(self) -> dict[str, Any]:
        return {
            **self.librdkafka(),
            # No duplicates or reordering from internal retries.
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }

    def redacted(self) -> dict[str, Any]:
        """For logs: secrets and pass-through values masked."""
        conf = self.librdkafka()
        for key in ("sasl.password", *self.extra):
            if key in conf:
                conf[key] = "***"
        return conf


class TopicSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    clicks: str = "clicks"
    recs: str = "recs"
    dlq: str = "clicks.dlq"
    items: str = "items"  # the item catalogue (compacted, key = item id): new items at run time
    partitions: int = Field(default=6, ge=1)  # room for 6 processes before anyone repartitions
    replication_factor: int = Field(default=1, ge=1)


class CodecLimits(BaseModel):
    """What a valid click event may look like beyond its schema."""

    model_config = ConfigDict(frozen=True)

    max_event_bytes: int = 16_384  # a click is ~100 bytes; anything near this is not a click
    max_id_length: int = 256
    # Clients' clocks drift; an event more than this ahead of the processor's clock is refused.
    max_future_skew_ms: int = 3_600_000


class ProcessorSettings(BaseSettings):
    """Everything `streamrec run` needs."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    limits: CodecLimits = CodecLimits()
    group: str = "streamrec"
    bundle: Path = Path("bundle")
    state_dir: Path = Path("state")
    # at-least-once: outputs and changelog acknowledged, then offsets committed; redeliveries
    # are recognised by the store. exactly-once: outputs, changelog and offsets in one Kafka
    # transaction (needs a broker that isolates aborted transactions: Apache Kafka).
    processing_guarantee: Literal["at-least-once", "exactly-once"] = "at-least-once"
    top_k: int = Field(default=10, ge=1, le=1000)
    # Upper bound of one unit of work; bigger batches amortise the ONNX call and the commit.
    batch_max: int = Field(default=2000, ge=1)
    poll_timeout_s: float = 0.1
    onnx_threads: int = Field(default=1, ge=0)  # 0 = let onnxruntime choose
    # Rows of one onnxruntime call (a batch is scored in chunks): 256 rows kept the bare
    # model at 145 MB instead of 529 MB per 2,000-row call and ran 1.3-1.8x faster
    # (BENCHMARKS.md, RSS at 1M users); None = the whole batch in one call.
    onnx_max_rows: int | None = Field(default=256, ge=1)
    # A batch's model calls run on a second thread, one chunk ahead of the loop thread that
    # ranks and encodes the chunk before (onnxruntime releases the GIL, so the two cores
    # share the work; stream.recommend.recommend). False: all on the loop thread.
    score_overlap: bool = True
    # Session length kept per user; None = the bundle's max_len.
    session_max_len: int | None = None
    # full: re-encode every touched user's window with model.onnx. incremental: one step.onnx
    # position per click from a per-user K/V cache (prefill.onnx on a miss or a slid window);
    # needs a bundle with a step section. auto: incremental when the bundle has one.
    inference: Literal["auto", "full", "incremental"] = "auto"
    # Memory for the K/V cache's LRU (~25 KB per user at d=64, 2 blocks, max_len 50): 128 MB
    # keeps ~5k active users; evicted entries go to RocksDB and come back on their next click.
    # The processor's RSS is about 380 MB + this at 1M stored users (BENCHMARKS.md).
    kv_cache_mb: float = Field(default=128.0, ge=0.0)
    # Top-k of a headless bundle (no score head: large catalogues): ann = faiss HNSW over its
    # item_vectors.npy (index cached in state_dir/ann), exact = chunked hidden @ V.T, auto =
    # ann when faiss is installed. Bundles with a score head rank their scores exactly.
    topk: Literal["auto", "exact", "ann"] = "auto"
    ann_ef_search: int = Field(default=256, ge=1)  # HNSW beam: µs per query vs recall
    # OpenMP threads of one batch's HNSW search: the search is most of a large catalogue's
    # cost per click, and a batch's queries split across threads (2: 1.9x here at 1M items).
    ann_threads: int = Field(default=2, ge=1)
    # Follow the items topic: items the bundle lacks are embedded (text_encoder), projected
    # into the model's item space and recommendable without a restart (stream/catalogue.py).
    follow_items: bool = True
    text_encoder: Path = DEFAULT_ENCODER_DIR  # `streamrec export-text-encoder` writes it there
    # At start-up the items topic is read to its end before the first click batch, at most this
    # long, so clicks on items added at run time are not dead-lettered after a restart.
    items_bootstrap_s: float = Field(default=30.0, ge=0.0)
    # Each recommended item carries `because`: the most similar item of the model's window.
    explain: bool = True
    log_every_s: float = 10.0
    # /metrics, /livez, /readyz. Loopback unless asked: metrics reveal topology and traffic.
    # "" disables the server.
    metrics_addr: str = "127.0.0.1:9108"
    # A bundle directory, or a models root holding versioned bundles and a CURRENT pointer
    # file naming the one to serve; a root is re-read every reload_check_s for hot swaps.
    reload_check_s: float = 2.0
    # /livez fails when the loop has not turned for this long (a stuck poll or scoring call).
    liveness_timeout_s: float = 60.0
    # Warn (log + streamrec_errors_total{kind="stalled"}) when records wait on the assigned
    # partitions but no fetch has brought one for this long: the embedded broker's empty
    # fetches far behind a long log of small batches (README, embedded broker limits).
    stall_warn_s: float = Field(default=30.0, gt=0)


@dataclass(frozen=True)
class RocksOptions:
    """RocksDB tuning for the session store."""

    # Per column family (sessions, K/V cache): sessions are small, so 16 MB absorbs ~25
    # batches of 2,000 users; 64 MB cost ~30 MB more RSS at 1M users for no measured speed.
    write_buffer_mb: int = 16
    max_open_files: int = 256  # the store is one of several processes' worth of files

    def to_options(self) -> Any:
        from rocksdict import Options

        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_write_buffer_size(self.write_buffer_mb << 20)
        opts.set_max_open_files(self.max_open_files)
        return opts
