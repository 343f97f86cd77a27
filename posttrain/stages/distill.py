"""Distillation from a teacher: the SFT loop with ``codistill_loss``.

corpus -> teacher targets, either online (teacher forward in the same step, no grad) or offline
(top-k log-probs written once to an Arrow dir, then read batch by batch) -> packed (default) or padded
micro-batches -> (1 − λ_t)·CE + λ_t·τ²·D(teacher ‖ student), aggregated over the whole optimizer
step -> DeepSpeed step -> periodic held-out eval and resume state -> HF checkpoint.

Offline targets: ``codistill.targets`` names the dir. When it does not exist and ``codistill.teacher``
is set, rank 0 writes it first from ``data`` (the same as ``python -m posttrain.teacher``); the
examples are then the ones stored with the targets, so targets and tokens always match.

Batching, data parallelism and resume are those of the SFT stage (see ``posttrain/stages/sft.py``).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import torch

from posttrain.codistill import Codistiller
from posttrain.config import ConfigError, DistillConfig
from posttrain.data import Example, collate_packed, collate_padded, iterate_forever, load_rows, tokenize_sft
from posttrain.losses import aggregate
from posttrain.pipeline import StageContext
from posttrain.stages.sft import _periodic_eval
from posttrain.teacher import (
    OfflineTargets,
    model_vocab,
    stage_max_len,
    stage_provenance,
    write_stage_targets,
)


def run_distill(ctx: StageContext) -> None:
    cfg: DistillConfig = ctx.cfg
    cd = cfg.codistill
    strategy, tracker = ctx.strategy, ctx.tracker
    torch.manual_seed(ctx.seed)
    model, tokenizer = ctx.load_model()
    max_len = stage_max_len(cfg)

    # ---- data + teacher targets ------------------------------------------------------------
    if cd.targets is not None:
        if not (Path(cd.targets) / "teacher_targets.json").exists():
            if cd.teacher is None:
                raise ConfigError(
                    f"codistill.targets '{cd.targets}' has no teacher targets and codistill.teacher is not set; "
                    "write them with `python -m posttrain.teacher` or set a teacher"
                )
            if strategy.is_main:  # fails first if the teacher's vocabulary is not the student's
                out = write_stage_targets(ctx.recipe, ctx.name, tokenizer, model_vocab(model))
                print(f"[posttrain] wrote teacher targets to {out}", flush=True)
            strategy.barrier()
        # targets written for another teacher, k, data, seed or length are refused, not reused
        provenance = stage_provenance(cfg, ctx.seed) if cd.teacher is not None else None
        offline = OfflineTargets.open(cd.targets, tokenizer, model_vocab(model), provenance)
        codistill = Codistiller(cd, offline=offline)
        examples = offline.examples()
        tracker.log({"codistill/offline_rows": len(examples), "codistill/top_k": offline.top_k}, step=0)
    else:
        ds = load_rows(cfg.data, "train", ctx.seed, required=["prompt"])
        if "completion" not in ds.column_names and "answer" not in ds.column_names:
            raise ValueError(f"{cfg.data.source}: distill data needs a 'completion' (or 'answer') column")
        examples = tokenize_sft(ds, tokenizer, max_len, where=cfg.data.source)
        codistill = Codistiller.online(cd, model, tokenizer, strategy.device, ctx.seed)
    eval_ds = ctx.eval_set() if cfg.eval_every else None

    # ---- engine + resume -------------------------------------------------------------------
    strategy.setup(model, cfg.optim, cfg.max_steps, cfg.micro_batch_size, cfg.grad_accum)
    state = strategy.load_state(ctx.state_dir) or {}
    step = int(state.get("step", 0))
    tracker.resume_at(step)
    per_step = cfg.grad_accum * strategy.world_size
    stream = iterate_forever(
        examples, cfg.micro_batch_size, ctx.seed, cfg.pack, cfg.seq_len, start=step * per_step,
        group_by_length=cfg.group_by_length,
    )  # fmt: skip
    tracker.progress(cfg.max_steps, step, desc=f"{ctx.name} (distill)")

    # ---- loop ------------------------------------------------------------------------------
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        global_micro = list(itertools.islice(stream, per_step))  # the whole step, all ranks
        mine = global_micro[strategy.rank :: strategy.world_size]  # [grad_accum] micro-batches
        batches = [
            (_collate(examples, mb, cfg, tokenizer.pad_token_id), _layout(examples, mb)) for mb in mine
        ]
        local_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b, _ in batches)
        denom = strategy.all_reduce_sum(local_tokens)  # loss tokens in the whole optimizer step

        loss_sum = 0.0
        for batch, layout in batches:
            labels = batch.pop("labels")
            logits = strategy.forward(**batch).logits  # [B, T, V]
            per_token, aux = codistill.loss(logits, labels, batch, step, cfg.max_steps, layout)
            loss = aggregate(per_token, aux["mask"], denom)
            strategy.backward(loss)
            strategy.step()
            loss_sum += float(loss.detach())
        step += 1

        loss_value = strategy.all_reduce_sum(loss_sum)  # token-mean codistillation loss of the step
        elapsed = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "train/loss": loss_value,
            "train/lr": strategy.lr,
            "train/tokens_per_s": denom / elapsed,
        }
        metrics |= codistill.step_metrics(strategy.world_size)
        if (norm := strategy.grad_norm()) is not None:
            metrics["train/grad_norm"] = norm
        if step % ctx.recipe.tracking.log_every == 0 or step == cfg.max_steps:
            tracker.log(metrics | strategy.ep_metrics(), step)  # ep_metrics: collective, {} without EP
        tracker.advance({"loss": loss_value, "λ": metrics["codistill/lambda_mean"]})

        if eval_ds is not None and step % cfg.eval_every == 0 and step < cfg.max_steps:
            _periodic_eval(ctx, tokenizer, eval_ds, step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            strategy.save_state(ctx.state_dir, {"step": step})

    strategy.export_hf(ctx.checkpoint_dir, tokenizer)


def _collate(
    examples: list[Example], micro: list[list[int]], cfg: DistillConfig, pad_id: int
) -> dict[str, torch.Tensor]:
    if cfg.pack:
        return collate_packed([[examples[i] for i in row] for row in micro], pad_id, cfg.seq_len)
    return collate_padded([examples[row[0]] for row in micro], pad_id)


def _layout(examples: list[Example], micro: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Per batch row, (example index, start offset) of each example in it (offsets add up when packing)."""
    out = []
    for row in micro:
        offsets = itertools.accumulate((len(examples[i].input_ids) for i in row[:-1]), initial=0)
        out.append(list(zip(row, offsets, strict=True)))
    return out
