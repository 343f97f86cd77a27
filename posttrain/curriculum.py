"""Continuous curriculum: the pass@k estimator, a stateful prompt pool, and a capability-mixed sampler.

The RL loop alternates training with *filter passes*. A filter pass samples ``n`` completions of
each due pool prompt with the current policy and hands the pool the number ``c`` that were correct;
the pool keeps the prompts whose pass rate ``c / n`` lies in the difficulty band (medium-to-hard)
and moves the others out:

  status    meaning                                   trained on   re-checked
  new       drawn from the dataset, not checked yet   yes          at the next filter pass
  active    pass rate inside the band                 yes          every filter pass
  easy      above the band, not reliably solved       no           every filter pass
  backlog   below the band (hopeless: 0 of n)         no           every ``backlog_recheck_every``-th pass
  retired   reliably solved                           no           never

*Reliably solved* means ``retire_after`` consecutive checks with every completion correct (a check
is a filter pass or a training group of the prompt). A prompt at pass rate 0.8 still teaches: its
last step to 1.0 raises sampled pass@1, and a band that retired everything above 0.8 lost exactly
those gains; so the default band's top is 1.0 and only all-correct checks retire a prompt. Whenever
fewer than ``capacity`` prompts are trainable, fresh ones are drawn from the dataset, in a seeded
order, so the pool refreshes itself cheaply. The band can move toward harder prompts over training
(``band`` -> ``band_final`` linearly over ``band_steps``).

Everything is a plain stateful object (``observe``, ``state_dict``, ``load_state_dict``,
``metrics``): resuming a run restores the curriculum exactly.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from posttrain.config import CurriculumConfig
from posttrain.types import RolloutGroup, Sample

POOL_FILE = "prompt_pool.json"  # an RL stage's final PromptPool.state_dict(), beside its checkpoint

Status = Literal["new", "active", "easy", "backlog", "retired", "unscorable", "abandoned"]
STATUSES: tuple[Status, ...] = ("new", "active", "easy", "backlog", "retired", "unscorable", "abandoned")
TRAINABLE: tuple[Status, ...] = ("new", "active")


# --------------------------------------------------------------------------------------------------
# The pass@k estimator


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``c`` correct out of ``n`` samples (Chen et al. 2021, "Evaluating LLMs
    trained on code"): ``1 - C(n-c, k) / C(n, k)``, computed as the stable product
    ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (no huge binomials).

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 0, 2), pass_at_k(4, 3, 2)
    (0.25, 0.0, 1.0)
    >>> round(pass_at_k(4, 1, 2), 6)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    0.5
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_table(rows: Iterable[tuple[str, int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Mean unbiased pass@k over prompts, overall and per capability: the one aggregation the pool's
    filter passes and the rollout metrics both use.

    ``rows``: (capability, n, c) per prompt with ``n >= 1`` scored samples and ``c`` correct. Returns
    ``pass@<k>`` and ``<capability>/pass@<k>`` for each k (a prompt with fewer than k samples counts
    with k = n); {} for no rows.

    >>> pass_at_k_table([("add", 4, 1), ("add", 4, 4), ("mul", 2, 0)], [1, 2])
    {'pass@1': 0.4166666666666667, 'pass@2': 0.5, 'add/pass@1': 0.625, 'add/pass@2': 0.75, 'mul/pass@1': 0.0, 'mul/pass@2': 0.0}
    """
    per_cap: dict[str, list[tuple[int, int]]] = {}
    for cap, n, c in rows:
        per_cap.setdefault(cap, []).append((n, c))
    everything = [nc for v in per_cap.values() for nc in v]
    out: dict[str, float] = {}
    for name, nc in [("", everything), *((f"{cap}/", v) for cap, v in sorted(per_cap.items()))]:
        if not nc:
            continue
        for k in ks:
            out[f"{name}pass@{k}"] = sum(pass_at_k(n, c, min(k, n)) for n, c in nc) / len(nc)
    return out


