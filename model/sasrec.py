"""SASRec-style causal Transformer over left-padded item windows (Kang & McAuley, 2018).

Pre-LN blocks (or post-LN, cfg.norm) of causal self-attention and a point-wise FFN, a final
LayerNorm, and an output layer tied to the item embedding: score(item) = hidden · embedding(item).

Two optional parts, both off by default (the ID-only model is then exactly the one above):
- TextSASRec: an item is its frozen text embedding projected to d_model plus its ID embedding;
  items never trained on are their text projection alone (cfg.text_dim).
- TimeFeatures: with a `time_seq` of epoch seconds, the log interval to the previous click and
  a session-start flag join the input, and the time between a query click and each earlier
  click biases attention, TiSASRec-style (cfg.time_buckets).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from export.item_text import feature_dim
from model.config import SASRecConfig
from model.errors import ConfigError


class Dropout(nn.Module):
    """nn.Dropout with its mask drawn by torch.rand: bernoulli_ took 17 ms per (128, 200, 64)
    tensor on this box, rand and a comparison 6 ms, and a step runs five of them."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.rand_like(x) >= self.p  # (..., D)
        return x * keep * (1.0 / (1.0 - self.p))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        # Python ints, not traced shapes: tracing for ONNX must not turn sizes into constants.
        self.d_model, self.n_heads = cfg.d_model, cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, L = x.shape[0], x.shape[1]
        heads = (B, L, self.n_heads, self.head_dim)
        q, k, v = self.qkv(x).split(self.d_model, dim=2)  # 3 × (B, L, D)
        q = q.view(heads).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(heads).transpose(1, 2)  # (B, H, L, hd)
        v = v.view(heads).transpose(1, 2)  # (B, H, L, hd)
        # No dropout on the attention weights: it cost ~25% of an epoch here (DESIGN.md).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)  # (B, H, L, hd)
        out: torch.Tensor = self.proj(y.transpose(1, 2).reshape(B, L, self.d_model))  # (B, L, D)
        return out


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        width = cfg.ffn_mult * cfg.d_model
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.d_model, width), nn.GELU(), nn.Linear(width, cfg.d_model)
        )
        self.drop = Dropout(cfg.dropout)
        self.post_ln = cfg.norm == "post"

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.ln_1(x + self.drop(self.attn(x, allowed)))  # (B, L, D)
            post: torch.Tensor = self.ln_2(x + self.drop(self.ffn(x)))  # (B, L, D)
            return post
        x = x + self.drop(self.attn(self.ln_1(x), allowed))  # (B, L, D)
        out: torch.Tensor = x + self.drop(self.ffn(self.ln_2(x)))  # (B, L, D)
        return out


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.num_items + 1, cfg.d_model, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.d_model)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_blocks))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.apply(_init_weights)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        # Created after the init above, so an ID-only model draws exactly the same weights.
        self.time = TimeFeatures(cfg) if cfg.time_buckets else None

    def forward(self, item_seq: torch.Tensor, time_seq: torch.Tensor | None = None) -> torch.Tensor:
        """item_seq (B, L) int64, left-padded with 0, L <= max_len -> hidden (B, L, D).

        time_seq (B, L) int64 epoch seconds, aligned with item_seq: needed by time-aware models,
        ignored by the others."""
        scale = math.sqrt(self.cfg.d_model)
        items = F.embedding(item_seq, self.input_vectors(), padding_idx=0)  # (B, L, D)
        x = items * scale + self.pos_emb(self.positions(item_seq))  # (B, L, D)
        allowed = attention_mask(item_seq)  # (B, 1, L, L)
        if self.time is not None:
            if time_seq is None:
                raise ConfigError("this model is time-aware: pass time_seq with item_seq")
            x = x + self.time.inputs(item_seq, time_seq)  # (B, L, D)
            allowed = self.time.bias(item_seq, time_seq).masked_fill(~allowed, -math.inf)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, allowed)
        hidden: torch.Tensor = self.ln_f(x)  # (B, L, D)
        return hidden

    def item_vectors(self) -> torch.Tensor:
        """(N + 1, D): each item's representation, used for the input embedding and as the tied
        output layer. Row 0 (padding) is zero. Subclasses (text-aware) override this one method;
        export writes it to the bundle as item_vectors.npy, so serving can score items outside
        the ONNX graph (ANN, items added at run time, explanations)."""
        return self.item_emb.weight

    def input_vectors(self) -> torch.Tensor:
        """(N + 1, D): the items as the input windows read them; item_vectors() unless a
        subclass trains the two sides differently (they are equal outside training)."""
        return self.item_vectors()

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training softmax's output layer: item_vectors() (N + 1, D) and a per-item score
        bias (N + 1,) or None, from one draw of any training-time randomness (ID dropout)."""
        return self.item_vectors(), None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> scores (..., num_items + 1); column 0 is padding."""
        scores = hidden @ self.item_vectors().T
        bias = self.score_bias()
        return scores if bias is None else scores + bias

    def text_only_vectors(self) -> torch.Tensor | None:
        """(N + 1, D): every item as an item without a trained ID (text-aware models), the
        output layer of the optional text-only softmax; None for ID-only models."""
        return None

    def score_bias(self) -> torch.Tensor | None:
        """(N + 1,) added to every score row outside training, or None (the ID-only model).
        Training never sees it: the loss ranks with item_vectors() alone."""
        return None

    def score_last(
        self, item_seq: torch.Tensor, time_seq: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores of the next item after the newest one: (B, L) -> (B, num_items + 1)."""
        return self.logits(self(item_seq, time_seq)[:, -1, :])  # (B, N + 1)

    def bundle_extras(self) -> dict[str, np.ndarray]:
        """Arrays the bundle ships besides item_vectors.npy: none for the ID-only model."""
        return {}

    def softmax_items(self) -> torch.Tensor | None:
        """Item indices the training softmax ranks over (None: all N + 1 columns)."""
        return None

    def positions(self, item_seq: torch.Tensor) -> torch.Tensor:
        """Position ids, (L,) for "slot" or (B, L) for "first"; padding slots get any id."""
        L = item_seq.shape[1]
        slots = torch.arange(L, device=item_seq.device)  # (L,)
        if self.cfg.positions == "slot":
            # Right-aligned, so extra left padding (or a shorter window) changes nothing.
            return slots + (self.cfg.max_len - L)
        n_pad = (item_seq == 0).long().sum(dim=1, keepdim=True)  # (B, 1)
        return (slots.unsqueeze(0) - n_pad).clamp(min=0)  # (B, L)


def attention_mask(item_seq: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool, True = may attend: causal, padding keys hidden.

    Every position may attend to itself, so an all-padding row still has one key and its
    softmax stays finite instead of NaN (DESIGN.md); real positions never see padding keys.
    """
    L = item_seq.shape[1]
    idx = torch.arange(L, device=item_seq.device)  # (L,)
    causal = idx.unsqueeze(0) <= idx.unsqueeze(1)  # (L, L) key <= query
    itself = idx.unsqueeze(0) == idx.unsqueeze(1)  # (L, L)
    real_key = (item_seq != 0)[:, None, None, :]  # (B, 1, 1, L)
    return causal & (real_key | itself)  # (B, 1, L, L)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


class TextSASRec(SASRec):
    """SASRec whose items are a projection of their frozen text embedding plus their ID.

    item_vectors(), row 0 zero:
        known item:    text_proj(text_emb) + [gate *] item_emb
        other item:    unknown_scale * text_proj(text_emb) + unknown
    `known` is 1 for the items of the training sequences (set by `set_known`). An item without
    training clicks has an ID embedding that never got a useful gradient, so it gets the shared
    learned `unknown` vector instead, which also stands in for the IDs that id_dropout hides
    during training: that is how the text-only form learns what it is worth. Such items also
    stay out of the training softmax (`softmax_items`). An item added at serving time is
    treated exactly the same way: `bundle_extras` folds the scale and `unknown` into one affine
    map of the text embedding. Outside training, `cfg.novelty_boost` is added to the scores of
    the items without a trained ID (`score_bias`); serving adds it to runtime items too."""

    text_emb: torch.Tensor  # (N + 1, T) buffer, frozen
    known: torch.Tensor  # (N + 1, 1) buffer, 1.0 = trained ID embedding

    def __init__(self, cfg: SASRecConfig) -> None:
        if cfg.text_dim < 1:
            raise ConfigError("TextSASRec needs text_dim >= 1")
        super().__init__(cfg)
        n = cfg.num_items + 1
        # What an item's text gives the model: its embedding, then (cfg.item_features) the
        # features parsed from the same text (export/item_text.py item_features).
        width = cfg.text_dim + (feature_dim(cfg.feature_genres) if cfg.item_features else 0)
        self.text_proj = nn.Linear(width, cfg.d_model)
        self.text_gate = nn.Linear(width, 1) if cfg.text_combine == "gate" else None
        self.cold_proj = nn.Linear(width, cfg.d_model) if cfg.cold_proj else None
        # cfg.text_bias: a score bias of each item without a trained ID, from its text.
        self.text_bias = nn.Linear(width, 1) if cfg.text_bias else None
        self.unknown = nn.Parameter(torch.zeros(cfg.d_model))  # (D,)
        # The text part of an item without a trained ID is scaled by this learned factor: with
        # nothing else to tell items apart, its text may need a sharper say than beside an ID.
        self.unknown_scale = nn.Parameter(torch.ones(1))  # (1,)
        for layer in (self.text_proj, self.text_gate, self.cold_proj):
            if layer is not None:
                _init_weights(layer)
        if self.text_bias is not None:  # starts as no bias at all
            nn.init.zeros_(self.text_bias.weight)
            nn.init.zeros_(self.text_bias.bias)
        # Buffers, so checkpoints and the ONNX graph carry them; filled by set_text/set_known.
        self.register_buffer("text_emb", torch.zeros(n, width))  # (N + 1, T [+ F])
        self.register_buffer("known", torch.zeros(n, 1))  # (N + 1, 1)

    def set_text(self, table: np.ndarray) -> None:
        """table (N + 1, text_dim [+ feature_dim]): item index i's text embedding, followed by
        its item features when cfg.item_features; row 0 is ignored."""
        expected = tuple(self.text_emb.shape)
        if table.shape != expected:
            raise ConfigError(f"text table {table.shape} does not fit the model's {expected}")
        with torch.no_grad():
            self.text_emb.copy_(torch.from_numpy(np.asarray(table, dtype=np.float32)))
            self.text_emb[0].zero_()

    def set_known(self, known: np.ndarray) -> None:
        """known (N + 1,) bool: items whose ID embedding is trained (seen in training data)."""
        with torch.no_grad():
            self.known.copy_(torch.from_numpy(np.asarray(known, dtype=np.float32)).view(-1, 1))
            self.known[0] = 0.0

    def item_vectors(self) -> torch.Tensor:
        return self._vectors(self._drawn_known())

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        known = self._drawn_known()  # one draw for the vectors and the bias
        return self._vectors(known), self._text_bias(known)

    def _drawn_known(self) -> torch.Tensor:
        """known (N + 1, 1), less a fresh id_dropout share of the items in training."""
        known = self.known  # (N + 1, 1)
        if self.training and self.cfg.id_dropout > 0.0:
            known = known * (torch.rand_like(known) >= self.cfg.id_dropout)  # (N + 1, 1)
        return known

    def _text_bias(self, known: torch.Tensor) -> torch.Tensor | None:
        """(N + 1,): the text bias of the items `known` says have no ID, 0 elsewhere."""
        if self.text_bias is None:
            return None
        bias = self.text_bias(self.text_emb)[:, 0] * (1.0 - known[:, 0])  # (N + 1,)
        return F.pad(bias[1:], (1, 0))  # padding 0

    def input_vectors(self) -> torch.Tensor:
        if self.cfg.id_dropout_side == "output":
            return self._vectors(self.known)  # no ID dropout on the input side
        return self.item_vectors()

    def text_only_vectors(self) -> torch.Tensor:
        return self._vectors(torch.zeros_like(self.known))

    def _vectors(self, known: torch.Tensor) -> torch.Tensor:
        trained = self.item_emb.weight  # (N + 1, D)
        if self.text_gate is not None:
            trained = trained * torch.sigmoid(self.text_gate(self.text_emb))  # (N + 1, D)
        ids = trained * known + self.unknown * (1.0 - known)  # (N + 1, D)
        text = self.text_proj(self.text_emb)  # (N + 1, D)
        if self.cfg.text_combine == "unseen":  # known items: their ID alone
            vectors = ids + text * self.unknown_scale * (1.0 - known)  # (N + 1, D)
        elif self.cold_proj is None:
            vectors = text * (known + self.unknown_scale * (1.0 - known)) + ids  # (N + 1, D)
        else:
            cold = self.cold_proj(self.text_emb) * self.unknown_scale  # (N + 1, D)
            vectors = text * known + cold * (1.0 - known) + ids  # (N + 1, D)
        return F.pad(vectors[1:], (0, 0, 1, 0))  # (N + 1, D), row 0 = padding = zeros

    def score_bias(self) -> torch.Tensor | None:
        """novelty_boost and the text bias on the items without a trained ID (0 elsewhere,
        padding included)."""
        if self.training or not (self.cfg.novelty_boost or self.text_bias is not None):
            return None
        return self._novelty_bias()

    def _novelty_bias(self) -> torch.Tensor:
        untrained = 1.0 - self.known[:, 0]  # (N + 1,)
        bias = F.pad(untrained[1:] * self.cfg.novelty_boost, (1, 0))  # (N + 1,), padding 0
        text = self._text_bias(self.known)
        return bias if text is None else bias + text

    def with_novelty_boost(self, boost: float) -> TextSASRec:
        """Set the scoring-time boost of items without a trained ID (config, so checkpoints and
        manifests carry it); returns self."""
        self.cfg = replace(self.cfg, novelty_boost=float(boost))
        return self

    def softmax_items(self) -> torch.Tensor:
        """Padding and the known items only. An item with no training clicks is never a target;
        as a softmax negative its text direction would only learn "never clicked", which is
        false for an item that is merely new: such items stay out of training, as an item
        added at serving time does."""
        known = self.known[:, 0] > 0  # (N + 1,)
        known[0] = True
        return torch.nonzero(known).squeeze(1)  # (C,)

    def bundle_extras(self) -> dict[str, np.ndarray]:
        """What serving needs to add an item at run time: v = text_emb @ W + b, b holding the
        `unknown` ID vector too, so v is exactly the row an untrained catalogue item has."""
        scale = self.unknown_scale  # (1,)
        proj = self.cold_proj if self.cold_proj is not None else self.text_proj
        weight = proj.weight.T * scale  # (T, D)
        bias = proj.bias * scale + self.unknown  # (D,)
        extras = {
            # The embeddings alone: features are parsed again from the text where needed.
            "item_text_emb": self.text_emb[:, : self.cfg.text_dim].detach().numpy().copy(),
            "text_proj_w": weight.detach().numpy().copy(),  # (T [+ F], D)
            "text_proj_b": bias.detach().numpy().copy(),  # (D,)
        }
        if self.text_bias is not None:  # [w, b]: a runtime item's bias is [t, f] @ w + b
            w = torch.cat([self.text_bias.weight[0], self.text_bias.bias])  # (T [+ F] + 1,)
            extras["text_bias"] = w.detach().numpy().astype(np.float32)
        if self.cfg.novelty_boost or self.text_bias is not None:
            # for serving that scores outside the graph (headless, ANN)
            extras["item_bias"] = self._novelty_bias().detach().numpy().astype(np.float32)
        return extras


class TimeFeatures(nn.Module):
    """Time as features from time_seq (epoch seconds; padding slots are ignored).

    Input side: an embedding of the log2 bucket of the interval to the previous click (bucket 0:
    no previous click in the window) and of a session-start flag (previous click more than
    session_gap_s ago). Attention side: a learned bias per head for the log2 bucket of
    t_query - t_key and for "same session". History is never cut at a session gap; the gap is a
    feature. Everything depends only on the query's past, so causality holds."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.buckets, self.gap = cfg.time_buckets, cfg.session_gap_s
        self.interval_emb = nn.Embedding(cfg.time_buckets + 1, cfg.d_model)
        self.session_emb = nn.Embedding(2, cfg.d_model)
        self.relation_bias = nn.Embedding(cfg.time_buckets, cfg.n_heads)
        self.session_bias = nn.Embedding(2, cfg.n_heads)
        for emb in (self.interval_emb, self.session_emb):
            nn.init.normal_(emb.weight, mean=0.0, std=0.02)
        for emb in (self.relation_bias, self.session_bias):
            nn.init.zeros_(emb.weight)  # starts as plain SASRec attention

    def _starts(self, item_seq: torch.Tensor, time_seq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        real = item_seq != 0  # (B, L)
        has_prev = real & F.pad(real[:, :-1], (1, 0), value=False)  # (B, L)
        interval = (time_seq - F.pad(time_seq[:, :-1], (1, 0))).clamp(min=0)  # (B, L) int64
        starts = ~has_prev | (interval > self.gap)  # (B, L) bool
        return has_prev, interval, starts

    def inputs(self, item_seq: torch.Tensor, time_seq: torch.Tensor) -> torch.Tensor:
        has_prev, interval, starts = self._starts(item_seq, time_seq)
        bucket = torch.where(has_prev, 1 + log_bucket(interval, self.buckets), 0)  # (B, L)
        out: torch.Tensor = self.interval_emb(bucket) + self.session_emb(starts.long())
        return out  # (B, L, D)

    def bias(self, item_seq: torch.Tensor, time_seq: torch.Tensor) -> torch.Tensor:
        _, _, starts = self._starts(item_seq, time_seq)
        session = starts.long().cumsum(dim=1)  # (B, L): session number of each slot
        same = session.unsqueeze(2) == session.unsqueeze(1)  # (B, L, L) query x key
        elapsed = (time_seq.unsqueeze(2) - time_seq.unsqueeze(1)).clamp(min=0)  # (B, L, L)
        bias = self.relation_bias(log_bucket(elapsed, self.buckets))  # (B, L, L, H)
        bias = bias + self.session_bias(same.long())  # (B, L, L, H)
        out: torch.Tensor = bias.permute(0, 3, 1, 2)  # (B, H, L, L)
        return out


def log_bucket(seconds: torch.Tensor, buckets: int) -> torch.Tensor:
    """floor(log2(1 + seconds)) capped at buckets - 1: 0 s -> 0, 1 s -> 1, 1 h -> 11, 1 day ->
    16, 1 year -> 24. int64 in, int64 out, exact at every power of two.

    A float log2 alone is not exact: onnxruntime computes it as ln(x) / ln(2), which puts
    1 + seconds = 2^15 in bucket 14, where PyTorch says 15; and float32 rounds large values
    up to the next power. So the float guess (off by at most one) is corrected against the
    int64 powers of two, and the ONNX graph gives PyTorch's buckets exactly."""
    x = seconds + 1  # (...) int64 >= 1
    powers = 2 ** torch.arange(buckets + 2, dtype=torch.int64)  # (buckets + 2,) exact
    guess = torch.log2(x.to(torch.float32)).floor().long().clamp(0, buckets)  # (...)
    exact = guess + (x >= powers[guess + 1]).long() - (x < powers[guess]).long()
    return exact.clamp(0, buckets - 1)


def build_model(cfg: SASRecConfig) -> SASRec:
    """The model class a config asks for: TextSASRec with text_dim, else SASRec."""
    return TextSASRec(cfg) if cfg.text_dim else SASRec(cfg)
