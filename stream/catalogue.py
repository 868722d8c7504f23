"""The item catalogue at run time: items published on the `items` topic become recommendable
without a restart or retraining.

Every processor instance follows the whole compacted topic (a non-group consumer assigned to
every partition from the beginning, like Kafka Streams' GlobalKTable) and polls it without
blocking between batches. For an item the serving bundle does not know, the catalogue embeds
its text (stream.text, the ONNX encoder) and maps it into the model's item space with the
bundle's text projection (export/item_text.py: vector = [text_emb, features] @ W + b, and a
score bias when the bundle has one), then hands both to the scoring table (`add_items`). A
tombstone withdraws an item (`remove_items`); an update of a runtime item replaces its vector;
items of the bundle are never re-added.

An ID-only bundle has no projection: new items are kept (a later text-aware bundle places
them on the swap), counted as unplaced, and logged once. Nothing here stops the processor.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from export.bundle import Bundle
from export.item_text import (
    TEXT_BIAS,
    TEXT_DIM,
    TEXT_FORMAT,
    TEXT_PROJ_B,
    TEXT_PROJ_W,
    feature_dim,
    item_features,
)
from stream.batch import dead_letter_headers, source_of
from stream.codec import Invalid, ItemRecord, ItemTombstone, decode_item
from stream.config import CodecLimits, KafkaSettings, ProcessorSettings
from stream.errors import ConfigError, StreamError
from stream.kafka.admin import partition_count
from stream.kafka.clients import ClosingContext, DeliveryTracker, make_consumer, make_producer
from stream.metrics import ProcessorMetrics
from stream.text import TextEncoder

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


class DeadLetterSink(Protocol):
    def send(self, msg: Message, invalid: Invalid) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class ItemSink(Protocol):
    """The scoring table's runtime-item seam (stream.itemtable.ItemTable)."""

    @property
    def dim(self) -> int | None: ...

    def add_items(
        self, item_ids: Sequence[str], vectors: FloatArray, bias: FloatArray | None = None
    ) -> int: ...

    def remove_items(self, item_ids: Iterable[str]) -> None: ...


@dataclass(frozen=True)
class TextProjection:
    """The bundle's map from an item's text to the model's item space (D): its text embedding
    (384), then, for a model with item features, the features parsed from the same text
    (export/item_text.py), through an affine map; and its score bias, when the bundle has one."""

    weight: FloatArray  # (384 [+ F], D)
    bias: FloatArray  # (D,)
    genres: tuple[str, ...] | None = None  # feature vocabulary; None: no item features
    score: FloatArray | None = None  # (384 [+ F] + 1,) text_bias.npy: [w, b]

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> TextProjection | None:
        """None for an ID-only bundle; ConfigError for a text bundle this build cannot use."""
        files, config = bundle.manifest.files, bundle.manifest.config
        if TEXT_PROJ_W not in files or TEXT_PROJ_B not in files:
            return None
        # The model config's text_format (model/config.py), as the manifest's config holds it.
        found = config.get("text_format") or TEXT_FORMAT
        if found != TEXT_FORMAT:
            raise ConfigError(f"bundle item text format {found!r}; this build embeds {TEXT_FORMAT}")
        genres = tuple(config.get("feature_genres") or ()) if config.get("item_features") else None
        width = TEXT_DIM + (0 if genres is None else feature_dim(genres))
        weight = np.load(bundle.path / TEXT_PROJ_W).astype(np.float32)  # (width, D)
        bias = np.load(bundle.path / TEXT_PROJ_B).astype(np.float32)  # (D,)
        if weight.ndim != 2 or weight.shape[0] != width or bias.shape != (weight.shape[1],):
            raise ConfigError(
                f"text projection {weight.shape} + {bias.shape} is not [{width}, D] + [D]"
            )
        score = None
        if TEXT_BIAS in files:
            score = np.load(bundle.path / TEXT_BIAS).astype(np.float32)  # (width + 1,)
            if score.shape != (width + 1,):
                raise ConfigError(f"text bias {score.shape} is not [{width + 1}]")
        return cls(weight, bias, genres, score)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def __call__(
        self, text_emb: FloatArray, texts: Sequence[str]
    ) -> tuple[FloatArray, FloatArray | None]:
        """(M, 384) embeddings of `texts` -> (M, D) vectors and (M,) score biases (or None)."""
        inputs = text_emb  # (M, 384)
        if self.genres is not None:
            features = np.asarray([item_features(t, self.genres) for t in texts], np.float32)
            inputs = np.concatenate([text_emb, features.reshape(len(texts), -1)], axis=1)
        vectors = (inputs @ self.weight + self.bias).astype(np.float32)  # (M, D)
        if self.score is None:
            return vectors, None
        return vectors, (inputs @ self.score[:-1] + self.score[-1]).astype(np.float32)  # (M,)


