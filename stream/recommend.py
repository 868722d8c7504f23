"""The score step both engines share: touched sessions -> one ranked list per user -> records.

`recommend` runs the model over one batch's sessions (session_inputs with the bundle's window
rule, then `score_batch`: incremental step/prefill when the scorer has a step model, else a
full re-encode), takes the top k outside the session, fills the explanation hook, and
returns each row's items; `recommendation_record` encodes one output (partition/offset of the
user's last click applied). stream.processor and stream.faust_engine call both, so the two
engines publish the same lists for the same sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stream.batch import now_ms
from stream.codec import ClickEvent, RecommendedItem, WireItem, encode_recommendation
from stream.errors import ScoringError
from stream.incremental import rank_batch, score_batch
from stream.itemtable import TableView
from stream.scoring import Explainer, Scorer, ranked_items, session_inputs
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
) -> Recommended:
    """Model inputs, model (full or incremental), top-k, the explanation hook, ranked items.

    `view` is one state of the item table for the whole batch; `stride` is the bundle's window
    rule (1 without a step section).
    """
    inputs = session_inputs(sessions, view, scorer.max_len, stride)
    scored = score_batch(scorer, users, sessions, inputs, view)
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
        for row in range(len(users))
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
