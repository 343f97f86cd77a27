"""The generating-ahead engine in a thread (what posttrain ships) vs in its own process, same RL steps.

    .venv/bin/python bench/async_engine_process.py --checkpoint runs/async_rl/runs/start_*/hard_sft/checkpoint

The quickstart's RL step shape (64 prompts x 8 samples, exact match, one update of the tiny Llama on
the informative groups, lr 3e-4, clip anchored on the behaviour log-probs), driven by hand for
``--steps`` steps in three modes:

  sequential  generate, update, sync (the synchronous loop: the engine idles during the update)
  thread      the next step's round generates in a background thread while the update runs (the
              shipped ``rl.asynchronous``, K = 1); the weights reach the engine in place
  process     the engine lives in a child process; the next round generates there while the update
              runs; the weights travel as a safetensors file plus a marker message (written by the
              trainer, loaded by the engine) — the transport an engine outside the process needs

Reports seconds per step (after 2 warm-up steps), the update, the wait for the round, the weight
transport, and CPU seconds per wall second of the whole process tree.

Measured 2026-12-03 on the 2-core machine, nothing else running, from the quickstart's hard_sft
checkpoint (``bench/async_rl.py`` writes it), 20 steps:

    torch threads  mode        step s  x seq  update s  sync s  cores
    default        sequential  0.90    1.00   0.50      0.025   1.79
    default        thread      0.80    1.13   0.76      0.027   1.80
    default        process     1.77    0.51   1.67      0.047   1.94
    1 per process  sequential  1.17    1.00   0.80      0.021   1.02
    1 per process  thread      0.85    1.38   0.83      0.019   1.29
    1 per process  process     0.95    1.24   0.86      0.050   1.44

Reading it: with torch's default threads, two processes each running a 2-thread OpenMP pool on 2
cores oversubscribe them and the update slows 3.3x (0.50 -> 1.67 s): the process engine halves the
step rate. With one thread per process it works (1.24x the sequential loop, 1.44 cores busy, more
than the threaded engine's 1.29 since no GIL is shared) but still loses to the thread (0.95 vs 0.85 s
a step): the groups are pickled across a pipe and the weights go through a file (0.050 s a sync
against 0.019-0.027 s in place, for 1M parameters; an 8B model would write 16 GB a sync). The best
step here is the shipped choice, the thread with default threads (0.80 s). A process engine pays off
where the engine has its own device or host (multi-node, docs/online_rl.md), with the weights sent
over a collective rather than a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from async_rl import cpu_seconds as process_cpu_seconds  # noqa: E402  (bench/ is on sys.path when run as a script)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for and live children."""
    total = sum(os.times()[:4])
    for child in mp.active_children():
        if math.isfinite(seconds := process_cpu_seconds(child.pid)):  # NaN: it has just exited
            total += seconds
    return total


def rl_config(checkpoint: Path) -> Any:
    from posttrain.config import parse_recipe

    doc = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    stage = {**doc["stages"]["rl"], "asynchronous": {"enabled": True, "max_staleness": 1}}
    model = {"name_or_path": str(checkpoint), "tokenizer": "char", "dtype": "float32"}
    recipe = {"run": {"name": "bench", "dir": tempfile.mkdtemp()}, "model": model, "stages": {"rl": stage}}
    return parse_recipe(recipe).stages["rl"]


def engine_child(conn: Any, checkpoint: str, work_dir: str, threads: int) -> None:
    """The engine process: ("gen", uids, seed) -> groups; ("sync", path) -> loads the weights file."""
    from safetensors.torch import load_file

    from posttrain.data import load_prompt_samples
    from posttrain.models import load_tokenizer
    from posttrain.rollout import make_engine

    cfg = rl_config(Path(checkpoint))
    tok = load_tokenizer(checkpoint)
    samples, _ = load_prompt_samples(cfg.data, tok, 0, 64, where="bench")
    by_uid = {s.uid: s for s in samples}
    engine = make_engine("vllm", checkpoint, tok, cfg.engine, work_dir=work_dir)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "gen":
            _, uids, seed = msg
            groups = engine.generate([by_uid[u] for u in uids], dataclasses.replace(cfg.sampling, seed=seed))
            conn.send(groups)
        elif msg[0] == "sync":
            t0 = time.perf_counter()
            engine.sync_weights(load_file(msg[1]))
            conn.send(time.perf_counter() - t0)
        else:
            engine.close()
            conn.send("closed")
            return


