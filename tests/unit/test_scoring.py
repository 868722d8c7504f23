from __future__ import annotations

import numpy as np
import pytest

from export.bundle import window_len
from stream.codec import RecommendedItem, encode_recommendation
from stream.errors import ScoringError
from stream.itemtable import ItemTable
from stream.scoring import (
    isolate_failures,
    left_pad,
    ranked_items,
    session_inputs,
    top_k,
    trimmed,
    width_chunks,
)
from stream.state import Session


def test_left_pad_keeps_the_most_recent_items_last() -> None:
    out = left_pad([[1, 2, 3], [], [4, 5, 6, 7, 8]], 4)
    assert out.tolist() == [[0, 1, 2, 3], [0, 0, 0, 0], [5, 6, 7, 8]]
    assert out.dtype == np.int64


def test_top_k_excludes_padding_and_seen_items_and_sorts() -> None:
    scores = np.array([[9.0, 1.0, 8.0, 3.0, 7.0, 2.0]], dtype=np.float32)
    seen = np.array([[0, 0, 4]], dtype=np.int64)
    best, best_scores = top_k(scores.copy(), seen, 3)
    assert best.tolist() == [[2, 3, 5]]
    assert best_scores.tolist() == [[8.0, 3.0, 2.0]]


def test_top_k_with_fewer_candidates_than_k_pads_with_zero() -> None:
    scores = np.array([[0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    seen = np.array([[1, 2]], dtype=np.int64)
    best, best_scores = top_k(scores.copy(), seen, 3)
    assert best.tolist() == [[3, 0, 0]]
    assert best_scores[0, 0] == 3.0
    assert not np.isfinite(best_scores[0, 1:]).any()


def test_top_k_matches_a_full_sort_on_random_rows() -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((32, 500)).astype(np.float32)
    seen = rng.integers(0, 500, size=(32, 20))
    best, _ = top_k(scores.copy(), seen, 10)
    for row in range(32):
        masked = scores[row].copy()
        masked[seen[row]] = -np.inf
        masked[0] = -np.inf
        assert best[row].tolist() == np.argsort(-masked, kind="stable")[:10].tolist()


def session_of(items: list[str], max_len: int) -> Session:
    s = Session()
    for k, item in enumerate(items):
        s.append(item, ts=k, partition=0, offset=k, max_len=max_len)
    return s


def table(n: int, dim: int = 3) -> ItemTable:
    vectors = np.random.default_rng(0).standard_normal((n + 1, dim)).astype(np.float32)
    return ItemTable(["", *(f"i{k}" for k in range(1, n + 1))], vectors)


def test_session_inputs_follow_the_window_rule_from_the_event_counter() -> None:
    L, stride = 4, 2
    view = table(20).view
    history = [f"i{k}" for k in range(1, 12)]
    for clicks in range(1, len(history) + 1):
        s = session_of(history[:clicks], L)  # the session keeps only the last L items
        inputs = session_inputs([s], view, L, stride)
        w = window_len(clicks, L, stride)
        expected = [int(i[1:]) for i in history[clicks - w : clicks]]
        assert inputs.item_seq[0].tolist() == [0] * (L - w) + expected, clicks
        assert (inputs.lengths[0], inputs.starts[0]) == (w, clicks - w)
        assert sorted(inputs.seen[0][inputs.seen[0] > 0]) == sorted(int(i[1:]) for i in s.items), (
            "every session item is excluded from the top-k"
        )
    # Stride 1 is the last max_len items, as without a step model.
    s = session_of(history, L)
    assert session_inputs([s], view, L, 1).item_seq[0].tolist() == [8, 9, 10, 11]


def test_time_seq_gives_each_window_item_its_own_click_time_in_seconds() -> None:
    items = table(5)
    items.add_items(["new"], np.ones((1, 3), np.float32))
    stamps = {"i1": 1_700_000_000_123, "gone": 1_700_000_060_000, "new": 1_700_000_120_999,
              "i2": 1_700_003_600_500, "i3": 1_700_003_601_000}  # fmt: skip
    s = Session()
    for k, (item, ts) in enumerate(stamps.items()):
        s.append(item, ts=ts, partition=0, offset=k, max_len=10)
    # Runtime and unknown items leave the window and take their times with them.
    inputs = session_inputs([s], items.view, 5, 1, with_time=True)
    assert inputs.item_seq.tolist() == [[0, 0, 1, 2, 3]]
    assert inputs.time_seq is not None and inputs.time_seq.dtype == np.int64
    assert inputs.time_seq.tolist() == [[0, 0, 1_700_000_000, 1_700_003_600, 1_700_003_601]]
    # Without runtime items (the fast path) the times follow the window rule like the items.
    s = Session()
    for k in range(5):
        s.append(f"i{k + 1}", ts=(1_700_000_000 + 60 * k) * 1000, partition=0, offset=k, max_len=10)
    plain = table(5).view
    inputs = session_inputs([s, session_of(["i2"], 10)], plain, 3, 1, with_time=True)
    assert inputs.item_seq.tolist() == [[3, 4, 5], [0, 0, 2]]
    assert inputs.time_seq is not None
    assert inputs.time_seq.tolist() == [[1_700_000_120, 1_700_000_180, 1_700_000_240], [0, 0, 0]]
    assert session_inputs([s], plain, 3, 1).time_seq is None


def test_runtime_and_unknown_items_stay_out_of_the_window_but_runtime_ones_are_seen() -> None:
    items = table(5)
    items.add_items(["new"], np.ones((1, 3), np.float32))
    view = items.view
    s = session_of(["i1", "gone", "new", "i2"], 10)
    inputs = session_inputs([s], view, 4, 2)
    assert inputs.item_seq[0].tolist() == [0, 0, 1, 2]
    assert set(inputs.seen[0].tolist()) == {0, 1, 2, view.index["new"]}


def test_runtime_items_are_scored_out_of_the_graph_and_removed_ones_never_come_back() -> None:
    items = table(4)
    skipped = items.add_items(["i2", "x", "y"], np.array([[0, 0, 0], [1, 0, 0], [0, 2, 0]], "f"))
    assert skipped == 1, "an id of the bundle's catalogue is not a runtime item"
    view = items.view
    assert view.ids[5:] == ("x", "y") and view.index["y"] == 6 and view.width == 7
    hidden = np.array([[1.0, 1.0, 0.0]], np.float32)
    scores = view.extend(np.zeros((1, 5), np.float32), hidden)
    assert scores[0, 5:].tolist() == [1.0, 2.0]
    assert view.vectors.shape == (7, 3)
    items.add_items(["x"], np.array([[5, 0, 0]], "f"))  # a repeated id keeps its index
    items.remove_items(["y", "i1"])
    new = items.view
    assert new.index["x"] == 5 and new.width == 7
    scores = new.extend(np.zeros((1, 5), np.float32), hidden)
    assert scores[0, 5] == 5.0 and scores[0, 6] == -np.inf and scores[0, 1] == -np.inf
    assert view.width == 7 and view.hidden_mask is None, "an old view never changes"


def test_each_runtime_item_keeps_its_own_bias_until_it_is_replaced() -> None:
    items = table(4)
    vectors = np.array([[1, 0, 0], [0, 1, 0]], "f")
    items.add_items(["x", "y"], vectors, np.array([0.5, -1.0], "f"))
    items.add_items(["z"], np.array([[0, 0, 1]], "f"))  # no bias: 0, the others keep theirs
    hidden = np.array([[1.0, 1.0, 1.0]], np.float32)
    view = items.view
    assert view.runtime_scores(hidden).tolist() == [[1.5, 0.0, 1.0]]
    items.add_items(["x"], vectors[:1])  # a replacement carries its own bias (none)
    assert items.view.runtime_scores(hidden).tolist() == [[1.0, 0.0, 1.0]]
    items.add_items(["y"], vectors[1:])
    assert items.view.runtime_bias is None  # no bias left: nothing added per score
    assert view.runtime_scores(hidden).tolist() == [[1.5, 0.0, 1.0]], "an old view never changes"
    with pytest.raises(ScoringError, match="bias"):
        items.add_items(["w"], vectors[:1], np.zeros(2, "f"))


def test_isolate_failures_bisects_to_the_rejected_rows() -> None:
    calls = []

    def call(lo: int, hi: int) -> None:
        calls.append((lo, hi))
        if lo <= 5 < hi:
            raise ScoringError("row 5")

    failed = isolate_failures(call, 16)
    assert list(failed) == [5] and len(calls) < 16
    assert isolate_failures(call, 0) == {}


def test_isolate_failures_calls_at_most_max_rows_rows_and_bisects_within_a_chunk() -> None:
    calls: list[tuple[int, int]] = []
    kept = np.zeros(23, dtype=np.int64)

    def call(lo: int, hi: int) -> None:
        calls.append((lo, hi))
        if lo <= 13 < hi or lo <= 20 < hi:
            raise ScoringError("rejected")
        kept[lo:hi] += 1

    failed = isolate_failures(call, 23, max_rows=8)
    assert sorted(failed) == [13, 20]
    assert max(hi - lo for lo, hi in calls) <= 8
    assert calls[0] == (0, 8), "a chunk without a poison row is one call"
    assert (kept[[13, 20]] == 0).all() and (np.delete(kept, [13, 20]) == 1).all()


def _covers(chunks: list[tuple[int, int]], n: int) -> bool:
    return [lo for lo, _ in chunks] == [0, *(hi for _, hi in chunks[:-1])] and chunks[-1][1] == n


def test_width_chunks_group_rows_of_similar_window_width() -> None:
    widths = np.array([1, 1, 2, 3, 4, 7, 8, 16, 40, 50, 50])
    # Classes: {1, 1}, {2}, {3, 4}, {7, 8}, {16}, {40, 50, 50}; with no call cost nothing merges.
    assert width_chunks(widths, call_cost=0) == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8), (8, 11)]
    # A call costs 32 row-positions: a class joins the previous call while padding that call's
    # rows to the new width costs less (2 rows 1 -> 2: 2; 3 rows 2 -> 4: 6; 5 rows 4 -> 8: 20;
    # 7 rows 8 -> 16: 56 >= 32, a new call; 1 row 16 -> 50: 34 >= 32, a new call).
    assert width_chunks(widths) == [(0, 7), (7, 8), (8, 11)]
    chunks = width_chunks(widths, max_rows=3, call_cost=0)
    assert max(hi - lo for lo, hi in chunks) <= 3 and _covers(chunks, len(widths))
    assert width_chunks(np.array([], dtype=np.int64)) == []
    assert width_chunks(np.array([0, 0, 5])) == [(0, 3)], "empty windows count as one slot"


def test_isolate_failures_calls_the_given_chunks_and_bisects_within_them() -> None:
    calls: list[tuple[int, int]] = []

    def call(lo: int, hi: int) -> None:
        calls.append((lo, hi))
        if lo <= 6 < hi:
            raise ScoringError("row 6")

    failed = isolate_failures(call, 10, max_rows=4, chunks=[(0, 2), (2, 9), (9, 10)])
    assert list(failed) == [6]
    assert calls[:2] == [(0, 2), (2, 9)] and calls[-1] == (9, 10)
    assert all(lo >= 2 and hi <= 9 for lo, hi in calls[2:-1]), "bisection stays in its chunk"


def test_trimmed_drops_only_all_padding_leading_columns() -> None:
    seq = np.array([[0, 0, 0, 5, 6], [0, 0, 2, 3, 4], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(trimmed(seq), seq[:, 2:])
    assert trimmed(np.zeros((2, 4), dtype=np.int64)).shape == (2, 1), "one column at least"
    full = np.arange(1, 7).reshape(2, 3)
    assert trimmed(full).shape == (2, 3)


def test_ranked_items_are_the_wire_form_of_recommended_items() -> None:
    ids = ("", "a", "b", "c", "d")
    best, scores = np.array([3, 1, 0]), np.array([2.5, 1.0, -np.inf], dtype=np.float32)
    want = [RecommendedItem("c", 2.5, 1), RecommendedItem("a", 1.0, 2)]
    assert ranked_items(best, scores, ids) == [i.to_dict() for i in want], "padding dropped"
    explained = ranked_items(best.tolist(), scores.tolist(), ids, [4, 0, 0])
    assert explained == [RecommendedItem("c", 2.5, 1, "d").to_dict(), want[1].to_dict()]
    assert "because" not in explained[1], "no explanation: the optional field is absent"
    record = encode_recommendation(
        user_id="u", items=explained, model_version="v", partition=0, offset=1, event_ts=2,
        generated_ts=3,
    )  # fmt: skip
    same = encode_recommendation(
        user_id="u", items=[RecommendedItem("c", 2.5, 1, "d"), want[1]], model_version="v",
        partition=0, offset=1, event_ts=2, generated_ts=3,
    )  # fmt: skip
    assert record == same
