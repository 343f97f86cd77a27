"""Training stages with expert parallelism, end to end through `posttrain run` on 2 ranks.

The SFT stage of the quickstart recipe (tiny Llama 4: 2 MoE layers x 4 experts) runs with
``launcher.nproc_per_node=2 parallel.ep_size=2`` — the CLI re-launches itself under torchrun, each
rank keeps 2 of the 4 experts per layer, ZeRO-2 — with a periodic held-out evaluation and resume
states on the way (both need the experts gathered from the two ranks). The reference is the same
recipe in one process with ``grad_accum=2``, which sees the same global batch per step (see
posttrain/stages/sft.py). Per-step losses and gradient norms must agree to 1e-4 relative, and the
exported checkpoints to ||w_ep - w_ref|| / ||w_ref - w_0|| <= 1e-3 (AdamW magnifies reduction-order
rounding; tests/test_moe_ep.py measures ~5e-5 for the same model).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from posttrain.config import ModelConfig, parse
from posttrain.models import build_model

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
SFT = [
    "recipe=quickstart",
    "model=tiny_llama4",
    "deepspeed=zero2",
    "eval.data.num_eval=8",
    "eval.sampled=false",
    "eval.include_base=false",
    f"stages.warmup.max_steps={STEPS}",
    "stages.warmup.micro_batch_size=8",
    "stages.warmup.data.num_train=400",
    "stages.warmup.save_every=2",
    "stages.warmup.eval_every=3",
    "tracking.progress=false",
    "tracking.log_every=1",
]


def _run(cwd: Path, *overrides: str) -> list[dict[str, float]]:
    res = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "run", *SFT, *overrides],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    lines = (cwd / "runs" / "r" / "warmup" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


@pytest.mark.multiproc
def test_sft_stage_with_ep2_equals_one_process(tmp_path: Path) -> None:
    ep_dir, ref_dir = tmp_path / "ep", tmp_path / "ref"
    ep_dir.mkdir(), ref_dir.mkdir()
    ep = _run(ep_dir, "run.name=r", "launcher.nproc_per_node=2", "parallel.ep_size=2")
    ref = _run(ref_dir, "run.name=r", "stages.warmup.grad_accum=2")

    train_ep = [r for r in ep if "train/loss" in r]
    train_ref = [r for r in ref if "train/loss" in r]
    assert [r["step"] for r in train_ep] == list(range(1, STEPS + 1))
    for a, b in zip(train_ep, train_ref, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
        # EP really on: both MoE layers route through it, nothing dropped, the all-to-all is timed
        assert {"ep/L0/max_load", "ep/L1/max_load"} <= set(a) and a["ep/dropped_tokens"] == 0.0
        assert a["ep/all_to_all_ms"] > 0.0 and a["ep/L0/max_load"] >= 1.0
        assert not any(k.startswith("ep/") for k in b)
    assert any("eval/greedy_pass@1" in r for r in ep)  # the periodic eval ran on the gathered experts

    w_ep = load_file(str(ep_dir / "runs/r/warmup/checkpoint/model.safetensors"))
    w_ref = load_file(str(ref_dir / "runs/r/warmup/checkpoint/model.safetensors"))
    assert set(w_ep) == set(w_ref)
    cfg = parse(ModelConfig, yaml.safe_load((REPO / "recipes/model/tiny_llama4.yaml").read_text()), "model")
    w0 = build_model(cfg, seed=0)[0].state_dict()
    err = sum(float(((w_ep[k] - w_ref[k]) ** 2).sum()) for k in w_ref) ** 0.5
    moved = sum(float(((w_ref[k] - w0[k]) ** 2).sum()) for k in w_ref) ** 0.5
    assert moved > 0 and err / moved <= 1e-3, (
        f"EP checkpoint differs from the 1-process one by {err / moved:.1e}"
    )
