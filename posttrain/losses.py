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

import math
from dataclasses import dataclass

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
        raise ValueError(
            "grpo_loss: kl_coef > 0 needs ref_logprobs (log-probs of the frozen reference model)"
        )
    if entropy_coef > 0 and entropy is None:
        raise ValueError(
            "grpo_loss: entropy_coef > 0 needs entropy (entropy_from_logits of the policy logits)"
        )
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


# --------------------------------------------------------------------------------------------------
# Codistillation: hard labels + a teacher's soft targets, weighted per token and over training
#
#   loss_t = (1 − λ_t) · CE(student, label_t) + λ_t · τ² · D(teacher_τ ‖ student_τ)
#
# λ_t = base(step) × Π per-token factors, from the modes:
#   fixed               base = lambda0
#   schedule            base moves from lambda0 to lambda1 over total_steps (linear or cosine)
#   teacher_confidence  factor = p_teacher(gold token)           soft where the teacher agrees with the label
#   teacher_entropy     factor = 1 − H(teacher) / log V          soft where the teacher is sure
# The per-token signals read the teacher at temperature 1; D reads both models at temperature τ.
# From top-k targets: p_teacher(gold) is 0 when the gold token is outside the top k, and H is the
# entropy over the K kept tokens + the tail bucket — a lower bound of the full entropy, so
# teacher_entropy's λ is at least the full-logits one (equal at K = V).
# λ_t is a constant of the loss (it depends on the teacher only), so no gradient flows through it.

