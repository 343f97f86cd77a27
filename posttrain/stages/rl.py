"""Online RL: one readable loop.

prompts (capability-stratified; from a curriculum pool or the whole train set)
  -> vLLM rollouts, ``sampling.n`` per prompt -> rewards -> group advantages
  -> drop zero-advantage groups and generate more, until ``prompts_per_step`` informative groups or
     ``max_gen_batches`` rounds (then train on what there is) -> clipped policy-gradient update,
     aggregated over the step's completion tokens -> weight sync into the running vLLM engine.
Every ``curriculum.refilter_every`` steps a filter pass samples the pool with the current policy and
keeps the medium-to-hard prompts (posttrain/curriculum.py).

Zero-advantage groups never reach the update: their sequences are not collated, not forwarded, and
not counted in the loss denominator. Completions whose reward is ``None`` are left out the same way.

Data parallelism: every rank draws the same prompts (same sampler state) and generates its share
(``uids[rank::world]``); per-prompt results are summed across ranks, so the pool, the sampler and
the choice of kept groups are identical everywhere; the kept sequences are then spread evenly over
the ranks for the update (the informative groups may have come from a few ranks).

Bad input is counted, never fatal: prompts longer than ``data.max_prompt_len`` (or the context) are
skipped at load (``data/skipped_long_prompts``, with the row numbers in the log), empty completions
are scored like any other (``rollout/empty_completions``), and ``None`` rewards are counted
(``reward/none``) and ignored by the advantages.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.advantages import group_advantages, rewards_tensor, zero_advantage_mask
from posttrain.config import ConfigError, RLConfig
from posttrain.curriculum import PoolSettings, PromptPool, StratifiedSampler, pass_at_k
from posttrain.data import load_rows, prompt_text
from posttrain.evaluate import evaluate
from posttrain.losses import aggregate, entropy_from_logits, grpo_loss, token_logprobs
from posttrain.pipeline import StageContext
from posttrain.reward_runner import RewardRunner
from posttrain.rollout import RolloutEngine, make_engine
from posttrain.strategy import write_hf_checkpoint
from posttrain.types import RolloutGroup, Sample

log = logging.getLogger(__name__)


def run_rl(ctx: StageContext) -> None:
    cfg: RLConfig = ctx.cfg
    strategy, tracker = ctx.strategy, ctx.tracker
    torch.manual_seed(ctx.seed)
    model, tokenizer = ctx.load_model()
    reference = _frozen_copy(model).to(strategy.device) if cfg.loss.kl_coef > 0 or cfg.loss.log_kl else None

    # ---- prompts, curriculum, rewards ------------------------------------------------------
    context = int(cfg.engine.max_model_len or model.config.max_position_embeddings)
    samples, skipped = load_prompts(cfg, tokenizer, ctx.seed, context)
    by_uid = {s.uid: s for s in samples}
    pool = PromptPool(samples, _pool_settings(cfg, ctx.seed)) if cfg.curriculum.enabled else None
    everything = _by_capability(samples)
    sampler = StratifiedSampler(_capability_weights(cfg, set(everything)), seed=ctx.seed)
    runner = RewardRunner(cfg.rewards)
    eval_ds = ctx.eval_set() if cfg.eval_every else None

    # ---- engines + resume ------------------------------------------------------------------
    grad_accum = micro_batches_per_step(cfg, strategy.world_size)
    strategy.setup(model, cfg.optim, cfg.max_steps * cfg.minibatches, cfg.micro_batch_size, grad_accum)
    state = strategy.load_state(ctx.state_dir) or {}
    step = int(state.get("step", 0))
    totals: dict[str, float] = dict(state.get("totals", {}))
    if pool is not None and "pool" in state:
        pool.load_state_dict(state["pool"])
    if "sampler" in state:
        sampler.load_state_dict(state["sampler"])
    tracker.resume_at(step)
    engine = _start_engine(ctx, cfg, tokenizer, resumed=step > 0)
    if step == 0:
        tracker.log({"data/prompts": len(samples), "data/skipped_long_prompts": skipped}, step=0)
    tracker.progress(cfg.max_steps, step, desc=f"{ctx.name} (rl)")

    # ---- loop ------------------------------------------------------------------------------
    while step < cfg.max_steps:
        metrics: dict[str, Any] = {}
        if pool is not None and cfg.curriculum.refilter_every and step % cfg.curriculum.refilter_every == 0:
            metrics |= filter_pass(pool, engine, runner, cfg, strategy, step, ctx.seed)

        t0 = time.perf_counter()
        draw = pool.trainable_by_capability if pool is not None else (lambda: everything)
        batch = collect_groups(draw, by_uid, sampler, engine, runner, cfg, strategy, step, ctx.seed)
        if pool is not None:
            for uid, (n, c) in batch.outcomes.items():
                pool.observe(uid, n, c, step)
            pool.refill()
        metrics |= batch.metrics
        metrics["time/rollout_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        engine.sleep()  # GPU: the engine's weights and KV cache leave the device while training runs
        metrics |= policy_update(strategy, batch.kept, cfg, grad_accum, tokenizer.pad_token_id, reference)
        metrics["time/update_s"] = time.perf_counter() - t1
        metrics["train/tokens_per_s"] = metrics.pop("_model_tokens", 0.0) / metrics["time/update_s"]
        engine.wake()
        if "train/skipped" not in metrics:
            engine.sync_weights(strategy.full_state_dict())
            metrics["rollout/sync_seconds"] = engine.metrics()["rollout/sync_seconds"]
        step += 1
        metrics["_count/skipped_updates"] = float("train/skipped" in metrics)

        for key in ("rollouts", "filter_rollouts", "groups", "groups_zero_adv", "skipped_updates"):
            totals[key] = totals.get(key, 0.0) + metrics.pop(f"_count/{key}", 0.0)
        metrics |= {f"total/{k}": v for k, v in totals.items()}
        metrics["total/rollouts_all"] = (
            totals["rollouts"] + totals["filter_rollouts"]
        )  # completions generated
        if pool is not None:
            metrics |= pool.metrics(step)
        metrics["time/step_s"] = time.perf_counter() - t0
        tracker.log(metrics | strategy.ep_metrics(), step)  # ep_metrics: collective, {} without EP
        if cfg.log_samples_every and (step % cfg.log_samples_every == 0 or step == 1):
            tracker.table("rollouts", sample_rows(batch.kept or batch.dropped, cfg.samples_per_log), step)
        tracker.advance({"reward": metrics.get("reward/mean", float("nan")), "groups": batch.kept_global})

        if eval_ds is not None and step % cfg.eval_every == 0 and step < cfg.max_steps:
            _periodic_eval(ctx, tokenizer, eval_ds, step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            client: dict[str, Any] = {"step": step, "totals": totals, "sampler": sampler.state_dict()}
            if pool is not None:
                client["pool"] = pool.state_dict()
            strategy.save_state(ctx.state_dir, client)

    engine.close()
    strategy.export_hf(ctx.checkpoint_dir, tokenizer)


# --------------------------------------------------------------------------------------------------
# Prompts


def load_prompts(cfg: RLConfig, tokenizer: Any, seed: int, context: int) -> tuple[list[Sample], int]:
    """Train rows -> Samples (uid = row number). Prompts longer than ``data.max_prompt_len`` tokens,
    or leaving no room for ``sampling.max_tokens`` in the context, are skipped and counted."""
    ds = load_rows(cfg.data, "train", seed, required=["prompt"])
    prompts = [str(p) for p in ds["prompt"]]
    lengths = [
        len(ids)
        for ids in tokenizer([prompt_text(tokenizer, p) for p in prompts], add_special_tokens=False).input_ids
    ]
    limit = min(cfg.data.max_prompt_len, context - cfg.sampling.max_tokens)
    columns = [c for c in ds.column_names if c != "prompt"]
    values = {c: ds[c] for c in columns}
    samples, too_long = [], []
    for i, (prompt, n_tok) in enumerate(zip(prompts, lengths, strict=True)):
        if n_tok > limit:
            too_long.append(i)
            continue
        samples.append(Sample(prompt=prompt, columns={c: values[c][i] for c in columns}, uid=str(i)))
    if too_long:
        rows = ", ".join(map(str, too_long[:10])) + (" …" if len(too_long) > 10 else "")
        log.warning(
            "%s: skipped %d prompt(s) longer than %d tokens after the chat template (rows %s); raise "
            "data.max_prompt_len (and the model context) or shorten them",
            cfg.data.source,
            len(too_long),
            limit,
            rows,
        )
    if not samples:
        raise ValueError(f"{cfg.data.source}: no prompt fits in {limit} tokens; raise data.max_prompt_len")
    return samples, len(too_long)


def _by_capability(samples: list[Sample]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        out[str(s.columns.get("capability", "default"))].append(s.uid)
    return dict(out)


def _capability_weights(cfg: RLConfig, capabilities: set[str]) -> dict[str, float]:
    """The sampler's weights; a key that names no capability of the data is an error (a typo would
    otherwise leave the real capability at the default weight)."""
    if cfg.capability_weights:
        unknown = sorted(set(cfg.capability_weights) - capabilities)
        if unknown:
            raise ConfigError(
                f"capability_weights names {', '.join(map(repr, unknown))}, which the RL data ({cfg.data.source}) "
                f"does not have; its capabilities: {', '.join(sorted(capabilities))}"
            )
        return dict(cfg.capability_weights)
    return {name: task.weight for name, task in cfg.data.tasks.items()}


def _pool_settings(cfg: RLConfig, seed: int) -> PoolSettings:
    c = cfg.curriculum
    lo, hi = c.band
    final = (c.band_final[0], c.band_final[1]) if c.band_final is not None else None
    return PoolSettings(
        capacity=c.pool_size,
        band=(lo, hi),
        band_final=final,
        band_steps=c.band_steps,
        retire_after=c.retire_after,
        backlog_recheck_every=c.backlog_recheck_every,
        seed=seed,
    )


def _start_engine(ctx: StageContext, cfg: RLConfig, tokenizer: Any, resumed: bool) -> RolloutEngine:
    """The rollout engine on the starting checkpoint; a resumed stage then receives the trained weights."""
    source = ctx.input_dir
    if source is None:  # the recipe's first stage: hand the freshly built model to the engine
        source = ctx.stage_dir / "rollout_init"
        state = ctx.strategy.full_state_dict()  # collective under ZeRO-3: every rank calls it
        if ctx.strategy.is_main:
            write_hf_checkpoint(ctx.strategy.module, state, tokenizer, Path(source))
        ctx.strategy.barrier()
    engine = make_engine(
        cfg.engine.kind,
        source,
        tokenizer,
        cfg.engine,
        work_dir=ctx.stage_dir / f"rollout_rank{ctx.strategy.rank}",
    )
    if resumed:
        engine.sync_weights(ctx.strategy.full_state_dict())
    return engine


# --------------------------------------------------------------------------------------------------
# Rollouts -> rewards -> advantages, with zero-advantage filtering and refill


@dataclass
class StepBatch:
    # This rank's groups to train on (rewards + advantages set): the informative ones, or every group
    # when filter_zero_advantage is off. The rest (zero-advantage, or beyond prompts_per_step) is
    # dropped: never collated, never forwarded.
    kept: list[RolloutGroup] = field(default_factory=list)
    dropped: list[RolloutGroup] = field(default_factory=list)
    kept_global: int = 0  # groups to train on, all ranks
    outcomes: dict[str, tuple[int, int]] = field(default_factory=dict)  # uid -> (n, correct), all ranks
    metrics: dict[str, float] = field(default_factory=dict)


def collect_groups(
    draw: Any,
    by_uid: dict[str, Sample],
    sampler: StratifiedSampler,
    engine: RolloutEngine,
    runner: RewardRunner,
    cfg: RLConfig,
    strategy: Any,
    step: int,
    seed: int,
) -> StepBatch:
    """Generate rounds of groups until ``prompts_per_step`` are informative (or ``max_gen_batches``).

    Each round asks for the missing number of prompts divided by the informative rate seen so far
    in this step (at least the missing number), so one refill round usually suffices. Extra
    informative groups beyond ``prompts_per_step`` are dropped in draw order.
    """
    out = StepBatch()
    want = cfg.prompts_per_step
    used: set[str] = set()
    all_groups: list[RolloutGroup] = []
    score_metrics: dict[str, list[float]] = defaultdict(list)
    stats: dict[str, float] = defaultdict(float)
    rounds = n_informative = 0
    while out.kept_global < want and rounds < cfg.max_gen_batches:
        need = want - out.kept_global
        rate = n_informative / len(out.outcomes) if out.outcomes else 1.0
        ask = max(need, math.ceil(need / max(rate, 0.1)))
        uids = sampler.sample(draw(), ask, exclude=used)
        if not uids:
            break
        used.update(uids)
        rounds += 1
        mine = [by_uid[u] for u in uids[strategy.rank :: strategy.world_size]]
        params = dataclasses.replace(cfg.sampling, seed=_seed(seed, step, rounds, strategy.rank))
        groups = engine.generate(mine, params)
        for k, v in engine.metrics().items():
            stats[k] += v
        for k, v in score(groups, runner, cfg).items():
            score_metrics[k].append(v)
        all_groups += groups

        # per-uid (informative, n, correct) summed over ranks, so every rank makes the same choice
        local = {g.sample.uid: g for g in groups}
        flags = _all_reduce(
            [
                [
                    float(u in local and not _zero(local[u])),
                    float(_scored(local[u])) if u in local else 0.0,
                    float(_correct(local[u], cfg)) if u in local else 0.0,
                ]
                for u in uids
            ],
            strategy,
        )
        generated = [u for u, (_, n, _) in zip(uids, flags, strict=True) if n > 0]
        informative = [u for u, (inf, _, _) in zip(uids, flags, strict=True) if inf > 0]
        n_informative += len(informative)
        # Plain GRPO (no filtering) trains on every group; zero-advantage ones then add only tokens
        # to the denominator, as in TRL.
        keep = set(informative[:need] if cfg.filter_zero_advantage else generated[:need])
        for u, (_, n, c) in zip(uids, flags, strict=True):
            if n > 0:
                out.outcomes[u] = (int(n), int(c))
        for g in groups:
            (out.kept if g.sample.uid in keep else out.dropped).append(g)
        out.kept_global += len(keep)

    n_groups = len(out.outcomes)
    n_zero = n_groups - n_informative
    m: dict[str, float] = {
        "rollout/gen_batches": float(rounds),
        "rollout/groups": float(n_groups),
        "rollout/groups_informative": float(n_informative),
        "rollout/groups_trained": float(out.kept_global),
        "rollout/zero_adv_frac": n_zero / max(n_groups, 1),
        "rollout/short_step": float(out.kept_global < want),
        "_count/rollouts": float(sum(n for n, _ in out.outcomes.values())),
        "_count/groups": float(n_groups),
        "_count/groups_zero_adv": float(n_zero),
    }
    for k in (
        "rollout/tokens",
        "rollout/seconds",
        "rollout/empty_completions",
        "rollout/truncated_completions",
        "rollout/skipped_overlong",
        "rollout/completions",
    ):
        m[k] = stats.get(k, 0.0)
    # generation counts, speed and reward metrics below are this rank's share (the tracker logs rank 0)
    m["rollout/tokens_per_s"] = (
        m["rollout/tokens"] / m["rollout/seconds"] if m["rollout/seconds"] > 0 else 0.0
    )
    m |= _group_metrics(all_groups, cfg)
    m |= {k: (sum(v) if _is_count(k) else sum(v) / len(v)) for k, v in score_metrics.items()}
    m |= {f"train/groups/{cap}": float(n) for cap, n in _count_by(out.kept).items()}
    m |= {f"train/difficulty/{d}": float(n) for d, n in _count_by(out.kept, "difficulty").items()}
    out.metrics = m
    return out


def score(groups: list[RolloutGroup], runner: RewardRunner, cfg: RLConfig) -> dict[str, float]:
    """Fill ``rewards`` (NaN = None) and ``advantages`` of each group in place; returns reward metrics."""
    if not groups:
        return {}
    prompts = [g.sample.prompt for g in groups for _ in g.completions]
    completions = [c.text for g in groups for c in g.completions]
    keys = sorted({k for g in groups for k in g.sample.columns})
    columns = {k: [g.sample.columns.get(k) for g in groups for _ in g.completions] for k in keys}
    totals, metrics = runner.score(prompts, completions, columns)
    grouped, start = [], 0
    for g in groups:
        grouped.append(totals[start : start + len(g.completions)])
        start += len(g.completions)
    adv = group_advantages(rewards_tensor(grouped), scale_by_std=cfg.loss.scale_by_std, eps=cfg.loss.adv_eps)
    for i, g in enumerate(groups):
        g.rewards = [float("nan") if r is None else float(r) for r in grouped[i]]
        g.advantages = adv.advantages[i].tolist()
    metrics["reward/none"] = float(sum(r is None for r in totals))
    return metrics


def _zero(g: RolloutGroup) -> bool:
    """The zero-advantage rule of posttrain.advantages (all scored rewards exactly equal; NaN = None)."""
    return bool(zero_advantage_mask(torch.tensor([g.rewards], dtype=torch.float64))[0])


def _scored(g: RolloutGroup) -> int:
    """Completions with a reward (``None`` ones are neither a pass nor a fail)."""
    return sum(1 for r in g.rewards if not math.isnan(r))


def _correct(g: RolloutGroup, cfg: RLConfig) -> int:
    return sum(1 for r in g.rewards if not math.isnan(r) and r >= cfg.pass_threshold)


_COUNT_SUFFIXES = (
    "/errors",
    "/timeouts",
    "/nan",
    "/wrong_length",
    "/not_applicable",
    "/batch_failures",
    "/seconds",
)


def _is_count(key: str) -> bool:
    """Reward metrics that add up over a step's generation rounds (the others are averaged)."""
    return key.endswith(_COUNT_SUFFIXES) or key in ("reward/none", "reward/failed_samples")


