"""Kill-and-resume soak: SIGKILL a multi-stage run at random moments; every rerun must finish with the
checkpoints of an uninterrupted run, bit for bit.

    .venv/bin/python -m pytest -m slow tests/test_soak.py          # POSTTRAIN_SOAK_KILLS=N (default 10)

The recipe (``soak_recipe``) chains every stage type and every on-disk cache there is: SFT, lightweight
SFT (a ``pass_rate`` judge pass through vLLM, its judgment cache written a chunk at a time, and the
selection), RL with vLLM and a curriculum pool, DPO on dataset pairs (its pairs file + cached reference log-probs), and a
distill stage codistilling from a frozen MoE teacher; each stage saves resume state every 2 steps. One
uninterrupted run gives the reference. Then, for each of N kills, a fresh run is started and
SIGKILLed (the whole process group) at a uniformly random moment of the reference's wall time, and
rerun with the same command — killed again at a later random moment while kills remain — until it
finishes. Checked after every finished run:

* every stage's exported ``model.safetensors`` equals the reference's bit for bit;
* ``metrics.jsonl`` of every stage has each step exactly once, in order, and the same lr at every step;
* each stage's W&B run (offline) keeps one id across every resume.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def soak_recipe(run_dir: Path) -> dict[str, Any]:
    pairs = run_dir.parent / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(2 * i + 1)}) + "\n"
                             for i in range(32)))  # fmt: skip
    tiny = {"source": "tiny", "tasks": {"add": {"kind": "add", "levels": [1, 2]}}, "num_train": 400}
    model = yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama.yaml").read_text())
    teacher = yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama4.yaml").read_text())
    return {
        "run": {"name": "soak", "dir": str(run_dir), "seed": 0},
        "model": model,
        "deepspeed": {"zero_stage": 2},
        "tracking": {"progress": False, "log_every": 1, "wandb": {"mode": "offline"}},
        "eval": {"data": {**tiny, "num_eval": 8}, "max_new_tokens": 4, "sampled": False, "include_base": False},
        "stages": {
            "sft": {"type": "sft", "data": tiny, "max_steps": 6, "micro_batch_size": 8, "save_every": 2},
            "hard_sft": {
                "type": "sft", "data": {**tiny, "num_train": 160}, "max_steps": 4, "micro_batch_size": 8,
                "save_every": 2, "data_selection": {"drop_easiest": 0.5},
                "data_filters": [{"name": "pass_rate",
                                  "judge": {"model": "sft", "sampling": {"n": 2, "max_tokens": 4}, "batch_size": 16}}],
            },
            "rl": {
                "type": "rl", "data": tiny, "sampling": {"n": 4, "max_tokens": 4}, "prompts_per_step": 4,
                "max_gen_batches": 2, "max_steps": 6, "save_every": 2, "log_samples_every": 1,
                "curriculum": {"enabled": True, "pool_size": 16, "refilter_every": 3, "filter_samples": 4, "pass_k": 2},
                "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "constant"},
            },
            "dpo": {
                "type": "dpo", "data": {"source": str(pairs)}, "pairs": {"source": "dataset"},
                "max_steps": 4, "epochs": 100.0, "pairs_per_step": 8, "save_every": 2,
            },
            "distill": {
                "type": "distill", "data": tiny, "max_steps": 4, "micro_batch_size": 8, "save_every": 2,
                "codistill": {"teacher": teacher, "lambda0": 0.5},
            },
        },
    }  # fmt: skip


def _start(recipe: Path, cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "posttrain.cli", "run", f"recipe={recipe}"], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def _run_to_end(recipe: Path, cwd: Path, kill_at: list[float]) -> tuple[int, list[float]]:
    """Run, SIGKILLing the process group at each of ``kill_at`` seconds (from each start), rerunning
    after every kill, until a run ends by itself. Returns (its exit code, the moments actually killed)."""
    killed = []
    while True:
        proc = _start(recipe, cwd)
        deadline = time.monotonic() + kill_at[0] if kill_at else None
        while proc.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                killed.append(kill_at.pop(0))
                break
            time.sleep(0.05)
        else:
            err = proc.stderr.read().decode() if proc.stderr else ""
            assert proc.returncode == 0, err[-3000:]
            return proc.returncode, killed


def _checkpoints(run: Path) -> dict[str, dict[str, Any]]:
    return {
        s: load_file(str(run / s / "checkpoint" / "model.safetensors"))
        for s in ("sft", "hard_sft", "rl", "dpo", "distill")
    }


def _steps(run: Path, stage: str) -> list[tuple[int, float | None]]:
    rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [(r["step"], r.get("train/lr")) for r in rows if r["step"] >= 1 and "train/lr" in r]


def test_killed_runs_resume_to_the_same_checkpoints(tmp_path: Path) -> None:
    kills = int(os.environ.get("POSTTRAIN_SOAK_KILLS", "10"))
    rng = random.Random(os.environ.get("POSTTRAIN_SOAK_SEED", "0"))
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    (ref_dir / "r.yaml").write_text(yaml.safe_dump(soak_recipe(ref_dir / "runs"), sort_keys=False))
    t0 = time.monotonic()
    _run_to_end(ref_dir / "r.yaml", ref_dir, [])
    duration = time.monotonic() - t0
    reference = _checkpoints(ref_dir / "runs" / "soak")
    ref_steps = {s: _steps(ref_dir / "runs" / "soak", s) for s in reference}

    done = 0
    trial = 0
    while done < kills:
        trial += 1
        work = tmp_path / f"trial{trial}"
        work.mkdir()
        (work / "r.yaml").write_text(yaml.safe_dump(soak_recipe(work / "runs"), sort_keys=False))
        moments = sorted(rng.uniform(1.0, duration) for _ in range(min(2, kills - done)))
        _, killed = _run_to_end(work / "r.yaml", work, [moments[0], *(m - moments[0] for m in moments[1:])])
        done += len(killed)
        run = work / "runs" / "soak"
        got = _checkpoints(run)
        for stage, weights in reference.items():
            assert all(weights[k].equal(got[stage][k]) for k in weights), (
                f"trial {trial} ({killed}): {stage} differs"
            )
            assert _steps(run, stage) == ref_steps[stage], f"trial {trial}: {stage} metrics steps/lr differ"
            ids = {p.name.split("-")[-1] for p in (run / stage / "wandb").glob("offline-run-*")}
            assert ids == {(run / stage / "wandb_id").read_text().strip()}, (
                f"trial {trial}: {stage} W&B runs {ids}"
            )
    print(f"soak: {done} kills over {trial} runs; reference run {duration:.0f} s")
