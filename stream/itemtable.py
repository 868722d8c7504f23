"""The scoring table: the bundle's items (scored inside the ONNX graph) plus items added at run
time (scored outside it as hidden @ vectors.T) — the out-of-graph seam of issue 8.

Column i of a score row is item index i: 0 is padding, 1..N the bundle's items (model.onnx's
own columns), N+1..N+M the runtime items in the order they were added. Runtime items are
recommendable only: the model cannot embed them, so they never enter its window (they are
kept in `seen`, so a user is not recommended what they clicked).

Who calls what:
    the catalogue follower (items topic)   add_items(ids, vectors[, bias]), remove_items(ids)
    the processor, once per batch          view = table.view; view.index, view.ids,
                                           view.extend(scores, hidden), view.vectors
Updates are copy-on-write: each one builds a new `TableView` and swaps it in with one
assignment, so a follower thread may update the table while the processor scores a batch
with the view it took at the start of that batch (indices never change under it).
A model swap starts with a fresh table (runtime vectors live in the old model's space).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np
import numpy.typing as npt

from stream.errors import ScoringError

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True, eq=False)
class TableView:
    """One immutable state of the table; use one view for a whole batch."""

    ids: tuple[str, ...]  # index -> item id ("" at 0, padding)
    index: dict[str, int]  # item id -> index (never mutated after construction)
    num_model: int  # N + 1: columns model.onnx scores itself
    bundle_vectors: FloatArray | None  # (N + 1, D) item_vectors.npy, when the bundle has it
    runtime: FloatArray  # (M, D) vectors of the runtime items, index N + 1 + j
    hidden_mask: BoolArray | None  # (N + 1 + M,) True = never recommend (removed items)
    # Text-aware bundles: the novelty boost on items without a trained ID. The graphs add
    # bundle_bias to their own columns; runtime items (never trained) get runtime_boost here.
    bundle_bias: FloatArray | None = None  # (N + 1,) item_bias.npy, when the bundle has it
    runtime_boost: float = 0.0  # manifest config novelty_boost
    # (M,) each runtime item's own score bias (a bundle's text_bias.npy), or None: none
    runtime_bias: FloatArray | None = None

    @property
    def width(self) -> int:
        """Columns of a score row: N + 1 + M."""
        return len(self.ids)

    @cached_property
    def vectors(self) -> FloatArray:
        """(N + 1 + M, D): every item's vector, as `explain` hooks receive them (one array per
        view, so a hook may cache what it derives from it)."""
        if self.bundle_vectors is None:
            raise ScoringError("the bundle has no item_vectors.npy; re-export the model")
        if not len(self.runtime):
            return self.bundle_vectors
        return np.concatenate([self.bundle_vectors, self.runtime])

    def runtime_scores(self, hidden: FloatArray) -> FloatArray:
        """(B, D) -> (B, M) float32: the runtime items' scores, novelty boost included."""
        extra = (hidden @ self.runtime.T).astype(np.float32, copy=False)  # (B, M)
        if self.runtime_boost:
            extra += np.float32(self.runtime_boost)
        if self.runtime_bias is not None:
            extra += self.runtime_bias
        return extra

    def extend(self, scores: FloatArray, hidden: FloatArray | None) -> FloatArray:
        """Model scores (B, N + 1) -> table scores (B, width); runtime items as hidden @ V.T.

        Returns `scores` itself (no copy) when nothing was added or removed.
        """
        if len(self.runtime):
            if hidden is None:
                raise ScoringError("model.onnx has no hidden output; re-export the model")
            scores = np.concatenate([scores, self.runtime_scores(hidden)], axis=1)
        if self.hidden_mask is not None:
            scores[:, self.hidden_mask] = -np.inf
        return scores


