"""The RL stage end to end on a tiny model: real vLLM (in-process, CPU), real DeepSpeed, real rewards.

The reward used here is a small plugin defined below, chosen so each capability has a known
character: ``const`` prompts always score 1.0 (every group is zero-advantage), ``na`` prompts score
``None`` (reward not applicable), and ``parity`` prompts score by the completion's length parity,
which a randomly initialised model gets right about half the time (informative groups).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import parse_recipe
from posttrain.data import encode_prompt
from posttrain.models import load_checkpoint
from posttrain.pipeline import run_pipeline
from posttrain.plugins import reward
from posttrain.schema import ConfigError

pytestmark = pytest.mark.vllm


@reward("rl_stage_test")
def rl_stage_test(
    prompts: list[str], completions: list[str], capability: list[str], **_: Any
) -> list[float | None]:
    """const -> 1.0; na -> None; parity -> 1.0 when the completion has an even number of characters.

    >>> rl_stage_test(["a", "b", "c"], ["xy", "x", "x"], capability=["parity", "parity", "const"])
    [1.0, 0.0, 1.0]
    """
    out: list[float | None] = []
    for c, cap in zip(completions, capability, strict=True):
        out.append(1.0 if cap == "const" else None if cap == "na" else float(len(c) % 2 == 0))
    return out


@reward("rl_stage_broken")
def rl_stage_broken(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
    """Fails on every sample, as a reward with a wrong path or a bug in its parser would."""
    raise FileNotFoundError("/no/such/verifier")


def _write_prompts(path: Path, caps: list[str], n_per_cap: int, long_rows: int = 0) -> None:
    rows = [
        {"prompt": f"{i}+{i}=", "answer": str(2 * i), "capability": cap}
        for cap in caps
        for i in range(n_per_cap)
    ]
    rows += [{"prompt": "9" * 80 + "=", "answer": "0", "capability": caps[0]} for _ in range(long_rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _recipe(tmp: Path, data: Path, name: str, **stage: Any) -> dict[str, Any]:
    rl: dict[str, Any] = {
        "type": "rl",
        "data": {"source": str(data), "max_prompt_len": 24},
        "sampling": {"n": 4, "max_tokens": 6},
        "engine": {"kind": "vllm"},
        "rewards": {"specs": [{"name": "rl_stage_test"}]},
        "prompts_per_step": 4,
        "max_gen_batches": 2,
        "max_steps": 2,
        "save_every": 0,
        "log_samples_every": 1,
        "optim": {
            "lr": 1e-3,
            "betas": [0.9, 0.99],
            "weight_decay": 0.0,
            "warmup_steps": 0,
            "schedule": "constant",
        },
    }
    rl.update(stage)
    yaml_model = (Path(__file__).resolve().parents[1] / "recipes" / "model" / "tiny_llama.yaml").read_text()
    import yaml

    return {
        "run": {"name": name, "dir": str(tmp / "runs"), "seed": 0},
        "model": yaml.safe_load(yaml_model),
        "deepspeed": {"zero_stage": 2},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
        "eval": {
            "data": {"source": "tiny", "tasks": {"add": {"kind": "add", "levels": [1]}}, "num_eval": 4},
            "sampled": False,
            "include_base": False,
            "max_new_tokens": 4,
        },
        "stages": {"rl": rl},
    }


def _rows(stage_dir: Path, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage_dir / name).read_text().splitlines() if line.strip()]


def test_rl_steps_with_vllm_train_only_on_informative_groups(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, ["parity", "const", "na"], n_per_cap=6, long_rows=1)
    recipe = parse_recipe(_recipe(tmp_path, data, "mixed"))
    run_pipeline(recipe)
    sd = tmp_path / "runs" / "mixed" / "rl"
    rows = _rows(sd, "metrics.jsonl")
    head = rows[0]
    assert head["step"] == 0 and head["data/skipped_long_prompts"] == 1 and head["data/prompts"] == 18
    steps = [r for r in rows if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        # groups of every capability were generated (stratified draw), but only parity ones trained
        assert r["rollout/const/pass@1"] == 1.0
        assert r.get("train/groups/const", 0) == 0 and r.get("train/groups/na", 0) == 0
        assert r["train/groups/parity"] == r["rollout/groups_trained"] >= 1
        assert r["rollout/zero_adv_frac"] > 0
        assert r["reward/none"] > 0  # the na prompts, counted
        assert r["train/sequences"] == 4 * r["rollout/groups_trained"]
        assert r["train/completion_tokens"] > 0 and r["train/grad_norm"] > 0
    # step 2's rollouts came from the weights trained at step 1: the engine's log-probs equal the
    # trainer's. A stale engine would not: the updates moved the log-probs of these very completions
    # by far more than that tolerance (checked below with transformers on the start and end weights).
    assert steps[1]["train/rollout_logprob_diff"] < 1e-4
    # the rollout table grows; rows from both steps are kept
    table = _rows(sd, "samples.jsonl")
    assert {r["step"] for r in table} == {1, 2}
    assert all(
        r["table"] == "rollouts" and {"prompt", "completion", "reward", "advantage"} <= set(r) for r in table
    )
    # the exported policy moved away from the starting weights
    before, tok = load_checkpoint(sd / "rollout_init")
    after, _ = load_checkpoint(sd / "checkpoint")
    shift = max(
        abs(
            _logprob(after, tok, r["prompt"], r["completion"])
            - _logprob(before, tok, r["prompt"], r["completion"])
        )
        for r in table
    )
    assert shift > 1e-2


@torch.no_grad()
def _logprob(model: Any, tok: Any, prompt: str, completion: str) -> float:
    """log p(completion + EOS | chat prompt) by one transformers forward pass."""
    p = encode_prompt(tok, prompt)
    c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]  # [T_c, V]
    return float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c)[:, None]).sum())


def test_zero_advantage_groups_never_reach_the_update(tmp_path: Path) -> None:
    """Every prompt is const (all rewards 1.0): each round is all zero-advantage, the step gives up
    after max_gen_batches rounds and runs no forward/backward at all -- the weights stay bit-equal."""
    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, ["const"], n_per_cap=12)
    run_pipeline(parse_recipe(_recipe(tmp_path, data, "const", max_steps=1, log_samples_every=0)))
    sd = tmp_path / "runs" / "const" / "rl"
    step1 = [r for r in _rows(sd, "metrics.jsonl") if r["step"] == 1][0]
    assert step1["rollout/gen_batches"] == 2 and step1["rollout/groups"] >= 8
    assert step1["rollout/groups_trained"] == 0 and step1["rollout/zero_adv_frac"] == 1.0
    assert step1["train/skipped"] == 1.0 and "train/loss" not in step1
    assert step1["total/skipped_updates"] == 1.0
    start = load_file(str(sd / "rollout_init" / "model.safetensors"))
    end = load_file(str(sd / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(start[k], end[k]) for k in start)


def test_minibatches_make_several_updates_per_step_off_policy_after_the_first(tmp_path: Path) -> None:
    """minibatches=2: two optimizer updates per step (the lr schedule counts updates: warmup 4 ->
    3/4 of the lr after step 1's two updates), the second on weights the first already moved, so its
    ratio against the pre-update log-probs leaves 1; the engine still matches the trainer on the
    weights that sampled."""
    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, ["parity"], n_per_cap=12)
    optim = {"lr": 3e-2, "betas": [0.9, 0.99], "weight_decay": 0.0, "warmup_steps": 4, "schedule": "constant"}
    run_pipeline(parse_recipe(_recipe(tmp_path, data, "mb", minibatches=2, optim=optim, log_samples_every=0)))
    steps = [r for r in _rows(tmp_path / "runs" / "mb" / "rl", "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["train/updates"] == 2.0 for r in steps)
    assert steps[0]["train/lr"] == pytest.approx(3e-2 * 3 / 4)
    assert steps[0]["train/ratio_max"] > 1.0 + 1e-3
    assert steps[1]["train/rollout_logprob_diff"] < 1e-4


def test_zero3_streams_the_weights_into_the_engine(tmp_path: Path) -> None:
    """Under ZeRO-3 the weight sync streams one gathered module at a time (``Strategy.hf_weights``):
    step 2's rollouts come from the weights step 1 trained, so engine and trainer agree."""
    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, ["parity"], n_per_cap=12)
    recipe = _recipe(tmp_path, data, "z3", log_samples_every=0)
    recipe["deepspeed"] = {"zero_stage": 3}
    run_pipeline(parse_recipe(recipe))
    steps = [r for r in _rows(tmp_path / "runs" / "z3" / "rl", "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in steps] == [1, 2] and steps[0]["train/grad_norm"] > 0
    assert steps[1]["train/rollout_logprob_diff"] < 1e-4


def test_a_reward_failing_on_every_sample_stops_the_run_naming_it(tmp_path: Path) -> None:
    """Three steps in a row (rewards.max_failed_steps) with every sample of a reward failing: one line
    naming the reward and its first error, not a run that "succeeds" without a single update."""
    from posttrain.reward_runner import RewardsFailing

    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, ["parity"], n_per_cap=12)
    recipe = _recipe(tmp_path, data, "broken", max_steps=5, log_samples_every=0,
                     rewards={"specs": [{"name": "rl_stage_broken"}]})  # fmt: skip
    with pytest.raises(RewardsFailing, match=r"reward 'rl_stage_broken' failed on every sample for 3 steps in a row "
                       r"\(first error: FileNotFoundError: /no/such/verifier\)"):  # fmt: skip
        run_pipeline(parse_recipe(recipe))
    rows = _rows(tmp_path / "runs" / "broken" / "rl", "metrics.jsonl")
    assert [r["step"] for r in rows if r["step"] >= 1] == [1, 2]  # stopped during step 3
    assert all(r["train/skipped"] == 1.0 for r in rows if r["step"] >= 1)


def test_a_run_that_stops_updating_stops_in_one_line_and_asks_are_capped(tmp_path: Path) -> None:
    """A constant reward: every group is zero-advantage. A refill round asks for at most
    max_ask_ratio (4) x the missing groups (4 + 16 = 20 groups per step, not ~30x), and after
    max_idle_steps steps without an update the stage stops with one line instead of spinning."""
    from posttrain.stages.rl import StageStalled

    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, ["const"], n_per_cap=60)
    recipe = parse_recipe(_recipe(tmp_path, data, "idle", max_steps=6, max_idle_steps=2, log_samples_every=0))
    with pytest.raises(StageStalled, match=r"stage rl \(rl\): 2 steps in a row without an informative group"):
        run_pipeline(recipe)
    rows = [r for r in _rows(tmp_path / "runs" / "idle" / "rl", "metrics.jsonl") if r["step"] >= 1]
    assert [r["step"] for r in rows] == [1]  # the second idle step raised before logging
    assert rows[0]["rollout/groups"] == 20 and rows[0]["rollout/gen_batches"] == 2