@dataclass
class _Runtime:
    text: str
    embedding: FloatArray | None = None  # (384,), once encoded


class Catalogue:
    """What the items topic says, placed into the current model's scoring table."""

    def __init__(self, encoder_dir: Path | None, metrics: ProcessorMetrics, threads: int = 1):
        self.encoder_dir = encoder_dir
        self.metrics = metrics
        self.threads = threads
        self._encoder: TextEncoder | None = None
        self._encoder_failed = False
        self._runtime: dict[str, _Runtime] = {}  # items not in the bundle, latest record each
        self._withdrawn_known: set[str] = set()  # bundle items withdrawn by a tombstone
        self._known: frozenset[str] = frozenset()
        self._sink: ItemSink | None = None
        self._projection: TextProjection | None = None
        self._warned = False

    @property
    def runtime_items(self) -> dict[str, str]:
        """item id -> text of every item known only from the topic."""
        return {item_id: r.text for item_id, r in self._runtime.items()}

    def attach(self, bundle: Bundle, sink: ItemSink) -> None:
        """Serve a (new) bundle: its table starts empty, so every runtime item is placed again,
        in the new model's item space."""
        self._sink, self._known, self._warned = sink, frozenset(bundle.item_ids[1:]), False
        try:
            self._projection = TextProjection.from_bundle(bundle)
        except (ConfigError, OSError, ValueError) as exc:
            logger.error("bundle %s: new items cannot be placed: %s", bundle.model_version, exc)
            self._projection = None
        if self._projection is not None and self._projection.dim != sink.dim:
            logger.error(
                "bundle %s: text projection gives %d-d vectors, its items are %s-d; new items "
                "cannot be placed",
                bundle.model_version,
                self._projection.dim,
                sink.dim,
            )
            self._projection = None
        moved = [i for i in self._runtime if i in self._known]  # the new bundle has them
        for item_id in moved:
            del self._runtime[item_id]
        if self._withdrawn_known:
            sink.remove_items(sorted(self._withdrawn_known))
        self._place(sorted(self._runtime))
        self.metrics.runtime_items.set(len(self._runtime) if self._projection else 0)

    def apply(self, records: Sequence[ItemRecord | ItemTombstone]) -> None:
        """Records in topic order; only each item's last record in the batch matters."""
        last: dict[str, ItemRecord | ItemTombstone] = {}
        for record in records:
            last[record.item_id] = record
        gone = [i for i, r in last.items() if isinstance(r, ItemTombstone)]
        changed = []
        for item_id, record in last.items():
            if isinstance(record, ItemTombstone):
                self._runtime.pop(item_id, None)
                if item_id in self._known:
                    self._withdrawn_known.add(item_id)
            elif item_id in self._known:
                self._restore_known(item_id)
            else:
                text = record.text()
                held = self._runtime.get(item_id)
                if held is None or held.text != text:
                    self._runtime[item_id] = _Runtime(text)
                    changed.append(item_id)
        if gone and self._sink is not None:
            self._sink.remove_items(gone)
        self._place(changed)
        self.metrics.runtime_items.set(len(self._runtime) if self._projection else 0)

    def _restore_known(self, item_id: str) -> None:
        """A bundle item republished after a tombstone is recommendable again."""
        if item_id in self._withdrawn_known and self._sink is not None and self._sink.dim:
            self._withdrawn_known.discard(item_id)
            # add_items brings a removed id back; a bundle id's vector is never used.
            self._sink.add_items([item_id], np.zeros((1, self._sink.dim), np.float32))

    def _place(self, item_ids: list[str]) -> None:
        if not item_ids or self._sink is None:
            return
        encoder = self._encoder_or_none() if self._projection is not None else None
        if self._projection is None or encoder is None:
            self._unplaced(len(item_ids))
            return
        try:
            self._embed([i for i in item_ids if self._runtime[i].embedding is None], encoder)
            text_emb = np.stack([self._runtime[i].embedding for i in item_ids])  # type: ignore[misc]
            texts = [self._runtime[i].text for i in item_ids]
            vectors, bias = self._projection(text_emb, texts)  # (M, D), (M,) or None
            self._sink.add_items(item_ids, vectors, bias)
        except StreamError as exc:
            # A failed encoder run or a table that refuses the vectors: the clicks go on.
            logger.error("could not place %d new items: %s", len(item_ids), exc)
            self.metrics.items_unplaced.inc(len(item_ids))

    def _embed(self, item_ids: list[str], encoder: TextEncoder) -> None:
        if not item_ids:
            return
        started = time.perf_counter()
        vectors = encoder.encode([self._runtime[i].text for i in item_ids])  # (m, 384)
        for item_id, vector in zip(item_ids, vectors, strict=True):
            self._runtime[item_id].embedding = vector
        took_ms = 1000 * (time.perf_counter() - started)
        logger.info("embedded %d new items in %.0f ms", len(item_ids), took_ms)

    def _encoder_or_none(self) -> TextEncoder | None:
        if self._encoder is None and not self._encoder_failed:
            try:
                if self.encoder_dir is None:
                    raise ConfigError("no text encoder directory is configured")
                self._encoder = TextEncoder(self.encoder_dir, threads=self.threads)
            except ConfigError as exc:
                self._encoder_failed = True
                logger.error("new items cannot be embedded: %s", exc)
        return self._encoder

    def _unplaced(self, n: int) -> None:
        self.metrics.items_unplaced.inc(n)
        if not self._warned:
            self._warned = True
            why = (
                "no text encoder" if self._projection else "an ID-only bundle (no text projection)"
            )
            logger.warning(
                "%d new items cannot be recommended with %s; they are kept and placed when a "
                "text-aware bundle is served (streamrec_items_unplaced_total counts them)",
                n,
                why,
            )


