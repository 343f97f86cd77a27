"""Truncated completions (cut at ``sampling.max_tokens``, no EOS): ``truncated: mask`` leaves them out of
the loss, ``truncated: penalty`` lowers their reward softly (DAPO's overlong punishment); counted either
way.

* The penalty on hand-derived values: max_tokens 8, overlong_buffer 4, overlong_penalty 1 — a
  completion of L tokens loses min(L - 4, 4) / 4 of its reward when L > 4; the advantages and the
  zero-advantage flag are recomputed from the new rewards.
* Masking is exact: one update with ``mask`` on groups holding truncated completions moves the weights
  exactly as an update with ``train`` on the same groups without those completions (the loss is
  normalised by the completion tokens that remain), and the masked ones are counted.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.config import DeepSpeedConfig, ModelConfig, RLConfig, parse_recipe
from posttrain.models import build_model
from posttrain.schema import parse
from posttrain.stages.rl import overlong_penalty
from posttrain.stages.rl_update import policy_update
from posttrain.strategy import Strategy
from posttrain.types import Completion, RolloutGroup, Sample
from tests.test_rl_stage import _recipe

REPO = Path(__file__).resolve().parents[1]


def _cfg(tmp_path: Path, **stage: object) -> RLConfig:
    data = tmp_path / "unused.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cfg: RLConfig = parse_recipe(_recipe(tmp_path, data, "t", **stage)).stages["rl"]
    return cfg


def _group(lengths: list[int], rewards: list[float], limit: int = 8) -> RolloutGroup:
    completions = [
        Completion("x" * n, [5] * n, [-1.0] * n, "length" if n >= limit else "stop") for n in lengths
    ]
    return RolloutGroup(Sample("p", uid=f"g{len(lengths)}{rewards}"), [3, 4], completions, list(rewards))


def test_overlong_penalty_by_hand(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, sampling={"n": 4, "max_tokens": 8}, truncated="penalty", overlong_buffer=4)
    # lengths 3 and 4: under max_tokens - buffer = 4, untouched; 5: 1 token over, -1/4; 8: -1 (the limit)
    a = _group([3, 4, 5, 8], [1.0, 1.0, 1.0, 1.0])  # zero-advantage before, informative after
    b = _group([8, 8, 8, 8], [0.0] * 4)  # all penalised fully: still zero-advantage
    c = _group([8, 2, 3, 4], [math.nan, 1.0, 0.0, 1.0])  # an unscored completion is not penalised
    assert overlong_penalty([a, b, c], cfg) == 6
    assert a.rewards == [1.0, 1.0, 0.75, 0.0] and b.rewards == [-1.0] * 4
    assert math.isnan(c.rewards[0]) and c.rewards[1:] == [1.0, 0.0, 1.0]
    # advantages: (r - mean) / (sample std + eps), mean 0.6875, std = sqrt(0.71875 / 3)
    mean, std = 0.6875, math.sqrt(((0.3125**2) * 2 + 0.0625**2 + 0.6875**2) / 3)
    assert a.advantages == pytest.approx([(r - mean) / (std + 1e-4) for r in a.rewards], abs=1e-6)
    assert not a.zero_advantage and b.zero_advantage and b.advantages == [0.0] * 4


def test_masked_truncated_completions_leave_the_loss_exactly(tmp_path: Path) -> None:
    mcfg = parse(ModelConfig, yaml.safe_load((REPO / "recipes/model/tiny_llama.yaml").read_text()), "model")
    stage = {"sampling": {"n": 3, "max_tokens": 8}}
    mask = _cfg(tmp_path, truncated="mask", **stage)
    train = _cfg(tmp_path, truncated="train", **stage)
    groups = [_group([8, 3, 5], [1.0, 0.0, 1.0]), _group([2, 8, 4], [0.0, 1.0, 1.0])]
    for g in groups:  # advantages by hand: the update only reads them
        g.advantages = [0.5, -1.0, 0.5]
    without = copy.deepcopy(groups)
    for g in without:  # the same groups with the truncated completions taken out
        keep = [i for i, c in enumerate(g.completions) if c.finish_reason != "length"]
        g.completions = [g.completions[i] for i in keep]
        g.rewards = [g.rewards[i] for i in keep]
        g.advantages = [g.advantages[i] for i in keep]

    def update(cfg: RLConfig, gs: list[RolloutGroup]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        model, tok = build_model(mcfg, seed=0)
        strategy = Strategy(DeepSpeedConfig(zero_stage=0), seed=0)
        strategy.setup(model, cfg.optim, 10, micro_batch_size=1)
        try:
            result = policy_update(strategy, gs, cfg, tok.pad_token_id, None)
            return {k: v.clone() for k, v in strategy.full_state_dict().items()}, result.metrics
        finally:
            strategy.close()

    masked, metrics = update(mask, groups)
    reference, _ = update(train, without)
    trained_all, _ = update(train, groups)
    assert metrics["train/truncated_masked"] == 2
    assert all(torch.equal(masked[k], reference[k]) for k in masked)
    assert any(not torch.equal(masked[k], trained_all[k]) for k in masked)  # the check can fail
