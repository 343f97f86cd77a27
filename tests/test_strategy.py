"""DeepSpeed through posttrain's Strategy: 2 ranks over gloo train like 1 rank with the same global batch.

One process with grad_accum=2 and two processes with grad_accum=1 see the same global micro-batches
(the SFT loop's data-parallel contract), so the loss curves must agree. Tolerance: relative 1e-4 per
step in fp32 (reduction order differs between the runs; measured differences are ~1e-6).
"""

from __future__ import annotations

import json
import math

import pytest

from posttrain.config import OptimConfig
from posttrain.strategy import lr_lambda
from tests.conftest import TINY_OVERRIDES, TINY_RECIPE

COMMON = [*TINY_OVERRIDES, "stages.warmup.micro_batch_size=4", "stages.warmup.save_every=0"]


def _losses(tmp_path, name):
    rows = (tmp_path / "runs" / name / "warmup" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(r)["train/loss"] for r in rows]


@pytest.mark.multiproc
def test_zero2_and_zero3_on_two_ranks_match_one_rank(run_cli, tmp_path):
    runs = {
        "one": ["deepspeed=zero2", "stages.warmup.grad_accum=2"],
        "z2x2": ["deepspeed=zero2", "stages.warmup.grad_accum=1", "launcher.nproc_per_node=2"],
        "z3x2": ["deepspeed=zero3", "stages.warmup.grad_accum=1", "launcher.nproc_per_node=2"],
    }
    for name, extra in runs.items():
        res = run_cli("run", TINY_RECIPE, *COMMON, *extra, f"run.name={name}")
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
    ref = _losses(tmp_path, "one")
    assert len(ref) == 6 and ref[-1] < ref[0]
    for name in ("z2x2", "z3x2"):
        got = _losses(tmp_path, name)
        assert len(got) == len(ref)
        for step, (a, b) in enumerate(zip(ref, got, strict=True), start=1):
            assert math.isclose(a, b, rel_tol=1e-4), f"{name} step {step}: {a} vs {b}"


def test_lr_schedule_hand_values():
    """warmup 4 then cosine to 10% over 10 steps: f(0)=1/4, f(3)=1, f(4)=1 (cosine start),
    f(7)=0.1+0.9*0.5*(1+cos(pi*3/6))=0.55, f(10)=0.1 (end)."""
    f = lr_lambda(OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1), total_steps=10)
    assert [round(f(s), 6) for s in (0, 3, 4, 7, 10)] == [0.25, 1.0, 1.0, 0.55, 0.1]
    g = lr_lambda(OptimConfig(warmup_steps=0, schedule="linear", min_lr_ratio=0.0), total_steps=10)
    assert [round(g(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
