"""Held-out evaluation: greedy pass@1 and sampled pass@1 (temperature 1), overall and per capability,
and the mean completion length of each.

Every rank evaluates its share of the held-out prompts (rows ``rank::world``) with transformers
``generate`` on its own device, and the counts are summed over the ranks, so no rank waits at a
barrier while another generates alone. A sharded model (ZeRO-3 or expert-parallel: its forward is a
collective) generates with ``synced_gpus`` and every rank runs the same number of ``generate`` calls.
Evaluation does not depend on the training-time rollout engine, so every stage's checkpoint is
measured the same way. Greedy results do not depend on the number of ranks; sampled ones are seeded
per rank.
"""

from __future__ import annotations

import math
from typing import Any

import datasets
import torch

from posttrain.config import EvalConfig
from posttrain.data import prompt_text
from posttrain.registry import REWARDS


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    calls: int | None = None,
    synced: bool = False,
) -> list[list[int]]:
    """Completion token ids (cut after EOS) for chat ``prompts``; temperature 0 is greedy. ``calls``:
    run exactly this many ``generate`` calls (the extra ones on a placeholder prompt), as sharded
    models need on every rank."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    placeholder = prompts[:1] or ["0"]
    out: list[list[int]] = []
    for i in range(max(len(batches), calls or 0)):
        real = i < len(batches)
        texts = [prompt_text(tokenizer, p) for p in (batches[i] if real else placeholder)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced,
        )
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False)
        ids = model.generate(**enc, **kwargs)[:, enc.input_ids.shape[1] :].tolist()
        if real:
            for row in ids:
                out.append(
                    row[: row.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in row else row
                )
    model.train(was_training)
    return out


def evaluate(
    model: Any,
    tokenizer: Any,
    ds: datasets.Dataset,
    cfg: EvalConfig,
    seed: int = 0,
    strategy: Any = None,
    synced: bool = False,
) -> dict[str, float]:
    """{"greedy_pass@1": …, "greedy_len": …, "sampled_pass@1": …, "<capability>/greedy_pass@1": …} on
    ``ds``; with ``strategy`` (a posttrain ``Strategy``) each rank takes its share and the counts are
    summed over ranks (a collective); ``synced`` for sharded models. ``*_len`` is the mean number of
    completion tokens (EOS included)."""
    score = REWARDS.get(cfg.reward)
    rank, world = (strategy.rank, strategy.world_size) if strategy is not None else (0, 1)
    caps_all = [str(c) for c in ds["capability"]] if "capability" in ds.column_names else ["all"] * len(ds)
    names = sorted(set(caps_all))
    mine = list(range(rank, len(ds), world))
    calls = math.ceil(math.ceil(len(ds) / world) / cfg.batch_size)  # the busiest rank's generate calls
    prompts = [str(ds["prompt"][i]) for i in mine]
    columns = {c: [ds[c][i] for i in mine] for c in ds.column_names if c != "prompt"}
    modes = {"greedy": 0.0, **({"sampled": 1.0} if cfg.sampled else {})}
    # per capability: [prompts, then per mode: solved, completion tokens]
    table = [[0.0] * (1 + 2 * len(modes)) for _ in names]
    for i in mine:
        table[names.index(caps_all[i])][0] += 1
    for m, temperature in enumerate(modes.values()):
        ids = generate(model, tokenizer, prompts, cfg.max_new_tokens, temperature, cfg.batch_size, seed + rank,
                       calls=calls, synced=synced)  # fmt: skip
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        rewards = score(prompts, texts, **columns) if prompts else []
        for i, r, completion in zip(mine, rewards, ids, strict=True):
            cell = table[names.index(caps_all[i])]
            cell[1 + 2 * m] += 1.0 if r == 1.0 else 0.0
            cell[2 + 2 * m] += len(completion)
    if strategy is not None:
        table = strategy.all_reduce_table(table)
    results: dict[str, float] = {}
    total = sum(row[0] for row in table)
    for m, mode in enumerate(modes):
        results[f"{mode}_pass@1"] = sum(row[1 + 2 * m] for row in table) / max(1.0, total)
        results[f"{mode}_len"] = sum(row[2 + 2 * m] for row in table) / max(1.0, total)
        for name, counts in zip(names, table, strict=True):
            results[f"{name}/{mode}_pass@1"] = counts[1 + 2 * m] / max(1.0, counts[0])
    return results
