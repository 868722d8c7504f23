"""The incremental path's K/V cache: LRU bound, validity rules, RocksDB write-back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream.kvcache import KVCache
from stream.state import RocksSessionStore

NB, D, L = 2, 4, 5
ENTRY = NB * 2 * L * D * 2 + 64  # what one user costs against the budget


def cache_for(users: int, store: RocksSessionStore | None = None, version: str = "v1") -> KVCache:
    return KVCache(
        n_blocks=NB, d_model=D, max_len=L, model_version=version,
        budget_bytes=users * ENTRY, backing=store,
    )  # fmt: skip


def prefill_kv(rows: int, seed: int) -> np.ndarray:
    """(rows, nb, 2, L, D) as prefill.onnx returns it: aligned with a left-padded window."""
    return np.random.default_rng(seed).standard_normal((rows, NB, 2, L, D)).astype(np.float16)


def put(cache: KVCache, users: list[str], kv: np.ndarray, lengths: list[int]) -> None:
    n = len(users)
    cache.put(
        users, kv, np.array(lengths), np.zeros(n, np.int64), np.arange(100, 100 + n),
        np.zeros(n, np.int64),
    )  # fmt: skip


def steppable(cache: KVCache, slots: np.ndarray, **kw: list[int]) -> list[bool]:
    """cache.steppable with one new click and the entries `put` made (start 0, offset 100),
    unless the keywords say otherwise; max 3 clicks to catch up."""
    n = len(slots)
    args = {"starts": [0] * n, "pending": [1] * n, "prev": [100] * n, "parts": [0] * n, **kw}
    names = ("starts", "pending", "prev", "parts")
    return cache.steppable(slots, *(np.array(args[k], dtype=np.int64) for k in names), 3).tolist()


def test_prefill_output_is_stored_right_padded_and_steps_append_at_the_next_position() -> None:
    cache = cache_for(4)
    kv = prefill_kv(2, seed=0)
    assert cache.lookup(["a", "b"]).tolist() == [-1, -1]
    put(cache, ["a", "b"], kv, [2, 5])
    slots = cache.lookup(["a", "b"])
    past = cache.gather(slots, 5)  # (2, nb, 2, P, D)
    assert past.shape == (2, NB, 2, 5, D) and past.flags.c_contiguous
    np.testing.assert_array_equal(past[0, :, :, :2], kv[0, :, :, L - 2 :])
    np.testing.assert_array_equal(past[1], kv[1])
    new = np.full((1, NB, 2, D), 7, dtype=np.float16)
    cache.append(slots[:1], new, np.array([101]))
    assert cache.length[slots[0]] == 3 and cache.offset[slots[0]] == 101
    np.testing.assert_array_equal(cache.gather(slots[:1], 3)[0, :, :, 2], new[0])


def test_an_entry_steps_only_when_it_is_the_window_minus_the_newest_click() -> None:
    cache = cache_for(4)
    put(cache, ["a"], prefill_kv(1, seed=1), [3])  # start 0, 3 positions, newest offset 100
    slots = cache.lookup(["a"])
    assert steppable(cache, slots) == [True]
    assert steppable(cache, slots, pending=[3]) == [True], "three clicks: three step waves"
    assert steppable(cache, slots, pending=[4]) == [False], "more than max: prefill"
    assert steppable(cache, slots, pending=[0]) == [False], "a replay: nothing new"
    assert steppable(cache, slots, starts=[3]) == [False], "the window slid"
    assert steppable(cache, slots, prev=[99]) == [False], "another history"
    assert steppable(cache, slots, parts=[1]) == [False], "another partition"
    assert steppable(cache, np.array([-1])) == [False]


def test_the_lru_is_bounded_in_bytes_and_never_evicts_a_user_of_the_current_batch() -> None:
    cache = cache_for(3)
    assert cache.capacity == 3
    for user in ("a", "b", "c"):
        cache.lookup([user])
        put(cache, [user], prefill_kv(1, seed=2), [2])
    cache.lookup(["a"])  # a is now the most recent: b goes first
    cache.lookup(["d"])
    put(cache, ["d"], prefill_kv(1, seed=3), [2])
    assert len(cache) == 3 and "b" not in cache and {"a", "c", "d"} <= {*cache._slots}
    assert cache.stats["evicted"] == 1
    # A batch of four users in a cache of three: the fourth is not cached, nobody is evicted.
    batch = ["a", "c", "d", "e"]
    cache.lookup(batch)
    put(cache, batch, prefill_kv(4, seed=4), [2, 2, 2, 2])
    assert "e" not in cache and {"a", "c", "d"} <= {*cache._slots}


def test_a_cache_with_no_budget_caches_nothing() -> None:
    cache = cache_for(0)
    slots = cache.lookup(["a"])
    put(cache, ["a"], prefill_kv(1, seed=5), [2])
    assert len(cache) == 0 and steppable(cache, slots) == [False]


def test_evicted_entries_go_to_rocksdb_and_come_back(tmp_path: Path) -> None:
    store = RocksSessionStore(tmp_path)
    try:
        cache = cache_for(1, store)
        kv = prefill_kv(1, seed=6)
        cache.lookup(["a"])
        put(cache, ["a"], kv, [3])
        cache.lookup(["b"])
        put(cache, ["b"], prefill_kv(1, seed=7), [2])  # evicts a, written back
        cache.write_back()
        assert cache.stats["written"] == 1 and "a" not in cache
        slots = cache.lookup(["a"])  # loaded from RocksDB (evicting b, also written)
        assert cache.stats["loaded"] == 1 and slots[0] >= 0
        np.testing.assert_array_equal(cache.gather(slots, 3)[0, :, :, :3], kv[0, :, :, L - 3 :])
        assert steppable(cache, slots) == [True]
    finally:
        store.close()


def test_entries_survive_a_restart_and_a_new_model_version_drops_them(tmp_path: Path) -> None:
    kv = prefill_kv(2, seed=8)
    store = RocksSessionStore(tmp_path)
    cache = cache_for(4, store)
    cache.lookup(["a", "b"])
    put(cache, ["a", "b"], kv, [2, 4])
    cache.flush()  # on close
    store.close()

    store = RocksSessionStore(tmp_path)
    try:
        again = cache_for(4, store)
        slots = again.lookup(["a", "b"])
        assert again.length[slots].tolist() == [2, 4]
        np.testing.assert_array_equal(again.gather(slots, 4)[1, :, :, :4], kv[1, :, :, 1:])
        other = cache_for(4, store, version="v2")  # a model swap: the old entries are useless
        assert other.lookup(["a", "b"]).tolist() == [-1, -1]
        assert store.kv_get(["a", "b"]) == [None, None]
    finally:
        store.close()


def test_drop_deletes_from_memory_and_rocksdb_and_release_frees_a_partition(
    tmp_path: Path,
) -> None:
    store = RocksSessionStore(tmp_path)
    try:
        cache = cache_for(4, store)
        cache.lookup(["a", "b", "c"])
        cache.put(
            ["a", "b", "c"], prefill_kv(3, seed=9), np.array([2, 2, 2]), np.zeros(3, np.int64),
            np.array([1, 2, 3]), np.array([0, 1, 1]),
        )  # fmt: skip
        cache.flush()
        cache.drop(["a"])  # forget: its derived data goes too
        assert "a" not in cache and store.kv_get(["a"]) == [None]
        cache.lookup(["b"])
        cache.append(cache.lookup(["b"]), np.zeros((1, NB, 2, D), np.float16), np.array([4]))
        cache.release({1})  # partition 1 revoked: b (changed) written back, both freed
        assert len(cache) == 0
        raw_b, raw_c = store.kv_get(["b", "c"])
        assert raw_b is not None and raw_c is not None
        assert cache._decode(raw_b) is not None and cache._decode(raw_b)[3] == 3  # type: ignore[index]
    finally:
        store.close()


@pytest.mark.parametrize("raw", [b"", b"\x00" * 10, b"x" * 200])
def test_a_foreign_or_truncated_value_is_ignored(raw: bytes) -> None:
    assert cache_for(1)._decode(raw) is None
