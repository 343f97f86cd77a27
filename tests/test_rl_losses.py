"""Reference tests for the RL losses: clipped policy gradient, k3 KL, entropy, and their sum."""

from __future__ import annotations

import math

import pytest
import torch
from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits

from posttrain.losses import aggregate, entropy_from_logits, grpo_loss, kl_k3, policy_gradient_loss


def _t(x: list[float]) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64)


def test_clipped_surrogate_hand_derived() -> None:
    """Four tokens, clip_low = clip_high = 0.2, loss = -min(rho*A, clip(rho, 0.8, 1.2)*A):
      rho 1.5, A +1: min(1.5, 1.2)   = 1.2  -> loss -1.2, clipped high (no gradient)
      rho 1.5, A -1: min(-1.5, -1.2) = -1.5 -> loss +1.5, not clipped
      rho 0.5, A -1: min(-0.5, -0.8) = -0.8 -> loss +0.8, clipped low (no gradient)
      rho 0.5, A +1: min(0.5, 0.8)   = 0.5  -> loss -0.5, not clipped
    clip fractions: low 1/4, high 1/4, any 2/4; ratio mean (1.5+1.5+0.5+0.5)/4 = 1."""
    old = torch.zeros(1, 4, dtype=torch.float64)
    logp = _t([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]).requires_grad_()
    adv = _t([1.0, -1.0, -1.0, 1.0])
    mask = torch.ones(1, 4, dtype=torch.bool)
    loss, m = policy_gradient_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    assert loss[0].tolist() == pytest.approx([-1.2, 1.5, 0.8, -0.5])
    assert m["clip_frac_low"].item() == 0.25 and m["clip_frac_high"].item() == 0.25
    assert m["clip_frac"].item() == 0.5
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["ratio_min"].item() == pytest.approx(0.5) and m["ratio_max"].item() == pytest.approx(1.5)
    loss.sum().backward()
    # d/dlogp of -rho*A = -rho*A where unclipped; 0 where the clip is active.
    assert logp.grad is not None
    assert logp.grad[0].tolist() == pytest.approx([0.0, 1.5, 0.0, -0.5])


def test_asymmetric_clip_hand_derived() -> None:
    """rho = 1.25, A = +1: with clip_high 0.2 the objective is capped at 1.2 (loss -1.2, clipped);
    with DAPO's clip_high 0.28 it is not (1.25 < 1.28: loss -1.25). rho = 0.75, A = -1 with clip_low
    0.2: min(-0.75, -0.8) = -0.8 -> loss 0.8 (clipped low) under both."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    logp = _t([math.log(1.25), math.log(0.75)])
    adv = _t([1.0, -1.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    sym, m_sym = policy_gradient_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    asym, m_asym = policy_gradient_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    assert sym[0].tolist() == pytest.approx([-1.2, 0.8])
    assert asym[0].tolist() == pytest.approx([-1.25, 0.8])
    assert m_sym["clip_frac_high"].item() == 0.5 and m_asym["clip_frac_high"].item() == 0.0


def test_on_policy_gradient_is_minus_advantage() -> None:
    """old = logp.detach() -> rho = 1, no clipping; d loss / d logp = -A on every unmasked token,
    0 on masked ones; sequence advantages [B] broadcast over T."""
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 5, generator=g)).requires_grad_()
    adv = torch.tensor([0.7, -1.3, 0.0])
    mask = torch.rand(3, 5, generator=g) > 0.3
    loss, m = policy_gradient_loss(logp, logp.detach(), adv, mask)
    loss.sum().backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(3, 5) * mask)
    assert m["clip_frac"].item() == 0.0 and m["ratio_mean"].item() == 1.0


def _naive_grpo(logp, old, ref, ent, adv, mask, clip_low, clip_high, kl_coef, ent_coef):  # type: ignore[no-untyped-def]
    """Plain-Python per-token loop, written from the formulas (independent of the tensor code)."""
    B, T = len(logp), len(logp[0])
    out = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if not mask[b][t]:
                continue
            rho = math.exp(logp[b][t] - old[b][t])
            a = adv[b]
            surrogate = min(rho * a, min(max(rho, 1 - clip_low), 1 + clip_high) * a)
            d = ref[b][t] - logp[b][t]
            k3 = math.exp(d) - d - 1
            out[b][t] = -surrogate + kl_coef * k3 - ent_coef * ent[b][t]
    return out


def test_grpo_loss_matches_naive_loop_and_trl_formulas() -> None:
    g = torch.Generator().manual_seed(3)
    B, T, V = 4, 7, 11
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (B, T), generator=g)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)  # [B, T]
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # off-policy: ratios clip
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.25
    ent = entropy_from_logits(logits).double()
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, entropy_coef=0.01)
    ours, m = grpo_loss(
        logp, old, adv, mask, kw["clip_low"], kw["clip_high"], ref, kw["kl_coef"], ent, kw["entropy_coef"]
    )
    naive = _naive_grpo(
        logp.tolist(),
        old.tolist(),
        ref.tolist(),
        ent.tolist(),
        adv.tolist(),
        mask.tolist(),
        kw["clip_low"],
        kw["clip_high"],
        kw["kl_coef"],
        kw["entropy_coef"],
    )
    torch.testing.assert_close(ours, torch.tensor(naive, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert 0 < m["clip_frac"].item() < 1  # the test really exercises both branches

    # TRL GRPOTrainer._compute_loss (loss_type "dapo"/"bnpo" path), formulas as written there:
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    a = adv.unsqueeze(1)
    trl_per_token = -torch.min(coef_1 * a, coef_2 * a)
    trl_kl = torch.exp(ref - logp) - (ref - logp) - 1
    trl_per_token = trl_per_token + 0.05 * trl_kl
    is_low = (coef_1 < 1 - 0.2) & (a < 0)
    is_high = (coef_1 > 1 + 0.28) & (a > 0)
    pg_only, m_pg = policy_gradient_loss(logp, old, adv, mask, 0.2, 0.28)
    kl_only, m_kl = kl_k3(logp, ref, mask)
    torch.testing.assert_close(pg_only + 0.05 * kl_only, trl_per_token * mask, rtol=1e-12, atol=1e-12)
    # TRL's "bnpo"/"dapo" aggregation = our aggregate() with this batch's token count
    trl_loss = (trl_per_token * mask).sum() / mask.sum().clamp(min=1.0)
    torch.testing.assert_close(aggregate(pg_only + 0.05 * kl_only, mask), trl_loss)
    masked_mean = lambda x: (x.double() * mask).sum() / mask.sum()  # noqa: E731
    torch.testing.assert_close(m_pg["clip_frac_low"].double(), masked_mean(is_low))
    torch.testing.assert_close(m_pg["clip_frac_high"].double(), masked_mean(is_high))
    torch.testing.assert_close(m_kl["kl_mean"], masked_mean(trl_kl))


def test_k3_hand_derived() -> None:
    """d = ref - logp: d = ln 2 -> 2 - ln 2 - 1 = 0.306853; d = 0 -> 0; d = -ln 2 -> 0.5 + ln 2 - 1 = 0.193147."""
    logp = torch.zeros(1, 3, dtype=torch.float64)
    ref = _t([math.log(2), 0.0, -math.log(2)])
    k3, m = kl_k3(logp, ref, torch.ones(1, 3, dtype=torch.bool))
    assert k3[0].tolist() == pytest.approx([1 - math.log(2), 0.0, math.log(2) - 0.5])
    assert k3[0, 0].item() == pytest.approx(0.306853, abs=1e-6)
    assert m["kl_mean"].item() == pytest.approx((1 - math.log(2) + math.log(2) - 0.5) / 3)


def test_k3_is_unbiased_for_kl() -> None:
    """E_{x~p}[k3] = KL(p || q): sample many tokens from p and compare with the exact KL."""
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    q = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    exact = (p * (p.log() - q.log())).sum()
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    k3, _ = kl_k3(p.log()[x][None], q.log()[x][None], torch.ones(1, x.numel(), dtype=torch.bool))
    assert k3.mean().item() == pytest.approx(exact.item(), rel=0.02)


def test_entropy_hand_derived_and_trl_parity() -> None:
    """Uniform over V = 4 -> ln 4 = 1.386294; p = (1/2, 1/2, 0, ...) (logits 0, 0, -inf...) -> ln 2;
    random logits agree with TRL's entropy_from_logits."""
    uniform = torch.zeros(1, 1, 4)
    half = torch.tensor([[[0.0, 0.0, -1e9, -1e9]]])
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4), abs=1e-6)
    assert entropy_from_logits(half).item() == pytest.approx(math.log(2), abs=1e-6)
    logits = torch.randn(3, 5, 17, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        entropy_from_logits(logits), trl_entropy_from_logits(logits), rtol=1e-5, atol=1e-6
    )


