"""Supervised fine-tuning, and the one supervised loop every supervised stage trains with.

``run_sft``: data -> (data filters: difficulty judges, then the selection; ``posttrain/filters.py``) ->
tokenise (loss on completion tokens only) -> ``train_supervised``
(with ``codistill_loss`` against an online teacher when ``codistill`` is set).

``train_supervised``: packed (default) or padded micro-batches -> per-token loss (NLL, or the
codistillation loss) aggregated over the whole optimizer step -> DeepSpeed step -> periodic held-out
eval and resume state -> HF checkpoint. The distill stage uses it too.

Data parallelism: the global stream of micro-batches is fixed by the seed; optimizer step s uses
micro-batches [s·A·W, (s+1)·A·W) (A = grad_accum, W = ranks) and rank r takes every W-th of them.
So one process with A = 2 and two processes with A = 1 see the same global batch, and a resumed
run continues at exactly the micro-batch where it stopped.

Metrics per logged step: ``train/loss`` (token mean over the step), ``train/loss_tokens`` (tokens
trained on, all ranks), ``perf/train_tokens_per_s`` (tokens forwarded per second, padding excluded,
all ranks), ``train/lr``, ``train/grad_norm``, ``train/nonfinite_steps`` (steps skipped for a NaN/inf loss or
gradient, whose update never happened); ``codistill/*`` with a teacher; ``moe/*`` under expert
parallelism (docs/metrics.md lists every name).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.codistill import Codistiller
from posttrain.config import SFTConfig, SupervisedLoopConfig
from posttrain.data import Example, batch_layout, collate_rows, iterate_forever, load_rows, tokenize_sft
from posttrain.filters import SELECTION_FILE, resolve_judge_model, run_filters, write_selection
from posttrain.losses import IGNORE_INDEX, aggregate, sft_loss, shift_for_next_token
from posttrain.stages.context import NonFiniteGuard, StageContext, maybe_eval, maybe_save, resume
from posttrain.teacher import stage_max_len


def run_sft(ctx: StageContext) -> None:
    cfg: SFTConfig = ctx.cfg
    torch.manual_seed(ctx.seed)
    ds = load_rows(cfg.data, "train", ctx.seed, required=["prompt", "completion|answer"])
    if cfg.data_filters:  # judges run (and free their engines) before the student loads
        ds = filter_rows(ctx, ds)
    model, tokenizer = ctx.load_model()
    examples = tokenize_sft(ds, tokenizer, stage_max_len(cfg), where=cfg.data.source)
    codistill = None
    if cfg.codistill is not None:  # an online teacher, held by the strategy (sharded as the student is)
        codistill = Codistiller.online(cfg.codistill, model, tokenizer, ctx.strategy, ctx.seed)
    train_supervised(ctx, model, tokenizer, examples, codistill)


def filter_rows(ctx: StageContext, ds: Any) -> Any:
    """The stage's data filters score every row (judgments cached on disk) and ``data_selection`` keeps
    part of them; the kept and dropped row ids go to ``<stage>/data_selection.json``. A resumed stage
    finds every judgment in the cache (no judge call) and keeps the same rows."""
    cfg: SFTConfig = ctx.cfg
    strategy, run_dir = ctx.strategy, ctx.stage_dir.parent
    shared = Path(ctx.recipe.run.dir).expanduser() / "judgment_cache"  # every run under run.dir
    cache = Path(cfg.judgment_cache).expanduser() if cfg.judgment_cache else shared
    stages = list(ctx.recipe.stages)
    result = run_filters(
        ds, cfg.data_filters, cfg.data_selection, seed=ctx.seed, cache_root=cache, work_dir=ctx.stage_dir,
        judge_dir=lambda m: resolve_judge_model(m, stages[: stages.index(ctx.name)], run_dir),
        label=ctx.name, progress=ctx.recipe.tracking.progress, rank=strategy.rank,
        world=strategy.world_size, barrier=strategy.barrier, path=f"stages.{ctx.name}.data_filters",
    )  # fmt: skip
    sel = result.selection
    if strategy.is_main:
        resumed = (ctx.stage_dir / SELECTION_FILE).exists()
        write_selection(ctx.stage_dir, result)
        if not resumed:  # metrics.jsonl has them already
            ctx.tracker.log(result.metrics, step=0)
        print(
            f"[posttrain] {ctx.name}: data filters ({', '.join(result.scores)}) kept {len(sel.kept)} of "
            f"{len(result.ids)} rows ({len(sel.kept) / max(1, len(result.ids)):.1%}); ids in "
            f"{ctx.stage_dir / SELECTION_FILE}",
            flush=True,
        )
        for note in result.notes:
            print(f"[posttrain] {ctx.name}: {note}", flush=True)
    return ds.select(sel.kept)


def train_supervised(
    ctx: StageContext,
    model: Any,
    tokenizer: Any,
    examples: list[Example],
    codistill: Codistiller | None = None,
) -> None:
    """Train ``model`` on ``examples`` for ``ctx.cfg.max_steps`` optimizer steps (resuming from the
    stage's saved state) and export the checkpoint. ``codistill`` set: the loss is its codistillation
    loss; else the NLL of the labels."""
    cfg: SupervisedLoopConfig = ctx.cfg
    strategy, tracker = ctx.strategy, ctx.tracker
    strategy.setup(model, cfg.optim, cfg.max_steps, cfg.micro_batch_size, cfg.grad_accum)
    step = int(resume(ctx, cfg.max_steps)["step"])
    per_step = cfg.grad_accum * strategy.world_size
    guard = NonFiniteGuard(ctx)
    stream = iterate_forever(
        examples, cfg.micro_batch_size, ctx.seed, cfg.pack, cfg.seq_len, start=step * per_step,
        group_by_length=cfg.group_by_length,
    )  # fmt: skip

    while step < cfg.max_steps:
        t0 = time.perf_counter()
        global_micro = list(itertools.islice(stream, per_step))  # the whole step, all ranks
        mine = global_micro[strategy.rank :: strategy.world_size]  # [grad_accum] micro-batches
        batches = [
            (
                collate_rows(examples, mb, cfg.pack, cfg.seq_len, tokenizer.pad_token_id),
                batch_layout(examples, mb),
            )
            for mb in mine
        ]
        # loss tokens in the whole optimizer step (all micro-batches, all ranks): the loss denominator
        denom = strategy.all_reduce_sum(
            sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b, _ in batches)
        )
        forwarded = strategy.all_reduce_sum(
            sum(len(examples[i].input_ids) for mb in mine for row in mb for i in row)
        )

        loss_sum = 0.0
        for batch, layout in batches:
            labels = batch.pop("labels")
            logits = strategy.forward(**batch).logits  # [B, T, V]
            if codistill is None:
                per_token, aux = sft_loss(*shift_for_next_token(logits, labels.to(logits.device)))
            else:
                per_token, aux = codistill.loss(logits, labels, batch, step, cfg.max_steps, layout)
            loss = aggregate(per_token, aux["mask"], denom)
            if not math.isfinite(value := float(loss.detach())):
                strategy.poison_step()  # the update this micro-batch belongs to is skipped
            strategy.backward(loss)
            strategy.step()
            loss_sum += value
        step += 1

        loss_value = strategy.all_reduce_sum(loss_sum)  # the step's token-mean loss
        metrics: dict[str, Any] = {
            "train/loss": loss_value,
            "train/loss_tokens": denom,
            "train/lr": strategy.lr,
            "perf/train_tokens_per_s": forwarded / (time.perf_counter() - t0),
        }
        if (norm := strategy.grad_norm()) is not None:
            metrics["train/grad_norm"] = norm
        metrics |= guard.after_step(step, loss_value, norm)  # a non-finite step was skipped; N in a row stop
        if codistill is not None:
            metrics |= codistill.step_metrics(strategy)
        if step % ctx.recipe.tracking.log_every == 0 or step == cfg.max_steps:
            tracker.log(metrics | strategy.ep_metrics(), step)  # ep_metrics: collective, {} without EP
        postfix = {"loss": loss_value} | ({"λ": metrics["codistill/lambda_mean"]} if codistill else {})
        tracker.advance(postfix)

        maybe_eval(ctx, tokenizer, step)
        maybe_save(ctx, step, lambda s=step: {"step": s})

    strategy.export_hf(ctx.checkpoint_dir, tokenizer)
