"""The distill stage (offline top-k targets) and SFT with an online teacher, end to end through the CLI.

The teacher is a saved copy of the student's own initial weights (tiny_llama, seed 0 = run.seed), so
before the first update teacher and student are the same distribution: the soft part of the loss at
step 1 must be 0. That holds only if the teacher targets line up with the student's positions
(online: the shift; offline: stored rows -> packed batch offsets), so it tests the plumbing, not
just that something ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from posttrain.config import ModelConfig, parse_recipe
from posttrain.models import build_model
from posttrain.schema import ConfigError, parse
from tests.conftest import TINY_RECIPE

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "eval.data.num_eval=4",
    "eval.sampled=false",
    "eval.include_base=false",
    "tracking.progress=false",
    "tracking.log_every=1",
]


def save_model(name: str, directory: Path, seed: int = 0, **config: object) -> Path:
    data = yaml.safe_load((REPO / "recipes" / "model" / f"{name}.yaml").read_text())
    data["config"] = {**data["config"], **config}
    model, tok = build_model(parse(ModelConfig, data, "model"), seed=seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def check_codistill_metrics(metrics: list[dict], steps: int) -> None:
    assert [r["step"] for r in metrics] == list(range(1, steps + 1))
    for r in metrics:
        hist = [v for k, v in r.items() if k.startswith("codistill/lambda_hist/")]
        assert len(hist) == 5 and sum(hist) == pytest.approx(1.0)
        assert 0.0 <= r["codistill/teacher_label_agreement"] <= 1.0 and r["codistill/hard"] > 0
    assert metrics[0]["codistill/soft"] == pytest.approx(0.0, abs=1e-5)  # teacher == student before step 1
    assert metrics[-1]["codistill/soft"] > 1e-4  # the student has moved away from its initial weights


def test_distill_stage_writes_offline_targets_and_trains_from_them(run_cli, tmp_path: Path) -> None:
    teacher = save_model("tiny_llama", tmp_path / "teacher")
    res = run_cli(
        "run", "recipe=distill_tiny", "run.name=d",
        f"stages.distill.codistill.teacher.name_or_path={teacher}",
        "stages.distill.max_steps=4", "stages.distill.micro_batch_size=4", "stages.distill.data.num_train=48",
        "stages.distill.pack=true", "stages.distill.seq_len=48", "stages.distill.save_every=2", *FAST,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "runs" / "d.teacher_targets" / "teacher_targets.json").read_text())
    assert meta["rows"] == 48 and meta["top_k"] == 8 and meta["vocab_size"] == 105
    metrics = rows(tmp_path / "runs" / "d" / "distill" / "metrics.jsonl")
    assert metrics[0]["codistill/offline_rows"] == 48  # step-0 row
    check_codistill_metrics(metrics[1:], steps=4)
    # λ = cosine schedule 0.9 -> 0.3 × p_teacher(gold) <= the schedule's value at that step
    assert all(0 < r["codistill/lambda_mean"] <= 0.9 for r in metrics[1:])
    AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "d" / "distill" / "checkpoint")

    # Another run on the same targets dir with other data: refused in one line, the targets kept.
    targets = tmp_path / "runs" / "d.teacher_targets"
    before = sorted((f.name, f.stat().st_mtime_ns) for f in targets.iterdir())
    res = run_cli(
        "run", "recipe=distill_tiny", "run.name=d2", f"stages.distill.codistill.targets={targets}",
        f"stages.distill.codistill.teacher.name_or_path={teacher}",
        "stages.distill.max_steps=4", "stages.distill.micro_batch_size=4", "stages.distill.data.num_train=40",
        "stages.distill.pack=true", "stages.distill.seq_len=48", *FAST,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("posttrain: error: ") and "teacher targets written for other settings" in last
    assert "data.num_train: 48 there, 40 here" in last
    assert sorted((f.name, f.stat().st_mtime_ns) for f in targets.iterdir()) == before


def test_distill_stage_with_an_online_teacher(run_cli, tmp_path: Path) -> None:
    """No targets dir: the teacher runs in the same step; packed rows line up (soft part 0 at step 1)."""
    teacher = save_model("tiny_llama", tmp_path / "teacher")
    res = run_cli(
        "run", "recipe=distill_tiny", "run.name=o", "stages.distill.codistill.targets=null",
        "stages.distill.codistill.top_k=0", f"stages.distill.codistill.teacher.name_or_path={teacher}",
        "stages.distill.max_steps=3", "stages.distill.micro_batch_size=4", "stages.distill.data.num_train=48",
        "stages.distill.seq_len=48", "stages.distill.save_every=0", *FAST,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "runs" / "o.teacher_targets").exists()
    metrics = rows(tmp_path / "runs" / "o" / "distill" / "metrics.jsonl")
    assert "codistill/offline_rows" not in metrics[0]
    check_codistill_metrics(metrics, steps=3)


def test_sft_with_an_online_teacher_uses_codistill_loss(run_cli, tmp_path: Path) -> None:
    """λ = 1 (fixed): the loss is the soft part alone, so train/loss must equal codistill/soft."""
    teacher = save_model("tiny_llama", tmp_path / "teacher")
    res = run_cli(
        "run", TINY_RECIPE, "run.name=s",
        f"stages.warmup.codistill.teacher.name_or_path={teacher}", "stages.warmup.codistill.teacher.tokenizer=null",
        "stages.warmup.codistill.lambda0=1.0", "stages.warmup.codistill.temperature=2.0",
        "stages.warmup.max_steps=3", "stages.warmup.micro_batch_size=8", "stages.warmup.data.num_train=200", *FAST,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = rows(tmp_path / "runs" / "s" / "warmup" / "metrics.jsonl")
    check_codistill_metrics(metrics, steps=3)
    for r in metrics:
        assert r["codistill/lambda_mean"] == pytest.approx(1.0)
        assert r["codistill/lambda_hist/0.8-1.0"] == pytest.approx(1.0)
        assert r["train/loss"] == pytest.approx(r["codistill/soft"], rel=1e-4, abs=1e-6)


def test_teacher_with_another_vocabulary_fails_with_one_line(run_cli, tmp_path: Path) -> None:
    teacher = save_model("tiny_llama", tmp_path / "teacher", vocab_size=120)
    res = run_cli(
        "run", TINY_RECIPE, "run.name=v",
        f"stages.warmup.codistill.teacher.name_or_path={teacher}", "stages.warmup.codistill.teacher.tokenizer=null",
        "stages.warmup.max_steps=2",
        "stages.warmup.data.num_train=50", *FAST,
    )  # fmt: skip
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("posttrain: error: teacher vocabulary (")
    assert "120 tokens" in last and "105 tokens" in last and "shared tokenizer" in last


def test_sft_refuses_offline_targets_at_config_time() -> None:
    model = {"arch": "llama"}
    recipe = {"model": model, "stages": {"warmup": {"type": "sft", "codistill": {"targets": "t"}}}}
    with pytest.raises(
        ConfigError, match=r"'stages.warmup.codistill': sft codistills from an online teacher"
    ):
        parse_recipe(recipe)
    with pytest.raises(ConfigError, match=r"'stages.d.codistill' needs 'teacher'"):
        parse_recipe({"model": model, "stages": {"d": {"type": "distill"}}})


@pytest.mark.multiproc
def test_two_ranks_match_one_rank_with_offline_targets(run_cli, tmp_path: Path) -> None:
    """One process with grad_accum=2 and two with grad_accum=1 see the same global micro-batches, so
    the loss and every codistill metric (all-reduced over ranks) agree step by step; in the 2-rank run
    rank 0 writes the targets while rank 1 waits. Tolerance as for SFT: relative 1e-4."""
    teacher = save_model("tiny_llama4", tmp_path / "teacher", seed=3)
    common = [
        "recipe=distill_tiny", f"stages.distill.codistill.teacher.name_or_path={teacher}",
        "stages.distill.max_steps=3", "stages.distill.micro_batch_size=4", "stages.distill.data.num_train=48",
        "stages.distill.save_every=0", *FAST,
    ]  # fmt: skip
    for name, extra in {"one": ["stages.distill.grad_accum=2"], "two": ["launcher.nproc_per_node=2"]}.items():
        res = run_cli("run", *common, *extra, f"run.name={name}")
        assert res.returncode == 0, f"{name}: {res.stderr[-3000:]}"
    one, two = (rows(tmp_path / "runs" / n / "distill" / "metrics.jsonl")[1:] for n in ("one", "two"))
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        for key in [k for k in a if k.startswith(("train/loss", "codistill/"))]:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
