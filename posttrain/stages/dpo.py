"""Lightweight DPO on hard prompts: one readable loop.

pairs (a dataset's prompt/chosen/rejected rows, or on-policy: hard prompts sampled with the current
policy, scored by the rewards, best against worst) -> reference log-probs, computed once through a
frozen copy of the starting model (``Strategy.frozen``: sharded like the policy) and cached on disk
-> ``losses.dpo_loss`` over token-bounded micro-batches, averaged over the step's pairs on all ranks
-> DeepSpeed step -> HF checkpoint.

What survives a kill: the pairs (``pairs.jsonl``, written once), the reference log-probs
(``reference_logps.jsonl``, appended a chunk at a time; a rerun computes only the missing pairs), and
the strategy's resume state; the pairs are visited in a seeded order, so a resumed stage ends with
the weights of an uninterrupted one. The reference cache is keyed by the reference model's weight
files, the pairs' content and the tokenisation: a changed key rebuilds it, and a gap in it fails.

Bad pairs are skipped and counted, with the row numbers in the log: an empty chosen, chosen equal to
rejected, a prompt (or pair) too long for ``data.max_prompt_len`` / ``max_completion_len``. A
dataset missing a column fails naming it (in ``posttrain validate`` already).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import DPOConfig
from posttrain.curriculum import POOL_FILE, pass_at_k
from posttrain.data import (
    DataError,
    collate_prompt_completion,
    encode_prompt,
    load_prompt_samples,
    load_rows,
    token_bins,
)
from posttrain.losses import completion_logprobs, dpo_loss
from posttrain.reward_runner import RewardRunner
from posttrain.rollout import make_engine
from posttrain.schema import first_difference, to_dict
from posttrain.stages.context import NonFiniteGuard, StageContext, maybe_eval, maybe_save, resume
from posttrain.strategy import FrozenModel, Strategy, write_hf_checkpoint
from posttrain.types import Sample

log = logging.getLogger(__name__)
PAIRS_FILE = "pairs.jsonl"
REFERENCE_FILE = "reference_logps.jsonl"
REFERENCE_CHUNK = 64  # pairs per appended line group of the reference cache


@dataclass
class Pair:
    prompt: list[int]  # [T_p] chat-formatted prompt tokens
    chosen: list[int]  # [T_c] completion tokens, EOS included
    rejected: list[int]
    row: int  # the data row (dataset) or prompt uid (on-policy) it came from
    margin: float = 0.0  # the reward margin (on-policy)


def run_dpo(ctx: StageContext) -> None:
    cfg: DPOConfig = ctx.cfg
    strategy, tracker = ctx.strategy, ctx.tracker
    torch.manual_seed(ctx.seed)
    model, tokenizer = ctx.load_model()

    # ---- pairs (written once; a rerun reads them) -------------------------------------------
    pairs_path = ctx.stage_dir / PAIRS_FILE
    key = pairs_key(ctx)
    if _header(pairs_path) != json.loads(json.dumps(key)):  # none yet, or made from other data/settings
        make = dataset_pairs if cfg.pairs.source == "dataset" else on_policy_pairs
        pairs, counts = make(ctx, tokenizer)
        if strategy.is_main:
            write_jsonl_atomic(pairs_path, [{"key": key}, *(asdict(p) for p in pairs)])
            tracker.log({f"dpo/{k}": float(v) for k, v in counts.items()}, step=0)
        strategy.barrier()
    pairs = [Pair(**json.loads(line)) for line in pairs_path.read_text().splitlines()[1:] if line]
    if not pairs:
        raise DataError(
            f"stage {ctx.name}: no usable preference pair (see dpo/* counts in {ctx.stage_dir / 'metrics.jsonl'}); "
            "lower pairs.min_margin, widen pairs.band or check the data"
        )

    # ---- reference log-probs, once, through a frozen copy of the starting model --------------
    reference = reference_logps(ctx, pairs)

    # ---- training -----------------------------------------------------------------------------
    steps = min(cfg.max_steps, math.ceil(cfg.epochs * len(pairs) / cfg.pairs_per_step))  # lightweight
    strategy.setup(model, cfg.optim, steps, micro_batch_size=1)
    step = int(resume(ctx, steps)["step"])
    guard = NonFiniteGuard(ctx)
    while step < steps:
        t0 = time.perf_counter()
        ids = step_pairs(len(pairs), cfg.pairs_per_step, step, ctx.seed)  # the step's pairs, all ranks
        mine = ids[strategy.rank :: strategy.world_size]
        sums, tokens = dpo_update(
            strategy, cfg, [pairs[i] for i in mine], [reference[i] for i in mine], len(ids)
        )
        step += 1
        n = float(len(ids))
        metrics: dict[str, Any] = {f"dpo/{k}": strategy.all_reduce_sum(v) / n for k, v in sums.items()}
        metrics["train/loss"] = metrics.pop("dpo/loss")
        metrics |= {"train/lr": strategy.lr, "train/pairs": n}
        metrics["perf/train_tokens_per_s"] = strategy.all_reduce_sum(tokens) / (time.perf_counter() - t0)
        if (norm := strategy.grad_norm()) is not None:
            metrics["train/grad_norm"] = norm
        metrics |= guard.after_step(step, metrics["train/loss"], norm)
        if step % ctx.recipe.tracking.log_every == 0 or step == steps:
            tracker.log(metrics | strategy.ep_metrics(), step)
        tracker.advance({"loss": metrics["train/loss"], "margin": metrics["dpo/margin"]})
        maybe_eval(ctx, tokenizer, step)
        maybe_save(ctx, step, lambda s=step: {"step": s})
    strategy.export_hf(ctx.checkpoint_dir, tokenizer)


def step_pairs(total: int, per_step: int, step: int, seed: int) -> list[int]:
    """Pair indices of optimizer step ``step``: epochs of a seeded permutation, read ``per_step`` at a
    time (a step may straddle two epochs). Depends on nothing but its arguments, so resumes exactly."""
    out: list[int] = []
    start = step * per_step
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), total)
        order = list(range(total))
        random.Random(f"dpo:{seed}:{epoch}").shuffle(order)
        out += order[offset : offset + per_step - len(out)]
    return out


def dpo_update(
    strategy: Strategy, cfg: DPOConfig, pairs: list[Pair], ref: list[tuple[float, float]], total_pairs: int
) -> tuple[dict[str, float], int]:
    """One optimizer update on this rank's pairs, in token-bounded micro-batches (as many on every rank);
    the loss is the mean over the step's pairs on all ranks. Returns metric sums over this rank's pairs
    and the tokens it forwarded."""
    bins = token_bins(
        [(2 * len(p.prompt), len(p.chosen) + len(p.rejected)) for p in pairs], cfg.micro_batch_tokens
    )
    count = int(strategy.all_reduce_max(len(bins)))
    bins += [[] for _ in range(count - len(bins))]
    sums: dict[str, float] = {}
    tokens = 0
    for k, b in enumerate(bins):
        strategy.accumulation_boundary(k == count - 1)
        micro = [pairs[i] for i in b]
        if not micro:  # a placeholder: one token, no loss, so every rank runs the same forwards
            out = strategy.forward(input_ids=torch.zeros(1, 1, dtype=torch.long))
            strategy.backward(out.logits.sum() * 0.0)
            strategy.step()
            continue
        logps, lengths, batch_tokens = sequence_logps(
            strategy.forward, micro, cfg.logprob_chunk_tokens, pad_id=0
        )
        tokens += batch_tokens
        p = len(micro)
        ref_c = torch.tensor([ref[i][0] for i in b], dtype=logps.dtype, device=logps.device)
        ref_r = torch.tensor([ref[i][1] for i in b], dtype=logps.dtype, device=logps.device)
        losses, m = dpo_loss(
            logps[:p], logps[p:], ref_c, ref_r, lengths[:p], lengths[p:],
            beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing, rpo_alpha=cfg.rpo_alpha,
        )  # fmt: skip
        loss = losses.sum() / total_pairs
        if not math.isfinite(float(loss.detach())):
            strategy.poison_step()
        strategy.backward(loss)
        strategy.step()
        for key, value in [("loss", losses.detach()), *m.items()]:
            sums[key] = sums.get(key, 0.0) + float(value.sum())
        sums["len_chosen"] = sums.get("len_chosen", 0.0) + float(lengths[:p].sum())
        sums["len_rejected"] = sums.get("len_rejected", 0.0) + float(lengths[p:].sum())
    for key in ("loss", "rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen",
                "logps_rejected", "len_chosen", "len_rejected"):  # fmt: skip
        sums.setdefault(key, 0.0)  # a rank without pairs still takes part in the all-reduce of each
    return sums, tokens


def sequence_logps(
    model: Any, pairs: list[Pair], chunk: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed completion log-probs [2P] (the P chosen, then the P rejected), their token counts [2P] and
    the tokens forwarded, for ``model`` (the policy's forward, or a frozen reference)."""
    seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    batch = collate_prompt_completion(seqs, pad_id)
    width = batch["completion_ids"].shape[1]
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
        logits_to_keep=width + 1,
    )  # fmt: skip
    logits = out.logits[:, :-1]  # [2P, C, V]
    mask = batch["completion_mask"].to(logits.device)
    lp, _ = completion_logprobs(logits, batch["completion_ids"], chunk_tokens=chunk, entropy=False)
    return (lp * mask).sum(-1), mask.sum(-1), int(batch["attention_mask"].sum())


