"""Non-finite steps: skipped with nothing moved, counted, and N in a row stop the run in one line.

A step whose gradients hold a NaN (ZeRO 0, 2 and 3), or whose loss the loop found non-finite (with
finite gradients), leaves the weights, the AdamW state and the lr schedule exactly as they were; the
next finite step trains normally. A diverging run (lr 1e30) stops after ``run.max_nonfinite_steps``
with one line naming the stage, the step and the last finite values, exit 2, no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.config import DeepSpeedConfig, ModelConfig, OptimConfig
from posttrain.models import build_model
from posttrain.schema import parse
from posttrain.strategy import Strategy
from tests.conftest import TINY_RECIPE

REPO = Path(__file__).resolve().parents[1]


def _adam_state(strategy: Strategy) -> list[torch.Tensor]:
    opt = strategy.optimizer
    return [v.clone() for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_a_nonfinite_step_moves_nothing(zero: int) -> None:
    cfg = parse(
        ModelConfig, yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama.yaml").read_text()), "model"
    )
    model, _ = build_model(cfg, seed=0)
    strategy = Strategy(DeepSpeedConfig(zero_stage=zero), seed=0)
    strategy.setup(model, OptimConfig(lr=1e-2, warmup_steps=4), 10, micro_batch_size=1)
    x = torch.randint(5, 60, (2, 8), generator=torch.Generator().manual_seed(0))

    def step(scale: float, poison: bool = False) -> None:
        loss = strategy.forward(input_ids=x, labels=x).loss * scale
        if poison:
            strategy.poison_step()
        strategy.backward(loss)
        strategy.step()

    try:
        step(1.0)
        assert not strategy.last_step_skipped
        weights = {k: v.clone() for k, v in strategy.full_state_dict().items()}
        adam, lr = _adam_state(strategy), strategy.lr
        for scale, poison in ((float("nan"), False), (1.0, True)):  # NaN gradients; a loop-poisoned step
            step(scale, poison)
            assert strategy.last_step_skipped
            after = strategy.full_state_dict()
            assert all(torch.equal(weights[k], after[k]) for k in weights)
            assert all(torch.equal(a, b) for a, b in zip(adam, _adam_state(strategy), strict=True))
            assert strategy.lr == lr  # the schedule did not advance
        step(1.0)
        assert not strategy.last_step_skipped and strategy.lr > lr  # warmup goes on from where it was
        moved = strategy.full_state_dict()
        assert any(not torch.equal(weights[k], moved[k]) for k in weights)
    finally:
        strategy.close()


def test_a_diverging_run_stops_in_one_line(run_cli, tmp_path: Path) -> None:
    res = run_cli(
        "run",
        TINY_RECIPE,
        "stages.warmup.optim.lr=1e30",
        "stages.warmup.max_steps=8",
        "stages.warmup.save_every=0",
    )
    assert res.returncode == 2, res.stderr[-2000:]
    error = [line for line in res.stderr.splitlines() if line.startswith("posttrain: error:")]
    assert len(error) == 1 and "Traceback" not in res.stderr
    assert "stage warmup (sft): 3 non-finite steps in a row, the last at step 4" in error[0]
    assert "last finite: loss" in error[0] and "at step 1" in error[0]
    rows = [
        json.loads(x)
        for x in (tmp_path / "runs" / "tiny" / "warmup" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["train/nonfinite_steps"] for r in rows] == [0.0, 1.0, 2.0]
    assert not (tmp_path / "runs" / "tiny" / "warmup" / "DONE").exists()
