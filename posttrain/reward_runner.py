"""Score completions with the recipe's weighted rewards, isolating rewards that misbehave.

    >>> from posttrain.config import RewardsConfig, RewardSpec
    >>> runner = RewardRunner(RewardsConfig(specs=(RewardSpec("exact_match", weight=2.0),)))
    >>> totals, metrics = runner.score(["1+1="], ["2"], {"answer": ["2"]})
    >>> totals, metrics["reward/exact_match/mean"]
    ([2.0], 1.0)

The total of a sample is ``sum(weight * value)`` over the rewards that apply to it (``None``
values are left out). It is ``None`` when no reward applies, or when any reward *failed* on it:
raised, ran past its timeout, returned NaN/inf or a non-number, or returned a list of the wrong
length. A failure is isolated to the samples it affects: when a batch call raises, times out or
returns the wrong length, each sample is retried on its own (a few at a time, all within one more
``timeout_s``), so only the samples that fail alone lose their score. Failures are counted
in the metrics (``reward/<name>/errors``, ``/timeouts``, ``/nan``, ``/wrong_length`` count samples;
``/batch_failures`` is 1 when the batch call failed and samples were retried) and the run goes
on, unless the recipe sets ``rewards.strict``, which raises ``RewardFailure`` instead.

Metrics per reward: ``mean`` and ``std`` of its scored values, the failure counts above,
``not_applicable`` (``None`` values) and ``seconds``; plus ``reward/total/mean`` and
``reward/failed_samples``.

Rewards run one after another, each in a daemon worker thread so that a hung reward can be left
behind (Python cannot kill a thread; a reward that must be killed should run its work in a
subprocess, as ``code_exec`` and ``math_verify`` do). ``timeout_s <= 0`` runs the reward in the
calling thread with no timeout (for code that needs the main thread, e.g. ``signal.alarm``).
Async rewards run on their own event loop in that thread and are cancelled at the timeout.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from posttrain.config import RewardsConfig, RewardSpec
from posttrain.errors import MissingDependencyError, UserError
from posttrain.plugins import RewardInfo, missing_requirements, reward_info
from posttrain.registry import REWARDS, RegistryError
from posttrain.types import RolloutGroup

Status = Literal["ok", "none", "error", "timeout", "nan", "wrong_length"]
FAILURES: tuple[Status, ...] = ("error", "timeout", "nan", "wrong_length")
_METRIC_OF: dict[Status, str] = {
    "error": "errors",
    "timeout": "timeouts",
    "nan": "nan",
    "wrong_length": "wrong_length",
    "none": "not_applicable",
}
RETRY_THREADS = 8  # concurrent one-sample calls when a batch call failed
DEFAULT_TIMEOUT_S = 30.0  # a spec without timeout_s, for a reward without a default of its own


class RewardFailure(RuntimeError):
    """A reward failed and the recipe asked for ``rewards.strict``."""


@dataclass
class RewardOutcome:
    """One reward on one batch."""

    name: str
    weight: float
    values: list[float | None]  # [B] None: not applicable or failed
    status: list[Status]  # [B]
    messages: list[str]  # [B] why a sample failed ("" when it did not)
    seconds: float  # wall time of the batch call (plus retries)
    batch_failure: str = ""  # why the batch call failed, so that samples were retried one by one


@dataclass
class ScoreReport:
    totals: list[float | None]  # [B]
    outcomes: list[RewardOutcome]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Bound:
    label: str  # the metric name: spec name, "fn" for "pkg.mod:fn", "_2" suffix for repeats
    spec: RewardSpec
    fn: Callable[..., Any]
    info: RewardInfo
    timeout_s: float


class _Timeout(Exception):
    pass


def bind_rewards(cfg: RewardsConfig) -> list[_Bound]:
    """Resolve the recipe's reward specs: names, optional requirements and each reward's cheap kwargs
    ``check``. Loads no model: ``posttrain run`` calls it before any stage trains, so a typo'd name, a
    missing extra or a bad judge path fails in a second, not after the stages before RL."""
    bound: list[_Bound] = []
    missing: list[str] = []
    seen: dict[str, int] = {}
    for spec in cfg.specs:
        fn = REWARDS.get(spec.name)
        if not callable(fn):
            raise RegistryError(
                f"reward {spec.name!r} resolved to {fn!r}, which is not callable; name a function"
            )
        base = spec.name.rsplit(":", 1)[-1]
        seen[base] = seen.get(base, 0) + 1
        label = base if seen[base] == 1 else f"{base}_{seen[base]}"
        info = reward_info(fn, base)
        timeout = spec.timeout_s if spec.timeout_s is not None else (info.timeout_s or DEFAULT_TIMEOUT_S)
        bound.append(_Bound(label, spec, fn, info, timeout))
        missing += missing_requirements(info)
    if missing:
        raise MissingDependencyError("; ".join(missing))
    for b in bound:
        if b.info.check is not None:
            b.info.check(dict(b.spec.kwargs))
    return bound


class RewardsFailing(UserError):
    """A reward failed on every sample for ``rewards.max_failed_steps`` steps in a row."""


class RewardRunner:
    def __init__(self, cfg: RewardsConfig):
        self.strict = cfg.strict
        self.max_failed_steps = cfg.max_failed_steps
        self.rewards = bind_rewards(cfg)
        # per reward label, since the last step_done(): [samples scored ok or None, samples failed], first error
        self._tally: dict[str, list[int]] = {}
        self._first_error: dict[str, str] = {}
        self._streak: dict[str, int] = {}
        for r in self.rewards:
            if r.info.setup is not None:
                r.info.setup(dict(r.spec.kwargs))

    def score(
        self, prompts: list[str], completions: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> tuple[list[float | None], dict[str, float]]:
        """Weighted totals ``[B]`` (``None``: no reward applies, or one failed) and metrics."""
        report = self.score_detailed(prompts, completions, columns)
        return report.totals, report.metrics

    def score_groups(
        self, groups: Sequence[RolloutGroup], scale_by_std: bool, eps: float
    ) -> dict[str, float]:
        """Score every completion of ``groups`` and fill each group's ``rewards`` (NaN = None),
        ``advantages`` and ``zero_advantage`` in place (the rules: ``posttrain.advantages``).
        Returns the reward metrics plus ``reward/none``, the count of unscored completions."""
        from posttrain.advantages import group_advantages, rewards_tensor  # torch: not for `validate`

        if not groups:
            return {}
        prompts = [g.sample.prompt for g in groups for _ in g.completions]
        completions = [c.text for g in groups for c in g.completions]
        keys = sorted({k for g in groups for k in g.sample.columns})
        columns = {k: [g.sample.columns.get(k) for g in groups for _ in g.completions] for k in keys}
        totals, metrics = self.score(prompts, completions, columns)
        grouped, start = [], 0
        for g in groups:
            grouped.append(totals[start : start + len(g.completions)])
            start += len(g.completions)
        adv = group_advantages(rewards_tensor(grouped), scale_by_std=scale_by_std, eps=eps)
        for i, g in enumerate(groups):
            g.rewards = [math.nan if r is None else float(r) for r in grouped[i]]
            g.advantages = adv.advantages[i].tolist()
            g.zero_advantage = bool(adv.zero_advantage[i])
        metrics["reward/none"] = float(sum(r is None for r in totals))
        return metrics

    def score_detailed(
        self, prompts: list[str], completions: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> ScoreReport:
        n = len(prompts)
        if len(completions) != n:
            raise ValueError(
                f"rewards: {len(completions)} completions for {n} prompts; pass one completion per prompt"
            )
        for key, col in columns.items():
            if len(col) != n:
                raise ValueError(
                    f"rewards: column {key!r} has {len(col)} values for {n} samples; give one per sample"
                )
        outcomes = [self._run_one(r, prompts, completions, columns) for r in self.rewards]
        for o in outcomes:
            tally = self._tally.setdefault(o.name, [0, 0])
            for status, message in zip(o.status, o.messages, strict=True):
                tally[status in FAILURES] += 1
                if status in FAILURES and o.name not in self._first_error:
                    self._first_error[o.name] = message or status
        totals: list[float | None] = []
        for i in range(n):
            if any(o.status[i] in FAILURES for o in outcomes):
                totals.append(None)
                continue
            parts = [o.weight * v for o in outcomes if (v := o.values[i]) is not None]
            totals.append(math.fsum(parts) if parts else None)
        return ScoreReport(totals, outcomes, _metrics(outcomes, totals))

    def step_done(self) -> None:
        """Close a training step: a reward that failed on every sample it saw in this step extends its
        streak; ``max_failed_steps`` in a row raise ``RewardsFailing`` naming it and its first error."""
        for name, (ok, failed) in self._tally.items():
            self._streak[name] = self._streak.get(name, 0) + 1 if failed and not ok else 0
            if self._streak[name] >= self.max_failed_steps:
                raise RewardsFailing(
                    f"reward {name!r} failed on every sample for {self._streak[name]} steps in a row "
                    f"(first error: {self._first_error.get(name, '?')}); fix the reward or its kwargs, or "
                    "raise rewards.max_failed_steps"
                )
        self._tally = {}
        if not any(self._streak.values()):
            self._first_error = {}

    # ----------------------------------------------------------------------------------------------

    def _run_one(
        self, r: _Bound, prompts: list[str], completions: list[str], columns: Mapping[str, Sequence[Any]]
    ) -> RewardOutcome:
        clash = set(columns) & set(r.spec.kwargs)
        if clash:
            raise ValueError(
                f"reward {r.label!r}: kwargs {sorted(clash)} clash with dataset columns of the same name; rename one"
            )
        n = len(prompts)
        start = time.perf_counter()
        outcome = RewardOutcome(r.label, r.spec.weight, [None] * n, ["none"] * n, [""] * n, 0.0)
        try:
            result = _call(r, prompts, completions, dict(columns), r.timeout_s)
            failure: tuple[Status, str] | None = None
            if not _is_sequence(result) or len(result) != n:
                failure = ("wrong_length", f"returned {_describe(result)} for {n} samples")
        except _Timeout:
            failure = ("timeout", f"no result within {r.timeout_s:g} s")
        except MissingDependencyError:
            raise
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            if self.strict:
                raise RewardFailure(f"reward {r.label!r} raised on a batch of {n}: {message}") from e
            failure = ("error", message)
        if failure is None:
            for i, value in enumerate(result):
                _set(outcome, i, value)
        elif self.strict:
            raise RewardFailure(f"reward {r.label!r} failed on a batch of {n} ({failure[0]}): {failure[1]}")
        elif n == 1:
            outcome.status[0], outcome.messages[0] = failure
        else:
            outcome.batch_failure = f"{failure[0]}: {failure[1]}"
            self._retry_each(r, prompts, completions, columns, outcome)
        outcome.seconds = time.perf_counter() - start
        if self.strict:
            bad = [i for i, s in enumerate(outcome.status) if s in FAILURES]
            if bad:
                i = bad[0]
                raise RewardFailure(
                    f"reward {r.label!r} failed on sample {i} ({outcome.status[i]}): {outcome.messages[i]}; "
                    "set rewards.strict=false to isolate failures and go on"
                )
        return outcome

    def _retry_each(
        self,
        r: _Bound,
        prompts: list[str],
        completions: list[str],
        columns: Mapping[str, Sequence[Any]],
        outcome: RewardOutcome,
    ) -> None:
        """Score samples one at a time to find the ones that fail, all within one more ``timeout_s``.

        ``RETRY_THREADS`` daemon threads take samples in order, so a sample that hangs holds up one
        thread, not the rest. Samples not finished by the deadline count as timeouts.
        """
        n = len(prompts)
        done: list[tuple[Status, str, Any] | None] = [None] * n
        todo = iter(range(n))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                one = {k: [v[i]] for k, v in columns.items()}
                try:
                    result = _call(r, [prompts[i]], [completions[i]], one, 0)
                except Exception as e:
                    done[i] = ("error", f"{type(e).__name__}: {e}", e)
                    continue
                if not _is_sequence(result) or len(result) != 1:
                    done[i] = ("wrong_length", f"returned {_describe(result)} for 1 sample", None)
                else:
                    done[i] = ("ok", "", result[0])

        threads = [
            threading.Thread(target=worker, name=f"reward-{r.label}-retry", daemon=True)
            for _ in range(min(n, RETRY_THREADS))
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + r.timeout_s if r.timeout_s > 0 else math.inf
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) if deadline < math.inf else None)
        for i, d in enumerate(done):
            if d is None:
                outcome.status[i], outcome.messages[i] = "timeout", f"no result within {r.timeout_s:g} s"
            elif isinstance(d[2], MissingDependencyError):
                raise d[2]
            elif d[0] == "ok":
                _set(outcome, i, d[2])
            else:
                outcome.status[i], outcome.messages[i] = d[0], d[1]


_COUNTS = ("/errors", "/timeouts", "/nan", "/wrong_length", "/not_applicable", "/batch_failures", "/seconds")


def merge_round_metrics(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The metrics of several ``score`` calls (a step's generation rounds) as one: counts and seconds
    add up (``reward/<name>/errors``, ``reward/none``, ``reward/failed_samples``, …), means and stds
    are averaged over the rounds that report them."""
    values: dict[str, list[float]] = {}
    for metrics in rounds:
        for k, v in metrics.items():
            values.setdefault(k, []).append(v)
    counts = {k for k in values if k.endswith(_COUNTS) or k in ("reward/none", "reward/failed_samples")}
    return {k: (sum(v) if k in counts else sum(v) / len(v)) for k, v in values.items()}


