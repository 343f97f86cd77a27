"""Supervised fine-tuning, and the one supervised loop every supervised stage trains with.

``run_sft``: data -> (data filters) -> tokenise (loss on completion tokens only) -> ``train_supervised``
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
from typing import Any

import torch

from posttrain.codistill import Codistiller
from posttrain.config import SFTConfig, SupervisedLoopConfig
from posttrain.data import Example, batch_layout, collate_rows, iterate_forever, load_rows, tokenize_sft
from posttrain.losses import IGNORE_INDEX, aggregate, sft_loss, shift_for_next_token
from posttrain.registry import DATA_FILTERS
from posttrain.stages.context import NonFiniteGuard, StageContext, maybe_eval, maybe_save, resume
from posttrain.teacher import stage_max_len


def run_sft(ctx: StageContext) -> None:
    cfg: SFTConfig = ctx.cfg
    torch.manual_seed(ctx.seed)
    model, tokenizer = ctx.load_model()
    ds = load_rows(cfg.data, "train", ctx.seed, required=["prompt", "completion|answer"])
    for name in cfg.data_filters:
        before = len(ds)
        ds = DATA_FILTERS.get(name)(ds)
        ctx.tracker.log(
            {f"data/filter/{name}/kept": len(ds), f"data/filter/{name}/dropped": before - len(ds)}, step=0
        )
    examples = tokenize_sft(ds, tokenizer, stage_max_len(cfg), where=cfg.data.source)
    codistill = None
    if cfg.codistill is not None:  # an online teacher, held by the strategy (sharded as the student is)
        codistill = Codistiller.online(cfg.codistill, model, tokenizer, ctx.strategy, ctx.seed)
    train_supervised(ctx, model, tokenizer, examples, codistill)


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
