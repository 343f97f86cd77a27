"""Rollout engines side by side on one tiny model: start time, extra RSS, weight-sync time, tokens/s.

    python bench/rollout_engines.py --model tiny_llama4 --prompts 64 --n 8 --max-tokens 16

Prints vLLM vs. the HF engine as a ratio measured in this run (timings on shared machines swing, so
compare ratios, not absolute numbers), and for MoE models how far vLLM's log-probs drift from
transformers' when the fused-MoE re-prepack after a reload is left out.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
from pathlib import Path

import torch
import yaml

from posttrain.config import EngineConfig, ModelConfig, SamplingConfig
from posttrain.models import build_model
from posttrain.rollout import HFEngine, VLLMEngine, refresh_fused_moe_weights
from posttrain.schema import parse
from posttrain.tasks import make_problem
from posttrain.types import RolloutGroup, Sample

REPO = Path(__file__).resolve().parents[1]


def max_logprob_gap(groups: list[RolloutGroup], model: torch.nn.Module) -> float:
    gap = 0.0
    with torch.no_grad():
        for g in groups:
            for c in g.completions:
                ids = torch.tensor([g.prompt_ids + c.token_ids])
                logits = model(ids).logits[0, len(g.prompt_ids) - 1 : -1]  # [T_c, V]
                ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(c.token_ids)[:, None])[
                    :, 0
                ]
                gap = max(gap, (torch.tensor(c.logprobs) - ref).abs().max().item())
    return gap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny_llama", help="a recipes/model/*.yaml name")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cfg = parse(
        ModelConfig, yaml.safe_load((REPO / "recipes/model" / f"{args.model}.yaml").read_text()), "model"
    )
    model, tok = build_model(cfg)
    model.eval()
    rng = random.Random(0)
    samples = [Sample(prompt=make_problem("add", 2, rng)[0], uid=str(i)) for i in range(args.prompts)]
    params = SamplingConfig(n=args.n, temperature=1.0, max_tokens=args.max_tokens, seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        tok.save_pretrained(Path(tmp) / "model")
        vllm_engine = VLLMEngine(Path(tmp) / "model", tok, EngineConfig(), work_dir=Path(tmp) / "engine")
        hf_engine = HFEngine(Path(tmp) / "model", tok, EngineConfig(kind="hf"))
        speeds: dict[str, list[float]] = {"vllm": [], "hf": []}
        for _ in range(args.repeats):
            for name, engine in (("vllm", vllm_engine), ("hf", hf_engine)):
                engine.generate(samples, params)
                speeds[name].append(engine.last_stats.tokens_per_s)
        syncs = []
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for _ in range(args.repeats):
            vllm_engine.sync_weights(state)
            syncs.append(vllm_engine.last_sync_seconds)

        # The reload alone (no fused-MoE re-prepack), then with it, against transformers.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        vllm_engine.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": iter(model.state_dict().items())}
        )
        vllm_engine.llm.reset_prefix_cache()
        greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=args.max_tokens)
        stale = max_logprob_gap(vllm_engine.generate(samples[:16], greedy), model)
        layers = vllm_engine.llm.collective_rpc(refresh_fused_moe_weights)[0]
        vllm_engine.llm.reset_prefix_cache()
        fixed = max_logprob_gap(vllm_engine.generate(samples[:16], greedy), model)
        vllm_engine.close()

    v, h = statistics.median(speeds["vllm"]), statistics.median(speeds["hf"])
    print(
        f"model {args.model}: {args.prompts} prompts x n={args.n}, max_tokens {args.max_tokens}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"vLLM start            {vllm_engine.start_seconds:6.1f} s   (+{vllm_engine.start_rss_bytes / 2**30:.2f} GiB RSS)"
    )
    print(f"HF engine start       {hf_engine.start_seconds:6.1f} s")
    print(f"vLLM weight sync      {1000 * statistics.median(syncs):6.0f} ms  (median of {len(syncs)})")
    print(f"rollout tokens/s      vLLM {v:7.0f}   HF {h:7.0f}   vLLM/HF {v / h:.2f}x")
    print(
        f"log-prob gap vs HF    reload alone {stale:.1e}   + fused-MoE refresh ({layers} layers) {fixed:.1e}"
    )


if __name__ == "__main__":
    main()