def _count_by(groups: list[RolloutGroup], column: str = "capability") -> dict[str, int]:
    """Groups per value of a data column (this rank's): capability, or difficulty when the data has it."""
    out: dict[str, int] = defaultdict(int)
    for g in groups:
        if column == "capability" or column in g.sample.columns:
            out[str(g.sample.columns.get(column, "default"))] += 1
    return dict(out)


def _group_metrics(groups: list[RolloutGroup], cfg: RLConfig) -> dict[str, float]:
    """Reward mean/std and sampled pass@1 / pass@n, overall and per capability, over every group generated."""
    per_cap: dict[str, list[RolloutGroup]] = defaultdict(list)
    for g in groups:
        per_cap[str(g.sample.columns.get("capability", "default"))].append(g)
    out: dict[str, float] = {}
    n = cfg.sampling.n
    for name, gs in [("", groups), *((f"{c}/", v) for c, v in sorted(per_cap.items()))]:
        rewards = [r for g in gs for r in g.rewards if not math.isnan(r)]
        if not rewards:
            continue
        mean = sum(rewards) / len(rewards)
        # overall: reward/mean, reward/std; per capability: rollout/<cap>/reward_mean (reward/<name>/…
        # belongs to the reward runner's per-reward metrics)
        key = "reward/" if not name else f"rollout/{name}reward_"
        out[f"{key}mean"] = mean
        out[f"{key}std"] = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
        nc = [(_scored(g), _correct(g, cfg)) for g in gs if _scored(g)]
        out[f"rollout/{name}pass@1"] = sum(pass_at_k(a, c, 1) for a, c in nc) / len(nc)
        out[f"rollout/{name}pass@{n}"] = sum(pass_at_k(a, c, min(n, a)) for a, c in nc) / len(nc)
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    if lengths:
        out["rollout/completion_len"] = sum(lengths) / len(lengths)
    return out


