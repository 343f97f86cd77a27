"""The DPO stage end to end on the tiny model: real DeepSpeed, real datasets, real vLLM for on-policy pairs.

* Dataset pairs train: the chosen - rejected margin grows, and bad rows (an empty chosen, chosen equal
  to rejected, a prompt too long) are skipped and counted, with their row numbers in the log.
* The reference log-probs read from the cache equal a fresh computation with the starting model; a
  reference pass killed half-way (the cache as a kill leaves it: some rows and a torn last line)
  resumes with exactly the missing pairs; changed data rebuilds the pairs and the cache.
* A stage killed after its step-2 state resumes to bit-identical weights.
* On-policy pairs: hard prompts measured and sampled with the policy through vLLM, scored, paired.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import parse_recipe
from posttrain.models import build_model
from posttrain.pipeline import run_pipeline
from posttrain.plugins import reward
from posttrain.stages.dpo import REFERENCE_FILE, Pair, sequence_logps

REPO = Path(__file__).resolve().parents[1]


@reward("dpo_stage_test")
def dpo_stage_test(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
    """1.0 for an even number of characters, else 0.0 (an untrained model gets it right half the time).

    >>> dpo_stage_test(["a", "b"], ["xy", "x"])
    [1.0, 0.0]
    """
    return [float(len(c) % 2 == 0) for c in completions]


def _pairs_file(path: Path, n: int = 48, bad: bool = True) -> Path:
    rows = [
        {"prompt": f"{i}+{i + 1}=", "chosen": str(2 * i + 1), "rejected": str(2 * i + 3)} for i in range(n)
    ]
    if bad:
        rows += [
            {"prompt": "1+1=", "chosen": "", "rejected": "3"},
            {"prompt": "1+2=", "chosen": "3", "rejected": "3"},
            {"prompt": "9" * 80 + "=", "chosen": "1", "rejected": "2"},
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp: Path, name: str, **stage: Any) -> dict[str, Any]:
    import yaml

    dpo: dict[str, Any] = {
        "type": "dpo", "data": {"source": str(_pairs_file(tmp / "pairs.jsonl")), "max_prompt_len": 24},
        "pairs": {"source": "dataset"}, "max_steps": 4, "pairs_per_step": 16, "beta": 0.5, "epochs": 100,
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"}, "save_every": 0,
    }  # fmt: skip
    dpo.update(stage)
    return {
        "run": {"name": name, "dir": str(tmp / "runs"), "seed": 0},
        "model": yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama.yaml").read_text()),
        "deepspeed": {"zero_stage": 2},
        "tracking": {"progress": False, "log_every": 1, "wandb": {"mode": "disabled"}},
        "stages": {"dpo": dpo},
    }


def _rows(sd: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (sd / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_dataset_pairs_train_and_bad_rows_are_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_pipeline(parse_recipe(_recipe(tmp_path, "ds", max_steps=8, pairs_per_step=48)))  # full batches
    sd = tmp_path / "runs" / "ds" / "dpo"
    rows = _rows(sd)
    head = {k: v for r in rows if r["step"] == 0 for k, v in r.items()}
    assert head["dpo/rows"] == 51 and head["dpo/pairs"] == 48
    assert (
        head["dpo/skipped_empty_chosen"] == head["dpo/skipped_identical"] == head["dpo/skipped_too_long"] == 1
    )
    assert "(rows 49)" in caplog.text and "(rows 50)" in caplog.text and "(rows 51)" in caplog.text
    steps = [r for r in rows if r["step"] >= 1]
    assert steps[0]["train/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy = reference at the first step
    assert steps[-1]["dpo/margin"] > 0.1 and steps[-1]["dpo/accuracy"] > 0.5
    assert steps[-1]["train/loss"] < steps[0]["train/loss"]

    # the cached reference log-probs equal a fresh computation with the starting model
    cache = [json.loads(x) for x in (sd / REFERENCE_FILE).read_text().splitlines()[1:]]
    pairs = [Pair(**json.loads(x)) for x in (sd / "pairs.jsonl").read_text().splitlines()[1:]]
    start, tok = build_model(parse_recipe(_recipe(tmp_path, "x")).model, seed=0)
    with torch.no_grad():
        fresh, _, _ = sequence_logps(start, pairs[:8], chunk=1024, pad_id=tok.pad_token_id)
    cached = torch.tensor([[c[1] for c in cache[:8]], [c[2] for c in cache[:8]]]).flatten()
    assert [c[0] for c in cache] == list(range(48))
    assert (fresh - cached).abs().max() < 1e-5


def test_a_killed_reference_pass_resumes_with_the_missing_pairs_and_changed_data_rebuilds(
    tmp_path: Path,
) -> None:
    recipe = parse_recipe(_recipe(tmp_path, "ref", max_steps=1))
    run_pipeline(recipe)
    sd = tmp_path / "runs" / "ref" / "dpo"
    full = (sd / REFERENCE_FILE).read_text().splitlines()
    # what a kill during the pass leaves: the header, 20 complete rows and a torn one
    (sd / REFERENCE_FILE).write_text("\n".join(full[:21]) + "\n" + full[21][:7])
    for marker in (sd / "DONE", sd / "TRAINED", sd.parent / "DONE"):
        marker.unlink()
    shutil.rmtree(sd / "checkpoint")
    run_pipeline(recipe)
    assert (sd / REFERENCE_FILE).read_text().splitlines() == full  # the same values, in order
    logged = [r for r in _rows(sd) if "dpo/reference_computed" in r]
    assert [(r["dpo/reference_cached"], r["dpo/reference_computed"]) for r in logged] == [(0, 48), (20, 28)]

    # new data in the same file: the pairs and the reference cache are rebuilt, not reused
    _pairs_file(Path(recipe.stages["dpo"].data.source), n=30, bad=False)
    for marker in (sd / "DONE", sd / "TRAINED", sd.parent / "DONE"):
        marker.unlink()
    run_pipeline(recipe)
    assert len((sd / REFERENCE_FILE).read_text().splitlines()) == 31
    assert len((sd / "pairs.jsonl").read_text().splitlines()) == 31


def test_a_resumed_stage_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    run_pipeline(parse_recipe(_recipe(tmp_path, "whole", max_steps=4)))
    recipe = parse_recipe(_recipe(tmp_path, "killed", max_steps=4, save_every=2))
    run_pipeline(recipe)
    sd = tmp_path / "runs" / "killed" / "dpo"
    for marker in (sd / "DONE", sd / "TRAINED", sd.parent / "DONE"):  # as if killed after step 3
        marker.unlink()
    shutil.rmtree(sd / "checkpoint")
    assert (sd / "state" / "latest").read_text() == "step2"
    run_pipeline(recipe)
    a = load_file(str(tmp_path / "runs" / "whole" / "dpo" / "checkpoint" / "model.safetensors"))
    b = load_file(str(sd / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in _rows(sd) if r["step"] >= 1] == [1, 2, 3, 4]


@pytest.mark.vllm
def test_on_policy_pairs_from_measured_hard_prompts(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n" for i in range(24))
    )
    recipe = _recipe(
        tmp_path, "onp", data={"source": str(prompts), "max_prompt_len": 24},
        pairs={"source": "on_policy", "n": 4, "min_margin": 0.5, "band": [0.0, 1.0], "measure_samples": 4,
               "measure_prompts": 12, "max_prompts": 8},
        sampling={"n": 4, "max_tokens": 6}, rewards={"specs": [{"name": "dpo_stage_test"}]}, max_steps=2,
        pairs_per_step=4,
    )  # fmt: skip
    run_pipeline(parse_recipe(recipe))
    sd = tmp_path / "runs" / "onp" / "dpo"
    head = {k: v for r in _rows(sd) if r["step"] == 0 for k, v in r.items()}
    assert head["dpo/measured_prompts"] == 12 and 1 <= head["dpo/hard_prompts"] <= 12
    assert head["dpo/pairs"] + head["dpo/skipped_ties"] + head["dpo/skipped_unscored"] + head[
        "dpo/skipped_small_margin"
    ] == min(8, head["dpo/hard_prompts"])
    pairs = [json.loads(x) for x in (sd / "pairs.jsonl").read_text().splitlines()[1:]]
    assert pairs and all(p["margin"] == 1.0 and p["chosen"] != p["rejected"] for p in pairs)
    assert (sd / "checkpoint" / "model.safetensors").exists()
