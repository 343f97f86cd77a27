"""``llm_rating``: a judge LLM rates each example's difficulty on a rubric; the score is the *expected*
rating under the judge's next-token probabilities of the rating tokens (Deita), not a parsed sample.

Every row becomes one judge prompt (``template``: ``{prompt}``, ``{completion}`` — the row's completion,
else its answer — ``{scale}`` and any other column by name), sent through the rollout engine's
``next_token_logprobs``. With p_r the judge's probability of the token for rating r (1..scale), the
rating is ``E[r] = Σ r·p_r / Σ p_r`` and the difficulty ``(E[r] − 1) / (scale − 1)``.

An answer that gives no usable rating is counted (``unusable``) and left without a difficulty, which
``data_selection.unscored`` keeps or drops — never a crash: in log-prob mode when the rating tokens
hold less than ``min_rating_mass`` of the judge's next-token probability (a judge that would answer
something else), in generate mode when fewer than that share of its samples hold a rating.

Generate mode (parse the first integer of ``judge.sampling.n`` sampled answers, average the ones in
[1, scale]) is the fallback when log-probs are unavailable: ``mode: auto`` uses it when the judge's
tokenizer does not give every rating one token of its own.

    data_filters:
      - name: llm_rating
        judge: {model: /models/judge-8b-instruct}
        kwargs: {scale: 5, template: "…{prompt}…{completion}…Difficulty (1-{scale}):"}
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import datasets

from posttrain.config import DataFilterSpec
from posttrain.filters import FilterContext, FilterScores
from posttrain.plugins import data_filter
from posttrain.schema import ConfigError, Prob, Range
from posttrain.types import Sample

DEFAULT_TEMPLATE = (
    "How hard is this task for a student? Rate it from 1 (trivial) to {scale} (very hard).\n"
    "Task: {prompt}\nAnswer: {completion}\nDifficulty (1-{scale}):"
)
_INT = re.compile(r"\d+")


@dataclass(frozen=True)
class LLMRatingOptions:
    template: str = DEFAULT_TEMPLATE  # fields: {prompt}, {completion}, {scale}, any column by name
    scale: Annotated[int, Range(ge=2, le=9)] = 5  # ratings 1..scale, one digit each
    min_rating_mass: Prob = 0.5  # below it an answer is unusable (see the module doc)
    mode: Literal["auto", "logprobs", "generate"] = "auto"


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names of a template.

    >>> template_fields("Task: {prompt} ({scale}) {answer}")
    ['prompt', 'scale', 'answer']
    """
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _columns(opts: LLMRatingOptions) -> list[str]:
    fields = [f for f in template_fields(opts.template) if f != "scale"]
    return ["completion|answer" if f == "completion" else f for f in fields]


def _check(opts: LLMRatingOptions, spec: DataFilterSpec, path: str) -> None:
    fields = template_fields(opts.template)
    if "prompt" not in fields:
        raise ConfigError(f"'{path}.kwargs.template' must contain {{prompt}}; it has {fields}")
    try:
        opts.template.format(**{f: "x" for f in fields})
    except (ValueError, IndexError, KeyError) as e:
        raise ConfigError(f"'{path}.kwargs.template' is not a valid format string ({e})") from None


def parse_rating(text: str, scale: int) -> int | None:
    """The first integer of a judge's answer when it lies in [1, scale].

    >>> parse_rating(" 4 - carries twice", 5), parse_rating("7", 5), parse_rating("hard", 5)
    (4, None, None)
    """
    m = _INT.search(text)
    if m is None:
        return None
    value = int(m.group())
    return value if 1 <= value <= scale else None


def expected_rating(logprobs: list[float]) -> tuple[float | None, float]:
    """(E[r], mass) from the log-probs of the rating tokens 1..scale, in order.

    >>> expected_rating([math.log(0.1), math.log(0.1), math.log(0.6)])
    (2.625, 0.8)
    >>> expected_rating([-math.inf, -math.inf])
    (None, 0.0)
    """
    probs = [math.exp(lp) for lp in logprobs]
    mass = sum(probs)
    if mass <= 0:
        return None, 0.0
    return sum((r + 1) * p for r, p in enumerate(probs)) / mass, round(mass, 12)


