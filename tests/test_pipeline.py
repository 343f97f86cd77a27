"""End-to-end `posttrain run` in a temp dir: checkpoints, table, resume after SIGKILL, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import TINY_OVERRIDES, TINY_RECIPE
from tests.test_tracking import history


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def _cmd(*extra: str) -> list[str]:
    return [sys.executable, "-m", "posttrain.cli", "run", TINY_RECIPE, *TINY_OVERRIDES, *extra]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted few-step run shared by the tests below."""
    cwd = tmp_path_factory.mktemp("e2e")
    env = {**os.environ, "WANDB_MODE": "offline"}  # the real W&B path (other runs here disable it)
    res = subprocess.run(
        _cmd("run.name=e2e", "stages.warmup.max_steps=12"),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return cwd, res


def test_end_to_end_writes_a_loadable_checkpoint_and_the_table(finished_run):
    cwd, res = finished_run
    rd = cwd / "runs" / "e2e"
    ckpt = rd / "warmup" / "checkpoint"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert (
        type(model).__name__ == "LlamaForCausalLM"
        and tok.decode(tok.encode("7+8=", add_special_tokens=False)) == "7+8="
    )
    rows = [json.loads(x) for x in (rd / "warmup" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]  # it learns something in 12 steps
    assert (rd / "DONE").exists() and (rd / "warmup" / "DONE").exists()
    assert "held-out accuracy per stage" in res.stdout and "warmup  sft" in res.stdout
    assert set(json.loads((rd / "warmup" / "eval.json").read_text())) >= {
        "greedy_pass@1",
        "add/greedy_pass@1",
    }
    (wandb_run,) = (rd / "warmup").glob("wandb/offline-run-*/run-*.wandb")  # W&B offline, one run per stage
    assert [(h["_step"], h["train/loss"]) for h in history(wandb_run)] == [
        (r["step"], r["train/loss"]) for r in rows
    ]


def test_rerun_of_a_finished_run_is_refused_and_nothing_changes(finished_run):
    cwd, _ = finished_run
    ckpt = cwd / "runs" / "e2e" / "warmup" / "checkpoint" / "model.safetensors"
    before = (ckpt.stat().st_mtime_ns, ckpt.read_bytes())
    res = subprocess.run(
        _cmd("run.name=e2e", "stages.warmup.max_steps=12"),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("posttrain: error:") and "is a finished run; pass run.overwrite=true" in err[-1]
    assert "Traceback" not in res.stderr
    assert (ckpt.stat().st_mtime_ns, ckpt.read_bytes()) == before


def test_overwrite_keeps_the_finished_run_until_a_new_one_finishes(finished_run, tmp_path):
    """run.overwrite=true moves the finished run aside; runs that fail (twice) leave it intact, the
    first that finishes replaces it."""
    import shutil

    shutil.copytree(finished_run[0] / "runs", tmp_path / "runs")
    previous = tmp_path / "runs" / "e2e.previous" / "warmup" / "checkpoint" / "model.safetensors"
    original = (tmp_path / "runs" / "e2e" / "warmup" / "checkpoint" / "model.safetensors").read_bytes()
    for seq_len in (4, 5):  # every example is longer: the stage fails after the run dir is set up
        # (two different recipes: the second attempt replaces the first's unfinished run, not the kept one)
        failing = _cmd(
            "run.name=e2e",
            "run.overwrite=true",
            "stages.warmup.pack=true",
            f"stages.warmup.seq_len={seq_len}",
        )
        res = subprocess.run(failing, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and f"every example is longer than {seq_len} tokens" in res.stderr, (
            res.stderr[-2000:]
        )
        assert previous.read_bytes() == original, f"the attempt with seq_len={seq_len} lost the finished run"
        assert not (tmp_path / "runs" / "e2e" / "DONE").exists()
    res = subprocess.run(
        _cmd("run.name=e2e", "run.overwrite=true", "stages.warmup.max_steps=3"),
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "runs" / "e2e" / "DONE").exists() and not previous.parents[2].exists()
    rows = (tmp_path / "runs" / "e2e" / "warmup" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3


def test_sigkill_mid_stage_then_resume_equals_uninterrupted(finished_run, tmp_path):
    """Kill -9 after the step-4 state is saved; rerunning the same command must finish with exactly
    the weights (and per-step losses) of the uninterrupted run: data position, optimizer, scheduler
    and RNG are all restored."""
    ref_cwd, _ = finished_run
    cmd = _cmd("run.name=e2e", "stages.warmup.max_steps=12")
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    latest = tmp_path / "runs" / "e2e" / "warmup" / "state" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() in {"step4", "step6", "step8"}:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-stage"
    assert not (tmp_path / "runs" / "e2e" / "warmup" / "checkpoint").exists()

    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a = _weights(ref_cwd / "runs" / "e2e" / "warmup" / "checkpoint")
    b = _weights(tmp_path / "runs" / "e2e" / "warmup" / "checkpoint")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [
        json.loads(x)
        for x in (tmp_path / "runs" / "e2e" / "warmup" / "metrics.jsonl").read_text().splitlines()
    ]
    ref = [
        json.loads(x)
        for x in (ref_cwd / "runs" / "e2e" / "warmup" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == list(range(1, 13))  # no duplicated rows after the resume
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref]


BAD = {
    "unknown recipe": (["run", "recipe=quickstrat"], "unknown recipe 'quickstrat'"),
    "unknown key": (
        ["run", "recipe=quickstart", "stages.warmup.lr=0.1"],
        "unknown key 'stages.warmup.lr' (did you mean 'stages.warmup.optim.lr'?)",
    ),
    "wrong type": (
        ["run", "recipe=quickstart", "stages.warmup.micro_batch_size=big"],
        "'stages.warmup.micro_batch_size' must be int",
    ),
    "missing model dir": (
        ["run", "recipe=quickstart", "model.name_or_path=./no/such/model"],
        "model.name_or_path: model dir './no/such/model' does not exist",
    ),
    "missing dataset file": (
        ["run", "recipe=quickstart", "stages.warmup.data.source=missing.jsonl"],
        "missing.jsonl: dataset file not found",
    ),
    "malformed jsonl": (
        ["run", "recipe=quickstart", "stages.warmup.data.source=bad.jsonl"],
        "bad.jsonl: row 3 is not valid JSON",
    ),
    "missing column": (
        ["run", "recipe=quickstart", "stages.warmup.data.source=nocol.jsonl"],
        "missing required column 'completion or answer'",
    ),
    # names that are no local path are tried on the hub (offline here: HF_HUB_OFFLINE=1, conftest)
    "unknown hub model": (
        ["run", "recipe=quickstart", "model.name_or_path=nosuch/model"],
        "model.name_or_path: 'nosuch/model' is no model dir here and no hub model",
    ),
    "model dir without config": (
        ["run", "recipe=quickstart", "model.name_or_path=empty_dir"],
        "model.name_or_path: 'empty_dir' has no config.json",
    ),
    "unknown hub dataset": (
        ["run", "recipe=quickstart", "stages.warmup.data.source=nosuch/dataset"],
        "nosuch/dataset: no such local file or dir, and loading it as a hub dataset failed",
    ),
    # the RL stage's reward is checked before the warmup stage trains
    "unknown reward": (
        ["run", "recipe=quickstart", "stages.rl.rewards.specs=[{name: exact_mach}]"],
        "unknown reward 'exact_mach'. Did you mean 'exact_match'?",
    ),
    "bad reward kwargs": (
        [
            "run",
            "recipe=quickstart",
            "stages.rl.rewards.specs=[{name: llm_judge, kwargs: {judge: ./nojudge}}]",
        ],
        "reward 'llm_judge': kwargs.judge './nojudge' is not a Hugging Face checkpoint directory",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_clear_line(case, run_cli, tmp_path):
    (tmp_path / "bad.jsonl").write_text(
        '{"prompt": "1+1=", "completion": "2"}\n{"prompt": "2+2=", "completion": "4"}\n{"prompt": "3+3=" "completion": "6"}\n'
    )
    (tmp_path / "nocol.jsonl").write_text('{"prompt": "1+1="}\n')
    (tmp_path / "empty_dir").mkdir()
    args, expected = BAD[case]
    res = run_cli(*args)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("posttrain:")]
    assert len(lines) == 1 and expected in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created or overwritten