def group_metrics(groups: Sequence[RolloutGroup], pass_threshold: float, n: int) -> dict[str, float]:
    """Reward mean/std and sampled pass@1 / pass@n, overall and per capability, over rollout groups
    (scored: ``RolloutGroup.rewards`` set, NaN for None): ``reward/mean``, ``reward/std``,
    ``rollout/pass@1``, ``rollout/pass@<n>``, ``rollout/<cap>/reward_mean``, ``rollout/<cap>/pass@1``, …,
    and ``rollout/completion_len``. A completion passes when its reward >= ``pass_threshold``."""
    per_cap: dict[str, list[RolloutGroup]] = {}
    for g in groups:
        per_cap.setdefault(g.sample.capability, []).append(g)
    out: dict[str, float] = {}
    for name, gs in [("", list(groups)), *((f"{c}/", v) for c, v in sorted(per_cap.items()))]:
        rewards = [r for g in gs for r in g.rewards if not math.isnan(r)]
        if not rewards:
            continue
        mean = sum(rewards) / len(rewards)
        # overall: reward/mean, reward/std; per capability: rollout/<cap>/reward_mean (reward/<name>/…
        # belongs to the reward runner's per-reward metrics)
        key = "reward/" if not name else f"rollout/{name}reward_"
        out[f"{key}mean"] = mean
        out[f"{key}std"] = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))
    rows = [(g.sample.capability, g.scored, g.correct(pass_threshold)) for g in groups if g.scored]
    out |= {f"rollout/{k}": v for k, v in pass_at_k_table(rows, sorted({1, n})).items()}
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    if lengths:
        out["rollout/completion_len"] = sum(lengths) / len(lengths)
    return out


def count_by(groups: Iterable[RolloutGroup], column: str) -> dict[str, int]:
    """Groups per value of a data column: ``capability`` (``Sample.capability``), or any other column
    (``difficulty``, …) among the groups that have it."""
    out: dict[str, int] = {}
    for g in groups:
        if column == "capability":
            value = g.sample.capability
        elif column in g.sample.columns:
            value = str(g.sample.columns[column])
        else:
            continue
        out[value] = out.get(value, 0) + 1
    return out


def by_capability(samples: Iterable[Sample]) -> dict[str, list[str]]:
    """Capability -> uids, in the order given (what ``StratifiedSampler.sample`` draws from)."""
    out: dict[str, list[str]] = {}
    for s in samples:
        out.setdefault(s.capability, []).append(s.uid)
    return out


# --------------------------------------------------------------------------------------------------
# The prompt pool


@dataclass
class PromptStats:
    status: Status = "new"
    checks: int = 0  # filter passes this prompt went through
    last_n: int = 0  # last filter pass: samples and correct ones
    last_c: int = 0
    last_check_step: int = -1
    rate: float | None = None  # latest known pass rate (filter pass or training group)
    train_groups: int = 0  # training groups observed
    train_samples: int = 0
    train_correct: int = 0
    solved_streak: int = 0  # consecutive all-correct checks
    backlog_since_pass: int = 0  # filter-pass index at which it entered the backlog
    outside: int = 0  # consecutive checks outside the band (easy or backlog): max_rechecks of them abandon it


@dataclass
class FilterReport:
    step: int
    band: tuple[float, float]
    checked: int
    moved: dict[str, int] = field(default_factory=dict)  # status -> prompts that ended the pass there
    pass_at: dict[str, float] = field(default_factory=dict)  # "pass@1", "pass@k", per capability too


