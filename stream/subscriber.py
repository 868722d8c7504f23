"""A small client for downstream teams: follow the `recs` topic, keep each user's latest list.

    with RecsSubscriber(KafkaSettings(bootstrap_servers="broker:9092")) as recs:
        recs.poll(5.0)
        rec = recs.latest("u0042")  # Recommendation | None

Without a group (the default) it reads every partition from the beginning and joins no consumer
group: the topic is compacted and keyed by user, so this bootstraps every user's latest list and
then follows it; each instance holds the whole topic. With a group it subscribes and commits
what it has applied, so a restart resumes where it stopped: `latest()` then knows only the users
seen since, and only those in the partitions assigned to this member (a revoked partition's users
are dropped, because another member now follows them).

Each record is validated against schema v1 (stream/schemas/recommendation.v1.json) in code: the
serving path stays free of jsonschema, and tests/unit/test_schema_agreement.py keeps the two in
agreement. Invalid records are counted by reason and skipped; nothing a producer writes makes
this raise. Delivery upstream is at-least-once, so a user's list may arrive twice or, after a
replay, an older list may arrive after a newer one: a record is applied only when its source
(`partition`, `offset`) is newer than the one held for that user. A tombstone (null value)
deletes the user.

Reads (`latest`, `users`, `invalid`, ...) take a lock and may come from any thread, e.g. an HTTP
server's; `poll`, `run_forever` and `close` must come from one thread at a time (librdkafka
consumers are not meant to be closed while another thread polls them).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import orjson
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

from stream.codec import SCHEMA_VERSION, RecommendedItem
from stream.config import KafkaSettings
from stream.errors import KafkaError
from stream.kafka.admin import partition_count
from stream.kafka.clients import ClosingContext, commit_offsets, make_consumer

logger = logging.getLogger(__name__)

InvalidReason = Literal[
    "not_json",  # also: not UTF-8
    "not_object",
    "missing_field",
    "wrong_type",
    "unsupported_version",  # schema_version is not 1 (a breaking change belongs on a new topic)
    "empty_field",
    "out_of_range",
    "rank_sequence",  # ranks are not 1..n in order: beyond what JSON Schema can express
    "key_mismatch",  # the record key is not the user id, so compaction would keep stale lists
    "bad_key",  # a tombstone without a (UTF-8) key deletes nobody
]
INVALID_REASONS: Final[tuple[str, ...]] = get_args(InvalidReason)
REQUIRED_FIELDS: Final = (
    "schema_version",
    "user_id",
    "items",
    "model_version",
    "partition",
    "offset",
    "event_ts",
    "generated_ts",
)
ITEM_FIELDS: Final = ("item_id", "score", "rank")  # required; "because" is optional
_BATCH_MAX: Final = 500


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One user's list, as published (schema v1). Unknown extra fields are not kept."""

    user_id: str
    items: tuple[RecommendedItem, ...]
    model_version: str
    partition: int  # source (clicks) partition of the last click applied
    offset: int  # its offset: with partition, the dedup key
    event_ts: int
    generated_ts: int

    def as_dict(self) -> dict[str, Any]:
        """The v1 record shape (JSON-ready)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "user_id": self.user_id,
            "items": [i.to_dict() for i in self.items],
            "model_version": self.model_version,
            "partition": self.partition,
            "offset": self.offset,
            "event_ts": self.event_ts,
            "generated_ts": self.generated_ts,
        }


@dataclass(frozen=True, slots=True)
class InvalidRecommendation:
    reason: InvalidReason
    detail: str


def _as_int(value: object) -> int | None:
    # JSON has one number type: JSON Schema's "integer" accepts 3.0, and bool is no integer.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _as_number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _validate_items(raw: object) -> tuple[RecommendedItem, ...] | InvalidRecommendation:
    if not isinstance(raw, list):
        return InvalidRecommendation("wrong_type", "items must be an array")
    items: list[RecommendedItem] = []
    for n, entry in enumerate(raw):
        if not isinstance(entry, dict):
            return InvalidRecommendation("wrong_type", f"items[{n}] must be an object")
        for name in ITEM_FIELDS:
            if name not in entry:
                return InvalidRecommendation("missing_field", f"items[{n}].{name}")
        item_id, score, rank = entry["item_id"], _as_number(entry["score"]), _as_int(entry["rank"])
        if not isinstance(item_id, str):
            return InvalidRecommendation("wrong_type", f"items[{n}].item_id must be a string")
        if score is None:
            return InvalidRecommendation("wrong_type", f"items[{n}].score must be a number")
        if rank is None:
            return InvalidRecommendation("wrong_type", f"items[{n}].rank must be an integer")
        if rank < 1:
            return InvalidRecommendation("out_of_range", f"items[{n}].rank is {rank}")
        because = entry.get("because")
        if "because" in entry and not isinstance(because, str):  # absent is fine, null is not
            return InvalidRecommendation("wrong_type", f"items[{n}].because must be a string")
        if because == "":
            return InvalidRecommendation("empty_field", f"items[{n}].because")
        items.append(RecommendedItem(item_id, score, rank, because))
    # Consumers show the list in rank order; a gap or a swap means a broken producer.
    if [i.rank for i in items] != list(range(1, len(items) + 1)):
        return InvalidRecommendation("rank_sequence", "ranks are not 1..n in order")
    return tuple(items)


def validate_recommendation(raw: object) -> Recommendation | InvalidRecommendation:
    """Check a parsed record against schema v1 (plus the rank sequence). Never raises."""
    if not isinstance(raw, dict):
        return InvalidRecommendation("not_object", f"top level is {type(raw).__name__}")
    for name in REQUIRED_FIELDS:
        if name not in raw:
            return InvalidRecommendation("missing_field", name)
    if _as_int(raw["schema_version"]) != SCHEMA_VERSION:
        return InvalidRecommendation(
            "unsupported_version", f"schema_version {raw['schema_version']!r:.20}"
        )
    user_id, model_version = raw["user_id"], raw["model_version"]
    if not isinstance(user_id, str):
        return InvalidRecommendation("wrong_type", "user_id must be a string")
    if not user_id:
        return InvalidRecommendation("empty_field", "user_id")
    if not isinstance(model_version, str):
        return InvalidRecommendation("wrong_type", "model_version must be a string")
    ints: dict[str, int] = {}
    for name in ("partition", "offset", "event_ts", "generated_ts"):
        value = _as_int(raw[name])
        if value is None:
            return InvalidRecommendation("wrong_type", f"{name} must be an integer")
        ints[name] = value
    for name in ("partition", "offset"):
        if ints[name] < 0:
            return InvalidRecommendation("out_of_range", f"{name} is {ints[name]}")
    items = _validate_items(raw["items"])
    if isinstance(items, InvalidRecommendation):
        return items
    return Recommendation(
        user_id=user_id,
        items=items,
        model_version=model_version,
        partition=ints["partition"],
        offset=ints["offset"],
        event_ts=ints["event_ts"],
        generated_ts=ints["generated_ts"],
    )


def parse_recommendation(value: bytes) -> Recommendation | InvalidRecommendation:
    """Decode and validate one record value. Never raises."""
    try:
        raw = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return InvalidRecommendation("not_json", str(exc)[:200])
    return validate_recommendation(raw)


@dataclass(frozen=True, slots=True)
class _Entry:
    rec: Recommendation
    topic_partition: int  # where it was read (recs), for dropping users on a revoke


class RecsSubscriber(ClosingContext):
    """Follows the recommendations topic and keeps each user's latest valid list in memory."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str = "recs",
        group: str | None = None,
        from_beginning: bool = True,
    ) -> None:
        self.topic = topic
        self.group = group
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._latest: dict[str, _Entry] = {}
        # (partition, offset) of deleted users: a redelivered older list must not resurrect them.
        self._deleted: dict[str, tuple[int, int]] = {}
        self._invalid: Counter[str] = Counter()
        self._applied = 0
        self._duplicates = 0
        self._closed = False
        if group is None:
            # Before the consumer exists, so a missing topic leaves nothing to close.
            n = partition_count(kafka, topic)
            # librdkafka insists on a group.id; assign() never joins it and nothing is committed.
            self._consumer: Consumer = make_consumer(
                kafka, f"streamrec-subscriber-{uuid.uuid4().hex[:12]}"
            )
            start = OFFSET_BEGINNING if from_beginning else OFFSET_END
            self._consumer.assign([TopicPartition(topic, p, start) for p in range(n)])
        else:
            reset = "earliest" if from_beginning else "latest"
            self._consumer = make_consumer(kafka, group, **{"auto.offset.reset": reset})
            self._consumer.subscribe([topic], on_revoke=self._on_revoke, on_lost=self._on_revoke)
        logger.info(
            "subscribed to %s (%s)",
            topic,
            f"group {group}" if group else "all partitions, no group",
        )

    # -- reads: any thread ------------------------------------------------------------------

    def latest(self, user_id: str) -> Recommendation | None:
        with self._lock:
            entry = self._latest.get(user_id)
        return entry.rec if entry is not None else None

    def users(self) -> int:
        with self._lock:
            return len(self._latest)

    @property
    def invalid(self) -> Counter[str]:
        """Skipped invalid records by reason (a copy: safe to read while another thread polls)."""
        with self._lock:
            return Counter(self._invalid)

    @property
    def applied(self) -> int:
        """Records applied so far: lists stored and tombstones."""
        with self._lock:
            return self._applied

    @property
    def duplicates(self) -> int:
        """Valid records skipped because a newer list (by source offset) was already held."""
        with self._lock:
            return self._duplicates

    # -- the polling thread -----------------------------------------------------------------

    def poll(self, timeout_s: float = 1.0) -> int:
        """Read what is available (waiting up to `timeout_s`), apply it; returns records applied."""
        if self._closed:
            return 0
        msgs = self._consumer.consume(_BATCH_MAX, timeout=timeout_s)
        applied = 0
        next_offsets: dict[tuple[str, int], int] = {}
        with self._lock:
            for msg in msgs:
                err, partition, offset = msg.error(), msg.partition(), msg.offset()
                if err is not None or partition is None or offset is None:
                    # Transport-level trouble (librdkafka retries by itself), not a bad record.
                    logger.warning("%s: consumer error: %s", self.topic, err)
                    continue
                applied += self._apply(msg.key(), msg.value(), partition)
                next_offsets[(self.topic, partition)] = offset + 1
            self._applied += applied
        if self.group is not None and next_offsets:
            try:
                commit_offsets(self._consumer, next_offsets)
            except KafkaError as exc:
                # The next batch's commit covers these offsets; at worst they are re-read.
                logger.warning("%s: %s", self.topic, exc)
        return applied

    def run_forever(self, stop: Callable[[], bool], poll_timeout_s: float = 0.2) -> None:
        """Poll until `stop()` is true; it is checked at least every `poll_timeout_s`."""
        while not self._closed and not stop():
            self.poll(poll_timeout_s)

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            # Leaves the group at once (if any): a member that just vanishes stalls the next join.
            self._consumer.close()

    # -- internals (called with the lock held) ----------------------------------------------

    def _apply(self, key: bytes | None, value: bytes | None, topic_partition: int) -> int:
        if value is None:
            return self._delete(key)
        parsed = parse_recommendation(value)
        if isinstance(parsed, InvalidRecommendation):
            return self._skip(parsed)
        if key is not None and key != parsed.user_id.encode("utf-8"):
            return self._skip(InvalidRecommendation("key_mismatch", "key differs from user_id"))
        user = parsed.user_id
        held = self._latest.get(user)
        marker = (
            (held.rec.partition, held.rec.offset) if held is not None else self._deleted.get(user)
        )
        # One user's clicks share one source partition, so offsets order them. A different
        # partition means the input was repartitioned: then arrival order is all there is.
        if marker is not None and marker[0] == parsed.partition and parsed.offset <= marker[1]:
            self._duplicates += 1
            return 0
        self._latest[user] = _Entry(parsed, topic_partition)
        self._deleted.pop(user, None)
        return 1

    def _delete(self, key: bytes | None) -> int:
        try:
            user = key.decode("utf-8") if key is not None else None
        except UnicodeDecodeError:
            user = None
        if user is None:
            return self._skip(InvalidRecommendation("bad_key", "tombstone without a UTF-8 key"))
        held = self._latest.pop(user, None)
        if held is not None:
            self._deleted[user] = (held.rec.partition, held.rec.offset)
        return 1

    def _skip(self, invalid: InvalidRecommendation) -> int:
        self._invalid[invalid.reason] += 1
        # The first of each reason is worth a warning; a broken producer would flood the log.
        level = logging.WARNING if self._invalid[invalid.reason] == 1 else logging.DEBUG
        logger.log(
            level, "%s: skipped invalid record (%s): %s", self.topic, invalid.reason, invalid.detail
        )
        return 0

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions if tp.topic == self.topic}
        with self._lock:
            gone = [u for u, e in self._latest.items() if e.topic_partition in revoked]
            for user in gone:
                del self._latest[user]
                self._deleted.pop(user, None)
        if gone:
            logger.info(
                "%s: partitions %s revoked; dropped %d users", self.topic, revoked, len(gone)
            )
