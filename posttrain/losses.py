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
import torch.utils.checkpoint

Tensor = torch.Tensor

IGNORE_INDEX = -100  # a label that is not trained on (prompt tokens, padding): the one value every stage uses


def shift_for_next_token(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """logits [B, T, V] predict labels [B, T] one position later -> ([B, T-1, V], [B, T-1])."""
    return logits[:, :-1, :], labels[:, 1:]


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log p(tokens) under logits: [B, T, V], [B, T] -> [B, T] (float32 for stability)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)


def next_token_logprobs(logits: Tensor, input_ids: Tensor) -> tuple[Tensor, Tensor]:
    """A forward's logits [B, T, V] on ``input_ids`` [B, T] -> (logits [B, T-1, V] predicting tokens
    1..T-1, the log-probs of those tokens [B, T-1])."""
    shifted = logits[:, :-1]
    return shifted, token_logprobs(shifted, input_ids[:, 1:].to(shifted.device))


def sft_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, chunk_tokens: int = 1024
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token negative log-likelihood of ``labels``; positions equal to ``ignore_index`` get 0.

    ``logits`` [B, T, V] and ``labels`` [B, T] are already aligned (call ``shift_for_next_token`` first).
    The float32 log-softmax runs ``chunk_tokens`` positions at a time (``completion_logprobs``), so no
    float32 [B, T, V] copy is kept for the backward pass. Returns (nll [B, T], {"mask": [B, T] bool}).
    """
    mask = labels != ignore_index
    logprobs, _ = completion_logprobs(logits, labels, chunk_tokens=chunk_tokens, entropy=False)
    return -logprobs * mask, {"mask": mask}


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


def completion_logprobs(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 1024,
    entropy: bool = True,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``tokens`` under ``softmax(logits / temperature)``, and that distribution's entropy.

    ``logits`` [B, S, V] (any dtype; only the positions that predict ``tokens`` [B, S], e.g. a
    completion's) are read whole rows at a time, about ``chunk_tokens`` positions (at least one row), in
    float32, so the float32 work is [chunk_tokens, V] rather than [B, S, V], and no slice is copied. With autograd on, each chunk is recomputed in the
    backward pass (activation checkpointing) instead of keeping its float32 softmax, so memory grows
    with the completion tokens in the logits' own dtype only. Returns (log-probs [B, S] float32,
    entropy [B, S] float32 or None without ``entropy``; it carries a gradient only with ``entropy_grad``).

    At ``temperature`` T the log-probs are those of the distribution the engine samples from at T
    (``SamplingConfig.temperature``), so the policy gradient is unbiased for T != 1 too.
    """
    if temperature <= 0:
        raise ValueError(f"completion_logprobs: temperature must be > 0, got {temperature}")
    if logits.dim() == 2:  # [N, V]: one row of N positions
        logits, tokens = logits.unsqueeze(0), tokens.unsqueeze(0)
    rows = max(1, chunk_tokens // max(1, logits.shape[1]))  # whole rows per chunk: slicing copies nothing
    targets = tokens.clamp_min(0).to(logits.device)  # [B, S]
    grad = torch.is_grad_enabled() and logits.requires_grad
    logps, ents = [], []
    for b in range(0, logits.shape[0], rows):
        x, t = logits[b : b + rows], targets[b : b + rows]  # [r, S, V] (a view), [r, S]
        if grad:
            lp = torch.utils.checkpoint.checkpoint(_chunk_logprobs, x, t, temperature, use_reentrant=False)
        else:
            lp = _chunk_logprobs(x, t, temperature)
        logps.append(lp)
        if entropy and grad and entropy_grad:
            ents.append(
                torch.utils.checkpoint.checkpoint(_chunk_entropy, x, temperature, use_reentrant=False)
            )
        elif entropy:
            with torch.no_grad():
                ents.append(_chunk_entropy(x, temperature))
    shape = tokens.shape
    empty = logits.new_zeros(shape, dtype=torch.promote_types(logits.dtype, torch.float32))
    logp = torch.cat(logps) if logps else empty
    return logp.reshape(shape), ((torch.cat(ents) if ents else empty).reshape(shape) if entropy else None)


def _tempered(x: Tensor, temperature: float) -> Tensor:
    z = x.to(torch.promote_types(x.dtype, torch.float32))  # [r, S, V]; no copy when already float32
    return z if temperature == 1.0 else z / temperature


def _chunk_logprobs(x: Tensor, targets: Tensor, temperature: float) -> Tensor:
    z = _tempered(x, temperature)  # [r, S, V]
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)  # [r, S]


