"""The score step both engines share: touched sessions -> one ranked list per user -> records.

`recommend` runs the model over one batch's sessions (session_inputs with the bundle's window
rule, then `score_batch`: incremental step/prefill when the scorer has a step model, else a
full re-encode), takes the top k outside the session, fills the explanation hook, and
yields each row's items, chunk by chunk (the processor scores the next chunk on a second
thread meanwhile); `recommendation_record` encodes one output (partition/offset of the
user's last click applied). stream.processor and stream.faust_engine call both, so the two
engines publish the same lists for the same sessions.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from stream.batch import now_ms
from stream.codec import ClickEvent, RecommendedItem, WireItem, encode_recommendation
from stream.errors import ScoringError
from stream.incremental import rank_batch, score_batch
from stream.itemtable import TableView
from stream.scoring import (
    Explainer,
    ModelInputs,
    Scored,
    Scorer,
    ranked_items,
    session_inputs,
    session_window,
    width_chunks,
)
from stream.state import Session


@dataclass(frozen=True, eq=False)
class Recommended:
    """One batch's lists, row r = the r-th user; failed rows have no list, only their error."""

    lists: list[list[WireItem] | None]  # the items as the output schema writes them
    failed: dict[int, ScoringError]


def recommend(
    scorer: Scorer,
    users: list[str],
    sessions: list[Session],
    view: TableView,
    *,
    stride: int,
    k: int,
    explain: Explainer | None = None,
    executor: Executor | None = None,
    chunk_rows: int = 256,
    meanwhile: Callable[[], None] | None = None,
) -> Generator[tuple[list[int], Recommended], None, None]:
    """Model inputs, model (full or incremental), top-k, the explanation hook and ranked items
    for one batch's sessions, in chunks of rows, the model one chunk ahead on `executor`'s
    thread. `view` is one state of the item table for the whole batch; `stride` is the
    bundle's window rule (1 without a step section).

    Yields (rows, lists of those rows): `rows` are indices into `users`, each exactly once,
    chunk by chunk in order of window length. While the caller ranks, explains and encodes
    chunk i on its own thread, chunk i + 1 (its inputs and its model calls) is scored on the
    executor's; onnxruntime releases the GIL, so the second core does the model's work. One
    chunk at a time is scored, in order, so a scorer's state (the K/V cache) sees the calls one
    call for the whole batch would make; the next chunk is submitted only after the previous
    one is in. `meanwhile` runs on the caller's thread while the first chunk is in the model
    (work of the batch that does not need its scores). Without an executor (rows in the order
    of `users`), or with fewer than two chunks' rows, the whole batch is one chunk, scored in
    line after `meanwhile`.
    """
    n, max_len = len(users), scorer.max_len
    with_time = bool(getattr(scorer, "uses_time", False))  # a time-aware bundle
    order, chunks = list(range(n)), [(0, n)]
    if executor is not None:
        widths = np.fromiter((session_window(s, max_len, stride)[1] for s in sessions), np.int64, n)
        sort = np.argsort(widths, kind="stable")
        chunks = overlap_chunks(widths[sort], chunk_rows, getattr(scorer, "max_rows", None))
        order = sort.tolist()

    def score(lo: int, hi: int) -> tuple[ModelInputs, Scored]:
        part = [sessions[r] for r in order[lo:hi]]
        inputs = session_inputs(part, view, max_len, stride, with_time=with_time)
        return inputs, score_batch(scorer, [users[r] for r in order[lo:hi]], part, inputs, view)

    if executor is None or len(chunks) < 2:
        if meanwhile is not None:
            meanwhile()
        inputs, scored = score(0, n)
        yield order, _ranked(scorer, scored, inputs, view, k, explain)
        return
    pending: Future[tuple[ModelInputs, Scored]] = executor.submit(score, *chunks[0])
    try:
        if meanwhile is not None:
            meanwhile()
        for i, (lo, hi) in enumerate(chunks):
            inputs, scored = pending.result()
            if i + 1 < len(chunks):
                pending = executor.submit(score, *chunks[i + 1])
            yield order[lo:hi], _ranked(scorer, scored, inputs, view, k, explain)
    finally:
        # A caller that stops early (or fails) must not leave a chunk in the scorer while the
        # next batch or a model swap starts; that chunk's own error is not this exit's.
        wait([pending])


def overlap_chunks(
    widths: npt.NDArray[np.int64], chunk_rows: int, max_rows: int | None
) -> list[tuple[int, int]]:
    """Row ranges over rows sorted by window width: whole model calls (`width_chunks`)
    gathered until a range holds at least `chunk_rows` rows, or an eighth of the rows if that
    is more (a handful of chunks: each hand-over between the threads costs a little)."""
    n = len(widths)
    target = max(chunk_rows, -(-n // 8))
    out: list[tuple[int, int]] = []
    for lo, hi in width_chunks(widths, max_rows):
        if out and out[-1][1] - out[-1][0] < target:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


def _ranked(
    scorer: Scorer,
    scored: Scored,
    inputs: ModelInputs,
    view: TableView,
    k: int,
    explain: Explainer | None,
) -> Recommended:
    """Top-k of one scored batch (or chunk), the explanation hook, the wire items per row."""
    best, best_scores = rank_batch(scorer, scored, inputs.seen, view, k)  # (B, k) each
    because = None if explain is None else explain(best, inputs.item_seq, view.vectors)
    # Python lists once per batch: per-element numpy scalars cost ~4 µs per output.
    ranked, scores = best.tolist(), best_scores.tolist()
    reasons = None if because is None else because.tolist()
    ids = view.ids
    lists: list[list[WireItem] | None] = [
        None
        if row in scored.failed
        else ranked_items(ranked[row], scores[row], ids, None if reasons is None else reasons[row])
        for row in range(len(ranked))
    ]
    return Recommended(lists, scored.failed)


def recommendation_record(
    user: str,
    items: Sequence[RecommendedItem] | Sequence[WireItem],
    model_version: str,
    source: tuple[int, int],
    event: object,
) -> tuple[bytes, int]:
    """(value, event_ts) of one output record; `source` is (partition, offset) of the user's
    last click applied, `event` that click (a forget request has no ts: generation time)."""
    generated = now_ms()
    event_ts = event.ts if isinstance(event, ClickEvent) else generated
    value = encode_recommendation(
        user_id=user,
        items=items,
        model_version=model_version,
        partition=source[0],
        offset=source[1],
        event_ts=event_ts,
        generated_ts=generated,
    )
    return value, event_ts
