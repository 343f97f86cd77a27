"""Group-relative advantages (GRPO) and the zero-advantage mask.

A *group* is the ``n`` completions sampled for one prompt. Rewards arrive as ``float | None`` per
completion; ``None`` means "this reward does not apply to this completion" (a reward plugin's
contract, see ``posttrain.plugins``).

Rules, in one place:

* **Advantage** of completion ``i`` in a group: ``A_i = r_i - mean(r)``, divided by ``std(r) + eps``
  when ``scale_by_std`` (GRPO; ``eps = 1e-4`` as in the measured recipe and TRL). ``std`` is the
  sample standard deviation (Bessel's correction, ``/(m-1)``), the same as TRL's ``nanstd``.
* **None rewards** are *unscored*: they are left out of the group's mean and std, and their
  completion gets advantage exactly 0 and ``scored = False`` (the loop also leaves them out of the
  loss-token count, so they cost no update compute). Turning ``None`` into 0 would bias the
  baseline and hand the completion a spurious advantage.
* **Zero-advantage group**: a group whose scored rewards are *all exactly equal* (or that has fewer
  than two scored completions). It carries no learning signal, whatever the common value is. The
  test is exact equality, not a band on the group mean: with continuous rewards a group of equal
  rewards has a mean strictly inside (0, 1) and slips through a mean band (OpenRLHF issue #1270).
  Nor is it an approximate ``std ~ 0`` test: a tiny but real contrast is kept.

Shapes: G groups, n completions per group. ``None`` is carried as NaN inside tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tensor = torch.Tensor

DEFAULT_EPS = 1e-4


def rewards_tensor(groups: Sequence[Sequence[float | None]]) -> Tensor:
    """Per-group rewards -> [G, n] float64 tensor with NaN for ``None``; groups must have equal n."""
    sizes = {len(g) for g in groups}
    if len(sizes) > 1:
        raise ValueError(f"every group needs the same number of completions, got sizes {sorted(sizes)}")
    rows = [[float("nan") if r is None else float(r) for r in g] for g in groups]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(groups), sizes.pop() if sizes else 0)


def zero_advantage_mask(rewards: Tensor) -> Tensor:
    """[G, n] rewards (NaN = unscored) -> [G] bool: True where the scored rewards are all exactly equal.

    A group with fewer than two scored completions is zero-advantage too (nothing to contrast).
    """
    scored = ~torch.isnan(rewards)  # [G, n]
    big = torch.where(scored, rewards, torch.full_like(rewards, float("inf")))
    small = torch.where(scored, rewards, torch.full_like(rewards, float("-inf")))
    lowest = big.min(dim=1).values  # [G]
    highest = small.max(dim=1).values  # [G]
    return (scored.sum(dim=1) < 2) | (lowest == highest)


@dataclass
class GroupAdvantages:
    advantages: Tensor  # [G, n] float64; 0 for unscored completions and zero-advantage groups
    scored: Tensor  # [G, n] bool; False where the reward was None
    zero_advantage: Tensor  # [G] bool
    mean: Tensor  # [G] mean of scored rewards (NaN if none scored)
    std: Tensor  # [G] sample std of scored rewards (0 with fewer than two scored)


def group_advantages(rewards: Tensor, scale_by_std: bool = True, eps: float = DEFAULT_EPS) -> GroupAdvantages:
    """[G, n] rewards (NaN = unscored) -> advantages per the module rules.

    Zero-advantage groups get advantage exactly 0 (also when they contain unscored completions).
    """
    scored = ~torch.isnan(rewards)  # [G, n]
    count = scored.sum(dim=1)  # [G]
    filled = torch.where(scored, rewards, torch.zeros_like(rewards))  # [G, n]
    mean = filled.sum(dim=1) / count  # [G], NaN where count == 0
    centred = torch.where(scored, rewards - mean.unsqueeze(1), torch.zeros_like(rewards))  # [G, n]
    var = (centred**2).sum(dim=1) / (count - 1).clamp_min(1)  # [G]
    std = torch.where(count > 1, var.sqrt(), torch.zeros_like(var))  # [G]
    adv = centred / (std.unsqueeze(1) + eps) if scale_by_std else centred  # [G, n]
    zero = zero_advantage_mask(rewards)  # [G]
    adv = torch.where(zero.unsqueeze(1) | ~scored, torch.zeros_like(adv), adv)
    return GroupAdvantages(advantages=adv, scored=scored, zero_advantage=zero, mean=mean, std=std)


__all__ = ["DEFAULT_EPS", "GroupAdvantages", "group_advantages", "rewards_tensor", "zero_advantage_mask"]
