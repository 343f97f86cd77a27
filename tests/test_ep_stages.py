"""Training stages with expert parallelism, end to end through `posttrain run` on 2 ranks.

SFT. A few-step SFT stage (packed rows; tiny Llama 4: 2 MoE layers x 4 experts) runs with
``launcher.nproc_per_node=2 parallel.ep_size=2`` — the CLI re-launches itself under torchrun, each
rank keeps 2 of the 4 experts per layer, ZeRO-2 — with a periodic held-out evaluation and resume
states on the way (both need the experts gathered from the two ranks). The reference is the same
recipe in one process with ``grad_accum=2``, which sees the same global batch per step (see
posttrain/stages/sft.py). Per-step losses and gradient norms must agree to 1e-4 relative, and the
exported checkpoints to ||w_ep - w_ref|| / ||w_ref - w_0|| <= 1e-3 (AdamW magnifies reduction-order
rounding; tests/test_moe_ep.py measures ~5e-5 for the same model).

RL. The RL stage (real vLLM on each rank) with ``parallel.ep_size=2``: each rank's vLLM engine starts from
the checkpoint the strategy writes from the expert-parallel model and receives the trained weights after
every update, experts gathered from both ranks. The starting checkpoint must equal the freshly built
model exactly, and the engine's log-probs at step 2 must equal the trainer's (< 1e-4; a wrong or stale
expert would shift them by far more).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config import ModelConfig
from posttrain.models import build_model
from posttrain.plugins import reward
from posttrain.schema import parse

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
SFT_RECIPE = f"""
defaults:
  - model: tiny_llama4
  - deepspeed: zero2
  - _self_
run: {{name: r, seed: 0}}
tracking: {{progress: false, log_every: 1}}
eval:
  data: {{source: tiny, tasks: {{add: {{kind: add, levels: [2]}}}}, num_eval: 8}}
  sampled: false
  include_base: false
  max_new_tokens: 4
stages:
  warmup:
    type: sft
    data: {{source: tiny, tasks: {{add: {{kind: add, levels: [1, 2]}}}}, num_train: 400}}
    pack: true
    seq_len: 64
    max_steps: {STEPS}
    micro_batch_size: 8
    optim: {{lr: 3.0e-3, warmup_steps: 2, schedule: cosine}}
    save_every: 2
    eval_every: 3
"""


def _recipe(directory: Path, text: str) -> str:
    path = directory / "recipe.yaml"
    path.write_text(text)
    return str(path)


def _run(cwd: Path, *args: str, stage: str = "warmup") -> list[dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the RL recipe names a reward in this module
    res = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "run", *args],
        cwd=cwd, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    lines = (cwd / "runs" / "r" / stage / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def _tiny_llama4() -> dict[str, torch.Tensor]:
    cfg = parse(ModelConfig, yaml.safe_load((REPO / "recipes/model/tiny_llama4.yaml").read_text()), "model")
    return build_model(cfg, seed=0)[0].state_dict()


@pytest.mark.multiproc
@pytest.mark.parametrize("zero", ["zero2", "zero1", "zero3"])
def test_sft_stage_with_ep2_equals_one_process(zero: str, tmp_path: Path) -> None:
    """Through the shipped recipes/deepspeed/zero{1,2,3}.yaml groups, as a user runs it."""
    ep_dir, ref_dir = tmp_path / "ep", tmp_path / "ref"
    ep_dir.mkdir(), ref_dir.mkdir()
    recipe = f"recipe={_recipe(tmp_path, SFT_RECIPE)}"
    ep = _run(ep_dir, recipe, f"deepspeed={zero}", "launcher.nproc_per_node=2", "parallel.ep_size=2")
    ref = _run(ref_dir, recipe, f"deepspeed={zero}", "stages.warmup.grad_accum=2")

    train_ep = [r for r in ep if "train/loss" in r]
    train_ref = [r for r in ref if "train/loss" in r]
    assert [r["step"] for r in train_ep] == list(range(1, STEPS + 1))
    for a, b in zip(train_ep, train_ref, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
        # EP really on: both MoE layers route through it and count their tokens, the all-to-all is timed
        assert {"moe/L0/max_load", "moe/L1/max_load", "moe/L1/tokens/e3"} <= set(a)
        assert a["moe/all_to_all_ms"] > 0.0 and a["moe/L0/max_load"] >= 1.0
        assert not any(k.startswith("moe/") for k in b)
    assert any("eval/greedy_pass@1" in r for r in ep)  # the periodic eval ran on the gathered experts

    w_ep = load_file(str(ep_dir / "runs/r/warmup/checkpoint/model.safetensors"))
    w_ref = load_file(str(ref_dir / "runs/r/warmup/checkpoint/model.safetensors"))
    assert set(w_ep) == set(w_ref)
    w0 = _tiny_llama4()
    err = sum(float(((w_ep[k] - w_ref[k]) ** 2).sum()) for k in w_ref) ** 0.5
    moved = sum(float(((w_ref[k] - w0[k]) ** 2).sum()) for k in w_ref) ** 0.5
    assert moved > 0 and err / moved <= 1e-3, (
        f"EP checkpoint differs from the 1-process one by {err / moved:.1e}"
    )


@reward("ep_parity")
def ep_parity(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    """1.0 when the completion has an even number of characters: an untrained model gets about half right.

    >>> ep_parity(["a", "b"], ["xy", "x"])
    [1.0, 0.0]
    """
    return [float(len(c) % 2 == 0) for c in completions]


RL_RECIPE = """
defaults:
  - model: tiny_llama4
  - deepspeed: zero2
  - _self_