CODISTILL_MODES = ("fixed", "schedule", "teacher_confidence", "teacher_entropy")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# log of the smallest positive float32: where the teacher has exactly zero mass (an empty top-k tail),
# reverse KL and JSD read this instead of −inf.
LOG_FLOOR = -87.0


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's next-token distribution at each position, aligned with the student's logits.

    Either ``logits`` [B, T, V] (online teacher), or a top-k summary (offline targets):
    ``topk_logprobs`` [B, T, K], the teacher's log-probabilities at temperature 1 (normalised over the
    whole vocabulary, so their exp sums to <= 1) of the token ids in ``topk_indices`` [B, T, K].

    Missing mass of the top-k path: the tokens outside the top k are merged into one *tail bucket*.
    The teacher's tail mass is ``1 − Σ exp(topk_logprobs)``; the student's is its exact probability of
    all non-kept tokens. The divergence is then taken over K + 1 classes, which, for KL and JSD, is a
    lower bound of the divergence over the full vocabulary (merging classes never increases it); at
    temperature τ the tail is tempered as one class (mass^(1/τ)). With K = V there is no tail and the
    result equals the full-logits path.
    """

    logits: Tensor | None = None  # [B, T, V]
    topk_logprobs: Tensor | None = None  # [B, T, K]
    topk_indices: Tensor | None = None  # [B, T, K] int64

    def __post_init__(self) -> None:
        has_values, has_index = self.topk_logprobs is not None, self.topk_indices is not None
        if (self.logits is not None) == (has_values or has_index) or has_values != has_index:
            raise ValueError("TeacherTargets takes either logits, or topk_logprobs + topk_indices")


def codistill_lambda_base(
    modes: tuple[str, ...], lambda0: float, lambda1: float, shape: str, step: int, total_steps: int
) -> float:
    """The token-independent part of λ: ``lambda0`` or, with mode ``schedule``, its value at ``step``.

    ``step`` is the 0-based index of the update among ``total_steps``: progress
    p = clamp(step / (total_steps − 1), 0, 1), so the first update uses λ0 and the last λ1;
    linear: λ0 + (λ1 − λ0)·p; cosine: λ0 + (λ1 − λ0)·(1 − cos πp)/2 (flat at both ends).
    """
    if "schedule" not in modes:
        return lambda0
    p = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
    if shape == "linear":
        frac = p
    elif shape == "cosine":
        frac = (1.0 - math.cos(math.pi * p)) / 2.0
    else:
        raise ValueError(f"unknown lambda schedule shape {shape!r}; valid: linear, cosine")
    return lambda0 + (lambda1 - lambda0) * frac


def _fp32_or_wider(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _check_modes(modes: tuple[str, ...]) -> None:
    unknown = [m for m in modes if m not in CODISTILL_MODES]
    if unknown or not modes:
        raise ValueError(f"codistill modes {modes!r}: each must be one of {', '.join(CODISTILL_MODES)}")
    if "fixed" in modes and "schedule" in modes:
        raise ValueError("codistill modes: 'fixed' and 'schedule' both set the base λ; pick one")


def _teacher_classes(
    student_logits: Tensor, teacher: TeacherTargets, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Teacher and student over the classes the divergence compares (V, or K kept + 1 tail).

    Returns (teacher log-probs at τ [B,T,C], student log-probs at τ [B,T,C],
    teacher p(gold) at τ=1 [B,T], teacher entropy at τ=1 [B,T], teacher argmax id [B,T]).
    """
    vocab = student_logits.shape[-1]
    student_tau = F.log_softmax(_fp32_or_wider(student_logits) / temperature, dim=-1)  # [B, T, V]
    gold = labels.clamp_min(0).unsqueeze(-1)  # [B, T, 1]
    if teacher.logits is not None:
        t_logits = _fp32_or_wider(teacher.logits.detach())  # [B, T, V]
        if t_logits.shape[-1] != vocab:
            raise ValueError(
                f"teacher logits have vocabulary {t_logits.shape[-1]} but the student's has {vocab}; "
                "codistillation needs teacher and student to share one tokenizer"
            )
        t_logp1 = F.log_softmax(t_logits, dim=-1)  # [B, T, V]
        t_tau = F.log_softmax(t_logits / temperature, dim=-1)  # [B, T, V]
        p_gold = t_logp1.gather(-1, gold).squeeze(-1).exp()  # [B, T]
        entropy = -torch.xlogy(t_logp1.exp(), t_logp1.exp()).sum(-1)  # [B, T]
        return t_tau, student_tau, p_gold, entropy, t_logits.argmax(-1)

    assert teacher.topk_logprobs is not None and teacher.topk_indices is not None
    values = _fp32_or_wider(teacher.topk_logprobs.detach())  # [B, T, K]
    index = teacher.topk_indices.detach().long()  # [B, T, K]
    k = values.shape[-1]
    if k > vocab or int(index.max()) >= vocab:
        raise ValueError(
            f"teacher top-k targets index a vocabulary of >= {max(k, int(index.max()) + 1)} tokens but the "
            f"student's has {vocab}; codistillation needs teacher and student to share one tokenizer"
        )
    s_kept = student_tau.gather(-1, index)  # [B, T, K]
    p_gold = (values.exp() * (index == gold)).sum(-1)  # [B, T]; 0 when the gold token is not in the top k
    argmax = index.gather(-1, values.argmax(-1, keepdim=True)).squeeze(-1)  # [B, T]
    if k == vocab:  # no tail
        t_logp1, s_classes = values, s_kept
    else:
        tail_mass = (1.0 - values.exp().sum(-1, keepdim=True)).clamp_min(0.0)  # [B, T, 1]
        t_logp1 = torch.cat([values, tail_mass.log()], dim=-1)  # [B, T, K+1]
        s_tail = student_tau.scatter(-1, index, float("-inf")).logsumexp(-1, keepdim=True)  # [B, T, 1]
        s_classes = torch.cat([s_kept, s_tail], dim=-1)  # [B, T, K+1]
    t_tau = F.log_softmax(t_logp1 / temperature, dim=-1)  # [B, T, C]
    entropy = -torch.xlogy(t_logp1.exp(), t_logp1.exp()).sum(-1)  # [B, T]
    return t_tau, s_classes, p_gold, entropy, argmax