def test_capability_weights_must_name_capabilities_of_the_data(tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, ["parity", "const"], n_per_cap=4)
    recipe = parse_recipe(_recipe(tmp_path, data, "w", capability_weights={"parity": 1.0, "cnst": 2.0}))
    with pytest.raises(
        ConfigError, match=r"capability_weights names 'cnst', .* its capabilities: const, parity$"
    ):
        run_pipeline(recipe)


@pytest.mark.slow
def test_resume_continues_the_curriculum_exactly(tmp_path: Path) -> None:
    """Run 3 steps (state saved at step 2), then replay a crash after step 2 and resume: step 3 of
    the resumed run draws the same prompts from the same pool, samples the same completions (seeded
    per step) and reaches the same loss -- the pool, sampler, step and weights were all restored."""
    data = tmp_path / "prompts.jsonl"
    _write_prompts(data, ["parity", "const"], n_per_cap=10)
    curriculum = {"enabled": True, "pool_size": 8, "refilter_every": 1, "filter_samples": 4, "pass_k": 2}
    recipe = parse_recipe(_recipe(tmp_path, data, "resume", max_steps=3, save_every=2, curriculum=curriculum))
    run_pipeline(recipe)
    sd = tmp_path / "runs" / "resume" / "rl"
    first = {r["step"]: r for r in _rows(sd, "metrics.jsonl")}
    for done in (sd / "DONE", sd / "TRAINED", tmp_path / "runs" / "resume" / "DONE"):
        done.unlink()
    run_pipeline(recipe)
    second = {r["step"]: r for r in _rows(sd, "metrics.jsonl")}
    assert sorted(second) == [0, 1, 2, 3]
    assert second[2] == first[2]  # rows up to the saved step are kept, not recomputed
    a, b = first[3], second[3]
    for key in (
        "curriculum/pool/drawn",
        "curriculum/pool/trainable",
        "curriculum/pool/backlog",
        "curriculum/pool/retired",
        "curriculum/filter/checked",
        "total/rollouts_all",
        "rollout/groups",
        "reward/mean",
        "train/sequences",
        "train/completion_tokens",
    ):
        assert a[key] == b[key], key
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5, abs=1e-7)
