"""Per-user key/value cache of the incremental path (issue 8): the float16 keys and values of
each user's current window, so a click costs one step.onnx position instead of a re-encode.

Hot path: one preallocated pool (capacity, n_blocks, 2, max_len, D) float16, an LRU of users ->
slots bounded in bytes (`kv_cache_mb`), and per-slot metadata arrays, so a batch's gather and
scatter are single numpy fancy-index operations, never per-user array work.

An entry is valid for steps only when it is exactly the session's window minus its k newest
clicks (`steppable`): same model, same window start (the window did not slide), k positions
shorter, and its newest cached event is the session event just before those k (input
partition and offset: Kafka never reuses them, so a forgotten user, a replay or a restore
that cut events fail the check). Anything else is rebuilt by prefill.onnx; correctness never
depends on the cache.

Persistence (the session store's "kv" column family, no WAL, never in the changelog): an
entry is written when it is evicted from memory, when its partition is revoked, and on close,
only if it changed since it was last written; never per click. A step changes 512 bytes of a
~25 KB entry (d=64, 2 blocks, L=50), so per-click write-through would write 25 KB per event,
or 512 bytes plus a key per event with per-position keys, for data that can be rebuilt; with
write-back an active user costs nothing and a returning user one read instead of a prefill.
Measured on the shared 2-core box (12k entries of ~19 KB): reading one back costs 16-27 µs,
a prefill row 100-300 µs; writing costs ~100 µs an entry (RocksDB flushes at ~190 MB/s here),
so closing with a full 256 MB cache takes 1-2 s. A model swap or a start with another bundle
drops the whole family (kv_reset).
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, OrderedDict
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
HalfArray = npt.NDArray[np.float16]

# start, newest cached offset, partition, cached length, model version length
_HEADER = struct.Struct("<qqqiH")


class KVBacking(Protocol):
    """Where evicted entries go (RocksSessionStore implements it)."""

    def kv_reset(self, model_version: str) -> None: ...

    def kv_get(self, user_ids: list[str]) -> list[bytes | None]: ...

    def kv_write(self, entries: Mapping[str, bytes | None]) -> None: ...


class KVCache:
    """LRU of per-user float16 K/V windows; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        n_blocks: int,
        d_model: int,
        max_len: int,
        model_version: str,
        budget_bytes: int,
        backing: KVBacking | None = None,
    ) -> None:
        self.shape = (n_blocks, 2, max_len, d_model)
        self.max_len = max_len
        self.model_version = model_version
        self._version = model_version.encode("utf-8")
        self.entry_bytes = n_blocks * 2 * max_len * d_model * 2
        self.capacity = max(0, budget_bytes // (self.entry_bytes + 64))
        # np.zeros maps pages lazily: an idle cache costs what its users touched, not the budget.
        self.pool: HalfArray = np.zeros((self.capacity, *self.shape), dtype=np.float16)
        self.start = np.full(self.capacity, -1, dtype=np.int64)  # window's first event number
        self.length = np.zeros(self.capacity, dtype=np.int64)  # cached positions
        self.offset = np.full(self.capacity, -1, dtype=np.int64)  # newest cached event's offset
        self.partition = np.full(self.capacity, -1, dtype=np.int64)
        self.dirty = np.zeros(self.capacity, dtype=np.bool_)  # changed since last written
        self._used = np.zeros(self.capacity, dtype=np.int64)  # batch number of the last use
        self._batch = 0
        self._slots: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._free = list(range(self.capacity - 1, -1, -1))
        self._backing = backing
        self._pending: dict[str, bytes | None] = {}
        self.stats: Counter[str] = Counter()
        if backing is not None:
            backing.kv_reset(model_version)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, user: str) -> bool:
        return user in self._slots

    # -- one batch --------------------------------------------------------------------------
    def lookup(self, users: Sequence[str]) -> IntArray:
        """(B,) slot of each user's entry, -1 when none; misses are looked up in the backing.

        Starts a batch: the slots returned here are not evicted before the next lookup.
        """
        self._batch += 1
        get, touch = self._slots.get, self._slots.move_to_end
        found = [get(u, -1) for u in users]
        for user, slot in zip(users, found, strict=True):
            if slot >= 0:
                touch(user)
        slots = np.array(found, dtype=np.int64)  # (B,)
        self._used[slots[slots >= 0]] = self._batch
        missing = np.flatnonzero(slots < 0)
        self.stats["resident"] += len(users) - len(missing)
        if len(missing) and self._backing is not None and self.capacity:
            self._load(users, missing, slots)
        return slots

    def _load(self, users: Sequence[str], rows: IntArray, slots: IntArray) -> None:
        assert self._backing is not None
        raws = self._backing.kv_get([users[r] for r in rows])
        for row, raw in zip(rows, raws, strict=True):
            entry = None if raw is None else self._decode(raw)
            if entry is None:
                continue
            slot = self._allocate(users[row])
            if slot < 0:
                return
            start, offset, partition, n, kv = entry
            self.pool[slot, :, :, :n] = kv  # (nb, 2, n, D)
            self._set(slot, start, n, offset, partition, dirty=False)
            slots[row] = slot
            self.stats["loaded"] += 1

    def steppable(
        self,
        slots: IntArray,
        starts: IntArray,
        pending: IntArray,
        prev_offsets: IntArray,
        partitions: IntArray,
        max_pending: int,
    ) -> BoolArray:
        """(B,) True where the entry is the window minus its `pending` newest clicks (1..
        max_pending), so step.onnx can append them.

        starts: the window's first event number now (scoring.ModelInputs); pending: window
        length now minus the entry's; prev_offsets: the offset of the session event just before
        the pending ones; partitions: the session's input partition.
        """
        hit = slots >= 0
        if not self.capacity:
            return hit
        s = np.where(hit, slots, 0)  # (B,)
        ok: BoolArray = (
            hit
            & (self.length[s] >= 1)
            & (pending >= 1)
            & (pending <= max_pending)
            & (self.start[s] == starts)
            & (self.offset[s] == prev_offsets)
            & (self.partition[s] == partitions)
        )
        return ok

    def gather(self, slots: IntArray, width: int) -> HalfArray:
        """(B, nb, 2, width, D) contiguous copy of these slots' first `width` positions."""
        return self.pool[slots, :, :, :width]  # fancy index on axis 0: one C-contiguous copy

    def append(self, slots: IntArray, new_kv: HalfArray, offsets: IntArray) -> None:
        """After a step: new_kv (B, nb, 2, D) goes to each slot's next position."""
        positions = self.length[slots]  # (B,)
        self.pool[slots, :, :, positions] = new_kv  # (B, nb, 2, D)
        self.length[slots] = positions + 1
        self.offset[slots] = offsets
        self.dirty[slots] = True

    def put(
        self,
        users: Sequence[str],
        kv: HalfArray,
        lengths: IntArray,
        starts: IntArray,
        offsets: IntArray,
        partitions: IntArray,
    ) -> None:
        """After a prefill: kv (b, nb, 2, W, D) aligned with the left-padded item_seq (W <=
        max_len; the real positions are the last `lengths` slots) becomes each user's entry,
        right-padded."""
        take = [
            self._allocate(u) if n else self._forget(u) for u, n in zip(users, lengths, strict=True)
        ]
        slots = np.array(take, dtype=np.int64)  # (b,)
        L = kv.shape[3]
        for row in np.flatnonzero(slots >= 0).tolist():
            slot, n = int(slots[row]), int(lengths[row])
            # Right-padded: position t is item_seq slot L - n + t. (One slice copy per row:
            # take_along_axis over the batch builds index arrays of kv's size: ~40× slower.)
            self.pool[slot, :, :, :n] = kv[row, :, :, L - n :]
            self._set(slot, starts[row], n, offsets[row], partitions[row], dirty=True)

    def _set(
        self, slot: int, start: int, n: int, offset: int, partition: int, *, dirty: bool
    ) -> None:
        self.start[slot], self.length[slot] = start, n
        self.offset[slot], self.partition[slot] = offset, partition
        self.dirty[slot] = dirty

    # -- membership -------------------------------------------------------------------------
    def _allocate(self, user: str) -> int:
        """The user's slot (a new one, or theirs), evicting the least recently used user; -1 when
        every slot is in use by this batch (batch larger than the cache)."""
        slot = self._slots.get(user)
        if slot is not None:
            return slot
        if self._free:
            slot = self._free.pop()
        else:
            if not self._slots:
                return -1
            victim, slot = next(iter(self._slots.items()))
            if self._used[slot] == self._batch:
                return -1
            if self.dirty[slot]:
                self._pending[victim] = self._encode(slot)
            del self._slots[victim]
            self.stats["evicted"] += 1
        self._slots[user] = slot
        self._used[slot] = self._batch
        return slot

    def _forget(self, user: str) -> int:
        slot = self._slots.pop(user, None)
        if slot is not None:
            self._free.append(slot)
            self.dirty[slot] = False
        return -1

    def drop(self, users: Collection[str]) -> None:
        """Remove these users' entries from memory and from the backing (a forgotten user's
        derived data goes too; a row that failed scoring is rebuilt next time)."""
        for user in users:
            self._forget(user)
            if self._backing is not None:
                self._pending[user] = None
        self.write_back()

    def release(self, partitions: Collection[int]) -> None:
        """Revoked partitions: write their changed entries back and free their memory."""
        wanted = set(partitions)
        gone = [(u, s) for u, s in self._slots.items() if int(self.partition[s]) in wanted]
        for user, slot in gone:
            if self.dirty[slot]:
                self._pending[user] = self._encode(slot)
            self._forget(user)
        self.write_back()

    def flush(self) -> None:
        """Write every changed entry back (on close); entries stay in memory."""
        for user, slot in self._slots.items():
            if self.dirty[slot]:
                self._pending[user] = self._encode(slot)
                self.dirty[slot] = False
        self.write_back()

    def write_back(self) -> None:
        """Pending writes (evictions, deletes) in one WriteBatch; once per batch."""
        if not self._pending:
            return
        if self._backing is not None:
            self.stats["written"] += sum(1 for v in self._pending.values() if v is not None)
            self.stats["written_bytes"] += sum(len(v) for v in self._pending.values() if v)
            self._backing.kv_write(self._pending)
        self._pending = {}

    # -- encoding -------------------------------------------------------------------------
    def _encode(self, slot: int) -> bytes:
        n = int(self.length[slot])
        header = _HEADER.pack(
            int(self.start[slot]), int(self.offset[slot]), int(self.partition[slot]), n,
            len(self._version),
        )  # fmt: skip
        return header + self._version + self.pool[slot, :, :, :n].tobytes()

    def _decode(self, raw: bytes) -> tuple[int, int, int, int, HalfArray] | None:
        """An entry of this model, or None (another version, a truncated or foreign value)."""
        if len(raw) < _HEADER.size:
            return None
        start, offset, partition, n, vlen = _HEADER.unpack_from(raw)
        body = _HEADER.size + vlen
        nb, two, L, d = self.shape
        if raw[_HEADER.size : body] != self._version or not 1 <= n <= L:
            return None
        if len(raw) - body != nb * two * n * d * 2:
            return None
        kv = np.frombuffer(raw, dtype=np.float16, offset=body).reshape(nb, two, n, d)
        return start, offset, partition, n, kv
