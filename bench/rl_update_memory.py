"""Peak memory of one RL policy update at a real vocabulary size: the update as it is now against the
way it was computed before (the peer, reproduced below), each in a fresh process, same model and data.

    python bench/rl_update_memory.py [--vocab 128256] [--seqs 8] [--prompt 192] [--completion 64]

Before: right-padded prompt + completion rows, logits for every position [B, T, V], a float32
log-softmax over all of them, and the entropy from another full float32 softmax. Now
(``posttrain.stages.rl.policy_update``): prompts left-padded so the completions line up, logits only
for the completion positions (``logits_to_keep``), the float32 log-softmax ``logprob_chunk_tokens``
positions at a time and recomputed in the backward pass. The model is a small Llama (hidden 64, 2
layers) with a Llama 3-sized vocabulary, so the vocabulary terms dominate as they do at 8B with long
prompts. Peak = the child's peak RSS (``ru_maxrss``) minus its RSS just before the update.

Measured 2026-12-03 on the 2-core CPU machine (1 thread, fp32, vocab 128256, 8 sequences of 192
prompt + 64 completion tokens, ZeRO-0, one process):

    before   peak RSS of one update 3.94 GiB  20.6 s
    now      peak RSS of one update 1.02 GiB  6.5 s
    ratio now / before: 0.26 (3.9x less)

(The machine was shared with other jobs: the seconds are indicative only; the memory is not timing.)
What remains in "now" is the logits of the completion positions in the model's dtype and their
gradient (8 x 64 x 128256 x 4 bytes = 0.25 GiB each, fp32 here, half that in bf16), the lm_head's
gradient and the AdamW state created by the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    os.environ.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(1)
    from posttrain.config import DeepSpeedConfig, ModelConfig, RLConfig
    from posttrain.losses import aggregate, entropy_from_logits, grpo_loss, token_logprobs
    from posttrain.models import build_model
    from posttrain.schema import parse
    from posttrain.stages.rl_update import policy_update
    from posttrain.strategy import Strategy
    from posttrain.types import Completion, RolloutGroup, Sample

    cfg = ModelConfig(
        arch="llama",
        config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 2, "max_position_embeddings": 1024, "vocab_size": args.vocab},
    )  # fmt: skip
    model, _ = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    n = 4
    groups = []
    for g in range(args.seqs // n):
        prompt = torch.randint(10, args.vocab, (args.prompt - 8 * g,), generator=gen).tolist()
        comps = [
            Completion("x", torch.randint(10, args.vocab, (args.completion - 4 * i,), generator=gen).tolist(),
                       [0.0] * (args.completion - 4 * i))
            for i in range(n)
        ]  # fmt: skip
        groups.append(
            RolloutGroup(
                Sample(str(g), uid=str(g)), prompt, comps, [1.0] * n, torch.randn(n, generator=gen).tolist()
            )
        )
    rl = parse(
        RLConfig, {"prompts_per_step": len(groups), "sampling": {"n": n}, "micro_batch_tokens": 10**6}, "rl"
    )
    strategy = Strategy(DeepSpeedConfig(zero_stage=0), seed=0)
    strategy.setup(model, rl.optim, 10, micro_batch_size=1)
    base = _rss()
    t0 = time.perf_counter()
    if mode == "now":
        policy_update(strategy, groups, rl, pad_id=0, reference=None)
    else:  # the previous computation: right padding, every position's logits, full float32 softmaxes
        seqs = [
            (g.prompt_ids + c.token_ids, len(g.prompt_ids), a)
            for g in groups
            for c, a in zip(g.completions, g.advantages, strict=True)
        ]
        width = max(len(ids) for ids, _, _ in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros(len(seqs), width, dtype=torch.long)
        comp = torch.zeros(len(seqs), width, dtype=torch.bool)
        for i, (row, p, _) in enumerate(seqs):
            ids[i, : len(row)], attn[i, : len(row)], comp[i, p : len(row)] = torch.tensor(row), 1, True
        logits = strategy.forward(input_ids=ids, attention_mask=attn).logits[:, :-1]  # [B, T-1, V]
        logprobs = token_logprobs(logits, ids[:, 1:])  # float32 log-softmax of all positions
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
        mask = comp[:, 1:]
        adv = torch.tensor([a for _, _, a in seqs])
        per_token, _ = grpo_loss(logprobs, logprobs.detach(), adv, mask, entropy=entropy)
        strategy.backward(aggregate(per_token, mask, float(mask.sum())))
        strategy.step()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"peak_gib": peak - base, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=192)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--child", choices=["before", "now"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    print(f"setup: vocab {args.vocab}, {args.seqs} sequences of {args.prompt} prompt + {args.completion} completion "
          "tokens, tiny Llama (hidden 64, 2 layers), fp32, 1 thread, ZeRO-0, one process per path")  # fmt: skip
    results = {}
    for mode in ("before", "now"):
        out = (
            subprocess.run(
                [sys.executable, __file__, "--child", mode, *sys.argv[1:]],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        results[mode] = json.loads(out)
        print(
            f"{mode:7s}  peak RSS of one update {results[mode]['peak_gib']:.2f} GiB  {results[mode]['seconds']:.1f} s"
        )
    ratio = results["now"]["peak_gib"] / results["before"]["peak_gib"]
    print(f"ratio now / before: {ratio:.2f} ({1 / ratio:.1f}x less)")


if __name__ == "__main__":
    main()
