"""Online RL: one readable loop, ``run_rl -> collect -> filter_pass -> policy_update``.

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

import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from posttrain.advantages import group_advantages, rewards_tensor
from posttrain.ahead import Ahead
from posttrain.config import RLConfig
from posttrain.curriculum import (
    POOL_FILE,
    PromptPool,
    StratifiedSampler,
    by_capability,
    count_by,
    group_metrics,
)
from posttrain.data import load_prompt_samples, write_json_atomic
from posttrain.errors import UserError
from posttrain.reward_runner import RewardRunner, merge_round_metrics
from posttrain.rollout import RolloutEngine, make_engine
from posttrain.schema import ConfigError
from posttrain.stages.context import NonFiniteGuard, StageContext, maybe_eval, maybe_save, resume
from posttrain.stages.rl_update import policy_update
from posttrain.strategy import Strategy, write_hf_checkpoint
from posttrain.types import RolloutGroup, Sample


def run_rl(ctx: StageContext) -> None:
    cfg: RLConfig = ctx.cfg
    strategy, tracker = ctx.strategy, ctx.tracker
    torch.manual_seed(ctx.seed)
    model, tokenizer = ctx.load_model()
    # the KL reference: a second copy of the starting model, held (and sharded) by the strategy
    reference = strategy.frozen(ctx.load_model()[0]) if cfg.loss.kl_coef > 0 or cfg.loss.log_kl else None

    # ---- prompts, curriculum ----------------------------------------------------------------
    context = int(cfg.engine.max_model_len or model.config.max_position_embeddings)
    limit = min(cfg.data.max_prompt_len, context - cfg.sampling.max_tokens)
    samples, skipped = load_prompt_samples(cfg.data, tokenizer, ctx.seed, limit, where=f"stages.{ctx.name}")
    pool = PromptPool(samples, cfg.curriculum, ctx.seed) if cfg.curriculum.enabled else None
    everything = by_capability(samples)
    sampler = StratifiedSampler(_capability_weights(cfg, set(everything)), seed=ctx.seed)

    # ---- training engine, resume, rollout engine --------------------------------------------
    strategy.setup(model, cfg.optim, cfg.max_steps * cfg.minibatches, micro_batch_size=1)
    state = resume(ctx, cfg.max_steps)
    step = int(state["step"])
    totals = Totals(**state.get("totals", {}))
    if pool is not None and "pool" in state:
        pool.load_state_dict(state["pool"])
    if "sampler" in state:
        sampler.load_state_dict(state["sampler"])
    rollouts = Rollouts(
        _start_engine(ctx, tokenizer, resumed=step > 0), RewardRunner(cfg.rewards), cfg, strategy, ctx.seed,
        {s.uid: s for s in samples},
    )  # fmt: skip
    guard = NonFiniteGuard(ctx)
    idle = 0  # steps in a row without an update
    if step == 0:
        tracker.log({"data/prompts": len(samples), "data/skipped_long_prompts": len(skipped)}, step=0)
    # asynchronous rollouts: the next steps' first rounds generate while the trainer updates (posttrain.ahead)
    ahead = Ahead(cfg.asynchronous.max_staleness if cfg.asynchronous.enabled else 0, rollouts.generate_round)
    for pending_step, uids in state.get("ahead", []):  # a kill lost their groups: regenerate them now
        ahead.admit(int(pending_step), list(uids))

    def filter_due(s: int) -> bool:
        return (
            pool is not None
            and bool(cfg.curriculum.refilter_every)
            and s % cfg.curriculum.refilter_every == 0
        )

    # ---- loop ------------------------------------------------------------------------------
    while step < cfg.max_steps:
        metrics: dict[str, Any] = {}
        if filter_due(step):  # (no round is ever generated ahead across a filter pass)
            filtered = rollouts.filter_pass(pool, step)
            metrics |= filtered.metrics
            totals.filter_rollouts += filtered.rollouts

        t0 = time.perf_counter()
        first = ahead.take(step) if ahead.has(step) else None
        batch = rollouts.collect(pool.trainable_by_capability() if pool else everything, sampler, step, first)
        rollouts.runner.step_done()  # a reward failing on every sample for N steps in a row stops here
        if pool is not None:
            for uid, (n, c) in batch.outcomes.items():
                pool.observe(uid, n, c, step)
            for uid in batch.unscored:
                pool.observe_unscored(uid)
            pool.refill()
        metrics |= batch.metrics
        metrics["time/rollout_s"] = time.perf_counter() - t0

        # admit the next steps' first rounds (at most max_staleness ahead, never across a filter pass)
        while (
            len(ahead) < ahead.depth
            and (nxt := ahead.next_step(step)) < cfg.max_steps
            and not filter_due(nxt)
        ):
            reserved = {u for _, uids in ahead.pending() for u in uids}
            trainable = pool.trainable_by_capability() if pool else everything
            ahead.admit(nxt, sampler.sample(trainable, cfg.prompts_per_step, exclude=reserved))
        ahead.start()  # generates in the background while the update below runs

        t1 = time.perf_counter()
        if not ahead.depth:  # GPU: the engine's weights and KV cache leave the device while training runs
            rollouts.engine.sleep()
        update = policy_update(strategy, batch.kept, cfg, tokenizer.pad_token_id, reference)
        metrics |= update.metrics
        if update.trained:  # a non-finite update was skipped; N in a row stop the stage
            metrics |= guard.after_step(
                step + 1, update.metrics["train/loss"], update.metrics.get("train/grad_norm")
            )
        metrics["time/update_s"] = time.perf_counter() - t1
        metrics["perf/train_tokens_per_s"] = update.model_tokens / metrics["time/update_s"]
        if ahead.depth:  # the engine generates no more while its weights are replaced
            waited, busy = ahead.wait(), ahead.busy_seconds
            ahead.busy_seconds = 0.0
            window = metrics["time/update_s"] + waited
            metrics["perf/trainer_idle_frac"] = waited / max(time.perf_counter() - t0, 1e-9)
            metrics["perf/engine_idle_frac"] = max(0.0, 1.0 - busy / max(window, 1e-9))
        if update.trained or rollouts.engine.asleep:  # a slept engine discarded its weights: reload them
            rollouts.engine.sync_weights(strategy.hf_weights())  # streamed, one module at a time
            rollouts.version += 1
            metrics["rollout/sync_seconds"] = rollouts.engine.metrics()["rollout/sync_seconds"]
        if not update.trained:
            metrics["train/skipped"] = 1.0
        idle = 0 if update.trained else idle + 1
        if idle >= cfg.max_idle_steps:
            raise StageStalled(
                f"stage {ctx.name} (rl): {idle} steps in a row without an informative group (last step {step + 1}: "
                f"{batch.metrics.get('rollout/groups', 0):.0f} groups, zero-advantage fraction "
                f"{batch.metrics.get('rollout/zero_adv_frac', 0):.2f}, trainable prompts "
                f"{sum(map(len, (pool.trainable_by_capability() if pool else everything).values()))}); the rewards "
                "do not tell the completions apart or the prompt pool is used up: check the rewards, or raise max_idle_steps"
            )
        step += 1

        totals.add(batch, skipped_update=not update.trained)
        metrics |= totals.metrics()
        if pool is not None:
            metrics |= pool.metrics(step)
        metrics["time/step_s"] = time.perf_counter() - t0
        tracker.log(metrics | strategy.ep_metrics(), step)  # ep_metrics: collective, {} without EP
        if cfg.log_samples_every and (step % cfg.log_samples_every == 0 or step == 1):
            tracker.table("rollouts", sample_rows(batch.kept or batch.dropped, cfg.samples_per_log), step)
        tracker.advance({"reward": metrics.get("reward/mean", float("nan")), "groups": batch.kept_global})

        maybe_eval(ctx, tokenizer, step)
        maybe_save(ctx, step, lambda s=step: _client_state(s, totals, sampler, pool, ahead))

    rollouts.engine.close()
    strategy.export_hf(ctx.checkpoint_dir, tokenizer)
    if pool is not None and strategy.is_main:  # the final pool: a later stage (DPO) reads the hard prompts
        write_json_atomic(ctx.stage_dir / POOL_FILE, pool.state_dict())


class StageStalled(UserError):
    """An RL stage that stopped updating: ``max_idle_steps`` steps in a row without an informative group."""


def _client_state(
    step: int, totals: Totals, sampler: StratifiedSampler, pool: PromptPool | None, ahead: Ahead
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "step": step, "totals": dataclasses.asdict(totals), "sampler": sampler.state_dict(),
        "ahead": ahead.pending(),  # admitted rounds not trained yet: their prompts, regenerated on resume
    }  # fmt: skip
    if pool is not None:
        state["pool"] = pool.state_dict()
    return state


@dataclass
class Totals:
    """Running counts over the stage (saved with the resume state, logged as ``total/*``)."""

    rollouts: float = 0.0  # completions generated for training steps
    filter_rollouts: float = 0.0  # completions generated by curriculum filter passes
    groups: float = 0.0
    groups_zero_adv: float = 0.0
    skipped_updates: float = 0.0  # steps with no informative group: no update, no weight sync

    def add(self, batch: StepBatch, skipped_update: bool) -> None:
        self.rollouts += batch.rollouts
        self.groups += len(batch.outcomes)
        self.groups_zero_adv += batch.zero_adv_groups
        self.skipped_updates += float(skipped_update)

    def metrics(self) -> dict[str, float]:
        out = {f"total/{k}": v for k, v in dataclasses.asdict(self).items()}
        out["total/rollouts_all"] = self.rollouts + self.filter_rollouts  # every completion generated
        return out


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


def _start_engine(ctx: StageContext, tokenizer: Any, resumed: bool) -> RolloutEngine:
    """The rollout engine on the starting checkpoint; a resumed stage then receives the trained weights."""
    source = ctx.input_dir
    if source is None:  # the recipe's first stage: hand the freshly built model to the engine
        source = ctx.stage_dir / "rollout_init"
        state = ctx.strategy.full_state_dict()  # collective under ZeRO-3: every rank calls it
        if ctx.strategy.is_main:
            write_hf_checkpoint(ctx.strategy.module, state, tokenizer, Path(source))
        ctx.strategy.barrier()
    engine = ctx.closing(
        make_engine(
            ctx.cfg.engine.kind,
            source,
            tokenizer,
            ctx.cfg.engine,
            work_dir=ctx.stage_dir / f"rollout_rank{ctx.strategy.rank}",
        )
    )
    if resumed:
        engine.sync_weights(ctx.strategy.hf_weights())
    return engine


# --------------------------------------------------------------------------------------------------
# Rollouts -> rewards -> advantages, with zero-advantage filtering and refill


@dataclass
class StepBatch:
    """One training step's rollouts. ``kept``: this rank's groups to train on (rewards and advantages
    set): the informative ones, or every group when ``filter_zero_advantage`` is off. The rest
    (zero-advantage, or beyond ``prompts_per_step``) is ``dropped``: never collated, never forwarded."""

    kept: list[RolloutGroup] = field(default_factory=list)
    dropped: list[RolloutGroup] = field(default_factory=list)
    kept_global: int = 0  # groups to train on, all ranks
    outcomes: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # uid -> (n scored, correct), all ranks
    zero_adv_groups: int = 0  # all ranks
    unscored: list[str] = field(default_factory=list)  # prompts generated whose completions all scored None
    rollouts: int = 0  # scored completions, all ranks
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FilterPass:
    metrics: dict[str, float]
    rollouts: int  # scored completions, all ranks


@dataclass
class Round:
    """One generation round: the prompts drawn (all ranks), this rank's scored groups, its counters."""

    uids: list[str]
    groups: list[RolloutGroup]
    reward_metrics: dict[str, float]
    engine_stats: dict[str, float]


@dataclass
class Rollouts:
    """What generating and scoring groups needs, bundled once for the stage: the engine, the rewards,
    the settings, the ranks, the seed and the prompts by uid."""

    engine: RolloutEngine
    runner: RewardRunner
    cfg: RLConfig
    strategy: Strategy
    seed: int
    by_uid: dict[str, Sample]
    version: int = 0  # weight syncs into the engine so far: the policy version new samples come from

    def collect(
        self,
        trainable: Mapping[str, list[str]],
        sampler: StratifiedSampler,
        step: int,
        first: Round | None = None,
    ) -> StepBatch:
        """Generate rounds of groups until ``prompts_per_step`` are informative (or ``max_gen_batches``).

        ``trainable``: capability -> uids to draw from. ``first``: the step's first round, generated
        ahead (asynchronous RL) — then the rounds after it are the refills. Each round asks for the
        missing number of prompts divided by the informative rate seen so far in this step (at least
        the missing number), so one refill round usually suffices. Extra informative groups beyond
        ``prompts_per_step`` are dropped in draw order.
        """
        cfg, out = self.cfg, StepBatch()
        want = cfg.prompts_per_step
        used: set[str] = set()
        generated: list[RolloutGroup] = []
        reward_rounds: list[dict[str, float]] = []
        engine_stats: dict[str, float] = defaultdict(float)
        rounds = n_informative = 0
        while out.kept_global < want and rounds < cfg.max_gen_batches:
            need = want - out.kept_global
            if rounds == 0 and first is not None:
                r = first
            else:
                rate = n_informative / len(out.outcomes) if out.outcomes else 1.0
                ask = min(math.ceil(need / max(rate, 1e-9)), math.ceil(cfg.max_ask_ratio * need))
                uids = sampler.sample(trainable, max(need, ask), exclude=used)
                if not uids:
                    break
                r = self.generate_round(step, uids, rounds + 1)
            uids, groups = r.uids, r.groups
            used.update(uids)
            rounds += 1
            reward_rounds.append(r.reward_metrics)
            for k, v in r.engine_stats.items():
                engine_stats[k] += v
            generated += groups

            # per uid (informative, n scored, correct) summed over ranks: every rank makes the same choice
            local = {g.sample.uid: g for g in groups}
            flags = self.strategy.all_reduce_table(
                [
                    [float(not g.zero_advantage), float(g.scored), float(g.correct(cfg.pass_threshold)), 1.0]
                    if (g := local.get(u)) is not None
                    else [0.0, 0.0, 0.0, 0.0]
                    for u in uids
                ]
            )
            answered = [u for u, (_, n, _, _) in zip(uids, flags, strict=True) if n > 0]
            informative = [u for u, (inf, n, _, _) in zip(uids, flags, strict=True) if inf > 0]
            n_informative += len(informative)
            # Plain GRPO (no filtering) trains on every group; zero-advantage ones then add only tokens
            # to the denominator, as in TRL. The capability quotas apply to what is kept, not only to
            # what is drawn: filtering must not tilt the trained mix toward the easier capability.
            keep = set(
                _by_quota(informative if cfg.filter_zero_advantage else answered, need, sampler, self.by_uid)
            )
            for u, (_, n, c, made) in zip(uids, flags, strict=True):
                if n > 0:
                    out.outcomes[u] = (int(n), int(c))
                elif made > 0:
                    out.unscored.append(u)
            for g in groups:
                (out.kept if g.sample.uid in keep else out.dropped).append(g)
            out.kept_global += len(keep)

        n_groups = len(out.outcomes)
        out.zero_adv_groups = n_groups - n_informative
        out.rollouts = sum(n for n, _ in out.outcomes.values())
        m: dict[str, float] = {
            "rollout/gen_batches": float(rounds),
            "rollout/groups": float(n_groups),
            "rollout/groups_informative": float(n_informative),
            "rollout/groups_trained": float(out.kept_global),
            "rollout/zero_adv_frac": out.zero_adv_groups / max(n_groups, 1),
            "rollout/short_step": float(out.kept_global < want),
        }
        # generation counts, speed and reward metrics below are this rank's share (the tracker logs rank 0)
        for k in (
            "tokens",
            "seconds",
            "empty_completions",
            "truncated_completions",
            "skipped_overlong",
            "completions",
        ):
            m[f"rollout/{k}"] = engine_stats.get(f"rollout/{k}", 0.0)
        m["perf/rollout_tokens_per_s"] = (
            m["rollout/tokens"] / m["rollout/seconds"] if m["rollout/seconds"] > 0 else 0.0
        )
        m |= group_metrics(generated, cfg.pass_threshold, cfg.sampling.n)
        m |= merge_round_metrics(reward_rounds)
        m |= {f"train/groups/{cap}": float(n) for cap, n in count_by(out.kept, "capability").items()}
        m |= {f"train/difficulty/{d}": float(n) for d, n in count_by(out.kept, "difficulty").items()}
        staleness = [self.version - g.policy_version for g in out.kept]  # this rank's trained groups
        if staleness:
            m["rollout/staleness_mean"] = sum(staleness) / len(staleness)
            m["rollout/staleness_max"] = float(max(staleness))
            m |= {f"rollout/staleness/{k}": float(staleness.count(k)) for k in sorted(set(staleness))}
        out.metrics = m
        return out

    def generate_round(self, step: int, uids: list[str], round_: int = 1) -> Round:
        """One generation round of ``step`` (seeded by step, round and rank), scored, stamped with the
        engine's weight version. Touches only this rank's engine and rewards: safe in the background
        thread of asynchronous RL (no collective)."""
        groups, reward_metrics = self._generate(
            uids, self.cfg.sampling, _seed(self.seed, step, round_, self.strategy.rank)
        )
        for g in groups:
            g.policy_version = self.version
        return Round(uids, groups, reward_metrics, dict(self.engine.metrics()))

    def filter_pass(self, pool: PromptPool, step: int) -> FilterPass:
        """Sample ``curriculum.filter_samples`` completions of every due pool prompt with the current
        policy and hand the pool the pass counts (it moves prompts in and out of the band)."""
        t0 = time.perf_counter()
        due = pool.due_for_check()
        params = dataclasses.replace(self.cfg.sampling, n=self.cfg.curriculum.filter_samples)
        groups, _ = self._generate(due, params, _seed(self.seed, step, 0, self.strategy.rank) ^ 0x5F)
        local = {g.sample.uid: g for g in groups}
        table = self.strategy.all_reduce_table(
            [
                [float(g.scored), float(g.correct(self.cfg.pass_threshold)), 1.0]
                if (g := local.get(u))
                else [0.0, 0.0, 0.0]
                for u in due
            ]
        )
        results = {u: (int(n), int(c)) for u, (n, c, _) in zip(due, table, strict=True) if n > 0}
        unscored = [u for u, (n, _, made) in zip(due, table, strict=True) if made > 0 and n == 0]
        report = pool.filter_pass(results, step, k=self.cfg.curriculum.pass_k, unscored=unscored)
        out = {f"curriculum/filter/{k}": v for k, v in report.pass_at.items()}
        out |= {f"curriculum/filter/to_{status}": float(n) for status, n in report.moved.items()}
        out["curriculum/filter/checked"] = float(report.checked)
        out["curriculum/filter/unscorable"] = float(len(unscored))
        out["curriculum/filter/seconds"] = time.perf_counter() - t0
        return FilterPass(out, sum(n for n, _ in results.values()))

    def _generate(
        self, uids: list[str], params: Any, seed: int
    ) -> tuple[list[RolloutGroup], dict[str, float]]:
        """This rank's share of ``uids`` (every world-th), generated with ``params`` at ``seed`` and scored."""
        mine = [self.by_uid[u] for u in uids[self.strategy.rank :: self.strategy.world_size]]
        groups = self.engine.generate(mine, dataclasses.replace(params, seed=seed))
        loss = self.cfg.loss
        metrics = self.runner.score_groups(groups, scale_by_std=loss.scale_by_std, eps=loss.adv_eps)
        if self.cfg.truncated == "penalty":
            metrics["reward/overlong_penalized"] = float(overlong_penalty(groups, self.cfg))
        return groups, metrics


def _by_quota(
    uids: list[str], need: int, sampler: StratifiedSampler, by_uid: Mapping[str, Sample]
) -> list[str]:
    """Up to ``need`` of ``uids``, in their order, with each capability's share of the sampler's quotas."""
    caps: dict[str, list[str]] = defaultdict(list)
    for u in uids:
        caps[by_uid[u].capability].append(u)
    quota = sampler.quotas({c: len(v) for c, v in caps.items()}, need)
    chosen = {u for c, v in caps.items() for u in v[: quota.get(c, 0)]}
    return [u for u in uids if u in chosen]


def overlong_penalty(groups: list[RolloutGroup], cfg: RLConfig) -> int:
    """DAPO's soft overlong punishment: a completion longer than ``max_tokens - overlong_buffer`` tokens
    loses ``overlong_penalty x (length - (max_tokens - buffer)) / buffer`` of reward (the whole penalty
    at the limit); the groups' advantages and zero-advantage flags are recomputed. Returns how many
    completions were penalised."""
    limit, buffer = cfg.sampling.max_tokens, cfg.overlong_buffer
    count = 0
    for g in groups:
        for i, c in enumerate(g.completions):
            over = len(c.token_ids) - (limit - buffer)
            if over > 0 and not math.isnan(g.rewards[i]):
                g.rewards[i] -= cfg.overlong_penalty * min(over, buffer) / buffer
                count += 1
    if groups:
        adv = group_advantages(
            rewards_tensor([g.rewards for g in groups]), cfg.loss.scale_by_std, cfg.loss.adv_eps
        )
        for i, g in enumerate(groups):
            g.advantages = adv.advantages[i].tolist()
            g.zero_advantage = bool(adv.zero_advantage[i])
    return count


def _seed(seed: int, step: int, rnd: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + rnd * 101 + rank) % (2**31 - 1)


def sample_rows(groups: list[RolloutGroup], k: int) -> list[dict[str, Any]]:
    """A few rollouts for the (append-only) rollout table: the best and the worst of the first groups."""
    rows = []
    for g in groups[: max(1, k // 2)]:
        order = sorted(
            range(len(g.completions)),
            key=lambda i: -(g.rewards[i] if not math.isnan(g.rewards[i]) else -math.inf),
        )
        for i in dict.fromkeys([order[0], order[-1]]):
            reward = None if math.isnan(g.rewards[i]) else g.rewards[i]
            rows.append(
                {"prompt": g.sample.prompt, "capability": g.sample.capability, "completion": g.completions[i].text,
                 "reward": reward, "advantage": g.advantages[i]}
            )  # fmt: skip
    return rows[:k]


__all__ = ["Rollouts", "StepBatch", "run_rl"]