def test_grpo_loss_needs_its_inputs() -> None:
    x = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(x, x, torch.zeros(1), mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(x, x, torch.zeros(1), mask, entropy_coef=0.1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_completion_logprobs_equal_the_full_computation(temperature: float, chunk: int) -> None:
    """``completion_logprobs`` (whole rows of about ``chunk`` positions at a time, recomputed in the
    backward pass) against one log-softmax of everything at temperature T: log-probs, entropy and both
    gradients equal to 1e-6 in float64 (float32 logits: to float32 rounding, 1e-6 of the log-prob and
    1e-5 of the entropy, a sum over the vocabulary), on a
    non-contiguous view as the RL update passes it."""
    from posttrain.losses import completion_logprobs

    gen = torch.Generator().manual_seed(0)
    full = (3.0 * torch.randn(4, 9, 300, generator=gen, dtype=torch.float64)).requires_grad_(True)
    tokens = torch.randint(0, 300, (4, 8), generator=gen)
    weights = torch.randn(4, 8, generator=gen)
    logits = full[:, :-1]  # [B, S, V], not contiguous
    lp, ent = completion_logprobs(logits, tokens, temperature, chunk_tokens=chunk, entropy_grad=True)
    ref_logp = torch.log_softmax(logits / temperature, dim=-1)  # [B, S, V]
    ref_lp = ref_logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ref_ent = -(ref_logp.exp() * ref_logp).sum(-1)
    assert (lp - ref_lp).abs().max() < 1e-6 and (ent - ref_ent).abs().max() < 1e-6
    g = torch.autograd.grad((lp * weights).sum() + (ent * weights).sum(), full)[0]
    g_ref = torch.autograd.grad((ref_lp * weights).sum() + (ref_ent * weights).sum(), full)[0]
    assert (g - g_ref).abs().max() < 1e-6
    # without entropy_grad the entropy is a constant of the loss; without grad the work is no_grad
    lp2, ent2 = completion_logprobs(logits, tokens, temperature, chunk_tokens=chunk)
    assert ent2 is not None and not ent2.requires_grad and lp2.requires_grad
    assert completion_logprobs(logits, tokens, temperature, chunk_tokens=chunk, entropy=False)[1] is None
    lp32, ent32 = completion_logprobs(logits.detach().float(), tokens, temperature, chunk_tokens=chunk)
    assert lp32.dtype == torch.float32
    assert ((lp32 - ref_lp).abs() / ref_lp.abs().clamp_min(1)).max() < 1e-6
    assert ((ent32 - ref_ent).abs() / ref_ent.abs().clamp_min(1)).max() < 1e-5  # a sum over V in float32
