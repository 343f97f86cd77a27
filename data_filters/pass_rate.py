"""``pass_rate``: difficulty = 1 − pass@k of a judge model's own samples, verified by a reward plugin.

The judge (any HF checkpoint dir, or an earlier stage's checkpoint by its stage name) samples
``judge.sampling.n`` completions of every prompt through the rollout engine; the reward (``exact_match``
by default, any reward plugin with its kwargs) scores them, and a completion passes when its reward is at
least ``threshold``. With ``c`` passes of ``n`` scored samples the difficulty is ``1 − pass@k`` with
the unbiased estimator (``posttrain.curriculum.pass_at_k``; ``k = 1``: the plain failure rate
``1 − c/n``). The default judge for verifiable data (s1 drops every question a reference model solves).

    data_filters:
      - name: pass_rate
        judge: {model: warmup, sampling: {n: 8, temperature: 1.0, max_tokens: 8}}
        kwargs: {reward: exact_match, k: 1}

The cache holds (n, c) per example, so a new ``k`` re-uses it; the reward,
its kwargs and ``threshold`` are part of the key. A row whose samples the reward could not score (it
failed or returned None on every one), or whose prompt is too long for the judge, has no difficulty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets

from posttrain.config import DataFilterSpec, RewardsConfig, RewardSpec
from posttrain.curriculum import pass_at_k
from posttrain.filters import FilterContext, FilterScores
from posttrain.plugins import data_filter, required_columns
from posttrain.registry import REWARDS
from posttrain.schema import ConfigError, PosInt
from posttrain.types import Sample


@dataclass(frozen=True)
class PassRateOptions:
    reward: str = "exact_match"  # a reward plugin: name, entry point or pkg.module:fn
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    threshold: float = 1.0  # a sample passes when its reward is >= this
    k: PosInt = 1  # difficulty = 1 - pass@k (k <= judge.sampling.n)


def _columns(opts: PassRateOptions) -> list[str]:
    return ["prompt", *[c for c in required_columns(REWARDS.get(opts.reward)) if c not in opts.reward_kwargs]]


def _check(opts: PassRateOptions, spec: DataFilterSpec, path: str) -> None:
    from posttrain.reward_runner import bind_rewards

    n = spec.judge.sampling.n if spec.judge is not None else 1
    if opts.k > n:
        raise ConfigError(f"'{path}.kwargs.k' is {opts.k}, above the judge's sampling.n={n}; k must be <= n")
    bind_rewards(RewardsConfig(specs=(RewardSpec(opts.reward, kwargs=dict(opts.reward_kwargs)),)))


@data_filter(
    "pass_rate",
    doc="1 - pass@k of a judge model's samples, checked by a reward (verifiable data)",
    judge=True,
    options=PassRateOptions,
    columns=_columns,
    check=_check,
)
def pass_rate(rows: datasets.Dataset, ctx: FilterContext) -> FilterScores:
    from posttrain.reward_runner import RewardRunner

    opts: PassRateOptions = ctx.options
    judge = ctx.require_judge()
    runner = RewardRunner(
        RewardsConfig(specs=(RewardSpec(opts.reward, kwargs=dict(opts.reward_kwargs)),), strict=False)
    )
    records: list[dict[str, Any]] = rows.to_list()
    failed = [0]

    def judge_rows(idx: list[int], chunk_no: int) -> list[Any]:
        samples = [
            Sample(prompt=str(records[i]["prompt"]), columns={k: v for k, v in records[i].items() if k != "prompt"},
                   uid=str(i))
            for i in idx
        ]  # fmt: skip
        groups = judge.generate(samples, seed=ctx.seed * 1_000_003 + chunk_no)
        prompts = [g.sample.prompt for g in groups for _ in g.completions]
        texts = [c.text for g in groups for c in g.completions]
        keys = sorted({k for g in groups for k in g.sample.columns})
        columns = {k: [g.sample.columns.get(k) for g in groups for _ in g.completions] for k in keys}
        totals, _ = runner.score(prompts, texts, columns) if prompts else ([], {})
        out: dict[str, Any] = {}
        start = 0
        for g in groups:
            mine = totals[start : start + len(g.completions)]
            start += len(g.completions)
            scored = [t for t in mine if t is not None]
            failed[0] += len(mine) - len(scored)
            out[g.sample.uid] = {"n": len(scored), "c": sum(1 for t in scored if t >= opts.threshold)}
        return [out.get(str(i)) for i in idx]  # None: the prompt did not fit the judge's context

    settings = {"reward": opts.reward, "reward_kwargs": opts.reward_kwargs, "threshold": opts.threshold}
    values = judge.map("pass_rate", settings, records, rows.column_names, judge_rows)
    scores: list[float | None] = []
    rates = []
    for v in values:
        if not v or not v.get("n"):
            scores.append(None)
            continue
        n, c = int(v["n"]), int(v["c"])
        rates.append(c / n)
        scores.append(1.0 - pass_at_k(n, c, min(opts.k, n)))
    unscored = sum(s is None for s in scores)
    notes = []
    if unscored:
        notes.append(
            f"{unscored} of {len(scores)} rows have no pass rate (prompt too long for the judge, or the reward "
            f"{opts.reward!r} scored none of their samples)"
        )
    metrics = {
        "pass_rate_mean": sum(rates) / len(rates) if rates else 0.0,
        "solved_all": float(sum(r == 1.0 for r in rates)),
        "solved_none": float(sum(r == 0.0 for r in rates)),
        "reward_unscored_samples": float(failed[0]),
    }
    return FilterScores(scores, metrics, notes)