def _divergence(t_logp: Tensor, s_logp: Tensor, kind: str, beta: float) -> Tensor:
    """D over the last axis of two log-distributions [B, T, C] -> [B, T]. Zero-probability terms add 0."""
    t_p, s_p = t_logp.exp(), s_logp.exp()
    if kind == "forward_kl":  # KL(teacher ‖ student) = Σ t (log t − log s)
        return (torch.xlogy(t_p, t_p) - t_p * s_logp).sum(-1)
    t_floor = t_logp.clamp_min(LOG_FLOOR)
    if kind == "reverse_kl":  # KL(student ‖ teacher) = Σ s (log s − log t)
        return (s_p * (s_logp - t_floor)).sum(-1)
    if kind == "jsd":  # β·KL(t ‖ m) + (1 − β)·KL(s ‖ m), m = β t + (1 − β) s  (GKD's generalized JSD)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {beta}; at 0 or 1 use forward_kl/reverse_kl")
        log_m = torch.logsumexp(torch.stack([t_floor + math.log(beta), s_logp + math.log1p(-beta)]), dim=0)
        kl_t = (torch.xlogy(t_p, t_p) - t_p * log_m).sum(-1)
        kl_s = (s_p * (s_logp - log_m)).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s
    raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")


def codistill_loss(
    student_logits: Tensor,
    labels: Tensor,
    teacher: TeacherTargets,
    *,
    modes: tuple[str, ...] = ("fixed",),
    lambda0: float = 0.5,
    lambda1: float = 0.5,
    schedule: str = "linear",
    step: int = 0,
    total_steps: int = 1,
    temperature: float = 1.0,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token codistillation loss ``(1 − λ_t)·CE + λ_t·τ²·D(teacher_τ ‖ student_τ)``.

    ``student_logits`` [B, T, V] and ``labels`` [B, T] are aligned (``shift_for_next_token``), and so
    is ``teacher`` (its position t predicts ``labels[:, t]``). The teacher gets no gradient.

    Returns (loss [B, T] with 0 at ignored positions, metrics): per-token ``lambda``, ``hard`` (CE),
    ``soft`` (τ²·D), ``agree`` (teacher argmax == label) [B, T] and ``mask``; and this batch's masked
    means ``lambda_mean``, ``hard_mean``, ``soft_mean``, ``teacher_label_agreement`` (all detached).
    """
    _check_modes(modes)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = labels != ignore_index  # [B, T]
    logp = F.log_softmax(_fp32_or_wider(student_logits), dim=-1)  # [B, T, V]
    hard = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    t_tau, s_tau, p_gold, entropy, argmax = _teacher_classes(student_logits, teacher, labels, temperature)
    soft = temperature**2 * _divergence(t_tau, s_tau, divergence, jsd_beta)  # [B, T]

    base = codistill_lambda_base(modes, lambda0, lambda1, schedule, step, total_steps)
    lam = torch.full_like(hard, base)  # [B, T]
    if "teacher_confidence" in modes:
        lam = lam * p_gold
    if "teacher_entropy" in modes:
        lam = lam * (1.0 - entropy / math.log(student_logits.shape[-1])).clamp(0.0, 1.0)
    lam = lam.detach()

    per_token = ((1.0 - lam) * hard + lam * soft) * mask  # [B, T]
    agree = (argmax == labels).float()  # [B, T]
    count = mask.sum().clamp_min(1)

    def mean(x: Tensor) -> Tensor:
        return (x.detach() * mask).sum() / count

    metrics = {
        "mask": mask,
        "lambda": lam,
        "hard": hard.detach(),
        "soft": soft.detach(),
        "agree": agree,
        "lambda_mean": mean(lam),
        "hard_mean": mean(hard),
        "soft_mean": mean(soft),
        "teacher_label_agreement": mean(agree),
    }
    return per_token, metrics
