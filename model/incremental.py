"""Incremental inference for SASRec models whose positions count from the window's first item.

With positions="first", an item's position does not change while the window grows, and causal
attention means its keys/values depend only on the items before it. So the keys/values of a
window can be cached and one new click costs one position of work (`StepModel`) instead of a
pass over the whole window (`Prefill`, which also returns the cache). The bundle contract and
the window rule live in export/bundle.py; this module holds the PyTorch side used for export.

Cache layout (both modules): kv (B, n_blocks, 2, P, D), index 0 = keys and 1 = values after
each block's qkv projection, heads concatenated along D (head h = columns h*hd:(h+1)*hd).

Time-aware models (cfg.time_buckets) step too: their cached keys/values depend only on earlier
clicks and their times, as the items' do. The step then also takes the new click's time and the
cached slots' times (`past_time`), from which it rebuilds the new position's interval and
session features and its time-relation attention bias exactly as the full model's
TimeFeatures computes them for that position.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError
from model.sasrec import Block, SASRec, TimeFeatures, log_bucket

CACHE_DTYPE = torch.float16  # ~2e-3 relative rounding; halves the per-user cache


def uses_time(model: SASRec) -> bool:
    """Time-aware models take a time_seq beside item_seq."""
    return getattr(model, "time", None) is not None


def supports_step(model: SASRec) -> bool:
    """Cached keys/values stay valid only when a click moves no earlier position."""
    return model.cfg.positions == "first"


def _require_step(model: SASRec) -> None:
    if not supports_step(model):
        raise ModelError(
            f"positions={model.cfg.positions!r} shift every cached position on each click; "
            "incremental inference needs positions='first'"
        )


class FullModel(nn.Module):
    """model.onnx: scores and the final-LayerNorm state of the newest slot of each window."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, item_seq: torch.Tensor, *time_seq: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """item_seq (B, L)[, time_seq (B, L) for time-aware models] -> scores (B, N + 1),
        hidden (B, D)."""
        hidden = self.model(item_seq, *time_seq)[:, -1, :]  # (B, D)
        return self.model.logits(hidden), hidden  # (B, N + 1), (B, D)


class Prefill(nn.Module):
    """prefill.onnx: the full model's outputs plus every slot's keys/values (the cache).

    The keys/values are read off the model's own forward (hooks on each block's qkv
    projection), so the cache is exactly what the full model computed, in any SASRec variant.
    """

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        _require_step(model)
        self.model = model

    def forward(
        self, item_seq: torch.Tensor, *time_seq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """item_seq (B, L) left-padded[, time_seq (B, L) for time-aware models] -> scores
        (B, N + 1), hidden (B, D), kv (B, nb, 2, L, D)."""
        qkv: list[torch.Tensor] = []
        handles = [
            block.attn.qkv.register_forward_hook(lambda _m, _i, out: qkv.append(out))
            for block in blocks_of(self.model)
        ]
        try:
            hidden = self.model(item_seq, *time_seq)[:, -1, :]  # (B, D)
        finally:
            for handle in handles:
                handle.remove()
        d = self.model.cfg.d_model
        kv = torch.stack([torch.stack(torch.split(o, d, dim=2)[1:], dim=1) for o in qkv], dim=1)
        return self.model.logits(hidden), hidden, kv.to(CACHE_DTYPE)  # kv (B, nb, 2, L, D)


class StepModel(nn.Module):
    """step.onnx: one new item per row on top of the cached keys/values of positions 0..P-1.

    Key j of the cache is attended iff j < position (slots beyond are the caller's padding),
    plus the new item itself, which is what the full model's causal mask gives that position.
    """

    vectors: torch.Tensor  # (N + 1, D)
    bias: torch.Tensor | None  # (N + 1,)

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        _require_step(model)
        self.model = model
        self.scale = math.sqrt(model.cfg.d_model)
        # A constant: the graph does not recompute a derived item representation per call.
        self.register_buffer("vectors", model.item_vectors().detach().clone(), persistent=False)
        bias = model.score_bias()  # (N + 1,) or None, as the full model's logits add it
        self.register_buffer("bias", None if bias is None else bias.detach().clone(), False)

    def forward(
        self,
        item: torch.Tensor,
        position: torch.Tensor,
        past_kv: torch.Tensor,
        *times: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """item (B,), position (B,), past_kv (B, nb, 2, P, D)[, time (B,) and past_time (B, P)
        epoch seconds for time-aware models] -> scores (B, N + 1), hidden (B, D), new_kv
        (B, nb, 2, D)."""
        vectors = self.vectors  # (N + 1, D)
        x = F.embedding(item, vectors) * self.scale + self.model.pos_emb(position)  # (B, D)
        steps = torch.arange(past_kv.shape[3], device=item.device)  # (P,)
        visible = steps.unsqueeze(0) < position.unsqueeze(1)  # (B, P)
        bias: tuple[torch.Tensor, torch.Tensor] | None = None
        features = self.model.time
        if features is not None:
            if len(times) != 2:
                raise ModelError("this model is time-aware: pass time and past_time")
            step_in, bias = _time_step(features, position, *times)
            x = x + step_in
        new_kv = []
        for i, block in enumerate(blocks_of(self.model)):
            # Select in float16, then cast: onnxruntime copies each selection, half the bytes
            # this way (about 15% of the step at batch 256 here).
            past_k, past_v = past_kv[:, i, 0].float(), past_kv[:, i, 1].float()  # (B, P, D)
            x, k, v = _block_step(block, x, past_k, past_v, visible, bias)
            new_kv.append(torch.stack([k, v], dim=1))  # (B, 2, D)
        hidden = self.model.ln_f(x)  # (B, D)
        scores = hidden @ vectors.T  # (B, N + 1)
        if self.bias is not None:
            scores = scores + self.bias
        return scores, hidden, torch.stack(new_kv, dim=1).to(CACHE_DTYPE)  # (B, nb, 2, D)


def blocks_of(model: SASRec) -> list[Block]:
    return [cast(Block, block) for block in model.blocks]


def _time_step(
    features: TimeFeatures, position: torch.Tensor, time: torch.Tensor, past_time: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """TimeFeatures at one new position: position (B,), time (B,), past_time (B, P) epoch
    seconds of the cached slots (slots >= position are ignored) -> (the input term (B, D), the
    attention bias towards the cached slots (B, H, P) and towards itself (B, H, 1)).

    As the full model: the interval to the previous click in the window (none at position 0),
    a session start after more than session_gap_s, and per key the log bucket of the time
    elapsed since it plus "same session" (no session start after the key up to the query)."""
    has_prev = position > 0  # (B,)
    previous = past_time.gather(1, (position - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (B,)
    interval = (time - previous).clamp(min=0)  # (B,)
    start = ~has_prev | (interval > features.gap)  # (B,)
    bucket = torch.where(has_prev, 1 + log_bucket(interval, features.buckets), 0)  # (B,)
    step_in = features.interval_emb(bucket) + features.session_emb(start.long())  # (B, D)
    # Session starts inside the cache: slot k >= 1 starts one when its gap exceeds session_gap_s.
    gaps = (past_time[:, 1:] - past_time[:, :-1]) > features.gap  # (B, P - 1)
    starts = torch.cumsum(F.pad(gaps.long(), (1, 0)), dim=1)  # (B, P): starts in slots 1..k
    # position <= P always (the cache holds the slots before it), so position - 1 is a slot.
    upto = starts.gather(1, (position - 1).clamp(min=0).unsqueeze(1))  # (B, 1)
    same = ((upto - starts) == 0) & ~start.unsqueeze(1)  # (B, P): key j, query position
    elapsed = (time.unsqueeze(1) - past_time).clamp(min=0)  # (B, P)
    past_bias = features.relation_bias(log_bucket(elapsed, features.buckets))  # (B, P, H)
    past_bias = past_bias + features.session_bias(same.long())  # (B, P, H)
    zero = torch.zeros_like(time)  # (B,): the new click is in its own session, 0 s from itself
    self_bias = features.relation_bias(zero) + features.session_bias(zero + 1)  # (B, H)
    return step_in, (past_bias.transpose(1, 2), self_bias.unsqueeze(2))


def _block_step(
    block: Block,
    x: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    visible: torch.Tensor,
    bias: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block (pre- or post-LN) at one position: x (B, D), past_k/v (B, P, D), visible
    (B, P), a time model's attention bias (towards the past (B, H, P) and itself (B, H, 1)) ->
    (x after the block (B, D), the position's key (B, D) and value (B, D))."""
    attn = block.attn
    heads, hd = attn.n_heads, attn.head_dim
    q, k, v = torch.split(attn.qkv(x if block.post_ln else block.ln_1(x)), attn.d_model, dim=1)
    qh = torch.unflatten(q, 1, (heads, hd)).unsqueeze(2)  # (B, H, 1, hd)
    kh = torch.unflatten(k, 1, (heads, hd))  # (B, H, hd)
    vh = torch.unflatten(v, 1, (heads, hd))  # (B, H, hd)
    past_kh = torch.unflatten(past_k, 2, (heads, hd)).transpose(1, 2)  # (B, H, P, hd)
    past_vh = torch.unflatten(past_v, 2, (heads, hd)).transpose(1, 2)  # (B, H, P, hd)
    scale = 1.0 / math.sqrt(hd)
    past_logits = (qh @ past_kh.transpose(2, 3)).squeeze(2) * scale  # (B, H, P)
    self_logit = (qh.squeeze(2) * kh).sum(dim=2, keepdim=True) * scale  # (B, H, 1)
    if bias is not None:
        past_logits, self_logit = past_logits + bias[0], self_logit + bias[1]
    past_logits = past_logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    weights = torch.softmax(torch.cat([past_logits, self_logit], dim=2), dim=2)  # (B, H, P + 1)
    y = (weights[:, :, :-1].unsqueeze(2) @ past_vh).squeeze(2)  # (B, H, hd)
    y = y + weights[:, :, -1:] * vh  # (B, H, hd)
    if block.post_ln:
        x = block.ln_1(x + block.attn.proj(y.flatten(1)))  # (B, D)
        return block.ln_2(x + block.ffn(x)), k, v  # (B, D)
    x = x + block.attn.proj(y.flatten(1))  # (B, D)
    out: torch.Tensor = x + block.ffn(block.ln_2(x))  # (B, D)
    return out, k, v