def _chunk_entropy(x: Tensor, temperature: float) -> Tensor:
    z = _tempered(x, temperature)  # [r, S, V]
    return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(dim=-1)  # [r, S]


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution: [B, T, V] -> [B, T] (float32), ``H = logsumexp(l) - sum p*l``."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)  # [B, T, V]
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def importance_weights(
    proximal: Tensor, behaviour: Tensor, mask: Tensor, mode: str = "truncate", cap: float = 2.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token importance weights w = π_prox / π_behav of the sampled tokens, for training on samples
    a different policy generated: the rollout engine at an older weight version (asynchronous RL) or
    with other kernels and precision (bf16 on GPU, MoE routing that flips).

    ``proximal`` [B, T]: the trainer's log-probs of the current weights before this step's update
    (the anchor of the PPO clip: decoupled PPO); ``behaviour`` [B, T]: the engine's log-probs at the
    weights that sampled. ``mode``: ``truncate`` — w = min(w, cap) (truncated IS); ``mask`` — w = 1
    inside [1/cap, cap] and 0 outside (the token leaves the loss; the denominator is unchanged);
    ``none`` — w = 1. Returns (w [B, T], detached; 0 off the mask) and metrics over the mask:
    ``is_weight_mean``, ``is_weight_max`` (of the raw ratio), ``is_ess`` (effective sample size
    (Σw)² / (N Σw²) of the raw ratios, 1 = all equal), ``is_masked_frac`` (tokens truncated or masked).

    >>> w, m = importance_weights(torch.tensor([[0.0, 0.0]]), torch.log(torch.tensor([[0.25, 1.0]])), torch.ones(1, 2, dtype=torch.bool))
    >>> w.tolist(), round(float(m["is_weight_max"]), 6), round(float(m["is_masked_frac"]), 6)
    ([[2.0, 1.0]], 4.0, 0.5)
    """
    raw = torch.exp((proximal - behaviour).detach().double())  # [B, T]
    m = mask.bool()
    count = m.sum().clamp_min(1)
    if mode == "none":
        w, out = torch.ones_like(raw), torch.zeros_like(m)
    elif mode == "truncate":
        w, out = raw.clamp(max=cap), raw > cap
    elif mode == "mask":
        out = (raw > cap) | (raw < 1.0 / cap)
        w = torch.where(out, torch.zeros_like(raw), torch.ones_like(raw))
    else:
        raise ValueError(f"unknown importance correction {mode!r}; valid: none, truncate, mask")
    r = torch.where(m, raw, torch.zeros_like(raw))
    metrics = {
        "is_weight_mean": r.sum() / count,
        "is_weight_max": r.max(),
        "is_ess": r.sum() ** 2 / (count * (r**2).sum()).clamp_min(1e-30),
        "is_masked_frac": (out & m).sum() / count,
    }
    return (w * m).to(proximal.dtype), metrics


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
    is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token RL loss = w · clipped policy gradient + ``kl_coef`` * k3 KL - ``entropy_coef`` * entropy.

    ``ref_logprobs`` [B, T] is needed when ``kl_coef > 0``; ``entropy`` [B, T] (``entropy_from_logits``)
    when ``entropy_coef > 0``; ``is_weights`` [B, T] (``importance_weights``, detached) multiply the
    policy-gradient term (decoupled PPO: the clip is anchored on ``old_logprobs``, the proximal
    policy, and w corrects from the behaviour policy to it). Returns (loss [B, T], metrics of the
    parts; ``kl_mean`` and ``entropy_mean`` whenever their inputs are given, even with a zero coefficient).
    """
    per_token, metrics = policy_gradient_loss(logprobs, old_logprobs, advantages, mask, clip_low, clip_high)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
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
#
# The classes D compares. Both models are first reduced to the same C classes at temperature 1 —
# all V tokens (teacher logits), or the K kept tokens + one tail bucket (top-k targets: the teacher's
# tail is 1 − Σ top-k probs, the student's its exact mass of the non-kept tokens) — and only then
# tempered, both in the same way, as C-class distributions: q_τ(c) = q(c)^(1/τ) / Σ_c' q(c')^(1/τ).
# So D = D(temper_τ(merge(teacher)) ‖ temper_τ(merge(student))), which is 0 whenever the merged
# distributions agree (a student equal to its teacher gets no soft loss and no gradient, at every τ:
# tempering is one-to-one on C-class distributions). With C = V this is exactly D(teacher_τ ‖
# student_τ) of the full vocabulary. With a tail at τ = 1 it is a lower bound of the full-vocabulary
# D (merging classes never increases KL or JSD); at τ ≠ 1 it is not a bound either way, because
# tempering the merged tail, (Σ_tail p)^(1/τ), is not merging the tempered tail tokens, Σ_tail p^(1/τ)
# (the teacher's individual tail tokens are unknown, so the second cannot be formed).

CODISTILL_MODES = ("fixed", "schedule", "teacher_confidence", "teacher_entropy")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
# log of the smallest positive float32: where the teacher has exactly zero mass (log-prob −inf, e.g.
# an empty top-k tail), reverse KL and JSD read this instead of −inf. Finite log-probs, however
# negative, are used as they are.
LOG_FLOOR = -87.0


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's next-token distribution at each position, aligned with the student's logits.

    Either ``logits`` [B, T, V] (online teacher), or a top-k summary (offline targets):
    ``topk_logprobs`` [B, T, K], the teacher's log-probabilities at temperature 1 (normalised over the
    whole vocabulary, so their exp sums to <= 1) of the token ids in ``topk_indices`` [B, T, K].

    Missing mass of the top-k path: the tokens outside the top k are merged into one *tail bucket*.
    The teacher's tail mass is ``1 − Σ exp(topk_logprobs)`` (0 where the top k hold all the mass); the
    student's is its exact temperature-1 probability of all non-kept tokens. Both models are thus
    reduced to the same K + 1 classes at temperature 1, and at temperature τ both K + 1-class
    distributions are tempered identically, q_τ(c) ∝ q(c)^(1/τ) — the student's kept tokens and tail
    too, not its full-vocabulary softmax(z/τ). The soft term is D over those K + 1 tempered classes:
    0 when the student's K + 1 classes equal the teacher's (tempering is one-to-one), so a student
    identical to its teacher gets no soft loss or gradient at any τ. At τ = 1 it is a lower bound of the
    full-vocabulary divergence for KL and JSD (merging classes never increases it); at τ ≠ 1 it is
    neither that divergence nor a bound of it (the tail is tempered as one class, (Σ_tail p)^(1/τ),
    where the full vocabulary would temper each tail token). With K = V there is no tail and the result
    equals the full-logits path at every τ.
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


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate near 0 and far below it; −inf at x = 0."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _temper(logp: Tensor, temperature: float) -> Tensor:
    """A C-class distribution (log-probs on the last axis) at temperature τ: log of q^(1/τ) / Σ q^(1/τ)."""
    return F.log_softmax(logp / temperature, dim=-1)


