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


# --------------------------------------------------------------------------------------------------
# Online RL: clipped policy gradient (GRPO / DAPO), k3 KL to a frozen reference, entropy


def policy_gradient_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (PPO/GRPO; DAPO's asymmetric clip when ``clip_high > clip_low``).

    With ratio ``rho = exp(logprobs - old_logprobs)`` and advantage ``A`` (one per sequence [B] or per
    token [B, T]), the per-token loss is ``-min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)``.
    On-policy (``old_logprobs = logprobs.detach()``) rho = 1 and the gradient is ``-A * grad logprobs``.

    logprobs, old_logprobs: [B, T] log-probs of the sampled tokens (current policy, sampling policy);
    mask: [B, T] bool, True on completion tokens. Returns (loss [B, T] (0 off the mask), metrics):
    ``clip_frac_low`` (rho < 1 - clip_low with A < 0, where the clip is active), ``clip_frac_high``
    (rho > 1 + clip_high with A > 0), ``clip_frac`` (either), ``ratio_mean/min/max`` over the mask.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages  # [B, 1] or [B, T]
    adv = adv.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)  # [B, T]
    per_token = -torch.min(ratio * adv, clipped * adv) * mask  # [B, T]
    r = ratio.detach()
    low = (r < 1.0 - clip_low) & (adv < 0) & mask  # [B, T]
    high = (r > 1.0 + clip_high) & (adv > 0) & mask  # [B, T]
    count = mask.sum().clamp_min(1)
    big = torch.finfo(r.dtype).max
    metrics = {
        "mask": mask,
        "ratio": r,
        "clipped": low | high,
        "clip_frac_low": low.sum() / count,
        "clip_frac_high": high.sum() / count,
        "clip_frac": (low | high).sum() / count,
        "ratio_mean": (r * mask).sum() / count,
        "ratio_min": torch.where(mask, r, torch.full_like(r, big)).min(),
        "ratio_max": torch.where(mask, r, torch.full_like(r, -big)).max(),
    }
    return per_token, metrics


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Schulman's k3 estimator of KL(policy || reference) per sampled token.

    With ``d = ref_logprobs - logprobs`` (both [B, T]): ``k3 = exp(d) - d - 1 >= 0``; its expectation
    under the policy is the KL. Returns (k3 [B, T] (0 off the mask), {"kl_mean": mean over the mask}).
    """
    d = ref_logprobs - logprobs  # [B, T]
    per_token = (torch.exp(d) - d - 1.0) * mask  # [B, T]
    return per_token, {"mask": mask, "kl_mean": per_token.detach().sum() / mask.sum().clamp_min(1)}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution: [B, T, V] -> [B, T] (float32), ``H = logsumexp(l) - sum p*l``."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)  # [B, T, V]
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token RL loss = clipped policy gradient + ``kl_coef`` * k3 KL - ``entropy_coef`` * entropy.

    ``ref_logprobs`` [B, T] is needed when ``kl_coef > 0``; ``entropy`` [B, T] (``entropy_from_logits``)
    when ``entropy_coef > 0``. Returns (loss [B, T], metrics of the parts; ``kl_mean`` and
    ``entropy_mean`` whenever their inputs are given, even with a zero coefficient).
    """
    per_token, metrics = policy_gradient_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high)
    count = mask.sum().clamp_min(1)
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("grpo_loss: kl_coef > 0 needs ref_logprobs (log-probs of the frozen reference model)")
    if entropy_coef > 0 and entropy is None:
        raise ValueError("grpo_loss: entropy_coef > 0 needs entropy (entropy_from_logits of the policy logits)")
    if ref_logprobs is not None:
        kl, kl_metrics = kl_k3(logprobs, ref_logprobs, mask)
        metrics["kl_mean"] = kl_metrics["kl_mean"]
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl
    if entropy is not None:
        metrics["entropy_mean"] = (entropy.detach() * mask).sum() / count
        if entropy_coef > 0:
            per_token = per_token - entropy_coef * entropy * mask
    return per_token, metrics