class PromptPool:
    """Prompts of a dataset with per-prompt statistics and a difficulty status (module docstring)."""

    def __init__(self, samples: Sequence[Sample], cfg: CurriculumConfig, seed: int = 0) -> None:
        """``cfg``: the recipe's ``curriculum`` section (its ranges checked by the schema); ``seed`` fixes
        the order in which prompts are drawn from ``samples``."""
        uids = [s.uid for s in samples]
        if len(set(uids)) != len(uids) or any(u == "" for u in uids):
            raise ValueError("PromptPool needs a unique, non-empty Sample.uid per prompt")
        self.cfg = cfg
        self.seed = seed
        self.samples: dict[str, Sample] = {s.uid: s for s in samples}
        self._order = list(uids)
        random.Random(f"pool:{seed}").shuffle(self._order)
        self._cursor = 0  # next position in _order to draw
        self.stats: dict[str, PromptStats] = {}
        self.passes = 0  # filter passes done
        self.refill()

    # ---- composition of the pool

    def capability(self, uid: str) -> str:
        return self.samples[uid].capability

    def uids(self, *statuses: Status) -> list[str]:
        return [u for u, st in self.stats.items() if st.status in statuses]

    def trainable_by_capability(self) -> dict[str, list[str]]:
        return by_capability(self.samples[u] for u in self.uids(*TRAINABLE))

    def refill(self) -> int:
        """Draw fresh prompts until ``capacity`` are trainable or the dataset is used up; returns count."""
        drawn = 0
        trainable = len(self.uids(*TRAINABLE))
        while trainable < self.cfg.pool_size and self._cursor < len(self._order):
            uid = self._order[self._cursor]
            self._cursor += 1
            if uid not in self.stats:
                self.stats[uid] = PromptStats()
                drawn += 1
                trainable += 1
        return drawn

    def band_at(self, step: int) -> tuple[float, float]:
        c = self.cfg
        if c.band_final is None or c.band_steps <= 0:
            return (c.band[0], c.band[1])
        f = min(max(step / c.band_steps, 0.0), 1.0)
        return (c.band[0] + f * (c.band_final[0] - c.band[0]), c.band[1] + f * (c.band_final[1] - c.band[1]))

    # ---- evidence

    def due_for_check(self) -> list[str]:
        """Prompts the next filter pass should sample: new, active, easy, the backlog when due, and up to
        ``retired_recheck`` retired ones (in turn), in case the policy forgot them."""
        due = self.uids("new", "active", "easy")
        every = self.cfg.backlog_recheck_every
        due += [
            u
            for u in self.uids("backlog")
            if (self.passes + 1 - self.stats[u].backlog_since_pass) % every == 0
        ]
        retired = sorted(self.uids("retired"), key=lambda u: (self.stats[u].last_check_step, u))
        return due + retired[: self.cfg.retired_recheck]

    def _record(self, st: PromptStats, n: int, c: int) -> None:
        st.rate = c / n
        st.solved_streak = st.solved_streak + 1 if c == n else 0

    def band_of(self, uid: str, step: int) -> tuple[float, float]:
        """The band at ``step`` for this prompt's capability (``bands`` overrides the moving band)."""
        band = self.cfg.bands.get(self.capability(uid))
        return (band[0], band[1]) if band is not None else self.band_at(step)

    def rate_of(self, n: int, c: int) -> float:
        """The pass rate the band is compared with: pass@1 = c/n, or the unbiased pass@k (``band_metric``)."""
        return c / n if self.cfg.band_metric == "pass@1" else pass_at_k(n, c, min(self.cfg.pass_k, n))

    def _classify(self, uid: str, n: int, c: int, step: int) -> Status:
        """The status rule of a check (filter pass, or the first training group of a new prompt):
        retired if the all-correct streak reached ``retire_after``; active if the rate is inside the
        band (and not 0 of n); else backlog (below, or 0 of n) or easy (above) — abandoned instead after
        ``max_rechecks`` checks in a row outside the band."""
        st = self.stats[uid]
        lo, hi = self.band_of(uid, step)
        rate = self.rate_of(n, c)
        if st.solved_streak >= self.cfg.retire_after:
            st.outside = 0
            return "retired"
        if c > 0 and lo <= rate <= hi:
            st.outside = 0
            return "active"
        st.outside += 1
        if st.outside >= self.cfg.max_rechecks:
            return "abandoned"
        return "backlog" if c == 0 or rate < lo else "easy"

    def _move(self, st: PromptStats, new: Status) -> None:
        if new == "backlog" and st.status != "backlog":
            st.backlog_since_pass = self.passes
        st.status = new

    def observe(self, uid: str, n: int, c: int, step: int) -> None:
        """A training group of prompt ``uid``: ``c`` of ``n`` completions correct.

        Updates the statistics; all-correct groups count toward retirement (``retire_after``). A *new*
        prompt's first group is its admission check: the status rule applies at once, so a prompt
        drawn between filter passes does not train until the next one before it is measured. A prompt
        leaving the trainable set here is replaced by ``refill`` (called by the loop after observing).
        """
        if not 0 <= c <= n or n < 1:
            raise ValueError(f"observe({uid!r}): need 0 <= c <= n and n >= 1, got n={n}, c={c}")
        st = self.stats[uid]
        st.train_groups += 1
        st.train_samples += n
        st.train_correct += c
        self._record(st, n, c)
        if st.status == "new":
            self._move(st, self._classify(uid, n, c, step))
        elif st.status in TRAINABLE and st.solved_streak >= self.cfg.retire_after:
            st.status = "retired"

    def observe_unscored(self, uid: str) -> None:
        """A check of ``uid`` in which no completion could be scored (every reward None: no answer to
        compare with, a verifier that fails on the reference). It never trains and is not re-checked."""
        st = self.stats[uid]
        if st.status != "unscorable":
            st.status = "unscorable"

    def filter_pass(
        self,
        results: Mapping[str, tuple[int, int]],
        step: int,
        k: int | None = None,
        unscored: Iterable[str] = (),
    ) -> FilterReport:
        """Apply one filter pass: ``results[uid] = (n, c)`` from the current policy, at training ``step``
        (the status rule: ``_classify``); ``unscored``: checked prompts none of whose completions could
        be scored (status unscorable). Then refills. ``k`` (default: the smallest n) is the k of the
        logged pass@k."""
        lo, hi = self.band_at(step)
        self.passes += 1
        for uid in unscored:
            self.observe_unscored(uid)
        for uid, (n, c) in results.items():
            if uid not in self.stats:
                raise KeyError(f"filter_pass: prompt {uid!r} is not in the pool (check due_for_check())")
            if not 0 <= c <= n or n < 1:
                raise ValueError(f"filter_pass({uid!r}): need 0 <= c <= n and n >= 1, got n={n}, c={c}")
            st = self.stats[uid]
            st.checks += 1
            st.last_n, st.last_c, st.last_check_step = n, c, step
            self._record(st, n, c)
            self._move(st, self._classify(uid, n, c, step))
        report = FilterReport(step=step, band=(lo, hi), checked=len(results))
        report.moved = dict(Counter(self.stats[u].status for u in results))
        if results:
            kk = k if k is not None else min(n for n, _ in results.values())
            rows = [(self.capability(u), n, c) for u, (n, c) in results.items()]
            report.pass_at = pass_at_k_table(rows, sorted({1, kk}))
        self.refill()
        return report

    # ---- dashboard and resume

    def metrics(self, step: int, bins: int = 5) -> dict[str, float]:
        """Counts per status and per capability, the band, and a histogram of known pass rates of
        the trainable prompts (``curriculum/pool/rate_hist/<lo>-<hi>``; unknown rates go to ``.../unknown``)."""
        counts = Counter(st.status for st in self.stats.values())
        out: dict[str, float] = {f"curriculum/pool/{s}": float(counts.get(s, 0)) for s in STATUSES}
        per_cap = Counter((self.capability(u), st.status) for u, st in self.stats.items())
        out |= {f"curriculum/pool/{status}/{cap}": float(n) for (cap, status), n in sorted(per_cap.items())}
        out["curriculum/pool/trainable"] = out["curriculum/pool/new"] + out["curriculum/pool/active"]
        out["curriculum/pool/drawn"] = float(self._cursor)
        out["curriculum/pool/unused"] = float(len(self._order) - self._cursor)
        lo, hi = self.band_at(step)
        out["curriculum/pool/band_lo"], out["curriculum/pool/band_hi"] = lo, hi
        for cap, uids in sorted(self.trainable_by_capability().items()):
            out[f"curriculum/pool/trainable/{cap}"] = float(len(uids))
        hist = [0] * bins
        unknown = 0
        for uid in self.uids(*TRAINABLE):
            rate = self.stats[uid].rate
            if rate is None:
                unknown += 1
            else:
                hist[min(int(rate * bins), bins - 1)] += 1
        for i, count in enumerate(hist):
            out[f"curriculum/pool/rate_hist/{i / bins:.1f}-{(i + 1) / bins:.1f}"] = float(count)
        out["curriculum/pool/rate_hist/unknown"] = float(unknown)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": _fingerprint(self.samples),
            "settings": {"seed": self.seed, **asdict(self.cfg)},
            "order": list(self._order),
            "cursor": self._cursor,
            "passes": self.passes,
            "stats": {u: asdict(st) for u, st in self.stats.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["fingerprint"] != _fingerprint(self.samples):
            raise ValueError(
                "PromptPool.load_state_dict: the saved pool was built from a different prompt set "
                "(data source, num_train or seed changed since the run was saved); restore those settings "
                "or start a new run"
            )
        self._order = list(state["order"])
        self._cursor = int(state["cursor"])
        self.passes = int(state["passes"])
        self.stats = {u: PromptStats(**st) for u, st in state["stats"].items()}


def _fingerprint(samples: Mapping[str, Sample]) -> str:
    import hashlib

    h = hashlib.sha256()
    for uid in sorted(samples):
        h.update(uid.encode())
        h.update(b"\0")
        h.update(samples[uid].prompt.encode())
        h.update(b"\0")
    return f"{len(samples)}:{h.hexdigest()[:16]}"


# --------------------------------------------------------------------------------------------------
# Capability-stratified sampling


class StratifiedSampler:
    """Draws a batch of prompts with a fixed share per capability.

    For a batch of ``size``, capability ``j`` gets ``floor(w_j * size)`` prompts (weights normalised
    over the capabilities that have trainable prompts), and the leftover slots go to capabilities
    drawn in proportion to the fractional parts, so every batch mixes capabilities as the weights say
    and the long-run shares equal the weights exactly in expectation. A capability with too few
    prompts gives its slots to the others. Prompts within a capability are drawn uniformly without
    replacement. Unlisted capabilities get weight ``default_weight``.
    """

    def __init__(
        self, weights: Mapping[str, float] | None = None, seed: int = 0, default_weight: float = 1.0
    ):
        self.weights = dict(weights or {})
        if any(w < 0 or not math.isfinite(w) for w in self.weights.values()):
            raise ValueError(
                f"StratifiedSampler: capability weights must be finite and >= 0, got {self.weights}"
            )
        self.default_weight = default_weight
        self.rng = random.Random(f"sampler:{seed}")

    def quotas(self, available: Mapping[str, int], size: int) -> dict[str, int]:
        caps = sorted(
            c for c, n in available.items() if n > 0 and self.weights.get(c, self.default_weight) > 0
        )
        quota = dict.fromkeys(caps, 0)
        remaining = min(size, sum(available[c] for c in caps))
        while remaining > 0:
            open_caps = [c for c in caps if quota[c] < available[c]]
            total_w = sum(self.weights.get(c, self.default_weight) for c in open_caps)
            exact = {c: remaining * self.weights.get(c, self.default_weight) / total_w for c in open_caps}
            add = {c: min(int(exact[c]), available[c] - quota[c]) for c in open_caps}
            if sum(add.values()) == 0:  # hand one slot out in proportion to the fractional parts
                frac = [exact[c] - int(exact[c]) for c in open_caps]
                pick = self.rng.choices(open_caps, weights=frac if sum(frac) > 0 else None)[0]
                add = {pick: 1}
            for c, a in add.items():
                quota[c] += a
                remaining -= a
        return quota

    def sample(
        self, by_capability: Mapping[str, Sequence[str]], size: int, exclude: Iterable[str] = ()
    ) -> list[str]:
        """Up to ``size`` distinct uids from ``by_capability`` (capability -> uids), none of ``exclude``."""
        skip = set(exclude)
        pools = {c: sorted(u for u in uids if u not in skip) for c, uids in by_capability.items()}
        quota = self.quotas({c: len(u) for c, u in pools.items()}, size)
        out: list[str] = []
        for cap in sorted(quota):
            out += self.rng.sample(pools[cap], quota[cap])
        self.rng.shuffle(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self.rng.getstate()
        return {"weights": dict(self.weights), "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))


__all__ = [
    "FilterReport",
    "by_capability",
    "count_by",
    "group_metrics",
    "pass_at_k_table",
    "PromptPool",
    "PromptStats",
    "StratifiedSampler",
    "pass_at_k",
]