@data_filter(
    "llm_rating",
    doc="a judge LLM's expected difficulty rating (next-token probabilities of the rating tokens)",
    judge=True,
    options=LLMRatingOptions,
    columns=_columns,
    check=_check,
)
def llm_rating(rows: datasets.Dataset, ctx: FilterContext) -> FilterScores:
    opts: LLMRatingOptions = ctx.options
    judge = ctx.require_judge()
    records: list[dict[str, Any]] = rows.to_list()
    fields = [f for f in template_fields(opts.template) if f != "scale"]
    ratings = [str(r) for r in range(1, opts.scale + 1)]
    token_ids = [judge.tokenizer.encode(r, add_special_tokens=False) for r in ratings]
    single = all(len(t) == 1 for t in token_ids)
    mode = opts.mode if opts.mode != "auto" else ("logprobs" if single else "generate")
    notes = []
    if mode == "logprobs" and not single:
        raise ConfigError(
            f"llm_rating: the judge's tokenizer splits a rating of 1..{opts.scale} into several tokens; "
            "use mode: generate (or auto)"
        )
    if opts.mode == "auto" and mode == "generate":
        notes.append(
            "the judge's tokenizer gives no single token per rating: ratings parsed from sampled text"
        )

    def prompt_of(row: dict[str, Any]) -> str:
        values = {f: row.get(f) for f in fields}
        if "completion" in fields and values.get("completion") is None:
            values["completion"] = row.get("answer")
        return opts.template.format(**{**values, "scale": opts.scale})

    def judge_rows(idx: list[int], chunk_no: int) -> list[Any]:
        samples = [Sample(prompt=prompt_of(records[i]), uid=str(i)) for i in idx]
        if mode == "logprobs":
            out = judge.next_token_logprobs(samples, [t[0] for t in token_ids])
            return [None if lp is None else [round(math.exp(x), 9) for x in lp] for lp in out]
        groups = {g.sample.uid: g for g in judge.generate(samples, seed=ctx.seed * 1_000_003 + chunk_no)}
        return [
            None
            if str(i) not in groups
            else [parse_rating(c.text, opts.scale) for c in groups[str(i)].completions]
            for i in idx
        ]

    settings = {"template": opts.template, "scale": opts.scale, "mode": mode}
    values = judge.map("llm_rating", settings, records, fields + ["answer"], judge_rows)

    scores: list[float | None] = []
    masses: list[float] = []
    unusable = 0
    for v in values:
        if v is None:
            scores.append(None)
            continue
        if mode == "logprobs":
            expected, mass = expected_rating([math.log(p) if p > 0 else -math.inf for p in v])
        else:
            got = [r for r in v if r is not None]
            expected, mass = (sum(got) / len(got) if got else None), len(got) / max(1, len(v))
        masses.append(mass)
        if expected is None or mass < opts.min_rating_mass:
            unusable += 1
            scores.append(None)
        else:
            scores.append((expected - 1.0) / (opts.scale - 1.0))
    too_long = sum(v is None for v in values)
    if unusable:
        what = "rating tokens held" if mode == "logprobs" else "share of samples with a rating was"
        notes.append(
            f"{unusable} of {len(values)} answers gave no usable rating (the {what} < "
            f"min_rating_mass={opts.min_rating_mass:g}; mean {sum(masses) / max(1, len(masses)):.3f}): left unscored"
        )
    if too_long:
        notes.append(f"{too_long} prompts did not fit the judge's context: left unscored")
    metrics = {
        "unusable": float(unusable),
        "rating_mass_mean": sum(masses) / len(masses) if masses else 0.0,
        "logprob_mode": float(mode == "logprobs"),
    }
    return FilterScores(scores, metrics, notes)
