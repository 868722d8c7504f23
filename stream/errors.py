"""Errors raised by stream/.

StreamError
 ├── ConfigError            settings that cannot work (bad address, missing bundle path, ...)
 ├── BrokerError            the embedded broker could not start or stopped answering
 ├── KafkaError             a Kafka operation failed; keeps librdkafka's error code
 │    └── DeliveryError     a produced record was not acknowledged
 ├── StateError             the RocksDB session store cannot be opened or written
 ├── ScoringError           the ONNX session rejected a batch or the bundle does not fit
 └── InvalidEventError      the producer API refused an event or item (carries the DLQ reason)
"""

from __future__ import annotations


class StreamError(Exception):
    """Root of stream/ errors."""


class ConfigError(StreamError):
    """Settings that cannot work."""


class BrokerError(StreamError):
    """The embedded broker could not be started or reached."""


class KafkaError(StreamError):
    """A Kafka operation failed. `code` is librdkafka's error code name when known."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message if code is None else f"{message} [{code}]")
        self.code = code


class DeliveryError(KafkaError):
    """A produced record was not acknowledged by the broker."""


class StateError(StreamError):
    """The session store cannot be used."""


class ScoringError(StreamError):
    """The scorer could not score a batch."""


class InvalidEventError(StreamError):
    """The producer API refused an event; `reason` is the dead-letter reason it would get."""

    def __init__(self, reason: str, detail: str, what: str = "click event") -> None:
        super().__init__(f"invalid {what} ({reason}): {detail}")
        self.reason = reason
