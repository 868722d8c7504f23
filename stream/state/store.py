"""Session state in RocksDB (rocksdict, raw bytes).

Keys:
    b"s/" + user_id                 -> the user's session (orjson): last `max_len` item ids and
                                       timestamps, total event count, source (partition, offset)
                                       of the last event applied
    b"o/" + topic + b"/" + partition -> the last input offset applied to this store

Sessions and the applied-offset markers of one batch go into one WriteBatch, so after a crash
the store is either before or after the whole batch. Events at or below a partition's marker
were already applied: a replay (at-least-once delivery) is recognised and not appended twice.

The column family "kv" holds the incremental-inference cache (stream.kvcache), which can always
be rebuilt from the session: b"u/" + user_id -> one encoded entry, b"m/version" -> the model
version of every entry. It is written without the WAL and never goes to the changelog.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import orjson
from rocksdict import Rdict, WriteBatch, WriteOptions

from stream.config import RocksOptions
from stream.errors import StateError

_SESSION = b"s/"
_OFFSET = b"o/"
_KV_FAMILY = "kv"
_KV_USER = b"u/"
_KV_VERSION = b"m/version"


@dataclass(slots=True)
class Session:
    items: list[str] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    # Input offset of each event in the window (all from the user's one input partition):
    # restoring from the changelog drops the events whose offsets were never committed.
    offsets: list[int] = field(default_factory=list)
    count: int = 0  # events ever applied, including those that slid out of the window
    partition: int = -1
    offset: int = -1

    def append(self, item_id: str, ts: int, partition: int, offset: int, max_len: int) -> None:
        self.items.append(item_id)
        self.ts.append(ts)
        self.offsets.append(offset)
        if len(self.items) > max_len:
            cut = len(self.items) - max_len
            del self.items[:cut], self.ts[:cut], self.offsets[:cut]
        self.count += 1
        self.partition = partition
        self.offset = offset

    def truncate_before(self, offset: int) -> int:
        """Drop the events at input offset >= `offset` (never committed); returns how many."""
        keep = sum(1 for o in self.offsets if o < offset)
        dropped = len(self.offsets) - keep
        if dropped:
            del self.items[keep:], self.ts[keep:], self.offsets[keep:]
            self.count -= dropped
            self.offset = self.offsets[-1] if self.offsets else -1
        return dropped

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "i": self.items,
                "t": self.ts,
                "f": self.offsets,
                "n": self.count,
                "p": self.partition,
                "o": self.offset,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Session:
        body = orjson.loads(raw)
        return cls(body["i"], body["t"], body["f"], body["n"], body["p"], body["o"])


class SessionStore(Protocol):
    def get(self, user_id: str) -> Session | None: ...

    def applied_offset(self, topic: str, partition: int) -> int: ...

    def write(
        self,
        sessions: Mapping[str, Session | bytes | None],
        applied: Mapping[tuple[str, int], int],
    ) -> None: ...

    def approx_sessions(self) -> int: ...

    def close(self) -> None: ...


def _offset_key(topic: str, partition: int) -> bytes:
    return _OFFSET + f"{topic}/{partition}".encode()


class RocksSessionStore:
    """SessionStore on a local RocksDB directory."""

    def __init__(self, path: Path, options: RocksOptions | None = None) -> None:
        self.path = Path(path)
        self._options = options or RocksOptions()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._db = Rdict(str(self.path), self._options.to_options())
            self._kv_family: Rdict | None = None
        except Exception as exc:  # rocksdict raises plain Exception for lock/IO errors
            raise StateError(
                f"cannot open the session store at {self.path}: {exc} "
                "(is another processor using this --state-dir?)"
            ) from exc

    def get(self, user_id: str) -> Session | None:
        raw = self._db.get(_SESSION + user_id.encode("utf-8"))
        return None if raw is None else Session.from_bytes(raw)

    def applied_offset(self, topic: str, partition: int) -> int:
        raw = self._db.get(_offset_key(topic, partition))
        return -1 if raw is None else int(raw)

    def write(
        self,
        sessions: Mapping[str, Session | bytes | None],
        applied: Mapping[tuple[str, int], int],
    ) -> None:
        """Sessions (None deletes one; bytes are an encoded session) and the applied-offset
        markers, in one WriteBatch."""
        batch = WriteBatch(raw_mode=True)
        for user_id, session in sessions.items():
            key = _SESSION + user_id.encode("utf-8")
            if session is None:
                batch.delete(key)
            else:
                batch.put(key, session if isinstance(session, bytes) else session.to_bytes())
        for (topic, partition), offset in applied.items():
            batch.put(_offset_key(topic, partition), str(offset).encode())
        try:
            self._db.write(batch)
        except Exception as exc:
            raise StateError(f"session store write failed: {exc}") from exc

    def approx_sessions(self) -> int:
        value = self._db.property_int_value("rocksdb.estimate-num-keys")
        return int(value or 0)

    def iter_sessions(self) -> list[tuple[str, Session]]:
        """Every stored session (tests, tools); not for the hot path."""
        out = []
        for key, value in self._db.items(from_key=_SESSION):
            assert isinstance(key, bytes) and isinstance(value, bytes)  # raw mode
            if not key.startswith(_SESSION):
                break
            out.append((key[len(_SESSION) :].decode("utf-8"), Session.from_bytes(value)))
        return out

    # -- the incremental-inference cache (KVBacking) ---------------------------------------
    def _kv(self) -> Rdict:
        if self._kv_family is None:
            try:
                family = self._db.get_column_family(_KV_FAMILY)
            except Exception:  # rocksdict: plain Exception when the family does not exist
                family = self._db.create_column_family(_KV_FAMILY, self._options.to_options())
            no_wal = WriteOptions()
            # Derived data: a crash loses recent entries, never the truth. (A property at run
            # time; the stub calls it a method.)
            no_wal.disable_wal = True  # type: ignore[method-assign,assignment]
            family.set_write_options(no_wal)
            self._kv_family = family
        return self._kv_family

    def kv_reset(self, model_version: str) -> None:
        """Keep the cache only if it was written for `model_version`; else drop it whole."""
        version = model_version.encode("utf-8")
        if self._kv().get(_KV_VERSION) == version:
            return
        self._kv().close()
        self._kv_family = None
        try:
            self._db.drop_column_family(_KV_FAMILY)
        except Exception as exc:
            raise StateError(f"cannot drop the kv cache column family: {exc}") from exc
        self._kv()[_KV_VERSION] = version

    def kv_get(self, user_ids: list[str]) -> list[bytes | None]:
        raw = self._kv().get([_KV_USER + u.encode("utf-8") for u in user_ids])
        return list(raw or [])

    def kv_write(self, entries: Mapping[str, bytes | None]) -> None:
        """Cache entries (None deletes one), in one WriteBatch."""
        batch = WriteBatch(raw_mode=True)
        batch.set_default_column_family(self._db.get_column_family_handle(_KV_FAMILY))
        for user_id, entry in entries.items():
            key = _KV_USER + user_id.encode("utf-8")
            if entry is None:
                batch.delete(key)
            else:
                batch.put(key, entry)
        try:
            self._kv().write(batch)
        except Exception as exc:
            raise StateError(f"kv cache write failed: {exc}") from exc

    def flush(self) -> None:
        self._db.flush()

    def close(self) -> None:
        if self._kv_family is not None:
            self._kv_family.close()  # a family handle left open keeps the DB's lock
            self._kv_family = None
        self._db.close()