run: {name: r, seed: 0}
tracking: {progress: false}
eval:
  data: {source: tiny, tasks: {add: {kind: add, levels: [1]}}, num_eval: 4}
  sampled: false
  include_base: false
  max_new_tokens: 4
stages:
  rl:
    type: rl
    data: {source: tiny, tasks: {add: {kind: add, levels: [1, 2]}}, num_train: 64}
    sampling: {n: 4, max_tokens: 6}
    engine: {kind: vllm}
    rewards: {specs: [{name: "tests.test_ep_stages:ep_parity"}]}
    prompts_per_step: 4
    max_gen_batches: 2
    max_steps: 2
    save_every: 0
    log_samples_every: 0
    optim: {lr: 1.0e-3, betas: [0.9, 0.99], weight_decay: 0.0, warmup_steps: 0, schedule: constant}
"""


@pytest.mark.multiproc
@pytest.mark.vllm
def test_rl_stage_with_ep2_syncs_gathered_experts_to_vllm(tmp_path: Path) -> None:
    (tmp_path / "rl_ep.yaml").write_text(RL_RECIPE)
    rows = _run(
        tmp_path,
        f"recipe={tmp_path / 'rl_ep.yaml'}",
        "launcher.nproc_per_node=2",
        "parallel.ep_size=2",
        stage="rl",
    )
    steps = [r for r in rows if r["step"] >= 1 and "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["rollout/groups_trained"] >= 1 and r["train/grad_norm"] > 0
        assert {"moe/L0/max_load", "moe/L1/max_load"} <= set(r) and r["moe/all_to_all_ms"] > 0.0
    # step 2 sampled from the weights trained at step 1, gathered from both ranks into each rank's vLLM
    assert steps[1]["train/rollout_logprob_diff"] < 1e-4
    sd = tmp_path / "runs" / "r" / "rl"
    start = load_file(str(sd / "rollout_init" / "model.safetensors"))
    w0 = _tiny_llama4()
    assert set(start) == set(w0) and all(torch.equal(start[k], w0[k]) for k in w0)
    end = load_file(str(sd / "checkpoint" / "model.safetensors"))
    assert set(end) == set(w0) and any(not torch.equal(end[k], w0[k]) for k in w0 if ".experts." in k)


def test_bad_ep_size_fails_before_any_rank_starts(run_cli, tmp_path: Path) -> None:
    recipe = f"recipe={_recipe(tmp_path, SFT_RECIPE)}"
    res = run_cli("run", recipe, "parallel.ep_size=4", "launcher.nproc_per_node=2", timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert lines[0] == (
        "posttrain: error: parallel.ep_size=4 is larger than the number of ranks (2); launch at least 4 ranks "
        "(launcher.nproc_per_node x launcher.nnodes) or lower parallel.ep_size"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["parallel.ep_size=3", "launcher.nproc_per_node=3"],
            "parallel.ep_size=3 does not divide the model's 4 routed experts",
        ),
        (
            ["parallel.ep_size=2", "launcher.nproc_per_node=3"],
            "parallel.ep_size=2 does not divide the number of ranks (3)",
        ),
        (
            ["parallel.ep_size=2", "launcher.nproc_per_node=2", "model=tiny_llama"],
            "(a dense model); set parallel.ep_size=1",
        ),
        (["parallel.ep_size=2"], "larger than the number of ranks (1)"),
        (
            ["parallel.ep_size=2", "launcher.nproc_per_node=2", "deepspeed=zero0"],
            "with deepspeed ZeRO-0 clips with a per-rank-averaged gradient norm",
        ),
        (
            [
                "parallel.ep_size=2",
                "launcher.nproc_per_node=2",
                "deepspeed=zero0",
                "deepspeed.gradient_clipping=0",
            ],
            None,
        ),
        (["parallel.ep_size=2", "launcher.nproc_per_node=4"], None),
        (["parallel.ep_size=4", "launcher.nproc_per_node=2", "launcher.nnodes=2"], None),
    ],
)
def test_recipe_check_of_the_ep_layout(overrides: list[str], message: str | None, tmp_path: Path) -> None:
    from posttrain.cli import compose
    from posttrain.parallel import check_recipe
    from posttrain.schema import ConfigError

    recipe = compose(_recipe(tmp_path, SFT_RECIPE), overrides)
    if message is None:
        check_recipe(recipe)
        return
    with pytest.raises(ConfigError) as info:
        check_recipe(recipe)
    assert message in str(info.value) and "\n" not in str(info.value)
