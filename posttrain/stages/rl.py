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

from posttrain.config import RLConfig
from posttrain.curriculum import (
    POOL_FILE,
    PromptPool,
    StratifiedSampler,
    by_capability,
    count_by,
    group_metrics,
)
from posttrain.data import collate_prompt_completion, load_prompt_samples, token_bins, write_json_atomic
from posttrain.losses import aggregate, completion_logprobs, grpo_loss
from posttrain.reward_runner import RewardRunner, merge_round_metrics
from posttrain.rollout import RolloutEngine, make_engine
from posttrain.schema import ConfigError
from posttrain.stages.context import NonFiniteGuard, StageContext, maybe_eval, maybe_save, resume
from posttrain.strategy import FrozenModel, Strategy, write_hf_checkpoint
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
    if step == 0:
        tracker.log({"data/prompts": len(samples), "data/skipped_long_prompts": len(skipped)}, step=0)

    # ---- loop ------------------------------------------------------------------------------
    while step < cfg.max_steps:
        metrics: dict[str, Any] = {}
        if pool is not None and cfg.curriculum.refilter_every and step % cfg.curriculum.refilter_every == 0:
            filtered = rollouts.filter_pass(pool, step)
            metrics |= filtered.metrics
            totals.filter_rollouts += filtered.rollouts

        t0 = time.perf_counter()
        batch = rollouts.collect(pool.trainable_by_capability() if pool else everything, sampler, step)
        rollouts.runner.step_done()  # a reward failing on every sample for N steps in a row stops here
        if pool is not None:
            for uid, (n, c) in batch.outcomes.items():
                pool.observe(uid, n, c, step)
            pool.refill()
        metrics |= batch.metrics
        metrics["time/rollout_s"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        rollouts.engine.sleep()  # GPU: the engine's weights and KV cache leave the device while training runs
        update = policy_update(strategy, batch.kept, cfg, tokenizer.pad_token_id, reference)
        metrics |= update.metrics
        if update.trained:  # a non-finite update was skipped; N in a row stop the stage
            metrics |= guard.after_step(
                step + 1, update.metrics["train/loss"], update.metrics.get("train/grad_norm")
            )
        metrics["time/update_s"] = time.perf_counter() - t1
        metrics["perf/train_tokens_per_s"] = update.model_tokens / metrics["time/update_s"]
        if update.trained or rollouts.engine.asleep:  # a slept engine discarded its weights: reload them
            rollouts.engine.sync_weights(strategy.hf_weights())  # streamed, one module at a time
            metrics["rollout/sync_seconds"] = rollouts.engine.metrics()["rollout/sync_seconds"]
        if not update.trained:
            metrics["train/skipped"] = 1.0
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
        maybe_save(ctx, step, lambda s=step: _client_state(s, totals, sampler, pool))

    rollouts.engine.close()
    strategy.export_hf(ctx.checkpoint_dir, tokenizer)
    if pool is not None and strategy.is_main:  # the final pool: a later stage (DPO) reads the hard prompts
        write_json_atomic(ctx.stage_dir / POOL_FILE, pool.state_dict())


def _client_state(
    step: int, totals: Totals, sampler: StratifiedSampler, pool: PromptPool | None
) -> dict[str, Any]:
    state: dict[str, Any] = {
        "step": step,
        "totals": dataclasses.asdict(totals),
        "sampler": sampler.state_dict(),
    }
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
    engine = make_engine(
        ctx.cfg.engine.kind,
        source,
        tokenizer,
        ctx.cfg.engine,
        work_dir=ctx.stage_dir / f"rollout_rank{ctx.strategy.rank}",
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
    rollouts: int = 0  # scored completions, all ranks
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FilterPass:
    metrics: dict[str, float]
    rollouts: int  # scored completions, all ranks


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

    def collect(self, trainable: Mapping[str, list[str]], sampler: StratifiedSampler, step: int) -> StepBatch:
        """Generate rounds of groups until ``prompts_per_step`` are informative (or ``max_gen_batches``).

        ``trainable``: capability -> uids to draw from. Each round asks for the missing number of
        prompts divided by the informative rate seen so far in this step (at least the missing number),
        so one refill round usually suffices. Extra informative groups beyond ``prompts_per_step`` are
        dropped in draw order.
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
            rate = n_informative / len(out.outcomes) if out.outcomes else 1.0
            uids = sampler.sample(trainable, max(need, math.ceil(need / max(rate, 0.1))), exclude=used)
            if not uids:
                break
            used.update(uids)
            rounds += 1
            groups, reward_metrics = self._generate(
                uids, self.cfg.sampling, _seed(self.seed, step, rounds, self.strategy.rank)
            )
            reward_rounds.append(reward_metrics)
            for k, v in self.engine.metrics().items():
                engine_stats[k] += v
            generated += groups

            # per uid (informative, n scored, correct) summed over ranks: every rank makes the same choice
            local = {g.sample.uid: g for g in groups}
            flags = self.strategy.all_reduce_table(
                [
                    [float(not g.zero_advantage), float(g.scored), float(g.correct(cfg.pass_threshold))]
                    if (g := local.get(u)) is not None
                    else [0.0, 0.0, 0.0]
                    for u in uids
                ]
            )
            answered = [u for u, (_, n, _) in zip(uids, flags, strict=True) if n > 0]
            informative = [u for u, (inf, n, _) in zip(uids, flags, strict=True) if inf > 0]
            n_informative += len(informative)
            # Plain GRPO (no filtering) trains on every group; zero-advantage ones then add only tokens
            # to the denominator, as in TRL.
            keep = set(informative[:need] if cfg.filter_zero_advantage else answered[:need])
            for u, (_, n, c) in zip(uids, flags, strict=True):
                if n > 0:
                    out.outcomes[u] = (int(n), int(c))
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
        out.metrics = m
        return out

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
                [float(g.scored), float(g.correct(self.cfg.pass_threshold))]
                if (g := local.get(u))
                else [0.0, 0.0]
                for u in due
            ]
        )
        results = {u: (int(n), int(c)) for u, (n, c) in zip(due, table, strict=True) if n > 0}
        report = pool.filter_pass(results, step, k=self.cfg.curriculum.pass_k)
        out = {f"curriculum/filter/{k}": v for k, v in report.pass_at.items()}
        out |= {f"curriculum/filter/to_{status}": float(n) for status, n in report.moved.items()}
        out["curriculum/filter/checked"] = float(report.checked)
        out["curriculum/filter/seconds"] = time.perf_counter() - t0
        return FilterPass(out, sum(n for n, _ in results.values()))

    def _generate(
        self, uids: list[str], params: Any, seed: int
    ) -> tuple[list[RolloutGroup], dict[str, float]]:
        """This rank's share of ``uids`` (every world-th), generated with ``params`` at ``seed`` and scored."""
        mine = [self.by_uid[u] for u in uids[self.strategy.rank :: self.strategy.world_size]]
        groups = self.engine.generate(mine, dataclasses.replace(params, seed=seed))
        loss = self.cfg.loss
        return groups, self.runner.score_groups(groups, scale_by_std=loss.scale_by_std, eps=loss.adv_eps)


def _seed(seed: int, step: int, rnd: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + rnd * 101 + rank) % (2**31 - 1)


# --------------------------------------------------------------------------------------------------
# Policy update


@dataclass
class _Seq:
    prompt: list[int]  # [T_p]
    completion: list[int]  # [T_c]
    advantage: float
    sampling_logprobs: list[float]  # [T_c] the rollout engine's log-probs of the completion tokens
    old_logprobs: list[float] | None = None  # [T_c] the trainer's, before this step's first update


@dataclass
class UpdateResult:
    metrics: dict[str, float]
    model_tokens: float = 0.0  # tokens forwarded by the update(s), all ranks
    trained: bool = False  # False: no informative group on any rank, the weights did not move


def policy_update(
    strategy: Strategy, groups: list[RolloutGroup], cfg: RLConfig, pad_id: int, reference: FrozenModel | None
) -> UpdateResult:
    """The step's update(s) on this rank's informative groups: ``cfg.minibatches`` optimizer steps, each
    on its share of the sequences, packed into micro-batches of at most ``cfg.micro_batch_tokens``
    tokens. Every rank runs as many micro-batches as the busiest one (the others run a 2-token no-loss
    placeholder: ZeRO's collectives need equal counts); each update's loss is aggregated with its
    completion-token count over all ranks, so the split never changes the gradient.

    Log-probs are taken at the sampling temperature, over the completion positions only, in chunks
    (``losses.completion_logprobs``). The first update is on-policy (ratio 1). With ``minibatches > 1``
    the later ones run on weights that already moved: their ratio is taken against the trainer's
    log-probs from before the first update (one no-grad forward of those sequences), and the clip
    bounds how far they go.
    """
    seqs = [
        _Seq(g.prompt_ids, c.token_ids, a, c.logprobs)
        for g in groups
        for c, r, a in zip(g.completions, g.rewards, g.advantages, strict=True)
        if not math.isnan(r) and c.token_ids
    ]
    # The kept groups can sit on a few ranks (each generated its own share of the prompts): spread
    # the sequences evenly over the ranks. Same gradient.
    seqs = strategy.all_gather_list(seqs)[strategy.rank :: strategy.world_size]
    parts = [seqs[u :: cfg.minibatches] for u in range(cfg.minibatches)]
    denoms = [strategy.all_reduce_sum(sum(len(s.completion) for s in part)) for part in parts]
    total = sum(denoms)
    if total == 0:  # no informative group on any rank: no update compute at all
        return UpdateResult({})

    def micro_batches(part: list[_Seq]) -> list[list[_Seq]]:
        """Token-bounded micro-batches, as many on every rank (placeholders where a rank has fewer)."""
        bins = [
            [part[i] for i in b]
            for b in token_bins([(len(s.prompt), len(s.completion)) for s in part], cfg.micro_batch_tokens)
        ]
        count = int(strategy.all_reduce_max(len(bins)))
        return bins + [[_Seq([pad_id], [], 0.0, [])] for _ in range(count - len(bins))]

    def forward(micro: list[_Seq], model: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The micro-batch collated and the logits of its completion positions [B, C, V]."""
        batch = _collate(micro, pad_id)
        width = batch["completion_ids"].shape[1]
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"], logits_to_keep=width + 1,
        )  # fmt: skip
        return batch, out.logits[:, :-1]  # position t predicts completion token t

    temperature, chunk = cfg.sampling.temperature, cfg.logprob_chunk_tokens
    if cfg.minibatches > 1:
        with torch.no_grad():  # old log-probs of the sequences updated after the first optimizer step
            for part in parts[1:]:
                for micro in micro_batches(part):
                    batch, logits = forward(micro, strategy.forward)
                    lp, _ = completion_logprobs(
                        logits, batch["completion_ids"], temperature, chunk, entropy=False
                    )
                    for b, s in enumerate(micro):
                        s.old_logprobs = lp[b, : len(s.completion)].cpu().tolist()

    sums: dict[str, float] = defaultdict(float)
    model_tokens = updates = 0
    for part, denom in zip(parts, denoms, strict=True):
        if denom == 0:  # the same on every rank: skip the whole optimizer step
            continue
        updates += 1
        micros = micro_batches(part)
        for k, micro in enumerate(micros):
            strategy.accumulation_boundary(k == len(micros) - 1)
            batch, logits = forward(micro, strategy.forward)
            model_tokens += int(batch["attention_mask"].sum())
            mask = batch["completion_mask"].to(logits.device)  # [B, C]
            logprobs, entropy = completion_logprobs(
                logits, batch["completion_ids"], temperature, chunk, entropy_grad=cfg.loss.entropy_coef > 0
            )  # [B, C] each
            old = (
                logprobs.detach()
                if micro[0].old_logprobs is None
                else batch["old_logprobs"].to(logits.device)
            )
            ref_logprobs = None
            if reference is not None:
                _, ref_logits = forward(micro, reference)
                ref_logprobs = completion_logprobs(
                    ref_logits, batch["completion_ids"], temperature, chunk, entropy=False
                )[0].to(logits.device)  # [B, C]
            per_token, m = grpo_loss(
                logprobs, old, batch["advantages"].to(logits.device), mask,
                clip_low=cfg.loss.clip_low, clip_high=cfg.loss.clip_high,
                ref_logprobs=ref_logprobs, kl_coef=cfg.loss.kl_coef,
                entropy=entropy, entropy_coef=cfg.loss.entropy_coef,
            )  # fmt: skip
            loss = aggregate(per_token, mask, denom)
            if not math.isfinite(float(loss.detach())):
                strategy.poison_step()  # this update is skipped (weights, optimizer, lr untouched)
            strategy.backward(loss)
            strategy.step()
            n_tok = float(mask.sum())
            sums["loss"] += float(loss.detach()) * denom  # back to a token sum: the step's mean below
            sums["clip_frac"] += float(m["clip_frac"]) * n_tok
            sums["entropy"] += float(m["entropy_mean"]) * n_tok
            sums["ratio_max"] = max(sums["ratio_max"], float(m["ratio_max"]) if n_tok else 0.0)
            if "kl_mean" in m:
                sums["kl"] += float(m["kl_mean"]) * n_tok
            if micro[0].old_logprobs is None:  # before any update of this step: trainer vs engine
                diff = (logprobs.detach() - batch["sampling_logprobs"].to(logits.device)).abs()
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
        # first update's sequences): ~1e-6 on CPU fp32 when the weight sync is right
        "train/rollout_logprob_diff": strategy.all_reduce_sum(sums["logprob_diff"])
        / max(strategy.all_reduce_sum(sums["logprob_tokens"]), 1.0),
    }
    if cfg.minibatches > 1:  # this rank's: 1 on-policy, > 1 once the later updates drift
        out["train/ratio_max"] = sums["ratio_max"]
    if reference is not None:
        out["train/kl"] = strategy.all_reduce_sum(sums["kl"]) / total
    if (norm := strategy.grad_norm()) is not None:
        out["train/grad_norm"] = norm
    return UpdateResult(out, model_tokens=strategy.all_reduce_sum(model_tokens), trained=True)


def _collate(seqs: list[_Seq], pad_id: int) -> dict[str, torch.Tensor]:
    """``collate_prompt_completion`` plus advantages [B]; old_logprobs are 0 where unknown."""
    batch = collate_prompt_completion(
        [(s.prompt, s.completion) for s in seqs], pad_id,
        sampling_logprobs=[s.sampling_logprobs for s in seqs], old_logprobs=[s.old_logprobs for s in seqs],
    )  # fmt: skip
    batch["advantages"] = torch.tensor([s.advantage for s in seqs], dtype=torch.float32)  # [B]
    return batch


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


__all__ = ["Rollouts", "StepBatch", "UpdateResult", "policy_update", "run_rl"]