def _all_reduce(rows: list[list[float]], strategy: Any) -> list[list[float]]:
    """Sum a small table over ranks (every rank passes the same shape)."""
    if strategy.world_size == 1 or not rows:
        return rows
    t = torch.tensor(rows, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _seed(seed: int, step: int, rnd: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + rnd * 101 + rank) % (2**31 - 1)


# --------------------------------------------------------------------------------------------------
# Curriculum filter pass


def filter_pass(
    pool: PromptPool,
    engine: RolloutEngine,
    runner: RewardRunner,
    cfg: RLConfig,
    strategy: Any,
    step: int,
    seed: int,
) -> dict[str, float]:
    """Sample ``filter_samples`` completions per due pool prompt with the current policy; update the pool."""
    t0 = time.perf_counter()
    due = pool.due_for_check()
    mine = [pool.samples[u] for u in due[strategy.rank :: strategy.world_size]]
    params = dataclasses.replace(
        cfg.sampling, n=cfg.curriculum.filter_samples, seed=_seed(seed, step, 0, strategy.rank) ^ 0x5F
    )
    groups = engine.generate(mine, params)
    score(groups, runner, cfg)
    local = {g.sample.uid: (_scored(g), _correct(g, cfg)) for g in groups}
    table = _all_reduce(
        [[float(local.get(u, (0, 0))[0]), float(local.get(u, (0, 0))[1])] for u in due], strategy
    )
    results = {u: (int(n), int(c)) for u, (n, c) in zip(due, table, strict=True) if n > 0}
    report = pool.filter_pass(results, step, k=cfg.curriculum.pass_k)
    out = {f"filter/{k}": v for k, v in report.pass_at.items()}
    out |= {f"filter/to_{status}": float(n) for status, n in report.moved.items()}
    out["filter/checked"] = float(report.checked)
    out["filter/seconds"] = time.perf_counter() - t0
    out["_count/filter_rollouts"] = float(sum(n for n, _ in results.values()))
    return out


# --------------------------------------------------------------------------------------------------
# Policy update


@dataclass
class _Seq:
    ids: list[int]  # [T] prompt + completion
    n_prompt: int
    advantage: float
    sampling_logprobs: list[float]  # [T_c] the rollout engine's log-probs of the completion tokens
    old_logprobs: list[float] | None = None  # [T_c] the trainer's, before this step's first update


def micro_batches_per_step(cfg: RLConfig, world_size: int) -> int:
    """Micro-batches per optimizer update, fixed per run (DeepSpeed's accumulation boundary): enough
    for one of the step's ``minibatches`` shares of ``prompts_per_step * n`` sequences."""
    per_update = math.ceil(cfg.prompts_per_step * cfg.sampling.n / cfg.minibatches)
    return max(1, math.ceil(per_update / (world_size * cfg.micro_batch_size)))


def policy_update(
    strategy: Any, groups: list[RolloutGroup], cfg: RLConfig, grad_accum: int, pad_id: int, reference: Any
) -> dict[str, float]:
    """The step's update(s) on this rank's informative groups: ``cfg.minibatches`` optimizer steps, each
    on its share of the sequences, in exactly ``grad_accum`` micro-batches (a short step leaves some
    empty: they run a 2-token no-loss forward so every rank reaches the accumulation boundary
    together); each update's loss is aggregated with its completion-token count over all ranks.

    The first update is on-policy (ratio 1). With ``minibatches > 1`` the later ones run on weights
    that already moved: their ratio is taken against the trainer's log-probs from before the first
    update (one no-grad forward of those sequences), and the clip bounds how far they go.
    """
    seqs = [
        _Seq(g.prompt_ids + c.token_ids, len(g.prompt_ids), a, c.logprobs)
        for g in groups
        for c, r, a in zip(g.completions, g.rewards, g.advantages, strict=True)
        if not math.isnan(r) and c.token_ids
    ]
    # The kept groups can sit on a few ranks (each generated its own share of the prompts): spread
    # the sequences evenly, so no rank's micro-batch outgrows micro_batch_size. Same gradient.
    seqs = strategy.all_gather_list(seqs)[strategy.rank :: strategy.world_size]
    parts = [seqs[u :: cfg.minibatches] for u in range(cfg.minibatches)]
    denoms = [strategy.all_reduce_sum(sum(len(s.ids) - s.n_prompt for s in part)) for part in parts]
    total = sum(denoms)
    if total == 0:  # no informative group on any rank: no update compute at all
        return {"train/skipped": 1.0}

    def chunk(part: list[_Seq]) -> list[list[_Seq]]:
        """``grad_accum`` micro-batches; an empty one holds a 2-token no-loss dummy (equal backward counts)."""
        return [part[i::grad_accum] or [_Seq([pad_id, pad_id], 2, 0.0, [])] for i in range(grad_accum)]

    if cfg.minibatches > 1:
        with torch.no_grad():  # old log-probs of the sequences updated after the first optimizer step
            for part in parts[1:]:
                for micro in chunk(part):
                    batch = _collate(micro, pad_id)
                    fwd = strategy.forward(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    )
                    lp = _next_token_logprobs(fwd.logits, batch)[1].cpu()  # [B, T-1]
                    for b, s in enumerate(micro):
                        s.old_logprobs = lp[b, s.n_prompt - 1 : len(s.ids) - 1].tolist()

    sums: dict[str, float] = defaultdict(float)
    model_tokens = updates = 0
    for part, denom in zip(parts, denoms, strict=True):
        if denom == 0:  # the same on every rank: skip the whole optimizer step
            continue
        updates += 1
        for micro in chunk(part):
            batch = _collate(micro, pad_id)
            model_tokens += int(batch["attention_mask"].sum())
            fwd = strategy.forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits, logprobs = _next_token_logprobs(fwd.logits, batch)  # [B, T-1, V], [B, T-1]
            mask = batch["completion_mask"][:, 1:].to(logits.device)  # [B, T-1]
            old = (
                logprobs.detach()
                if micro[0].old_logprobs is None
                else batch["old_logprobs"].to(logits.device)
            )
            ref_logprobs = None
            if reference is not None:
                with torch.no_grad():
                    ref_out = reference(
                        input_ids=batch["input_ids"].to(logits.device),
                        attention_mask=batch["attention_mask"].to(logits.device),
                    )
                    ref_logprobs = _next_token_logprobs(ref_out.logits, batch)[1]  # [B, T-1]
            if cfg.loss.entropy_coef > 0:
                entropy = entropy_from_logits(logits)  # [B, T-1]
            else:
                with torch.no_grad():
                    entropy = entropy_from_logits(logits.detach())
            per_token, m = grpo_loss(
                logprobs,
                old,
                batch["advantages"].to(logits.device),
                mask,
                clip_low=cfg.loss.clip_low,
                clip_high=cfg.loss.clip_high,
                ref_logprobs=ref_logprobs,
                kl_coef=cfg.loss.kl_coef,
                entropy=entropy,
                entropy_coef=cfg.loss.entropy_coef,
            )
            loss = aggregate(per_token, mask, denom)
            strategy.backward(loss)
            strategy.step()
            n_tok = float(mask.sum())
            sums["loss"] += float(loss.detach()) * denom  # back to a token sum: the step's mean below
            sums["clip_frac"] += float(m["clip_frac"]) * n_tok
            sums["entropy"] += float(m["entropy_mean"]) * n_tok
            sums["ratio_max"] = max(sums["ratio_max"], float(m["ratio_max"]) if n_tok else 0.0)
            if "kl_mean" in m:
                sums["kl"] += float(m["kl_mean"]) * n_tok
            diff = (logprobs.detach() - batch["sampling_logprobs"].to(logits.device)).abs()
            if micro[0].old_logprobs is None:  # before any update of this step: trainer vs engine
                sums["logprob_diff"] += float((diff * mask).sum())
                sums["logprob_tokens"] += n_tok
    out = {
        "train/loss": strategy.all_reduce_sum(sums["loss"]) / total,
        "train/clip_frac": strategy.all_reduce_sum(sums["clip_frac"]) / total,
        "train/entropy": strategy.all_reduce_sum(sums["entropy"]) / total,
        "train/sequences": strategy.all_reduce_sum(len(seqs)),
        "train/completion_tokens": total,
        "train/updates": float(updates),
        "train/lr": strategy.lr,
        # |trainer - rollout engine| log-prob per completion token, on the weights that sampled (the
        # first update's sequences): ~0 when the weight sync is right
        "train/rollout_logprob_diff": strategy.all_reduce_sum(sums["logprob_diff"])
        / max(strategy.all_reduce_sum(sums["logprob_tokens"]), 1.0),
        "_model_tokens": strategy.all_reduce_sum(model_tokens),
    }
    if cfg.minibatches > 1:
        out["train/ratio_max"] = sums[
            "ratio_max"
        ]  # this rank's: 1 on-policy, > 1 once the later updates drift
    if reference is not None:
        out["train/kl"] = strategy.all_reduce_sum(sums["kl"]) / total
    if (norm := strategy.grad_norm()) is not None:
        out["train/grad_norm"] = norm
    return out


def _next_token_logprobs(
    logits: torch.Tensor, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A forward's logits [B, T, V] on a collated batch -> (logits [B, T-1, V] predicting tokens 1..T-1,
    the log-probs of those tokens [B, T-1])."""
    shifted = logits[:, :-1]
    return shifted, token_logprobs(shifted, batch["input_ids"][:, 1:].to(shifted.device))


def _collate(seqs: list[_Seq], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids/attention_mask/completion_mask [B, T], advantages [B],
    sampling_logprobs / old_logprobs [B, T-1] aligned with the shifted targets (old: 0 where unknown)."""
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    attn = torch.zeros(len(seqs), width, dtype=torch.long)  # [B, T]
    comp = torch.zeros(len(seqs), width, dtype=torch.bool)  # [B, T]
    sampling = torch.zeros(len(seqs), width - 1, dtype=torch.float32)  # [B, T-1]
    old = torch.zeros(len(seqs), width - 1, dtype=torch.float32)  # [B, T-1]
    for i, s in enumerate(seqs):
        ids[i, : len(s.ids)] = torch.tensor(s.ids)
        attn[i, : len(s.ids)] = 1
        comp[i, s.n_prompt : len(s.ids)] = True
        sampling[i, s.n_prompt - 1 : len(s.ids) - 1] = torch.tensor(s.sampling_logprobs, dtype=torch.float32)
        if s.old_logprobs is not None:
            old[i, s.n_prompt - 1 : len(s.ids) - 1] = torch.tensor(s.old_logprobs, dtype=torch.float32)
    adv = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)  # [B]
    return {
        "input_ids": ids, "attention_mask": attn, "completion_mask": comp, "advantages": adv,
        "sampling_logprobs": sampling, "old_logprobs": old,
    }  # fmt: skip


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# --------------------------------------------------------------------------------------------------
# Dashboard helpers


