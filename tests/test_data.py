"""Data: tiny-world determinism and held-out disjointness, tokenisation, packing, bad files."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import DataConfig, ModelConfig, TinyTaskConfig
from posttrain.data import (
    DataError,
    check_source,
    collate_packed,
    collate_padded,
    encode_sft,
    iterate_forever,
    load_rows,
    pack_rows,
    tokenize_sft,
)
from posttrain.losses import IGNORE_INDEX, sft_loss, shift_for_next_token
from posttrain.models import build_model
from posttrain.tasks import generate_rows, is_held_out
from posttrain.tokenizer import build_char_tokenizer

TASKS = {
    "add": TinyTaskConfig(kind="add", levels=(1, 2)),
    "rev": TinyTaskConfig(kind="reverse", levels=(3, 4)),
}


def test_tiny_world_is_deterministic_and_held_out_is_disjoint():
    a = generate_rows(TASKS, "train", 500, seed=3)
    assert a == generate_rows(TASKS, "train", 500, seed=3)
    assert a != generate_rows(TASKS, "train", 500, seed=4)
    held = generate_rows(TASKS, "eval", 50, seed=3)
    assert len(held) == 100 and len({r["prompt"] for r in held}) == 100
    assert all(is_held_out(r["prompt"]) for r in held)
    assert not ({r["prompt"] for r in a} & {r["prompt"] for r in held})
    for r in a + held:
        if r["capability"] == "add":
            x, y = r["prompt"][:-1].split("+")
            assert int(x) + int(y) == int(r["answer"]) and r["difficulty"] == max(len(x), len(y))
        else:
            assert r["prompt"][4:-1][::-1] == r["answer"] and r["difficulty"] == len(r["answer"])


def test_sft_labels_cover_completion_and_eos_only():
    tok = build_char_tokenizer()
    ids, labels = encode_sft(tok, "12+3=", "15")
    n_prompt = len(
        "<bos><|user|>12+3=<|end|><|assistant|>".replace("<bos>", "B")
        .replace("<|user|>", "U")
        .replace("<|end|>", "E")
        .replace("<|assistant|>", "A")
    )
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == "15<eos>"


SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
}
SMALL_L4 = {
    **SMALL,
    "intermediate_size_mlp": 128,
    "num_local_experts": 2,
    "interleave_moe_layer_step": 2,
    "head_dim": 32,
}


@pytest.mark.parametrize("arch,config", [("llama", SMALL), ("llama4", SMALL_L4)])
def test_packed_loss_equals_padded_loss(arch, config):
    """Packing with restarting position_ids must not let examples attend to each other."""
    torch.manual_seed(0)
    model, tok = build_model(ModelConfig(arch=arch, config=config))
    model.eval()
    rows = generate_rows(TASKS, "train", 6, seed=0)
    import datasets

    examples = tokenize_sft(datasets.Dataset.from_list(rows), tok, 64)
    padded = collate_padded(examples, tok.pad_token_id)
    packed_rows = pack_rows(examples, range(len(examples)), 64)
    assert len(packed_rows) < len(examples)  # something was really packed
    packed = collate_packed([[examples[i] for i in r] for r in packed_rows], tok.pad_token_id, 64)

    def total(batch):
        labels = batch.pop("labels")
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits
        per_token, aux = sft_loss(*shift_for_next_token(logits, labels))
        return float(per_token.sum()), int(aux["mask"].sum())

    (lp, np_), (lk, nk) = total(dict(padded)), total(dict(packed))
    assert np_ == nk
    assert abs(lp - lk) < 1e-4 * abs(lp)


def test_resume_position_continues_the_stream():
    tok = build_char_tokenizer()
    import datasets

    examples = tokenize_sft(datasets.Dataset.from_list(generate_rows(TASKS, "train", 40, 0)), tok, 64)
    full = iterate_forever(examples, 8, seed=1, pack=False, seq_len=64)
    first = [next(full) for _ in range(12)]  # crosses an epoch boundary (5 batches per epoch)
    resumed = iterate_forever(examples, 8, seed=1, pack=False, seq_len=64, start=7)
    assert [next(resumed) for _ in range(5)] == first[7:12]


def test_jsonl_bad_row_is_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + '{"prompt": "x",\n')
    with pytest.raises(DataError, match=r"d.jsonl: row 2 is not valid JSON"):
        load_rows(DataConfig(source=str(f)), "train", 0, ["prompt"])


def test_missing_file_and_missing_column(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: dataset file not found"):
        load_rows(DataConfig(source=str(tmp_path / "nope.jsonl")), "train", 0, ["prompt"])
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "a", "completion": "b"}) + "\n")
    with pytest.raises(DataError, match=r"missing required column\(s\) prompt \(has: question, completion\)"):
        load_rows(DataConfig(source=str(f)), "train", 0, ["prompt"])
    with pytest.raises(DataError, match=r"missing required column 'prompt'"):
        check_source(DataConfig(source=str(f)), "stages.x.data", ["prompt"])


def test_jsonl_source_loads_through_datasets(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(5))
    )
    ds = load_rows(DataConfig(source=str(f)), "train", 0, ["prompt", "completion"])
    assert len(ds) == 5 and ds[2] == {"prompt": "2+1=", "completion": "3"}