def pairs_key(ctx: StageContext) -> dict[str, Any]:
    """What the pairs depend on: the data (settings, and a file's size and modification time), the pair
    settings, the seed and the starting checkpoint (on-policy pairs are its samples)."""
    cfg: DPOConfig = ctx.cfg
    source = Path(cfg.data.source)
    stamp = [source.stat().st_size, source.stat().st_mtime_ns] if source.is_file() else None
    return {
        "data": to_dict(cfg.data), "file": stamp, "pairs": to_dict(cfg.pairs), "seed": ctx.seed,
        "sampling": to_dict(cfg.sampling), "rewards": to_dict(cfg.rewards),
        "start": str(ctx.input_dir) if ctx.input_dir is not None else to_dict(ctx.recipe.model),
    }  # fmt: skip


def _header(path: Path) -> Any:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text().split("\n", 1)[0]).get("key")
    except (json.JSONDecodeError, AttributeError):
        return None


# --------------------------------------------------------------------------------------------------
# Reference log-probs, cached


def reference_key(ctx: StageContext, pairs: list[Pair]) -> dict[str, Any]:
    """What the reference log-probs depend on: the reference weights (the stage's starting checkpoint's
    weight files, or the recipe's model config when it is built from scratch), the pairs' tokens, and
    the numerics that turn them into log-probs."""
    pair_hash = hashlib.sha256()
    for p in pairs:
        pair_hash.update(json.dumps([p.prompt, p.chosen, p.rejected]).encode())
    source = ctx.input_dir
    weights = (
        sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in Path(source).glob("*.safetensors"))
        if source is not None
        else to_dict(ctx.recipe.model)
    )
    return {
        "reference": str(source) if source is not None else "recipe model",
        "weights": weights,
        "seed": ctx.seed,
        "pairs": len(pairs),
        "pairs_sha256": pair_hash.hexdigest(),
        "dtype": ctx.recipe.model.dtype,
        "bf16": ctx.recipe.deepspeed.bf16,
    }


