"""Full-softmax cross-entropy over the tied output layer, fused for CPU training.

`F.cross_entropy(hidden @ E.T, targets)` spent most of a training step in log-softmax and its
backward on ML-1M (T ≈ 14k targets × 3.4k items per batch): autograd keeps the logits, the
log-probabilities, a zero-filled one-hot gradient and the softmax gradient, each a (T, N + 1)
tensor. Here the forward turns the logits into probabilities in place and keeps only them; the
backward reuses that buffer as the logits' gradient. Same numbers as
`F.cross_entropy(hidden @ E.T, targets, label_smoothing=eps)` (mean over rows), about 4x
faster for that part of the step.

The (T, C) buffer is kept between steps: a fresh 190 MB tensor per step cost ~70 ms of page
faults here (glibc serves it with mmap). A forward takes the buffer and its backward gives it
back, so two forwards before one backward simply allocate a second one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from model.sasrec import SASRec

_spare: list[torch.Tensor] = []  # at most one idle (T * C,) float32 buffer


def _take(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    spare = _spare.pop() if _spare else None
    n = rows * cols
    if spare is None or spare.numel() < n or spare.dtype != like.dtype:
        spare = torch.empty(max(n, spare.numel() if spare is not None else 0), dtype=like.dtype)
    return spare[:n].view(rows, cols)


def _give_back(buffer: torch.Tensor) -> None:
    base = buffer._base if buffer._base is not None else buffer
    _spare[:] = [base]


class _FullSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        target_weights: torch.Tensor,
        smoothing: float,
    ) -> torch.Tensor:
        logits = torch.mm(hidden, weight.T, out=_take(len(hidden), len(weight), hidden))  # (T, C)
        target_logit = (logits.gather(1, targets) * target_weights).sum(dim=1)  # (T,)
        mean_logit = logits.mean(dim=1) if smoothing else None  # (T,)
        top = logits.amax(dim=1, keepdim=True)  # (T, 1)
        probs = logits.sub_(top).exp_()  # (T, C), unnormalised
        total = probs.sum(dim=1, keepdim=True)  # (T, 1)
        lse = top.squeeze(1) + total.squeeze(1).log()  # (T,)
        loss = lse - target_logit  # (T,)
        if mean_logit is not None:
            loss = (1.0 - smoothing) * loss + smoothing * (lse - mean_logit)
        probs.div_(total)
        ctx.probs = probs
        ctx.smoothing = smoothing
        ctx.save_for_backward(hidden, weight, targets, target_weights)
        return loss.mean()

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, targets, target_weights = ctx.saved_tensors
        probs: torch.Tensor = ctx.probs  # (T, C), freed with ctx
        smoothing: float = ctx.smoothing
        T, C = probs.shape
        # d loss / d logits = (softmax - smoothed target distribution) / T, in the probs buffer.
        grad = probs
        if smoothing:
            grad.sub_(smoothing / C)
        rows = torch.arange(T).unsqueeze(1).expand_as(targets)  # (T, K)
        grad.index_put_((rows, targets), target_weights * (smoothing - 1.0), accumulate=True)
        grad.mul_(grad_outputs[0] / T)
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None  # (T, D)
        grad_weight = grad.T @ hidden if ctx.needs_input_grad[1] else None  # (C, D)
        ctx.probs = None
        _give_back(probs)
        return grad_hidden, grad_weight, None, None, None


def full_softmax_ce(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    smoothing: float = 0.0,
    target_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of (T, D) hidden rows against all C rows of weight (C, D).

    targets: (T,) int64 in [0, C), or (T, K) with target_weights (T, K) whose rows sum to 1:
    a target distribution over K items per row (repeats add up). Rows are never ignored:
    select the real ones before calling.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    if targets.dim() == 1:
        targets = targets.unsqueeze(1)  # (T, 1)
    if target_weights is None:
        target_weights = torch.ones(targets.shape, dtype=hidden.dtype)
    out: torch.Tensor = _FullSoftmaxCE.apply(  # type: ignore[no-untyped-call]
        hidden, weight, targets, target_weights.to(hidden.dtype), float(smoothing)
    )
    return out


def sequence_loss(
    model: SASRec,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    future: int = 1,
    future_decay: float = 0.5,
    times: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean full-softmax cross-entropy over every non-padding target of (B, L) windows.

    With future > 1 each position learns a distribution over the next `future` items of its
    window, weighted future_decay^j for the item j + 1 steps ahead: one softmax, several
    targets, so the extra signal costs almost nothing. `times` (B, L) epoch seconds feed a
    time-aware model."""
    hidden = model(inputs, times)  # (B, L, D)
    real = targets.reshape(-1) != 0  # (B * L,)
    ahead = [targets] + [F.pad(targets[:, j:], (0, j)) for j in range(1, future)]
    upcoming = torch.stack(ahead, dim=-1).reshape(-1, future)[real]  # (T, K)
    weights = (future_decay ** torch.arange(future, dtype=hidden.dtype)) * (upcoming != 0)
    output = model.item_vectors()  # (N + 1, D), the tied output layer
    columns = model.softmax_items()
    if columns is not None:  # a softmax over some items only: targets renumbered to its columns
        output = output[columns]  # (C, D)
        renumber = torch.zeros(len(model.item_emb.weight), dtype=torch.int64)
        renumber[columns] = torch.arange(len(columns))
        upcoming = renumber[upcoming]  # (T, K); targets are always among the columns
    # Only real positions get logits: gathering (T, D) hidden rows is cheap and skips ~40% of
    # the output layer on padded windows (DESIGN.md).
    rows = hidden.reshape(-1, hidden.shape[-1])[real]  # (T, D)
    weights = weights / weights.sum(dim=1, keepdim=True)  # (T, K)
    return full_softmax_ce(rows, output, upcoming, label_smoothing, weights)
