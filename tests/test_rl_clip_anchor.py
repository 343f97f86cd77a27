"""What the clipped ratio is taken against (``loss.clip_anchor``).

With one update per batch, a ratio to the proximal log-probs (the trainer's, before the update) is 1:
the clip never binds, so stale samples (asynchronous rollouts) get no trust region and a token the
last updates already pushed up is pushed again (measured in bench/async_rl.py: a one-step lag then
collapses the tiny world's RL). Against the behaviour log-probs the clip bounds it, as in PPO.

* ``auto`` resolves to behaviour exactly when rollouts can be stale and no importance correction is set.
* Behaviour-anchored: completions whose behaviour log-probs are far below the trainer's (ratio ≫ 1 +
  clip_high) with positive advantages are all clipped — the weights do not move; proximal-anchored, the
  same update moves them (so the test can fail).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from posttrain.config import DeepSpeedConfig, ModelConfig, RLConfig
from posttrain.models import build_model
from posttrain.schema import ConfigError, parse
from posttrain.stages.rl_update import policy_update
from posttrain.strategy import Strategy
from tests.test_rl_truncated import _cfg, _group

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("stage", "anchor"),
    [
        ({}, "proximal"),
        ({"asynchronous": {"enabled": True, "max_staleness": 0}}, "proximal"),
        ({"asynchronous": {"enabled": True, "max_staleness": 1}}, "behaviour"),
        (
            {"asynchronous": {"enabled": True, "max_staleness": 2}, "loss": {"is_correction": "truncate"}},
            "proximal",
        ),
        (
            {"asynchronous": {"enabled": True, "max_staleness": 1}, "loss": {"clip_anchor": "proximal"}},
            "proximal",
        ),
        ({"loss": {"clip_anchor": "behaviour"}}, "behaviour"),
    ],
)
def test_auto_anchor_is_behaviour_exactly_when_samples_can_be_stale(
    stage: dict[str, object], anchor: str, tmp_path: Path
) -> None:
    assert _cfg(tmp_path, **stage).clip_anchor == anchor


def test_a_behaviour_anchor_with_an_importance_correction_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already corrects"):
        _cfg(tmp_path, loss={"clip_anchor": "behaviour", "is_correction": "truncate"})


def test_the_behaviour_anchor_clips_tokens_already_pushed_past_the_trust_region(tmp_path: Path) -> None:
    mcfg = parse(ModelConfig, yaml.safe_load((REPO / "recipes/model/tiny_llama.yaml").read_text()), "model")

    def update(cfg: RLConfig) -> tuple[bool, float]:
        groups = [_group([3, 4, 2], [1.0, 0.0, 1.0])]
        for g in groups:
            g.advantages = [1.0, 0.5, 1.0]  # all positive: a ratio above 1 + clip_high is clipped
            for c in g.completions:
                c.logprobs = [-50.0] * len(c.token_ids)  # the sampling policy gave them ~0 probability
        model, tok = build_model(mcfg, seed=0)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        strategy = Strategy(DeepSpeedConfig(zero_stage=0), seed=0)
        strategy.setup(model, cfg.optim, 10, micro_batch_size=1)
        try:
            result = policy_update(strategy, groups, cfg, tok.pad_token_id, None)
            after = strategy.full_state_dict()
            moved = any(not torch.equal(before[k], after[k]) for k in before)
            return moved, result.metrics["train/clip_frac"]
        finally:
            strategy.close()

    moved, clip_frac = update(
        _cfg(tmp_path, sampling={"n": 3, "max_tokens": 8}, loss={"clip_anchor": "behaviour"})
    )
    assert not moved and clip_frac == 1.0
    moved, clip_frac = update(
        _cfg(tmp_path, sampling={"n": 3, "max_tokens": 8}, loss={"clip_anchor": "proximal"})
    )
    assert moved and clip_frac == 0.0
