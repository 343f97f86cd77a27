"""GPU smoke test: a ~0.5B Llama-style model built from config (no hub access needed), SFT then online RL
with vLLM colocated, in bf16, through ``posttrain run`` — one command on a GPU host:

    python bench/gpu_smoke.py [--steps 20] [--rl-steps 5] [--peak-tflops 989]

It prints the peak GPU memory, SFT tokens/s and MFU (6 x params x tokens/s over the GPU's bf16 peak),
rollout tokens/s and the weight-sync seconds, read from the run's metrics.jsonl and
``torch.cuda.max_memory_allocated`` of this process (with ``--nproc 1``, the default, the run is in
this process; ``--nproc N`` re-launches under torchrun and the memory line then reads 0).

Last GPU run: none yet — no GPU host has run this script. The CPU tests carry the fixes it exercises
(log-probs at the sampling temperature, chunked completion log-probs, token-budget micro-batches,
streamed weight sync, per-rank evaluation, engine placement); this docstring gets the figures, the
date and the hardware of the first GPU run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="SFT steps")
    parser.add_argument("--rl-steps", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's bf16 dense peak")
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():  # `make bench` runs every script: say so, and measure nothing
        print(
            "gpu_smoke: no CUDA device here, nothing measured; run it on a GPU host (make VLLM_EXTRA=vllm install)"
        )
        return
    sys.path.insert(0, str(REPO))
    from posttrain.cli import main as posttrain

    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_smoke-"))
    model = {  # ~0.5B parameters: hidden 1024, 24 layers, MLP 4096
        "arch": "llama", "tokenizer": "char", "dtype": "bfloat16",
        "config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "max_position_embeddings": 2048},
    }  # fmt: skip
    recipe = {
        "defaults": ["_self_"], "model": model,
        "run": {"name": "gpu_smoke", "dir": str(work / "runs"), "seed": 0},
        "deepspeed": {"zero_stage": 3 if args.nproc > 1 else 2, "bf16": True},
        "launcher": {"nproc_per_node": args.nproc},
        "tracking": {"wandb": {"mode": "disabled"}, "log_every": 1, "progress": False},
        "eval": {"data": {"tasks": {"add": {"kind": "add", "levels": [3]}}, "num_eval": 64}, "max_new_tokens": 8},
        "stages": {
            "sft": {"type": "sft", "data": {"tasks": {"add": {"kind": "add", "levels": [3]}}, "num_train": 20000},
                    "pack": True, "seq_len": 1024, "micro_batch_size": 8, "max_steps": args.steps, "save_every": 0,
                    "optim": {"lr": 3e-4, "warmup_steps": 5}},
            "rl": {"type": "rl", "data": {"tasks": {"add": {"kind": "add", "levels": [3]}}, "num_train": 2000},
                   "sampling": {"n": 8, "max_tokens": 16}, "prompts_per_step": 64, "max_steps": args.rl_steps,
                   "engine": {"dtype": "bfloat16", "gpu_memory_utilization": 0.3}, "save_every": 0},
        },
    }  # fmt: skip
    path = work / "gpu_smoke.yaml"
    path.write_text(json.dumps(recipe))
    t0 = time.perf_counter()
    code = posttrain(["run", f"recipe={path}"])
    if code:
        sys.exit(f"gpu_smoke: posttrain run exited with {code}")
    rows = {s: [json.loads(x) for x in (work / "runs" / "gpu_smoke" / s / "metrics.jsonl").read_text().splitlines()]
            for s in ("sft", "rl")}  # fmt: skip
    sft = [r for r in rows["sft"] if "perf/train_tokens_per_s" in r][2:]  # after warm-up
    rl = [r for r in rows["rl"] if r["step"] >= 2]
    params = 0.5e9
    tok_s = sum(r["perf/train_tokens_per_s"] for r in sft) / max(1, len(sft))
    print(f"hardware: {args.nproc} x {name}; total {time.perf_counter() - t0:.0f} s")
    print(f"peak GPU memory (rank 0): {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    mfu = f"{6 * params * tok_s / (peak * 1e12):.1%}" if peak else "unknown (pass --peak-tflops)"
    print(f"SFT tokens/s: {tok_s:.0f}  MFU: {mfu}")
    print(f"rollout tokens/s: {sum(r['perf/rollout_tokens_per_s'] for r in rl) / max(1, len(rl)):.0f}")
    print(f"weight sync s: {sum(r.get('rollout/sync_seconds', 0.0) for r in rl) / max(1, len(rl)):.3f}")


if __name__ == "__main__":
    main()