def follow_items(
    settings: ProcessorSettings, metrics: ProcessorMetrics
) -> CatalogueFollower | None:
    """The processor's follower, or None when it is turned off or the topic does not exist."""
    if not settings.follow_items:
        return None
    catalogue = Catalogue(settings.text_encoder, metrics, max(settings.onnx_threads, 1))
    marker = settings.state_dir / "items-dlq-offsets.json"
    dead_letters = ItemDeadLetters(settings.kafka, settings.topics.dlq, marker)
    try:
        return CatalogueFollower(
            settings.kafka, settings.topics.items, catalogue, dead_letters, settings.limits
        )
    except ConfigError as exc:
        logger.warning("new items at run time are off: %s", exc)
        return None


class CatalogueFollower(ClosingContext):
    """Reads the whole items topic into a Catalogue; `poll()` never blocks."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        catalogue: Catalogue,
        dead_letters: DeadLetterSink,
        limits: CodecLimits | None = None,
        batch_max: int = 500,
    ) -> None:
        self.topic, self.catalogue, self.dead_letters = topic, catalogue, dead_letters
        self.limits = limits or CodecLimits()
        self.batch_max = batch_max
        self.records = 0
        try:
            n = partition_count(kafka, topic)
        except StreamError as exc:
            raise ConfigError(
                f"items topic {topic}: {exc}; create it (`streamrec topics create`) or set "
                "follow_items false"
            ) from exc
        self.partitions = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)]
        # librdkafka wants a group.id; assign() never joins the group and nothing is committed:
        # each start reads the compacted topic from the beginning.
        self._consumer: Consumer = make_consumer(kafka, f"streamrec-catalogue-{topic}")
        self._consumer.assign(self.partitions)

    def poll(self, timeout_s: float = 0.0) -> int:
        """Apply what has been fetched (at most batch_max records); returns records read."""
        msgs = self._consumer.consume(self.batch_max, timeout=timeout_s)
        decoded: list[ItemRecord | ItemTombstone] = []
        for msg in msgs:
            if msg.error() is not None:
                logger.warning("%s: consume error: %s", self.topic, msg.error())
                continue
            result = decode_item(msg.key(), msg.value(), self.limits)
            if isinstance(result, Invalid):
                self.dead_letters.send(msg, result)
            else:
                decoded.append(result)
        if decoded:
            self.catalogue.apply(decoded)
        self.dead_letters.flush()
        self.records += len(msgs)
        return len(msgs)

    def caught_up(self) -> bool:
        """Every partition read to the high watermark of its latest fetch response (the
        list-offsets answer is wrong on the embedded broker: stream/kafka/lag.py)."""
        tps = [TopicPartition(self.topic, tp.partition) for tp in self.partitions]
        for tp in self._consumer.position(tps):
            low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high < 0:
                return False  # no fetch response yet
            position = tp.offset if tp.offset >= 0 else max(low, 0)  # nothing read: the start
            if position < high:
                return False
        return True

    def bootstrap(self, timeout_s: float) -> bool:
        """Read the topic to its end before clicks are processed, as a GlobalKTable does, so a
        restart does not dead-letter clicks on runtime items; bounded by `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(0.1)
            if self.caught_up():
                logger.info(
                    "items topic %s read: %d records, %d runtime items",
                    self.topic,
                    self.records,
                    len(self.catalogue.runtime_items),
                )
                return True
        logger.warning(
            "items topic %s not read to its end in %.0f s; going on", self.topic, timeout_s
        )
        return False

    def close(self) -> None:
        self._consumer.close()
        self.dead_letters.close()


class ItemDeadLetters:
    """Invalid item records to the dead-letter topic, once per record per state directory.

    The follower reads the whole topic on every start; `marker` (a small JSON file) keeps the
    last offset dead-lettered per partition, so a restart does not send them again. Every
    processor instance reads every partition, so with several instances each sends its own
    copy: the headers name the source record (topic, partition, offset) to drop duplicates by.
    """

    def __init__(self, kafka: KafkaSettings, topic: str, marker: Path) -> None:
        self.kafka, self.topic, self.marker = kafka, topic, marker
        self._done: dict[str, int] = {}
        if marker.is_file():
            try:
                self._done = {str(k): int(v) for k, v in json.loads(marker.read_text()).items()}
            except (OSError, ValueError, AttributeError) as exc:
                logger.warning("ignoring unreadable %s: %s", marker, exc)
        self._delivery: DeliveryTracker | None = None
        self._pending: dict[str, int] = {}
        self.sent = 0

    def send(self, msg: Message, invalid: Invalid) -> None:
        _, partition, offset = source_of(msg)
        if offset <= self._done.get(str(partition), -1):
            return  # sent before a restart
        if self._delivery is None:
            # Its own producer: the processor's may be transactional (exactly-once).
            self._delivery = DeliveryTracker(make_producer(self.kafka))
        self._delivery.produce(
            self.topic, msg.key(), msg.value(), dead_letter_headers(msg, invalid)
        )
        self._pending[str(partition)] = offset
        self.sent += 1
        logger.warning("invalid item record %s[%d]@%d: %s", msg.topic(), partition, offset, invalid)

    def flush(self) -> None:
        if self._delivery is None or not self._pending:
            return
        self._delivery.flush(timeout_s=30)
        self._done.update(self._pending)
        self._pending.clear()
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._done), encoding="utf-8")
        os.replace(tmp, self.marker)

    def close(self) -> None:
        if self._delivery is not None:
            self._delivery.producer.flush(10)
