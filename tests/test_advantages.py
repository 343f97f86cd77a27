"""Reference tests for group-relative advantages and the zero-advantage mask."""

from __future__ import annotations

import math

import pytest
import torch
from trl.trainer.utils import nanstd

from posttrain.advantages import group_advantages, rewards_tensor, zero_advantage_mask

EPS = 1e-4


def test_hand_derived_binary_group() -> None:
    """Rewards [1, 0, 0, 1]: mean 0.5; sample variance = 4 * 0.25 / 3 = 1/3, std = sqrt(1/3);
    advantages = +-0.5 / (sqrt(1/3) + 1e-4) = +-0.86588... (and +-0.5 without std scaling)."""
    r = rewards_tensor([[1.0, 0.0, 0.0, 1.0]])
    out = group_advantages(r, scale_by_std=True, eps=EPS)
    a = 0.5 / (math.sqrt(1 / 3) + EPS)
    assert out.advantages[0].tolist() == pytest.approx([a, -a, -a, a], abs=1e-12)
    assert a == pytest.approx(0.865876, abs=1e-6)
    assert out.mean.tolist() == [0.5]
    assert out.std.tolist() == pytest.approx([math.sqrt(1 / 3)])
    assert out.zero_advantage.tolist() == [False]
    plain = group_advantages(r, scale_by_std=False)
    assert plain.advantages.tolist() == [[0.5, -0.5, -0.5, 0.5]]


def test_none_rewards_are_left_out_of_the_baseline() -> None:
    """Rewards [1, None, 0, 0]: scored {1, 0, 0}, mean 1/3; deviations 2/3, -1/3, -1/3;
    variance (4/9 + 1/9 + 1/9) / 2 = 1/3; advantages (2/3, 0, -1/3, -1/3) / (sqrt(1/3) + eps),
    and the unscored completion gets exactly 0 and scored=False."""
    out = group_advantages(rewards_tensor([[1.0, None, 0.0, 0.0]]), eps=EPS)
    d = math.sqrt(1 / 3) + EPS
    assert out.advantages[0].tolist() == pytest.approx(
        [(2 / 3) / d, 0.0, -(1 / 3) / d, -(1 / 3) / d], abs=1e-12
    )
    assert out.scored.tolist() == [[True, False, True, True]]
    assert out.mean.tolist() == pytest.approx([1 / 3])


def test_zero_advantage_mask_is_exact_equality() -> None:
    """All-equal groups are zero-advantage whatever the common value (0, 1, or a continuous 0.3 whose
    mean lies inside any (lo, hi) band -- the OpenRLHF #1270 case); groups with < 2 scored rewards are
    too; a tiny but real contrast (1 vs 1 + 1e-9) is kept."""
    groups = [
        [1.0, 1.0, 1.0, 1.0],  # solved
        [0.0, 0.0, 0.0, 0.0],  # hopeless
        [0.3, 0.3, 0.3, 0.3],  # continuous, mean 0.3
        [None, 1.0, None, None],  # one scored
        [None, None, None, None],  # none scored
        [0.3, None, 0.3, 0.3],  # equal among the scored
        [1.0, 1.0 + 1e-9, 1.0, 1.0],  # tiny real contrast
        [1.0, 0.0, 1.0, 1.0],
    ]
    r = rewards_tensor(groups)
    assert zero_advantage_mask(r).tolist() == [True, True, True, True, True, True, False, False]
    out = group_advantages(r)
    zero_rows = out.advantages[out.zero_advantage]
    assert torch.equal(zero_rows, torch.zeros_like(zero_rows))
    assert (out.advantages[6] != 0).sum().item() == 4  # every completion of the tiny contrast moves
    assert math.isnan(out.mean[4].item()) and out.std[4].item() == 0.0


def test_parity_with_trl_formula_on_random_rewards() -> None:
    """TRL GRPOTrainer (scale_rewards='group'): (r - nanmean) / (nanstd + 1e-4), unscorable -> 0."""
    g = torch.Generator().manual_seed(0)
    r = torch.rand(64, 8, generator=g, dtype=torch.float64)
    none = torch.rand(64, 8, generator=g) < 0.2
    none[:, :2] = False  # keep >= 2 scored per group (TRL's nanstd is NaN below that)
    r[none] = float("nan")
    trl_adv = (r - torch.nanmean(r, dim=1, keepdim=True)) / (nanstd(r, dim=1, keepdim=True) + 1e-4)
    trl_adv = torch.where(torch.isnan(r), torch.zeros_like(trl_adv), trl_adv)
    ours = group_advantages(r, scale_by_std=True, eps=1e-4).advantages
    # TRL's nanstd computes Bessel's factor count / (count - 1) in float32: agreement to ~1e-7 relative.
    torch.testing.assert_close(ours, trl_adv, rtol=1e-6, atol=1e-9)


def test_naive_loop_parity_with_ties_and_none() -> None:
    """Against a plain-Python loop over groups, with discrete rewards (many all-equal groups)."""
    g = torch.Generator().manual_seed(1)
    vals = torch.randint(0, 2, (200, 6), generator=g).tolist()
    drop = (torch.rand(200, 6, generator=g) < 0.15).tolist()
    groups = [
        [None if d else float(v) for v, d in zip(row, drow, strict=True)]
        for row, drow in zip(vals, drop, strict=True)
    ]
    out = group_advantages(rewards_tensor(groups), eps=EPS)
    for i, grp in enumerate(groups):
        s = [x for x in grp if x is not None]
        zero = len(s) < 2 or len(set(s)) == 1
        assert bool(out.zero_advantage[i]) == zero
        if zero:
            expected = [0.0] * len(grp)
        else:
            m = sum(s) / len(s)
            sd = math.sqrt(sum((x - m) ** 2 for x in s) / (len(s) - 1))
            expected = [0.0 if x is None else (x - m) / (sd + EPS) for x in grp]
        assert out.advantages[i].tolist() == pytest.approx(expected, abs=1e-12)


def test_unequal_group_sizes_are_an_error() -> None:
    with pytest.raises(ValueError, match="same number of completions"):
        rewards_tensor([[1.0, 0.0], [1.0]])
