"""Teacher targets: online (same-step forward, no grad) and offline (top-k in Arrow), vocab checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from posttrain.cli import main as cli_main
from posttrain.config import CodistillConfig, ModelConfig, TinyTaskConfig
from posttrain.data import Example, collate_padded, encode_sft
from posttrain.losses import codistill_loss, shift_for_next_token
from posttrain.models import build_model
from posttrain.schema import ConfigError, parse
from posttrain.tasks import generate_rows
from posttrain.teacher import (
    META_FILE,
    OfflineTargets,
    VocabMismatchError,
    load_teacher,
    online_targets,
    write_offline_targets,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def model_cfg(name: str, **config: object) -> ModelConfig:
    data = yaml.safe_load((RECIPES / "model" / f"{name}.yaml").read_text())
    data["config"] = {**data["config"], **config}
    return parse(ModelConfig, data, "model")


@pytest.fixture(scope="module")
def teacher_and_tok() -> tuple[torch.nn.Module, object]:
    return build_model(model_cfg("tiny_llama4"), seed=1)


def examples(tok: object, n: int = 12) -> list[Example]:
    rows = generate_rows({"add": TinyTaskConfig(kind="add", levels=(1, 2))}, "train", n, seed=0)
    return [Example(*encode_sft(tok, r["prompt"], r["completion"])) for r in rows]


def test_online_targets_align_with_the_shifted_student_and_carry_no_grad(teacher_and_tok) -> None:
    teacher, tok = teacher_and_tok
    batch = collate_padded(examples(tok, 4), tok.pad_token_id)
    with torch.no_grad():
        want = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    t = online_targets(teacher, batch)
    assert t.logits is not None and not t.logits.requires_grad
    torch.testing.assert_close(t.logits, want)
    k = online_targets(teacher, batch, top_k=5)
    values, index = torch.topk(F.log_softmax(want, -1), 5, dim=-1)
    torch.testing.assert_close(k.topk_logprobs, values)
    assert torch.equal(k.topk_indices, index)


def test_online_codistillation_step_updates_the_student_only(teacher_and_tok) -> None:
    """A larger MoE teacher (tiny_behemoth) and a dense student: after one backward, every student
    parameter that the loss reaches has a gradient and no teacher parameter has one."""
    student, tok = build_model(model_cfg("tiny_llama"), seed=0)
    teacher = load_teacher(model_cfg("tiny_behemoth"), tok, student.config.vocab_size)
    batch = collate_padded(examples(tok, 4), tok.pad_token_id)
    labels = batch.pop("labels")
    targets = online_targets(teacher, batch)
    logits, shifted = shift_for_next_token(student(**batch).logits, labels)
    loss, m = codistill_loss(logits, shifted, targets, modes=("teacher_confidence",), lambda0=0.9)
    (loss.sum() / m["mask"].sum()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0


def test_offline_targets_round_trip_equals_online_topk(teacher_and_tok, tmp_path: Path) -> None:
    teacher, tok = teacher_and_tok
    exs = examples(tok, 10)
    out = write_offline_targets(
        teacher, tok, exs, tmp_path / "targets", top_k=6, batch_size=4, teacher_name="t"
    )
    assert (out / META_FILE).exists() and not (tmp_path / "targets.partial").exists()
    stored = OfflineTargets.open(out, tok, teacher.config.vocab_size)
    assert stored.top_k == 6 and len(stored.ds) == 10
    assert [e.input_ids for e in stored.examples()] == [e.input_ids for e in exs]

    chosen = [7, 2, 5]
    batch = collate_padded([exs[i] for i in chosen], tok.pad_token_id)
    offline = stored.batch([[(i, 0)] for i in chosen], width=batch["input_ids"].shape[1])
    online = online_targets(teacher, batch, top_k=6)
    mask = batch["labels"][:, 1:] != -100  # [B, T-1] loss positions
    torch.testing.assert_close(offline.topk_logprobs[mask], online.topk_logprobs[mask])
    assert torch.equal(offline.topk_indices[mask], online.topk_indices[mask])

    student = torch.randn(3, batch["input_ids"].shape[1] - 1, teacher.config.vocab_size)
    a, _ = codistill_loss(student, batch["labels"][:, 1:], offline, lambda0=0.7, temperature=2.0)
    b, _ = codistill_loss(student, batch["labels"][:, 1:], online, lambda0=0.7, temperature=2.0)
    torch.testing.assert_close(a, b)


def test_offline_targets_place_packed_examples_at_their_offsets(teacher_and_tok, tmp_path: Path) -> None:
    teacher, tok = teacher_and_tok
    exs = examples(tok, 3)
    stored = OfflineTargets.open(write_offline_targets(teacher, tok, exs, tmp_path / "t", top_k=3), tok, 105)
    n0 = len(exs[0].input_ids)
    width = n0 + len(exs[1].input_ids) + 2
    packed = stored.batch([[(0, 0), (1, n0)]], width=width)
    single = stored.batch([[(1, 0)]], width=len(exs[1].input_ids))
    assert packed.topk_indices is not None and single.topk_indices is not None
    # example 1's loss positions, shifted by its offset in the packed row
    pos = [t for t in range(len(exs[1].labels) - 1) if exs[1].labels[t + 1] != -100]
    assert torch.equal(packed.topk_indices[0, [n0 + p for p in pos]], single.topk_indices[0, pos])


def test_vocabulary_mismatch_fails_with_one_line_naming_both(teacher_and_tok, tmp_path: Path) -> None:
    _, tok = teacher_and_tok
    with pytest.raises(
        VocabMismatchError, match=r"teacher vocabulary \(.*: 120 tokens.*student's \(.*: 105 tokens"
    ):
        load_teacher(model_cfg("tiny_llama4", vocab_size=120), tok, 105)

    teacher, _ = build_model(model_cfg("tiny_llama4"), seed=0)
    out = write_offline_targets(teacher, tok, examples(tok, 2), tmp_path / "t", top_k=2)
    meta = json.loads((out / META_FILE).read_text())
    meta["vocab_fingerprint"] = "0123456789abcdef"  # same size, different token -> id map
    (out / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(VocabMismatchError) as e:
        OfflineTargets.open(out, tok, 105)
    msg = str(e.value)
    assert "\n" not in msg and "vocab 0123456789abcdef" in msg and "105 tokens" in msg and str(out) in msg
    with pytest.raises(ConfigError, match=r"not a teacher-targets dir"):
        OfflineTargets.open(tmp_path, tok, 105)


def test_codistill_config_checks() -> None:
    ok = parse(CodistillConfig, {"targets": "x", "modes": ["schedule", "teacher_confidence"]}, "c")
    assert ok.modes == ("schedule", "teacher_confidence")
    bad = [
        ({}, r"'c' needs 'teacher'"),
        ({"targets": "x", "modes": ["fixed", "schedule"]}, r"'c.modes'"),
        ({"targets": "x", "modes": ["confidence"]}, r"'c.modes\[0\]' must be one of"),
        ({"targets": "x", "lambda0": 1.5}, r"'c.lambda0' must be in \[0, 1\]"),
        (
            {"targets": "x", "divergence": "jsd", "jsd_beta": 1.0},
            r"'c.jsd_beta' must be in \(0, 1\), got 1.0",
        ),
        ({"targets": "x", "teacher": {"arch": "llama4"}, "top_k": 0}, r"'c.top_k' must be >= 1"),
        ({"targets": "x", "temprature": 2.0}, r"did you mean 'c.temperature'"),
    ]
    for data, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            parse(CodistillConfig, data, "c")


def test_teacher_command_writes_a_stage_targets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = {
        "defaults": ["_self_"],
        "model": yaml.safe_load((RECIPES / "model" / "tiny_llama.yaml").read_text()),
        "stages": {
            "distill": {
                "type": "distill",
                "data": {"tasks": {"add": {"kind": "add", "levels": [1]}}, "num_train": 8},
                "codistill": {
                    "teacher": yaml.safe_load((RECIPES / "model" / "tiny_llama4.yaml").read_text()),
                    "targets": str(tmp_path / "targets"),
                    "top_k": 4,
                },
            }
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli_main(["teacher-targets", f"recipe={path}", "stage=distill"]) == 0
    meta = json.loads((tmp_path / "targets" / META_FILE).read_text())
    assert meta["rows"] == 8 and meta["top_k"] == 4 and meta["vocab_size"] == 105
    assert cli_main(["teacher-targets", f"recipe={path}", "stage=nope"]) == 2
    assert "recipe has no stage 'nope'" in capsys.readouterr().err
