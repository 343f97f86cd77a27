"""Real tokenizers: one pad rule for every stage and engine, and base models without a chat template.

Every Llama 3.x tokenizer has no pad token. posttrain pads with EOS then (``models.ensure_pad_token``),
which is only safe because no batch finds padding by its id: these tests build such a tokenizer (the
tiny world's char tokenizer with its pad token removed, saved like a hub checkpoint) and run SFT
packed and padded, RL with the vLLM and the HF engine, and the held-out evaluation on it, and check
that a real EOS is still trained on when EOS is also the pad.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from posttrain.config import ModelConfig, parse_recipe
from posttrain.data import Example, collate_padded, prompt_text
from posttrain.losses import IGNORE_INDEX
from posttrain.models import build_model, ensure_pad_token, load_checkpoint, load_tokenizer
from posttrain.pipeline import run_pipeline
from posttrain.schema import ConfigError, parse

REPO = Path(__file__).resolve().parents[1]


def _llama3_like(tmp: Path, chat_template: bool = True) -> Path:
    """The tiny Llama saved with a tokenizer that has no pad token (and optionally no chat template)."""
    cfg = parse(
        ModelConfig, yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama.yaml").read_text()), "model"
    )
    model, tok = build_model(cfg, seed=0)
    tok.pad_token = None
    if not chat_template:
        tok.chat_template = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None
    out = tmp / "llama3_like"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config.get("pad_token") is None
    return out


def test_a_tokenizer_without_pad_pads_with_eos_and_eos_is_still_trained(tmp_path: Path) -> None:
    tok = load_tokenizer(_llama3_like(tmp_path))
    assert tok.pad_token_id == tok.eos_token_id is not None
    short, long = (
        Example([5, 6, tok.eos_token_id], [IGNORE_INDEX, 6, tok.eos_token_id]),
        Example([5] * 5, [IGNORE_INDEX] * 5),
    )
    batch = collate_padded([short, long], tok.pad_token_id)
    assert batch["labels"][0, 2] == tok.eos_token_id  # the real EOS: trained on
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]  # padding (the same id) is not attended
    assert (batch["labels"][0, 3:] == IGNORE_INDEX).all()

    class NoSpecials:
        pad_token_id = None
        eos_token = None
        name_or_path = "nothing"

    with pytest.raises(ConfigError, match="neither a pad nor an EOS token"):
        ensure_pad_token(NoSpecials())  # type: ignore[arg-type]


def test_a_base_tokenizer_without_chat_template_takes_the_prompt_as_is(tmp_path: Path) -> None:
    tok = load_tokenizer(_llama3_like(tmp_path, chat_template=False))
    assert prompt_text(tok, "1+1=") == "<bos>1+1="


@pytest.mark.vllm
def test_every_stage_and_engine_runs_on_a_tokenizer_without_pad(tmp_path: Path) -> None:
    model_dir = _llama3_like(tmp_path)
    tiny = {"source": "tiny", "tasks": {"add": {"kind": "add", "levels": [1]}}, "num_train": 64}
    sft = {"type": "sft", "data": tiny, "max_steps": 2, "micro_batch_size": 4, "save_every": 0}
    rl = {
        "type": "rl", "data": tiny, "sampling": {"n": 2, "max_tokens": 4}, "prompts_per_step": 2,
        "max_gen_batches": 1, "max_steps": 1, "save_every": 0, "log_samples_every": 0,
    }  # fmt: skip
    recipe: dict[str, Any] = {
        "run": {"name": "nopad", "dir": str(tmp_path / "runs")},
        "model": {"name_or_path": str(model_dir), "tokenizer": None},
        "deepspeed": {"zero_stage": 2},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
        "eval": {"data": {**tiny, "num_eval": 4}, "max_new_tokens": 4, "batch_size": 3},
        "stages": {
            "packed": {**sft, "pack": True, "seq_len": 32},
            "padded": {**sft, "pack": False},
            "rl_vllm": {**rl, "engine": {"kind": "vllm"}},
            "rl_hf": {**rl, "engine": {"kind": "hf", "hf_batch_size": 3}},
        },
    }
    results = run_pipeline(parse_recipe(recipe))
    assert set(results) == {"base", "packed", "padded", "rl_vllm", "rl_hf"}
    assert all(0.0 <= r["greedy_pass@1"] <= 1.0 for r in results.values())
    run = tmp_path / "runs" / "nopad"
    for stage in ("packed", "padded"):
        rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows if "train/loss" in r)
    _, tok = load_checkpoint(run / "rl_hf" / "checkpoint")
    assert tok.pad_token_id == tok.eos_token_id