def reference_logps(ctx: StageContext, pairs: list[Pair]) -> list[tuple[float, float]]:
    """(chosen, rejected) summed reference log-probs per pair, from the cache when its key matches;
    the missing ones (a fresh stage, a pass killed half-way) are computed through ``strategy.frozen``
    and appended a chunk at a time. The frozen copy is released afterwards."""
    strategy = ctx.strategy
    path = ctx.stage_dir / REFERENCE_FILE
    key = reference_key(ctx, pairs)
    done = _read_reference(path, key) if strategy.is_main else []
    if strategy.is_main and path.exists() and not done and path.read_text().strip():
        path.unlink()  # written for another reference or other pairs: rebuilt, never reused
    done_n = int(strategy.all_reduce_max(len(done)))
    ctx.tracker.log(
        {"dpo/reference_cached": float(done_n), "dpo/reference_computed": float(len(pairs) - done_n)}, step=0
    )
    if done_n < len(pairs):
        frozen = strategy.frozen(ctx.load_model()[0])
        if strategy.is_main:  # a fresh file, or the valid part of a killed pass's (its torn tail dropped)
            write_jsonl_atomic(path, [{"key": key}, *([i, c, r] for i, (c, r) in enumerate(done))])
        for start in range(done_n, len(pairs), REFERENCE_CHUNK):
            chunk = list(range(start, min(start + REFERENCE_CHUNK, len(pairs))))
            values = _reference_chunk(strategy, frozen, [pairs[i] for i in chunk], ctx.cfg)
            if strategy.is_main:
                with path.open("a") as f:  # a line per pair; a torn last line is dropped on reading
                    f.write(
                        "".join(json.dumps([i, c, r]) + "\n" for i, (c, r) in zip(chunk, values, strict=True))
                    )
            strategy.barrier()
        strategy.release(frozen)
    out = _read_reference(path, key) if strategy.is_main else []
    if strategy.is_main and len(out) != len(pairs):
        raise DataError(
            f"{path}: {len(out)} reference log-probs for {len(pairs)} pairs; delete the file to rebuild it"
        )
    return strategy.broadcast_object(out)


