"""Held-out evaluation: greedy pass@1 and sampled pass@1 (temperature 1), overall and per capability.

Generation here uses transformers' ``generate`` on rank 0: evaluation must not depend on the
training-time rollout engine, so every stage's checkpoint is measured the same way.
"""

from __future__ import annotations

from collections import defaultdict
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
) -> list[str]:
    """Completions (special tokens removed) for chat ``prompts``; temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    gen = torch.Generator().manual_seed(seed)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        if temperature > 0:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False)
        ids = model.generate(**enc, **kwargs)
        out += tokenizer.batch_decode(ids[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return out


def evaluate(
    model: Any, tokenizer: Any, ds: datasets.Dataset, cfg: EvalConfig, seed: int = 0
) -> dict[str, float]:
    """{"greedy_pass@1": …, "sampled_pass@1": …, "<capability>/greedy_pass@1": …, …} on ``ds``."""
    score = REWARDS.get(cfg.reward)
    prompts = [str(p) for p in ds["prompt"]]
    caps = [str(c) for c in ds["capability"]] if "capability" in ds.column_names else ["all"] * len(prompts)
    columns = {c: ds[c] for c in ds.column_names if c != "prompt"}
    modes = {"greedy": 0.0, **({"sampled": 1.0} if cfg.sampled else {})}
    results: dict[str, float] = {}
    for mode, temperature in modes.items():
        completions = generate(
            model, tokenizer, prompts, cfg.max_new_tokens, temperature, cfg.batch_size, seed
        )
        rewards = score(prompts, completions, **columns)
        per_cap: dict[str, list[float]] = defaultdict(list)
        for cap, r in zip(caps, rewards, strict=True):
            per_cap[cap].append(1.0 if r == 1.0 else 0.0)
        flat = [x for xs in per_cap.values() for x in xs]
        results[f"{mode}_pass@1"] = sum(flat) / max(1, len(flat))
        for cap, xs in sorted(per_cap.items()):
            results[f"{cap}/{mode}_pass@1"] = sum(xs) / len(xs)
    return results
