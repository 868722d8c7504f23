"""The processor's score step in chunks, the model one chunk ahead on a second thread
(stream.recommend.recommend with an executor): the same lists as one chunk in line, every row
once, with a real ONNX bundle (full re-encode and incremental)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from export.bundle import load_bundle
from stream.incremental import IncrementalScorer
from stream.recommend import overlap_chunks, recommend
from stream.scoring import OnnxScorer, width_chunks
from stream.state import Session


def _sessions(item_ids: tuple[str, ...], users: int, max_len: int) -> list[Session]:
    """Histories of 1 to 3 * max_len clicks: windows of every width, and slid ones."""
    rng = random.Random(7)
    out = []
    for u in range(users):
        s = Session()
        for k in range(rng.randint(1, 3 * max_len)):
            s.append(item_ids[rng.randint(1, len(item_ids) - 1)], k, 0, 1000 * u + k, max_len)
        out.append(s)
    return out


def test_overlap_chunks_cover_every_row_once_along_model_call_boundaries() -> None:
    widths = np.sort(np.random.default_rng(0).integers(1, 51, size=300))
    calls = width_chunks(widths, 16)
    chunks = overlap_chunks(widths, 40, 16)
    assert chunks[0][0] == 0 and chunks[-1][1] == 300
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
    bounds = {lo for lo, _ in calls}
    assert all(lo in bounds for lo, _ in chunks)  # no model call is split between chunks
    assert all(hi - lo >= 40 for lo, hi in chunks[:-1])
    assert len(chunks) > 2
    # A big batch is cut into about eight chunks, whatever the minimum.
    assert 6 <= len(overlap_chunks(np.full(4000, 50), 64, 256)) <= 8


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_chunks_on_a_second_thread_give_the_lists_of_one_call(bundle_dir: Path, mode: str) -> None:
    bundle = load_bundle(bundle_dir)

    def scorer() -> OnnxScorer | IncrementalScorer:
        if mode == "full":
            return OnnxScorer(bundle, 1, max_rows=8)
        return IncrementalScorer(bundle, 1, max_rows=8)

    one, chunked = scorer(), scorer()
    view = one.items.view
    sessions = _sessions(bundle.item_ids, 90, bundle.max_len)
    users = [f"user-{u}" for u in range(len(sessions))]
    stride = bundle.step.stride if bundle.step is not None else 1
    [(order, whole)] = recommend(one, users, sessions, view, stride=stride, k=5)
    assert order == list(range(len(users)))  # no executor: one chunk, in the users' order
    calls: list[str] = []
    with ThreadPoolExecutor(1) as executor:
        got: dict[int, object] = {}
        n_chunks = 0
        for rows, done in recommend(
            chunked, users, sessions, chunked.items.view, stride=stride, k=5,
            executor=executor, chunk_rows=10, meanwhile=lambda: calls.append("meanwhile"),
        ):  # fmt: skip
            calls.append("chunk")
            n_chunks += 1
            assert len(rows) == len(done.lists)
            for j, row in enumerate(rows):
                assert row not in got
                got[row] = done.lists[j]
    assert n_chunks > 2
    assert calls[0] == "meanwhile" and calls.count("meanwhile") == 1
    assert sorted(got) == list(range(len(users)))
    for row, items in got.items():
        expected = whole.lists[row]
        assert items is not None and expected is not None
        assert [i["item_id"] for i in items] == [i["item_id"] for i in expected]
        np.testing.assert_allclose(
            [i["score"] for i in items], [i["score"] for i in expected], rtol=1e-5, atol=1e-5
        )


class _Watched(OnnxScorer):
    """OnnxScorer that counts its calls in flight and holds each for 0.2 s, so a chunk left
    in the model when the generator closes would still be there at the check."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.in_flight = 0
        self.lock = threading.Lock()

    def score_hidden(
        self, item_seq: np.ndarray, time_seq: np.ndarray | None = None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        with self.lock:
            self.in_flight += 1
        try:
            time.sleep(0.2)
            return super().score_hidden(item_seq, time_seq)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_a_caller_that_stops_early_leaves_no_chunk_in_the_model(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    scorer = _Watched(bundle, 1, max_rows=4)
    sessions = _sessions(bundle.item_ids, 60, bundle.max_len)
    users = [f"user-{u}" for u in range(len(sessions))]
    with ThreadPoolExecutor(1) as executor:
        chunks = recommend(
            scorer, users, sessions, scorer.items.view, stride=1, k=5,
            executor=executor, chunk_rows=8,
        )  # fmt: skip
        next(chunks)  # the second chunk is now submitted
        chunks.close()
        assert scorer.in_flight == 0
