"""Supervised fine-tuning: one readable loop.

data -> (data filters) -> tokenise (loss on completion tokens only) -> packed (default) or padded
micro-batches -> per-token NLL, aggregated over the whole optimizer step -> DeepSpeed step ->
periodic held-out eval and resume state -> HF checkpoint.

Data parallelism: the global stream of micro-batches is fixed by the seed; optimizer step s uses
micro-batches [s·A·W, (s+1)·A·W) (A = grad_accum, W = ranks) and rank r takes every W-th of them.
So one process with A = 2 and two processes with A = 1 see the same global batch, and a resumed
run continues at exactly the micro-batch where it stopped.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch

from posttrain.codistill import Codistiller
from posttrain.config import SFTConfig
from posttrain.data import Example, collate_packed, collate_padded, iterate_forever, load_rows, tokenize_sft
from posttrain.evaluate import evaluate
from posttrain.losses import aggregate, sft_loss, shift_for_next_token
from posttrain.pipeline import StageContext
from posttrain.registry import DATA_FILTERS


def run_sft(ctx: StageContext) -> None:
    cfg: SFTConfig = ctx.cfg
    strategy, tracker = ctx.strategy, ctx.tracker
    torch.manual_seed(ctx.seed)
    model, tokenizer = ctx.load_model()

    # ---- data ------------------------------------------------------------------------------
    ds = load_rows(cfg.data, "train", ctx.seed, required=["prompt"])
    if "completion" not in ds.column_names and "answer" not in ds.column_names:
        raise ValueError(f"{cfg.data.source}: SFT data needs a 'completion' (or 'answer') column")
    for name in cfg.data_filters:
        before = len(ds)
        ds = DATA_FILTERS.get(name)(ds)
        tracker.log(
            {f"data_filter/{name}/kept": len(ds), f"data_filter/{name}/dropped": before - len(ds)}, step=0
        )
    max_len = cfg.seq_len if cfg.pack else cfg.data.max_prompt_len + cfg.data.max_completion_len
    examples = tokenize_sft(ds, tokenizer, max_len, where=cfg.data.source)
    # codistillation: an online teacher turns the loss into codistill_loss (before setup: ZeRO-3 shards the model)
    codistill = (
        Codistiller.online(cfg.codistill, model, tokenizer, strategy.device, ctx.seed)
        if cfg.codistill
        else None
    )
    eval_ds = ctx.eval_set() if cfg.eval_every else None

    # ---- engine + resume -------------------------------------------------------------------
    strategy.setup(model, cfg.optim, cfg.max_steps, cfg.micro_batch_size, cfg.grad_accum)
    state = strategy.load_state(ctx.state_dir) or {}
    step = int(state.get("step", 0))
    tracker.resume_at(step)
    per_step = cfg.grad_accum * strategy.world_size
    stream = iterate_forever(
        examples,
        cfg.micro_batch_size,
        ctx.seed,
        cfg.pack,
        cfg.seq_len,
        start=step * per_step,
        group_by_length=cfg.group_by_length,
    )
    tracker.progress(cfg.max_steps, step, desc=f"{ctx.name} (sft)")

    # ---- loop ------------------------------------------------------------------------------
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        global_micro = list(itertools.islice(stream, per_step))  # the whole step, all ranks
        mine = global_micro[strategy.rank :: strategy.world_size]  # [grad_accum] micro-batches
        batches = [_collate(examples, mb, cfg, tokenizer.pad_token_id) for mb in mine]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        denom = strategy.all_reduce_sum(local_tokens)  # loss tokens in the whole optimizer step
        seen = strategy.all_reduce_sum(
            sum(int((b["input_ids"] != tokenizer.pad_token_id).sum()) for b in batches)
        )

        loss_sum = 0.0
        for batch in batches:
            labels = batch.pop("labels")
            logits = strategy.forward(**batch).logits  # [B, T, V]
            if codistill is None:
                per_token, aux = sft_loss(*shift_for_next_token(logits, labels.to(logits.device)))
            else:
                per_token, aux = codistill.loss(logits, labels, batch, step, cfg.max_steps)
            loss = aggregate(per_token, aux["mask"], denom)
            strategy.backward(loss)
            strategy.step()
            loss_sum += float(loss.detach())
        step += 1

        loss_value = strategy.all_reduce_sum(loss_sum)  # token-mean NLL of the step
        elapsed = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "train/loss": loss_value,
            "train/lr": strategy.lr,
            "train/tokens_per_s": seen / elapsed,
        }
        if (norm := strategy.grad_norm()) is not None:
            metrics["train/grad_norm"] = norm
        if codistill is not None:
            metrics |= codistill.step_metrics(strategy.world_size)
        if step % ctx.recipe.tracking.log_every == 0 or step == cfg.max_steps:
            tracker.log(metrics | strategy.ep_metrics(), step)  # ep_metrics: collective, {} without EP
        tracker.advance({"loss": loss_value})

        if eval_ds is not None and step % cfg.eval_every == 0 and step < cfg.max_steps:
            _periodic_eval(ctx, tokenizer, eval_ds, step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            strategy.save_state(ctx.state_dir, {"step": step})

    strategy.export_hf(ctx.checkpoint_dir, tokenizer)


def _collate(
    examples: list[Example], micro: list[list[int]], cfg: SFTConfig, pad_id: int
) -> dict[str, torch.Tensor]:
    if cfg.pack:
        return collate_packed([[examples[i] for i in row] for row in micro], pad_id, cfg.seq_len)
    return collate_padded([examples[row[0]] for row in micro], pad_id)


def _periodic_eval(ctx: StageContext, tokenizer: Any, eval_ds: Any, step: int) -> None:
    """Held-out greedy/sampled pass@1 of the current weights, on rank 0 (ZeRO-3 / expert-parallel weights gathered)."""
    strategy = ctx.strategy
    if strategy.model_is_sharded:
        state = strategy.full_state_dict()
        if not strategy.is_main:
            return
        model, _ = ctx.load_model()
        model.load_state_dict(state)
    elif not strategy.is_main:
        return
    else:
        model = strategy.module
    metrics = evaluate(model, tokenizer, eval_ds, ctx.recipe.eval, seed=ctx.seed + step)
    ctx.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