def _call(
    r: _Bound, prompts: list[str], completions: list[str], columns: dict[str, Any], timeout_s: float
) -> Any:
    """``r.fn(prompts, completions, **columns, **kwargs)``, within ``timeout_s`` (<= 0: no limit)."""
    kwargs = {**columns, **r.spec.kwargs}

    def invoke() -> Any:
        result = r.fn(prompts, completions, **kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run(_bounded(result, timeout_s))
        return result

    if timeout_s <= 0:
        return invoke()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = invoke()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name=f"reward-{r.label}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise _Timeout
    if "error" in box:
        if isinstance(box["error"], TimeoutError) and r.info.is_async:
            raise _Timeout
        raise box["error"]
    return box["value"]


async def _bounded(awaitable: Any, timeout_s: float) -> Any:
    if timeout_s <= 0:
        return await awaitable
    return await asyncio.wait_for(awaitable, timeout_s)


def _is_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or (
        hasattr(x, "__len__") and hasattr(x, "__getitem__") and not isinstance(x, (str, bytes, dict))
    )


def _describe(x: Any) -> str:
    return f"{len(x)} values" if _is_sequence(x) else f"a {type(x).__name__}"


def _set(outcome: RewardOutcome, i: int, value: Any) -> None:
    if value is None:
        return  # status stays "none"
    try:
        if isinstance(value, (str, bytes)):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        outcome.status[i], outcome.messages[i] = "error", f"returned {value!r}, not a number or None"
        return
    if not math.isfinite(v):
        outcome.status[i], outcome.messages[i] = "nan", f"returned {v}"
        return
    outcome.values[i], outcome.status[i] = v, "ok"


def _metrics(outcomes: list[RewardOutcome], totals: list[float | None]) -> dict[str, float]:
    m: dict[str, float] = {}
    for o in outcomes:
        ok = [v for v, s in zip(o.values, o.status, strict=True) if s == "ok" and v is not None]
        if ok:
            m[f"reward/{o.name}/mean"] = statistics.fmean(ok)
            m[f"reward/{o.name}/std"] = statistics.pstdev(ok)
        for status, key in _METRIC_OF.items():
            m[f"reward/{o.name}/{key}"] = float(sum(s == status for s in o.status))
        m[f"reward/{o.name}/batch_failures"] = 1.0 if o.batch_failure else 0.0
        m[f"reward/{o.name}/seconds"] = o.seconds
    scored = [t for t in totals if t is not None]
    if scored:
        m["reward/total/mean"] = statistics.fmean(scored)
    n_failed = sum(any(o.status[i] in FAILURES for o in outcomes) for i in range(len(totals)))
    m["reward/failed_samples"] = float(n_failed)
    return m