def _read_reference(path: Path, key: dict[str, Any]) -> list[tuple[float, float]]:
    """The cached values in pair order, or [] when the file is missing or was written for another key.
    Rows must run 0, 1, 2, …: a gap fails; a torn last line (a kill mid-write) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0])
    except (IndexError, json.JSONDecodeError):
        return []
    if first_difference(header.get("key"), json.loads(json.dumps(key))) is not None:
        return []
    out: list[tuple[float, float]] = []
    for n, line in enumerate(lines[1:]):
        try:
            i, c, r = json.loads(line)
        except (json.JSONDecodeError, ValueError):
            if n == len(lines) - 2:
                break  # the torn last line of a killed write
            raise DataError(f"{path}: line {n + 2} is corrupt; delete the file to rebuild it") from None
        if i != len(out):
            raise DataError(
                f"{path}: a gap in the reference log-probs at pair {len(out)}; delete the file to rebuild it"
            )
        out.append((float(c), float(r)))
    return out


@torch.no_grad()
def _reference_chunk(
    strategy: Strategy, frozen: FrozenModel, pairs: list[Pair], cfg: DPOConfig
) -> list[tuple[float, float]]:
    """Reference log-probs of ``pairs``: each rank computes every world-th pair in token-bounded
    micro-batches (a sharded reference's forward is collective: every rank runs as many) and the
    results are gathered in pair order."""
    mine = list(range(strategy.rank, len(pairs), strategy.world_size))
    bins = token_bins([(2 * len(pairs[i].prompt), len(pairs[i].chosen) + len(pairs[i].rejected)) for i in mine],
                      cfg.micro_batch_tokens)  # fmt: skip
    count = int(strategy.all_reduce_max(len(bins)))
    local: list[tuple[int, float, float]] = []
    for k in range(count):
        if k >= len(bins):
            frozen(input_ids=torch.zeros(1, 1, dtype=torch.long))  # keep a sharded reference in lockstep
            continue
        ids = [mine[j] for j in bins[k]]
        logps, _, _ = sequence_logps(frozen, [pairs[i] for i in ids], cfg.logprob_chunk_tokens, pad_id=0)
        local += [(i, float(logps[n]), float(logps[len(ids) + n])) for n, i in enumerate(ids)]
    gathered = sorted(strategy.all_gather_list(local))
    return [(c, r) for _, c, r in gathered]


# --------------------------------------------------------------------------------------------------
# Pairs


def dataset_pairs(ctx: StageContext, tokenizer: Any) -> tuple[list[Pair], dict[str, int]]:
    """Pairs from the data's prompt/chosen/rejected columns (text or chat messages); bad rows skipped."""
    cfg: DPOConfig = ctx.cfg
    ds = load_rows(cfg.data, "train", ctx.seed, required=["prompt", "chosen", "rejected"])
    counts = {"rows": len(ds), "skipped_empty_chosen": 0, "skipped_identical": 0, "skipped_too_long": 0}
    skipped: dict[str, list[int]] = {k: [] for k in counts if k.startswith("skipped")}
    pairs = []
    for i, row in enumerate(ds):
        prompt = _prompt_ids(tokenizer, row["prompt"])
        chosen, rejected = (
            _completion_ids(tokenizer, row["chosen"]),
            _completion_ids(tokenizer, row["rejected"]),
        )
        why = (
            "skipped_empty_chosen" if len(chosen) <= 1 else
            "skipped_identical" if chosen == rejected else
            "skipped_too_long" if len(prompt) > cfg.data.max_prompt_len
            or max(len(chosen), len(rejected)) > cfg.data.max_completion_len else ""
        )  # fmt: skip
        if why:
            counts[why] += 1
            skipped[why].append(i + 1)
            continue
        pairs.append(Pair(prompt, chosen, rejected, row=i))
    for why, rows in skipped.items():
        if rows:
            shown = ", ".join(map(str, rows[:10])) + (" …" if len(rows) > 10 else "")
            log.warning(
                "%s: %s %d pair(s) (rows %s)", cfg.data.source, why.replace("_", " "), len(rows), shown
            )
    counts["pairs"] = len(pairs)
    return pairs, counts


def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    if isinstance(prompt, list):  # conversational: the messages before the answer
        text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
        return list(tokenizer(str(text), add_special_tokens=False).input_ids)
    return encode_prompt(tokenizer, str(prompt))


def _completion_ids(tokenizer: Any, completion: Any) -> list[int]:
    if isinstance(completion, list):  # conversational: the assistant message(s)
        completion = "".join(str(m.get("content", "")) for m in completion if isinstance(m, dict))
    return list(tokenizer(str(completion), add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]


def on_policy_pairs(ctx: StageContext, tokenizer: Any) -> tuple[list[Pair], dict[str, int]]:
    """Hard prompts (pass rate in ``pairs.band``) sampled ``pairs.n`` times with the starting policy
    through the rollout engine, scored by the rewards, paired best against worst when the margin is at
    least ``pairs.min_margin``. Ties and single-valued groups are skipped and counted."""
    cfg: DPOConfig = ctx.cfg
    strategy = ctx.strategy
    limit = cfg.data.max_prompt_len
    samples, too_long = load_prompt_samples(cfg.data, tokenizer, ctx.seed, limit, where=f"stages.{ctx.name}")
    by_uid = {s.uid: s for s in samples}
    runner = RewardRunner(cfg.rewards)
    engine = _engine(ctx, tokenizer)
    counts = {"prompts": len(samples), "skipped_long_prompts": len(too_long)}

    hard, source = _hard_from_pool(ctx, by_uid), "rl_pool"
    if hard is None:  # no RL pool for this data: measure pass rates with the current policy
        rng = random.Random(f"dpo-measure:{ctx.seed}")
        uids = rng.sample(sorted(by_uid), min(cfg.pairs.measure_prompts, len(by_uid)))
        rates = _pass_rates(ctx, engine, runner, [by_uid[u] for u in uids])
        lo, hi = cfg.pairs.band
        hard, source = [u for u in uids if u in rates and lo <= rates[u] <= hi], "measured"
        counts["measured_prompts"] = len(uids)
    counts["hard_prompts"] = len(hard)
    chosen_uids = hard[: cfg.pairs.max_prompts]

    mine = [by_uid[u] for u in chosen_uids[strategy.rank :: strategy.world_size]]
    params = cfg.sampling.__class__(
        **{**asdict(cfg.sampling), "n": cfg.pairs.n, "seed": ctx.seed * 7919 + strategy.rank}
    )
    groups = engine.generate(mine, params)
    runner.score_groups(groups, scale_by_std=True, eps=1e-4)
    engine.close()
    local, skips = [], {"skipped_ties": 0, "skipped_unscored": 0, "skipped_small_margin": 0}
    for g in groups:
        scored = [(r, c) for r, c in zip(g.rewards, g.completions, strict=True) if r == r and c.token_ids]
        if len(scored) < 2:
            skips["skipped_unscored"] += 1
            continue
        best = max(scored, key=lambda rc: rc[0])
        worst = min(scored, key=lambda rc: rc[0])
        margin = best[0] - worst[0]
        if margin == 0:
            skips["skipped_ties"] += 1
        elif margin < cfg.pairs.min_margin:
            skips["skipped_small_margin"] += 1
        else:
            local.append(
                Pair(
                    g.prompt_ids, best[1].token_ids, worst[1].token_ids, row=int(g.sample.uid), margin=margin
                )
            )
    pairs = sorted(strategy.all_gather_list(local), key=lambda p: p.row)
    for k, v in skips.items():
        counts[k] = int(strategy.all_reduce_sum(v))
    counts["pairs"] = len(pairs)
    log.info("dpo: %d pairs from %d hard prompts (%s)", len(pairs), len(chosen_uids), source)
    return pairs, counts


def _engine(ctx: StageContext, tokenizer: Any) -> Any:
    source = ctx.input_dir
    if source is None:  # the recipe's first stage: the engine needs the built model on disk
        source = ctx.stage_dir / "rollout_init"
        model, _ = ctx.load_model()
        if ctx.strategy.is_main:
            write_hf_checkpoint(model, model.state_dict(), tokenizer, Path(source))
        ctx.strategy.barrier()
    cfg: DPOConfig = ctx.cfg
    work_dir = ctx.stage_dir / f"rollout_rank{ctx.strategy.rank}"
    return ctx.closing(make_engine(cfg.engine.kind, source, tokenizer, cfg.engine, work_dir=work_dir))


def _hard_from_pool(ctx: StageContext, by_uid: dict[str, Sample]) -> list[str] | None:
    """The previous RL stage's hard prompts (known pass rate inside ``pairs.band``), when that stage
    wrote its final pool and trained on this stage's data (uids are row numbers of the same rows)."""
    if ctx.input_dir is None:
        return None
    prev = Path(ctx.input_dir).parent
    pool_file = prev / POOL_FILE
    prev_cfg = ctx.recipe.stages.get(prev.name)
    if not pool_file.exists() or prev_cfg is None or to_dict(prev_cfg.data) != to_dict(ctx.cfg.data):
        return None
    stats = json.loads(pool_file.read_text())["stats"]
    lo, hi = ctx.cfg.pairs.band
    return sorted(
        (u for u, st in stats.items() if u in by_uid and st["rate"] is not None and lo <= st["rate"] <= hi),
        key=lambda u: (stats[u]["rate"], int(u)),
    )


def _pass_rates(
    ctx: StageContext, engine: Any, runner: RewardRunner, samples: list[Sample]
) -> dict[str, float]:
    """Pass rate (pass@1 of ``measure_samples`` completions) per prompt, every rank its share, summed."""
    cfg: DPOConfig = ctx.cfg
    strategy = ctx.strategy
    params = cfg.sampling.__class__(
        **{**asdict(cfg.sampling), "n": cfg.pairs.measure_samples, "seed": ctx.seed * 104729 + strategy.rank}
    )
    groups = engine.generate(samples[strategy.rank :: strategy.world_size], params)
    runner.score_groups(groups, scale_by_std=True, eps=1e-4)
    local = {g.sample.uid: (g.scored, g.correct(cfg.pass_threshold)) for g in groups}
    table = strategy.all_reduce_table([[float(local.get(s.uid, (0, 0))[i]) for i in (0, 1)] for s in samples])
    return {s.uid: pass_at_k(int(n), int(c), 1) for s, (n, c) in zip(samples, table, strict=True) if n > 0}


def write_jsonl_atomic(path: Path, rows: list[Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
