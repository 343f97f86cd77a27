"""Expert parallelism vs. plain data parallelism on 2 ranks (gloo, CPU): per-rank expert memory, step time.

Three arms train the same Llama 4 MoE model (every layer MoE by default) under the same DeepSpeed ZeRO
stage with the same global batch:

  DP    transformers' own MoE block, every rank holds every expert (``ep_size=1``, posttrain's default);
  EP1   the expert-parallel block with ``ep_size=1`` (every expert local, no all-to-all): isolates the
        block's sparse dispatch — transformers' Llama 4 block runs every expert on every token and
        zeroes the unrouted ones, the expert-parallel block runs each token through its expert only;
  EP2   ``ep_size=2``: each rank holds half of the experts, tokens travel by all-to-all.

Per rank it reports the routed experts' weights as stored (the ZeRO-3 partition under ZeRO-3) and the experts' share of the ZeRO optimizer partition
(fp32 master copy + AdamW's two moments; ZeRO-1/2 only) in MiB, the peak RSS, and the median step time
(after 2 warm-up steps), with ratios measured in this run (timings on shared machines swing: compare
ratios).

    OMP_NUM_THREADS=1 python bench/expert_parallel.py [--zero 2] [--experts 8] [--hidden 512] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

MIB = 2**20


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "hidden_size": args.hidden,
        "intermediate_size": 2 * args.hidden,
        "intermediate_size_mlp": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64,
        "num_key_value_heads": args.hidden // 64,
        "head_dim": 64,
        "max_position_embeddings": 256,
        "num_local_experts": args.experts,
        "num_experts_per_tok": 1,
        "interleave_moe_layer_step": 1,
        "no_rope_layer_interval": 4,
        "attention_chunk_size": 256,
        "use_qk_norm": True,
    }


def _worker(rank: int, port: int, arm: str, args: argparse.Namespace, out: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    import deepspeed

    from posttrain import moe
    from posttrain.config import ModelConfig
    from posttrain.models import build_model

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    model, _ = build_model(ModelConfig(arch="llama4", config=model_config(args)), seed=0)
    experts_full = {id(p) for n, p in model.named_parameters() if ".experts." in n}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "train_batch_size": 2 * args.micro_batch,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": args.zero},
        "steps_per_print": 10**9,
    }
    if arm != "DP":
        ep = moe.apply_expert_parallel(model, 2 if arm == "EP2" else 1)
        expert_ids = {id(p) for p in ep.expert_parameters()}
        groups = moe.moe_param_groups([{"name": "all", "params": list(model.parameters())}])
        ds.update(ep.ds_config())
    else:
        expert_ids = experts_full
        params = list(model.parameters())
        groups = [
            {"name": "dense", "params": [p for p in params if id(p) not in expert_ids]},
            {"name": "experts", "params": [p for p in params if id(p) in expert_ids]},
        ]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=1e-4), config=ds)
    # elements this rank stores: its ZeRO-3 partition (ds_tensor), else the whole local tensor
    weights = sum(
        int(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel())
        for p in model.parameters()
        if id(p) in expert_ids
    )

    gen = torch.Generator().manual_seed(rank)
    times = []
    for step in range(args.steps):
        x = torch.randint(3, model.config.vocab_size, (args.micro_batch, args.seq), generator=gen)  # [B, T]
        torch.distributed.barrier()
        t0 = time.perf_counter()
        engine.backward(engine(input_ids=x, labels=x, use_cache=False).loss)
        engine.step()
        torch.distributed.barrier()
        if step >= 2:  # warm-up steps excluded
            times.append(time.perf_counter() - t0)

    optim_elems = 0  # the experts' fp32 master partition + AdamW moments on this rank (ZeRO-1/2)
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        for i, group in enumerate(opt.bit16_groups):
            if group and all(id(p) in expert_ids for p in group):
                part = opt.single_partition_of_fp32_groups[i]
                optim_elems += part.numel() + sum(
                    t.numel() for t in opt.optimizer.state[part].values() if t.ndim
                )
    result = {
        "expert_weights_mib": weights * 4 / MIB,
        "expert_optim_mib": optim_elems * 4 / MIB,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_s": statistics.median(times),
    }
    Path(out, f"{arm}_rank{rank}.json").write_text(json.dumps(result))
    engine.destroy()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_arm(arm: str, args: argparse.Namespace, out: str) -> list[dict[str, float]]:
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, arm, args, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"{arm}: a rank failed ({[p.exitcode for p in procs]})")
    return [json.loads(Path(out, f"{arm}_rank{r}.json").read_text()) for r in range(2)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--zero", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        arms = {arm: run_arm(arm, args, out) for arm in ("DP", "EP1", "EP2")}
    print(
        f"Llama 4 MoE: {args.layers} MoE layers x {args.experts} experts, hidden {args.hidden}; ZeRO-{args.zero}; 2 ranks"
    )
    print(f"{'':24}{'DP':>10}{'EP1':>10}{'EP2':>10}{'EP2/DP':>8}{'EP2/EP1':>8}")
    for key, label in [
        ("expert_weights_mib", "expert weights MiB/rank"),
        ("expert_optim_mib", "expert optim MiB/rank"),
        ("peak_rss_mib", "peak RSS MiB/rank"),
        ("step_s", "step time s"),
    ]:
        dp, ep1, ep2 = (max(r[key] for r in arms[a]) for a in ("DP", "EP1", "EP2"))
        ratios = "".join(f"{ep2 / d:8.2f}" if d else f"{'-':>8}" for d in (dp, ep1))
        print(f"{label:24}{dp:10.3f}{ep1:10.3f}{ep2:10.3f}{ratios}")


if __name__ == "__main__":
    main()
