from __future__ import annotations

from pathlib import Path

import pytest

from stream.errors import StateError
from stream.state import RocksSessionStore, Session


def test_session_window_keeps_the_last_max_len_and_counts_everything() -> None:
    s = Session()
    for k in range(7):
        s.append(f"i{k}", 100 + k, partition=2, offset=10 + k, max_len=3)
    assert s.items == ["i4", "i5", "i6"]
    assert s.ts == [104, 105, 106]
    assert (s.count, s.partition, s.offset) == (7, 2, 16)
    assert Session.from_bytes(s.to_bytes()) == s


def test_store_round_trip_and_applied_offsets_survive_reopen(tmp_path: Path) -> None:
    store = RocksSessionStore(tmp_path)
    s = Session()
    s.append("i1", 1, 0, 5, 10)
    store.write({"ü-ser": s}, {("clicks", 0): 5, ("clicks", 3): 9})
    store.close()
    store = RocksSessionStore(tmp_path)
    try:
        assert store.get("ü-ser") == s
        assert store.get("nobody") is None
        assert store.applied_offset("clicks", 0) == 5
        assert store.applied_offset("clicks", 3) == 9
        assert store.applied_offset("clicks", 1) == -1
        assert [u for u, _ in store.iter_sessions()] == ["ü-ser"]
    finally:
        store.close()


def test_a_second_process_on_the_same_state_dir_gets_a_clear_error(tmp_path: Path) -> None:
    store = RocksSessionStore(tmp_path)
    try:
        with pytest.raises(StateError, match="another processor"):
            RocksSessionStore(tmp_path)
    finally:
        store.close()
