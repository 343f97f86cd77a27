"""Distillation from a teacher: the supervised loop (``train_supervised``) with ``codistill_loss``.

corpus -> teacher targets, either online (teacher forward in the same step, no grad; the teacher is
held by the strategy: ZeRO-3-sharded when the student is, expert-parallel for MoE) or offline (top-k
log-probs written once to an Arrow dir, then read batch by batch) -> (1 − λ_t)·CE + λ_t·τ²·D(teacher ‖
student) -> HF checkpoint.

Offline targets: ``codistill.targets`` names the dir. When it does not exist and ``codistill.teacher``
is set, rank 0 writes it first from ``data`` (the same as ``posttrain teacher-targets``); the examples
are then the ones stored with the targets, so targets and tokens always match. Targets written for
another teacher, k, data, seed or length are refused, never reused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.codistill import Codistiller
from posttrain.config import DistillConfig
from posttrain.data import load_rows, tokenize_sft
from posttrain.schema import ConfigError
from posttrain.stages.context import StageContext
from posttrain.stages.sft import train_supervised
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
    strategy = ctx.strategy
    torch.manual_seed(ctx.seed)
    model, tokenizer = ctx.load_model()

    if cd.targets is None:  # online: the teacher runs beside the student
        ds = load_rows(cfg.data, "train", ctx.seed, required=["prompt", "completion|answer"])
        examples = tokenize_sft(ds, tokenizer, stage_max_len(cfg), where=cfg.data.source)
        train_supervised(
            ctx, model, tokenizer, examples, Codistiller.online(cd, model, tokenizer, strategy, ctx.seed)
        )
        return

    if not (Path(cd.targets) / "teacher_targets.json").exists():
        if cd.teacher is None:
            raise ConfigError(
                f"codistill.targets '{cd.targets}' has no teacher targets and codistill.teacher is not set; "
                "write them with `posttrain teacher-targets` or set a teacher"
            )
        if strategy.is_main:  # fails first if the teacher's vocabulary is not the student's
            out = write_stage_targets(ctx.recipe, ctx.name, tokenizer, model_vocab(model))
            print(f"[posttrain] wrote teacher targets to {out}", flush=True)
        strategy.barrier()
    # targets written for another teacher, k, data, seed or length are refused, not reused
    provenance = stage_provenance(cfg, ctx.seed) if cd.teacher is not None else None
    offline = OfflineTargets.open(cd.targets, tokenizer, model_vocab(model), provenance)
    examples = offline.examples()
    ctx.tracker.log({"codistill/offline_rows": len(examples), "codistill/top_k": offline.top_k}, step=0)
    train_supervised(ctx, model, tokenizer, examples, Codistiller(cd, offline=offline))