def sample_rows(groups: list[RolloutGroup], k: int) -> list[dict[str, Any]]:
    """A few rollouts for the (append-only) rollout table: the best and the worst of the first groups."""
    rows = []
    for g in groups[: max(1, k // 2)]:
        order = sorted(
            range(len(g.completions)),
            key=lambda i: -(g.rewards[i] if not math.isnan(g.rewards[i]) else -math.inf),
        )
        for i in dict.fromkeys([order[0], order[-1]]):
            rows.append(
                {
                    "prompt": g.sample.prompt,
                    "capability": str(g.sample.columns.get("capability", "default")),
                    "completion": g.completions[i].text,
                    "reward": None if math.isnan(g.rewards[i]) else g.rewards[i],
                    "advantage": g.advantages[i],
                }
            )
    return rows[:k]


def _periodic_eval(ctx: StageContext, tokenizer: Any, eval_ds: Any, step: int) -> None:
    """Held-out greedy/sampled pass@1 of the current weights on rank 0 (ZeRO-3 / expert-parallel weights gathered)."""
    strategy = ctx.strategy
    state = strategy.full_state_dict() if strategy.model_is_sharded else None
    if not strategy.is_main:
        return
    model = strategy.module
    if state is not None:
        model, _ = ctx.load_model()
        model.load_state_dict(state)
    metrics = evaluate(model, tokenizer, eval_ds, ctx.recipe.eval, seed=ctx.seed + step)
    ctx.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
