"""The producer API: validated click events, keyed by user, through an idempotent producer.

    with ClickProducer(KafkaSettings(bootstrap_servers="localhost:9092")) as clicks:
        clicks.send("u42", "i0017")            # ts defaults to now (epoch ms)

Events are checked against the click schema v1 before they leave the process (the item
catalogue is the processor's business: unknown items are dead-lettered there).

    with ItemProducer(KafkaSettings(bootstrap_servers="localhost:9092")) as items:
        items.publish("i9001", "Heat (1995)", genres=["Action", "Crime"])   # item schema v1
        items.withdraw("i0042")                                             # a tombstone
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import orjson

from stream.batch import CONTROL_HEADER, FORGET
from stream.codec import ClickEvent, Invalid, ItemRecord, decode_click, decode_item
from stream.config import CodecLimits, KafkaSettings
from stream.errors import InvalidEventError
from stream.kafka.clients import DeliveryTracker, make_producer


class _Anything:
    """A catalogue that contains every item (the producer does not know the bundle)."""

    def __contains__(self, item: object) -> bool:
        return True


class _Producer:
    """An idempotent producer to one topic; leaving `with` waits until all is acknowledged."""

    def __init__(self, kafka: KafkaSettings, topic: str, limits: CodecLimits | None) -> None:
        self.topic = topic
        self.limits = limits or CodecLimits()
        self._delivery = DeliveryTracker(make_producer(kafka))
        self.sent = 0

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything sent is acknowledged; raises DeliveryError otherwise."""
        self._delivery.flush(timeout_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.flush()


class ClickProducer(_Producer):
    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str = "clicks",
        limits: CodecLimits | None = None,
    ) -> None:
        super().__init__(kafka, topic, limits)

    def send(
        self, user_id: str, item_id: str, ts: int | None = None, event_type: str = "click"
    ) -> ClickEvent:
        """Validate and enqueue one event; raises InvalidEventError with the DLQ reason."""
        now = time.time_ns() // 1_000_000
        event = ClickEvent(user_id, item_id, now if ts is None else ts, event_type)
        return self.send_event(event, now_ms=now)

    def send_event(self, event: ClickEvent, now_ms: int | None = None) -> ClickEvent:
        payload = event.to_json()
        key = event.user_id.encode("utf-8") if isinstance(event.user_id, str) else None
        checked = decode_click(
            key,
            payload,
            known_items=_Anything(),
            now_ms=now_ms if now_ms is not None else time.time_ns() // 1_000_000,
            limits=self.limits,
        )
        if isinstance(checked, Invalid):
            raise InvalidEventError(checked.reason, checked.detail)
        self._delivery.produce(self.topic, key, payload)
        self._delivery.producer.poll(0)
        self.sent += 1
        return checked

    def forget(self, user_id: str) -> None:
        """Ask the processor to delete this user's session, changelog entry and latest list.

        A control record on the input topic, keyed by the user: it is handled in order with
        the user's clicks, by whichever process owns their partition.
        """
        if not user_id.strip():
            raise InvalidEventError("empty_field", "user_id")
        key = user_id.encode("utf-8")
        value = orjson.dumps({"user_id": user_id, "ts": time.time_ns() // 1_000_000})
        self._delivery.produce(self.topic, key, value, headers=[(CONTROL_HEADER, FORGET)])
        self._delivery.producer.poll(0)

    def send_raw(self, key: bytes | None, value: bytes | None) -> None:
        """Unvalidated bytes (tests and the demo's malformed-event injection)."""
        self._delivery.produce(self.topic, key, value)
        self._delivery.producer.poll(0)


class ItemProducer(_Producer):
    """Publishes catalogue items (item schema v1), keyed by item id, to the items topic."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str = "items",
        limits: CodecLimits | None = None,
    ) -> None:
        super().__init__(kafka, topic, limits)

    def publish(
        self,
        item_id: str,
        title: str,
        genres: Sequence[str] = (),
        year: int | None = None,
        fields: dict[str, object] | None = None,
    ) -> ItemRecord:
        """Validate and enqueue one item; raises InvalidEventError with the DLQ reason."""
        item = ItemRecord(item_id, title, tuple(genres), year, fields)
        payload = item.to_json()
        key = item_id.encode("utf-8") if isinstance(item_id, str) else None
        checked = decode_item(key, payload, self.limits)
        if isinstance(checked, Invalid):
            raise InvalidEventError(checked.reason, checked.detail, "item")
        assert isinstance(checked, ItemRecord)
        self._send(key, payload)
        return checked

    def withdraw(self, item_id: str) -> None:
        """A tombstone: processors stop recommending the item (compaction then drops it)."""
        if not item_id.strip():
            raise InvalidEventError("empty_field", "item_id", "item")
        self._send(item_id.encode("utf-8"), None)

    def _send(self, key: bytes | None, value: bytes | None) -> None:
        self._delivery.produce(self.topic, key, value)
        self._delivery.producer.poll(0)
        self.sent += 1
