"""Losses as pure tensor functions.

Convention (shared by every loss here):
  * a loss function takes tensors and returns ``(per_token_loss [B, T], metrics: dict[str, Tensor])``;
    it never touches a model, an optimizer or a process group;
  * ``aggregate`` turns per-token losses into the scalar that is back-propagated. The training loop
    passes ``denom`` = the number of loss tokens in the *whole optimizer step* (all micro-batches,
    all data-parallel ranks), so the gradient does not depend on how the step is split.

Shapes: B batch, T sequence, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def shift_for_next_token(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """logits [B, T, V] predict labels [B, T] one position later -> ([B, T-1, V], [B, T-1])."""
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens) under logits: [B, T, V], [B, T] -> [B, T] (float32 for stability)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token negative log-likelihood of ``labels``; positions equal to ``ignore_index`` get 0.

    ``logits`` [B, T, V] and ``labels`` [B, T] are already aligned (call ``shift_for_next_token`` first).
    Returns (nll [B, T], {"mask": [B, T] bool}).
    """
    mask = labels != ignore_index
    nll = -token_logprobs(logits, labels) * mask
    return nll, {"mask": mask}


def aggregate(per_token: Tensor, mask: Tensor, denom: float | Tensor | None = None) -> Tensor:
    """Sum of masked per-token losses divided by ``denom`` (default: this batch's mask count).

    With ``denom`` = loss tokens in the whole optimizer step, summing this over micro-batches and
    ranks gives the token mean of the full step, whatever the accumulation/data-parallel split.
    """
    total = (per_token * mask).sum()
    if denom is None:
        denom = mask.sum().clamp_min(1)
    return total / denom
