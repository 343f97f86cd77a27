"""The RL policy update: the step's informative groups -> token-bounded micro-batches -> the clipped
policy gradient (with the optional importance correction, k3 KL and entropy terms) aggregated over the
step's completion tokens on all ranks -> DeepSpeed step(s). ``posttrain/stages/rl.py`` calls it once
per step; tests drive it directly to check that no split of a step changes its gradient.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from posttrain.config import RLConfig
from posttrain.data import collate_prompt_completion, token_bins
from posttrain.losses import aggregate, completion_logprobs, grpo_loss, importance_weights
from posttrain.strategy import FrozenModel, Strategy
from posttrain.types import RolloutGroup


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
    (``losses.completion_logprobs``). The clipped ratio is taken against ``cfg.clip_anchor``: the
    engine's behaviour log-probs (asynchronous rollouts: PPO's trust region around the policy that
    sampled), or the proximal ones — the first update is then on-policy (ratio 1), and with
    ``minibatches > 1`` the later ones, on weights that already moved, take their ratio against the
    trainer's log-probs from before the first update (one no-grad forward of those sequences), and the
    clip bounds how far they go.
    """
    seqs = [
        _Seq(g.prompt_ids, c.token_ids, a, c.logprobs)
        for g in groups
        for c, r, a in zip(g.completions, g.rewards, g.advantages, strict=True)
        if not math.isnan(r) and c.token_ids and not (cfg.truncated == "mask" and c.finish_reason == "length")
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
    behaviour_anchor = cfg.clip_anchor == "behaviour"  # else the proximal (pre-update) log-probs
    if cfg.minibatches > 1 and not behaviour_anchor:
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
    for u, (part, denom) in enumerate(zip(parts, denoms, strict=True)):
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
            if behaviour_anchor:  # the sampling policy's log-probs (possibly older weights)
                old = batch["sampling_logprobs"].to(logits.device)
            elif u == 0:  # the first update: the current weights
                old = logprobs.detach()
            else:  # a later minibatch: the weights before this step's first update
                old = batch["old_logprobs"].to(logits.device)
            ref_logprobs = None
            if reference is not None:
                _, ref_logits = forward(micro, reference)
                ref_logprobs = completion_logprobs(
                    ref_logits, batch["completion_ids"], temperature, chunk, entropy=False
                )[0].to(logits.device)  # [B, C]
            is_weights = None
            if cfg.loss.is_correction != "none":  # behaviour (engine) -> proximal (trainer, pre-update)
                behaviour = batch["sampling_logprobs"].to(logits.device)
                is_weights, ism = importance_weights(
                    old, behaviour, mask, cfg.loss.is_correction, cfg.loss.is_cap
                )
                for key in ("is_weight_mean", "is_ess", "is_masked_frac"):
                    sums[key] += float(ism[key]) * float(mask.sum())
                sums["is_weight_max"] = max(sums["is_weight_max"], float(ism["is_weight_max"]))
            per_token, m = grpo_loss(
                logprobs, old, batch["advantages"].to(logits.device), mask, is_weights=is_weights,
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
            if u == 0:  # before any update of this step: trainer vs engine
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
    if cfg.loss.is_correction != "none":  # token-weighted means over all ranks; the max is this rank's
        for key in ("is_weight_mean", "is_ess", "is_masked_frac"):
            out[f"train/{key}"] = strategy.all_reduce_sum(sums[key]) / total
        out["train/is_weight_max"] = sums["is_weight_max"]
    if cfg.truncated == "mask":
        out["train/truncated_masked"] = strategy.all_reduce_sum(
            sum(1 for g in groups for c in g.completions if c.finish_reason == "length" and c.token_ids)
        )
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