def _teacher_classes(
    student_logp: Tensor, teacher: TeacherTargets, labels: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Teacher and student over the classes the divergence compares (V, or K kept + 1 tail).

    ``student_logp`` [B, T, V] is the student's log-softmax at temperature 1. Both models are reduced
    to the same C classes at temperature 1 and then tempered the same way (``_temper``).

    Returns (teacher log-probs at τ [B,T,C], student log-probs at τ [B,T,C] (float64 for top-k),
    teacher p(gold) at τ=1 [B,T], teacher entropy at τ=1 [B,T], teacher argmax id [B,T]).
    """
    vocab = student_logp.shape[-1]
    gold = labels.clamp_min(0).unsqueeze(-1)  # [B, T, 1]
    if teacher.logits is not None:
        t_logits = _fp32_or_wider(teacher.logits.detach())  # [B, T, V]
        if t_logits.shape[-1] != vocab:
            raise ValueError(
                f"teacher logits have vocabulary {t_logits.shape[-1]} but the student's has {vocab}; "
                "codistillation needs teacher and student to share one tokenizer"
            )
        t_logp1 = F.log_softmax(t_logits, dim=-1)  # [B, T, V]
        p_gold = t_logp1.gather(-1, gold).squeeze(-1).exp()  # [B, T]
        entropy = -torch.xlogy(t_logp1.exp(), t_logp1.exp()).sum(-1)  # [B, T]
        t_tau, s_tau = _temper(t_logp1, temperature), _temper(student_logp, temperature)  # softmax(z/τ) each
        return t_tau, s_tau, p_gold, entropy, t_logits.argmax(-1)

    assert teacher.topk_logprobs is not None and teacher.topk_indices is not None
    values = _fp32_or_wider(teacher.topk_logprobs.detach())  # [B, T, K]
    index = teacher.topk_indices.detach().long()  # [B, T, K]
    k = values.shape[-1]
    if k > vocab or int(index.max()) >= vocab:
        raise ValueError(
            f"teacher top-k targets index a vocabulary of >= {max(k, int(index.max()) + 1)} tokens but the "
            f"student's has {vocab}; codistillation needs teacher and student to share one tokenizer"
        )
    p_gold = (values.exp() * (index == gold)).sum(-1)  # [B, T]; 0 when the gold token is not in the top k
    argmax = index.gather(-1, values.argmax(-1, keepdim=True)).squeeze(-1)  # [B, T]
    # The K (+ 1) classes in float64 (few, so cheap): tempering and the divergence then add no rounding
    # of their own, and a student equal to its teacher gets 0, not float32 noise times τ².
    t_logp1 = values.double()  # [B, T, K]
    s_logp1 = student_logp.gather(-1, index).double()  # [B, T, K], temperature 1
    if k < vocab:
        # the teacher's tail log(1 − Σ top-k probs), from log Σ: exact for the stored log-probs even when
        # tiny (1 − Σ exp in float32 rounds a tail below ~1e-7 to 0); −inf only when the top k hold it all
        kept_mass = t_logp1.logsumexp(-1, keepdim=True).clamp_max(0.0)  # [B, T, 1]
        t_logp1 = torch.cat([t_logp1, _log1mexp(kept_mass)], dim=-1)  # [B, T, K+1]
        s_rest = student_logp.scatter(-1, index, float("-inf"))  # [B, T, V], the kept ids at −inf
        empty = torch.isneginf(s_rest).all(-1, keepdim=True)  # [B, T, 1]: no student tail mass at all
        s_rest = torch.where(empty, torch.zeros_like(s_rest), s_rest)  # logsumexp of all −inf: NaN grads
        s_tail = torch.where(empty, float("-inf"), s_rest.logsumexp(-1, keepdim=True))  # [B, T, 1]
        s_logp1 = torch.cat([s_logp1, s_tail.double()], dim=-1)  # [B, T, K+1]
    entropy = -torch.xlogy(t_logp1.exp(), t_logp1.exp()).sum(-1).to(values.dtype)  # [B, T]
    return _temper(t_logp1, temperature), _temper(s_logp1, temperature), p_gold, entropy, argmax


def _weighted(p: Tensor, log_ratio: Tensor) -> Tensor:
    """p · log_ratio per class, 0 where p = 0 (whatever log_ratio is, ±inf or NaN), gradients finite."""
    return p * torch.where(p == 0, torch.zeros_like(log_ratio), log_ratio)


def _divergence(t_logp: Tensor, s_logp: Tensor, kind: str, beta: float) -> Tensor:
    """D over the last axis of two log-distributions [B, T, C] -> [B, T]. Zero-probability terms add 0.

    Each term is p · (log p − log q), the difference taken per class, so equal inputs give exactly 0.
    Reverse KL and JSD read ``LOG_FLOOR`` for log t only where the teacher has zero mass (log t = −inf);
    every finite log t is used as it is."""
    t_p, s_p = t_logp.exp(), s_logp.exp()
    if kind == "forward_kl":  # KL(teacher ‖ student) = Σ t (log t − log s)
        return _weighted(t_p, t_logp - s_logp).sum(-1)
    t_floor = torch.where(torch.isneginf(t_logp), torch.full_like(t_logp, LOG_FLOOR), t_logp)
    if kind == "reverse_kl":  # KL(student ‖ teacher) = Σ s (log s − log t)
        return _weighted(s_p, s_logp - t_floor).sum(-1)
    if kind == "jsd":  # β·KL(t ‖ m) + (1 − β)·KL(s ‖ m), m = β t + (1 − β) s  (GKD's generalized JSD)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd_beta must be in (0, 1), got {beta}; at 0 or 1 use forward_kl/reverse_kl")
        log_b, log_1b = torch.full_like(t_floor, math.log(beta)), torch.full_like(t_floor, math.log1p(-beta))
        # where s = 0 its log-ratio is weighted by 0; a finite stand-in keeps that term's gradient finite
        s_safe = torch.where(torch.isneginf(s_logp), torch.zeros_like(s_logp), s_logp)
        m_over_t = torch.logaddexp(log_b, log_1b + (s_logp - t_floor))  # log(m/t) = log(β + (1 − β) s/t)
        m_over_s = torch.logaddexp(log_b + (t_floor - s_safe), log_1b)  # log(m/s) = log(β t/s + 1 − β)
        kl_t = _weighted(t_p, -m_over_t).sum(-1)
        kl_s = _weighted(s_p, -m_over_s).sum(-1)
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
    ignore_index: int = IGNORE_INDEX,
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
    t_tau, s_tau, p_gold, entropy, argmax = _teacher_classes(logp, teacher, labels, temperature)
    soft = (temperature**2 * _divergence(t_tau, s_tau, divergence, jsd_beta)).to(hard.dtype)  # [B, T]

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


# --------------------------------------------------------------------------------------------------
# DPO: preference pairs against a frozen reference
#
# With sequence log-probs (summed over the completion tokens) of the policy π and the reference π_ref,
# the chosen and rejected log-ratios are ρ_c = log π(y_c|x) − log π_ref(y_c|x), ρ_r likewise, and
# h = ρ_c − ρ_r. Per pair:
#   sigmoid       −log σ(β h)                                   (Rafailov et al. 2023, DPO)
#                 with label_smoothing ε: −(1 − ε) log σ(β h) − ε log σ(−β h)  (conservative DPO, cDPO)
#   robust        (−(1 − ε) log σ(β h) + ε log σ(−β h)) / (1 − 2ε)           (Chowdhury et al. 2024, rDPO)
#   hinge         max(0, 1 − β h)                               (SLiC)
#   ipo           (h − 1/(2β))²  on the summed log-ratios      (Azar et al. 2023, Eq. 17 as written)
#   ipo_norm      (h̄ − 1/(2β))²  with h̄ from log-ratios averaged over each completion's tokens (TRL's "ipo")
#   sigmoid_norm  −log σ(β h̄)    length-normalised DPO (open-instruct's dpo_norm, TRL's sigmoid_norm)
# The implicit rewards are β ρ_c and β ρ_r (β ρ̄ for the normalised types). An optional RPO term adds
# α × the chosen completion's per-token NLL, which keeps the chosen log-prob from falling with the
# rejected one.

DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "ipo_norm", "sigmoid_norm")


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    chosen_tokens: Tensor,
    rejected_tokens: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair DPO losses [P] and metrics, from summed sequence log-probs [P] of the policy and the
    reference and the completion token counts [P] (used by the ``*_norm`` types and the RPO term).

    Metrics (detached, [P] each): ``rewards_chosen``, ``rewards_rejected``, ``margin`` (their
    difference), ``accuracy`` (margin > 0); ``logps_chosen``/``logps_rejected`` (the policy's).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    n_c, n_r = (
        chosen_tokens.clamp_min(1).to(policy_chosen.dtype),
        rejected_tokens.clamp_min(1).to(policy_chosen.dtype),
    )
    rho_c, rho_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected  # [P]
    if loss_type.endswith("_norm"):
        rho_c, rho_r = rho_c / n_c, rho_r / n_r
    h = rho_c - rho_r  # [P]
    eps = label_smoothing
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo, ipo_norm
        losses = (h - 1 / (2 * beta)) ** 2
    if rpo_alpha > 0:
        losses = losses + rpo_alpha * (-policy_chosen / n_c)
    rewards_c, rewards_r = (beta * rho_c).detach(), (beta * rho_r).detach()
    metrics = {
        "rewards_chosen": rewards_c,
        "rewards_rejected": rewards_r,
        "margin": rewards_c - rewards_r,
        "accuracy": (rewards_c > rewards_r).to(rewards_c.dtype),
        "logps_chosen": policy_chosen.detach(),
        "logps_rejected": policy_rejected.detach(),
    }
    return losses, metrics