def run_mode(mode: str, checkpoint: Path, steps: int, work: Path, threads: int) -> dict[str, float]:
    import threading

    from safetensors.torch import save_file

    from posttrain.config import DeepSpeedConfig
    from posttrain.curriculum import StratifiedSampler, by_capability
    from posttrain.data import load_prompt_samples
    from posttrain.models import load_checkpoint
    from posttrain.reward_runner import RewardRunner
    from posttrain.rollout import make_engine
    from posttrain.stages.rl_update import policy_update
    from posttrain.strategy import Strategy

    cfg = rl_config(checkpoint)
    model, tok = load_checkpoint(checkpoint)
    samples, _ = load_prompt_samples(cfg.data, tok, 0, 64, where="bench")
    strategy = Strategy(DeepSpeedConfig(zero_stage=2), seed=0)
    strategy.setup(model, cfg.optim, steps, micro_batch_size=1)
    runner = RewardRunner(cfg.rewards)
    sampler, everything = StratifiedSampler({}, seed=0), by_capability(samples)
    draws = [sampler.sample(everything, cfg.prompts_per_step) for _ in range(steps + 1)]
    by_uid = {s.uid: s for s in samples}

    child = conn = engine = None
    if mode == "process":
        ctx = mp.get_context("spawn")
        conn, child_conn = ctx.Pipe()
        child = ctx.Process(
            target=engine_child, args=(child_conn, str(checkpoint), str(work / "engine"), threads)
        )
        child.start()
        assert conn.recv() == "ready"
    else:
        engine = make_engine("vllm", checkpoint, tok, cfg.engine, work_dir=work / "engine")

    def generate(step: int) -> list[Any]:
        if conn is not None:
            conn.send(("gen", draws[step], 1000 + step))
            groups: list[Any] = conn.recv()
        else:
            groups = engine.generate(
                [by_uid[u] for u in draws[step]], dataclasses.replace(cfg.sampling, seed=1000 + step)
            )
        return groups

    rows = []
    ahead: dict[str, Any] = {}
    pending = generate(0) if mode != "sequential" else None
    for step in range(steps):
        t0, c0 = time.perf_counter(), cpu_seconds()
        groups = generate(step) if mode == "sequential" else pending
        runner.score_groups(groups, scale_by_std=cfg.loss.scale_by_std, eps=cfg.loss.adv_eps)
        kept = [g for g in groups if not g.zero_advantage]
        t_gen = time.perf_counter() - t0
        thread = None
        if mode == "thread" and step + 1 < steps:
            thread = threading.Thread(target=lambda s=step + 1: ahead.__setitem__("g", generate(s)))
            thread.start()
        elif mode == "process" and step + 1 < steps:
            conn.send(("gen", draws[step + 1], 1000 + step + 1))
        t1 = time.perf_counter()
        policy_update(strategy, kept, cfg, tok.pad_token_id, None)
        t_update = time.perf_counter() - t1
        t2 = time.perf_counter()
        if thread is not None:
            thread.join()
            pending = ahead.pop("g")
        elif mode == "process" and step + 1 < steps:
            pending = conn.recv()
        t_wait = time.perf_counter() - t2
        t3 = time.perf_counter()
        if mode == "process":
            path = work / "weights.safetensors"
            save_file({k: v.detach().clone() for k, v in strategy.hf_weights()}, str(path))
            conn.send(("sync", str(path)))  # the marker: the file is complete
            conn.recv()
        else:
            engine.sync_weights(strategy.hf_weights())
        t_sync = time.perf_counter() - t3
        wall = time.perf_counter() - t0
        rows.append({"step": wall, "gen": t_gen, "update": t_update, "wait": t_wait, "sync": t_sync,
                     "cores": (cpu_seconds() - c0) / wall})  # fmt: skip
    if conn is not None:
        conn.send(("close",))
        conn.recv()
        child.join()
    else:
        engine.close()
    strategy.close()
    measured = rows[2:]
    return {k: statistics.mean(r[k] for r in measured) for k in measured[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="the RL stage's starting checkpoint")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", nargs="+", default=["sequential", "thread", "process"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.threads:  # before torch loads; the engine process inherits it (torch.set_num_threads would
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # not reach the generating thread's OpenMP)
    results = {}
    for mode in args.modes:
        with tempfile.TemporaryDirectory() as tmp:
            results[mode] = run_mode(mode, args.checkpoint.resolve(), args.steps, Path(tmp), args.threads)
        print(f"[bench] {mode} done", flush=True)
    base = results.get("sequential", {}).get("step", float("nan"))
    print(
        f"{args.steps} steps, the first 2 left out; seconds per step; torch threads {args.threads or 'default'}"
    )
    print("mode        step s  x seq  first-round s  update s  wait s  sync s  cores")
    for mode, r in results.items():
        print(f"{mode:<10}  {r['step']:.2f}    {base / r['step']:.2f}   {r['gen']:.2f}           "
              f"{r['update']:.2f}      {r['wait']:.2f}    {r['sync']:.3f}   {r['cores']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