class ItemTable:
    """The bundle's items plus runtime ones; `view` is the current immutable state."""

    def __init__(
        self,
        item_ids: Sequence[str],
        bundle_vectors: FloatArray | None,
        *,
        bundle_bias: FloatArray | None = None,
        runtime_boost: float = 0.0,
    ) -> None:
        ids = tuple(item_ids)
        for name, array in (("item_vectors.npy", bundle_vectors), ("item_bias.npy", bundle_bias)):
            if array is not None and array.shape[0] != len(ids):
                raise ScoringError(
                    f"{name} has {array.shape[0]} rows for {len(ids)} item indices (padding "
                    "included); re-export the bundle"
                )
        dim = 0 if bundle_vectors is None else bundle_vectors.shape[1]
        self._bundle_index = {item_id: i for i, item_id in enumerate(ids) if i > 0}
        self._removed: frozenset[str] = frozenset()
        self.view = TableView(
            ids, dict(self._bundle_index), len(ids), bundle_vectors,
            np.zeros((0, dim), np.float32), None, bundle_bias, float(runtime_boost),
        )  # fmt: skip

    @property
    def dim(self) -> int | None:
        v = self.view.bundle_vectors
        return None if v is None else int(v.shape[1])

    def add_items(
        self, item_ids: Sequence[str], vectors: FloatArray, bias: FloatArray | None = None
    ) -> int:
        """Add or replace runtime items; `vectors` (M, D) float32 in the model's item space,
        `bias` (M,) each one's own score bias (a text bias; None: 0).

        An id of the bundle's own catalogue is skipped (its vector is inside the graph); a
        repeated runtime id replaces its vector and keeps its index; an id removed earlier
        comes back. Returns how many ids were skipped.
        """
        dim = self.dim
        vectors = np.asarray(vectors, dtype=np.float32)
        if dim is None:
            raise ScoringError("the bundle has no item_vectors.npy; runtime items need one")
        if vectors.shape != (len(item_ids), dim):
            raise ScoringError(f"vectors {vectors.shape} do not match {len(item_ids)} ids × {dim}")
        biases = np.zeros(len(item_ids), np.float32) if bias is None else np.asarray(bias, "f")
        if biases.shape != (len(item_ids),):
            raise ScoringError(f"bias {biases.shape} does not match {len(item_ids)} ids")
        old = self.view
        runtime = list(old.runtime)
        offsets = list(np.zeros(len(runtime), np.float32) if old.runtime_bias is None
                       else old.runtime_bias)  # fmt: skip
        ids, index = list(old.ids), dict(old.index)
        skipped = 0
        for item_id, vector, offset in zip(item_ids, vectors, biases, strict=True):
            if item_id in self._bundle_index:
                skipped += 1
                continue
            at = index.get(item_id)
            if at is None:
                index[item_id] = len(ids)
                ids.append(item_id)
                runtime.append(vector)
                offsets.append(offset)
            else:
                runtime[at - old.num_model] = vector
                offsets[at - old.num_model] = offset
        self._removed -= set(item_ids)
        stacked = np.asarray(runtime, dtype=np.float32).reshape(len(runtime), dim)  # (M, D)
        runtime_bias = np.asarray(offsets, dtype=np.float32)  # (M,)
        self._publish(tuple(ids), index, stacked, runtime_bias if runtime_bias.any() else None)
        if skipped:
            logger.debug("add_items: %d ids of the bundle's catalogue skipped", skipped)
        return skipped

    def remove_items(self, item_ids: Iterable[str]) -> None:
        """Never recommend these items again (catalogue tombstones).

        Runtime and bundle items alike are masked (a bundle item stays a valid model input, so
        sessions holding it keep their meaning); `add_items` brings a runtime one back.
        """
        self._removed |= {i for i in item_ids if i in self.view.index}
        old = self.view
        self._publish(old.ids, old.index, old.runtime, old.runtime_bias)

    def _publish(
        self,
        ids: tuple[str, ...],
        index: dict[str, int],
        runtime: FloatArray,
        runtime_bias: FloatArray | None,
    ) -> None:
        old = self.view
        mask = None
        if self._removed:
            mask = np.zeros(len(ids), dtype=np.bool_)
            mask[[index[i] for i in self._removed]] = True
        self.view = replace(
            old, ids=ids, index=index, runtime=runtime, hidden_mask=mask, runtime_bias=runtime_bias
        )
