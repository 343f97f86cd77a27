"""The codistillation part of a training loop: teacher targets per micro-batch, the loss, its metrics.

Used by the distill stage and by the SFT stage when ``codistill`` is configured::

    cd = Codistiller.online(cfg.codistill, model, tokenizer, strategy, seed)          # before setup
    ...
    per_token, aux = cd.loss(logits, labels, batch, step, total_steps)                # per micro-batch
    ...
    metrics |= cd.step_metrics(strategy)                                             # once per step

Metrics (all ranks, all micro-batches of the step, token-weighted): ``codistill/lambda_mean``,
``codistill/hard`` and ``codistill/soft`` (the two loss parts before weighting),
``codistill/teacher_label_agreement`` (teacher argmax == label) and the λ histogram as the fraction
of loss tokens in each fifth of [0, 1]: ``codistill/lambda_hist/0.0-0.2`` … ``0.8-1.0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from posttrain.config import CodistillConfig
from posttrain.losses import TeacherTargets, codistill_loss, shift_for_next_token
from posttrain.strategy import Strategy
from posttrain.teacher import OfflineTargets, load_teacher, model_vocab, online_targets

HIST_BINS = 5
_SUMS = ("tokens", "lambda", "hard", "soft", "agree")


class Codistiller:
    """Targets from an online teacher or from offline top-k targets, and the running step metrics."""

    def __init__(self, cfg: CodistillConfig, teacher: Any = None, offline: OfflineTargets | None = None):
        if (teacher is None) == (offline is None):
            raise ValueError("Codistiller needs exactly one of an online teacher or offline targets")
        self.cfg = cfg
        self.teacher = teacher
        self.offline = offline
        self._sums = torch.zeros(len(_SUMS) + HIST_BINS, dtype=torch.float64)

    @classmethod
    def online(
        cls, cfg: CodistillConfig, student: Any, tokenizer: Any, strategy: Strategy, seed: int
    ) -> Codistiller:
        """Load ``cfg.teacher`` (checked against the student's vocabulary) as a frozen model of
        ``strategy`` (sharded like the student; expert-parallel when it is MoE and ep_size > 1)."""
        if cfg.teacher is None:
            raise ValueError("codistill.teacher is not set: online codistillation needs a teacher model")
        teacher = load_teacher(cfg.teacher, tokenizer, model_vocab(student), seed=seed)
        return cls(cfg, teacher=strategy.frozen(teacher))

    def targets(
        self, batch: dict[str, torch.Tensor], layout: Sequence[Sequence[tuple[int, int]]] | None
    ) -> TeacherTargets:
        """Targets for the shifted positions of ``batch`` [B, T-1, ·]. ``layout`` (offline only): per
        batch row, the (target row, offset) of each example in it."""
        if self.teacher is not None:
            return online_targets(self.teacher, batch, self.cfg.top_k)
        assert self.offline is not None and layout is not None
        return self.offline.batch(layout, width=batch["input_ids"].shape[1])

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        batch: dict[str, torch.Tensor],
        step: int,
        total_steps: int,
        layout: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``codistill_loss`` on unshifted ``logits`` [B, T, V] / ``labels`` [B, T]; adds to the step metrics."""
        targets = _to(self.targets(batch, layout), logits.device)
        c = self.cfg
        per_token, aux = codistill_loss(
            *shift_for_next_token(logits, labels.to(logits.device)),
            targets,
            modes=c.modes, lambda0=c.lambda0, lambda1=c.lambda1, schedule=c.schedule,
            step=step, total_steps=total_steps, temperature=c.temperature,
            divergence=c.divergence, jsd_beta=c.jsd_beta,
        )  # fmt: skip
        self._accumulate(aux)
        return per_token, aux

    def _accumulate(self, aux: dict[str, torch.Tensor]) -> None:
        mask = aux["mask"]
        lam = aux["lambda"][mask].double().cpu()  # [N] λ of the loss tokens
        hist = torch.histc(lam, bins=HIST_BINS, min=0.0, max=1.0)
        sums = [float(mask.sum())] + [float((aux[k].double() * mask).sum()) for k in _SUMS[1:]]
        self._sums += torch.cat([torch.tensor(sums, dtype=torch.float64), hist])

    def step_metrics(self, strategy: Strategy) -> dict[str, float]:
        """This step's metrics over all micro-batches and ranks (one all-reduce); resets the sums."""
        sums = strategy.all_reduce_tensor(self._sums)
        self._sums.zero_()
        tokens, lam, hard, soft, agree, *hist = (float(x) for x in sums)
        n = max(tokens, 1.0)
        out = {
            "codistill/lambda_mean": lam / n,
            "codistill/hard": hard / n,
            "codistill/soft": soft / n,
            "codistill/teacher_label_agreement": agree / n,
        }
        for b, count in enumerate(hist):
            out[f"codistill/lambda_hist/{b / HIST_BINS:.1f}-{(b + 1) / HIST_BINS:.1f}"] = count / n
        return out


def _to(t: TeacherTargets, device: torch.device) -> TeacherTargets:
    def mv(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.to(device)

    return TeacherTargets(
        logits=mv(t.logits), topk_logprobs=mv(t.topk_logprobs), topk_indices=mv(t.topk_indices)
    )
