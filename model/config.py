"""Model and training configuration, saved inside checkpoints and bundle manifests."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from model.errors import ConfigError

Positions = Literal["slot", "first"]
Windows = Literal["last", "all"]
Schedule = Literal["constant", "cosine"]
TextCombine = Literal["sum", "gate", "unseen"]
IdDropoutSide = Literal["both", "output"]
Norm = Literal["pre", "post"]


@dataclass(frozen=True)
class SASRecConfig:
    num_items: int  # items are indexed 1..num_items; index 0 is padding
    max_len: int = 50  # window length; the serving contract feeds exactly this many slots
    d_model: int = 64  # embedding width, shared by the tied output layer
    n_blocks: int = 2  # Transformer blocks
    n_heads: int = 1  # attention heads; d_model must divide evenly
    dropout: float = 0.2  # on embeddings and residual branches, never on attention weights
    ffn_mult: int = 1  # FFN width = ffn_mult * d_model; SASRec's point-wise FFN keeps d_model
    # "pre": LayerNorm on each residual branch's input (x + f(LN(x))), as GPT-2 and most
    # SASRec code; "post": LayerNorm after each residual sum (LN(x + f(x))), as the original
    # Transformer and BERT4Rec. Both keep the final LayerNorm before the output layer.
    norm: Norm = "pre"
    # "slot": learned embedding of the window slot, right-aligned (the newest item is always
    # max_len - 1), as in SASRec. "first": counted from the first real item of the window, so a
    # position does not move when a click is appended until the window is full (DESIGN.md).
    positions: Positions = "first"
    layer_norm_eps: float = 1e-6
    # Text-aware items (model/sasrec.py TextSASRec): 0 = ID-only. Otherwise the width of the
    # frozen text embedding (384 for all-MiniLM-L6-v2) projected to d_model and combined with
    # the ID embedding; items never trained on are represented by their text alone.
    text_dim: int = 0
    text_encoder: str = ""  # the frozen encoder's name, for the manifest (model/text.py)
    text_format: str = ""  # the item-text rule the embeddings were made with (model/text.py)
    # "sum": text projection + ID embedding; "gate": text projection + g * ID embedding with a
    # per-item gate g = sigmoid(w . text) that decides how much the ID adds; "unseen": known
    # items are their ID embedding alone (an ID-only SASRec), only items without a trained ID
    # are their text (fitted as a cold head on a trained ID-only model: init_from + trainable).
    text_combine: TextCombine = "sum"
    # Training only: each step, this share of items lose their ID part (input and output side),
    # so the text projection learns to stand alone as it must for unseen items.
    id_dropout: float = 0.0
    # "both": IDs are dropped in the input windows and in the output softmax (two independent
    # draws per step); "output": in the softmax only, so the Transformer always reads known
    # items with their IDs.
    id_dropout_side: IdDropoutSide = "both"
    # Training only: weight of a second full softmax in which every item is its text alone
    # (the form an item without a trained ID has), so the text path learns to rank without
    # taking IDs away from the main softmax. 0 = off.
    text_only_loss: float = 0.0
    # Items without a trained ID get their own text projection (not the one known items add to
    # their ID), so a cold-start head can be fitted on a frozen warm model (TrainConfig
    # init_from + trainable) without moving any known item.
    cold_proj: bool = False
    # Scoring only (never training): added to the score of every item without a trained ID, so
    # a new item with only a title can reach the top k at all. A product knob, the exposure new
    # items get; make eval picks it on validation under a cap on what it costs known items.
    novelty_boost: float = 0.0
    # Text-aware only: items also read features parsed from their text (export/item_text.py
    # item_features: release-year bucket, genres over `feature_genres`, which training fills
    # from the catalogue when empty). They join the text embedding as the projection's input.
    item_features: bool = False
    feature_genres: tuple[str, ...] = ()
    # Text-aware only: items without a trained ID also get a learned score bias from their
    # [text, features] (trained with ID dropout like the projection): a per-item prior, e.g.
    # that a new release is clicked more than an old film, which a dot product cannot say.
    text_bias: bool = False
    # Time-aware (model/sasrec.py TimeFeatures): 0 = no time input. Otherwise the number of
    # log2 buckets for the interval to the previous click (input embedding) and for the time
    # between a query click and each earlier click (a learned attention bias per head).
    time_buckets: int = 0
    session_gap_s: int = 1800  # a click after this much silence starts a new session (feature)

    def __post_init__(self) -> None:
        _positive(self, ("num_items", "max_len", "d_model", "n_blocks", "n_heads", "ffn_mult"))
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in ("pre", "post"):
            raise ConfigError(f"norm must be 'pre' or 'post', got {self.norm!r}")
        if self.positions not in ("slot", "first"):
            raise ConfigError(f"positions must be 'slot' or 'first', got {self.positions!r}")
        if self.text_dim < 0 or self.time_buckets < 0 or self.session_gap_s < 1:
            raise ConfigError("text_dim and time_buckets must be >= 0 and session_gap_s >= 1")
        if self.text_combine not in ("sum", "gate", "unseen") or not 0.0 <= self.id_dropout < 1:
            raise ConfigError(
                f"text_combine must be 'sum', 'gate' or 'unseen' and id_dropout in [0, 1), got "
                f"{self.text_combine!r}, {self.id_dropout}"
            )
        if not math.isfinite(self.novelty_boost) or (self.novelty_boost and not self.text_dim):
            raise ConfigError(
                f"novelty_boost must be finite and needs a text-aware model (text_dim > 0), got "
                f"{self.novelty_boost} with text_dim {self.text_dim}"
            )
        if (self.item_features or self.text_bias) and not self.text_dim:
            raise ConfigError("item_features and text_bias need a text-aware model (text_dim > 0)")
        if self.text_only_loss < 0.0 or (self.text_only_loss and not self.text_dim):
            raise ConfigError("text_only_loss must be >= 0 and needs a text-aware model")
        if self.id_dropout_side not in ("both", "output"):
            raise ConfigError(f"id_dropout_side must be both or output: {self.id_dropout_side!r}")
        if self.time_buckets == 1:
            raise ConfigError("time_buckets must be 0 (off) or >= 2")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SASRecConfig:
        known = _known(cls, raw)
        if "feature_genres" in known:  # a list in JSON
            known["feature_genres"] = tuple(known["feature_genres"])
        return cls(**known)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 200  # upper bound; max_seconds or patience usually stops earlier
    batch_size: int = 128  # users per step (one window of max_len targets each)
    lr: float = 1e-3  # Adam learning rate, as in SASRec
    weight_decay: float = 0.0  # AdamW decoupled decay; SASRec trains without it
    seed: int = 42  # model init, dropout and the per-epoch shuffle
    threads: int = 2  # torch.set_num_threads: the box has 2 cores shared with others
    max_seconds: float | None = None  # wall-clock budget checked between steps; None = no budget
    # With max_seconds: after the warmup, cut `epochs` to what the measured pace fits in the
    # budget, so the cosine ends inside it on a busy box too. The run is then exactly the one
    # `epochs=N` gives (the log and the checkpoint say N) when warmup_epochs is whole and >= 1.
    fit_epochs: bool = False
    eval_every: int = 1  # epochs between validation passes
    patience: int = 10  # validation passes without a better NDCG@10 before stopping
    eval_batch_size: int = 256  # users per scoring call during evaluation
    # "last": one window per user, the newest max_len + 1 training items, as in SASRec. "all":
    # also the older stretches of long histories, cut at points that move every epoch, so every
    # training item is a target at least once per epoch (ML-1M: 8.6k windows instead of 6k).
    windows: Windows = "last"
    # With windows "all": older windows overlap the next newer one by this many items, and
    # each target counts once, in the window where it has the most context (>= this many
    # items); 0 = windows max_len apart, as before (model/data.py `training_windows`).
    window_overlap: int = 0
    # "cosine": from lr down to 0 at the last epoch (set epochs to what fits the time budget).
    schedule: Schedule = "constant"
    warmup_epochs: float = 0.0  # linear warmup from 0 to lr over this many epochs
    label_smoothing: float = 0.0  # of the full-softmax cross-entropy; 0 = plain CE
    # Each position learns the next `future` items of its window, the one j + 1 steps ahead
    # with weight future_decay^j (normalised); 1 = next item only, as in SASRec.
    future: int = 1
    future_decay: float = 0.5
    # Start from this checkpoint's weights (same items; parameters the checkpoint lacks keep
    # their init) instead of a fresh init; "" = fresh.
    init_from: str = ""
    # Comma-separated parameter name prefixes to train (e.g. "cold_proj,unknown"); every
    # other parameter is frozen. "" = train everything.
    trainable: str = ""

    def __post_init__(self) -> None:
        _positive(self, ("epochs", "batch_size", "threads", "eval_every", "patience"))
        _positive(self, ("eval_batch_size", "future"))
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(
                f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}"
            )
        if self.windows not in ("last", "all") or self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"unknown windows {self.windows!r} or schedule {self.schedule!r}")
        if self.window_overlap < 0:
            raise ConfigError(f"window_overlap must be >= 0, got {self.window_overlap}")
        if not 0.0 < self.future_decay <= 1.0:
            raise ConfigError(f"future_decay must be in (0, 1], got {self.future_decay}")
        if self.warmup_epochs < 0 or not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(
                f"warmup_epochs must be >= 0 and label_smoothing in [0, 1), got "
                f"{self.warmup_epochs}, {self.label_smoothing}"
            )
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ConfigError(f"max_seconds must be positive or None, got {self.max_seconds}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        return cls(**_known(cls, raw))


def _positive(cfg: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be >= 1, got {value}")


def _known(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    # Checkpoints written by a newer version may carry extra keys; unknown ones are dropped.
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in raw.items() if k in names}
