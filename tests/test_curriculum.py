"""Reference tests for the pass@k estimator, the prompt pool and the capability-stratified sampler."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections import Counter

import pytest

from posttrain.config import CurriculumConfig
from posttrain.curriculum import PromptPool, StratifiedSampler, pass_at_k
from posttrain.types import Sample

# ---------------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_equals_brute_force_over_subsets() -> None:
    """pass@k = fraction of the C(n, k) size-k subsets of the n samples that hold >= 1 correct one."""
    for n in range(1, 9):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n() -> None:
    """n = 500: the binomials overflow floats (C(500, 250) ~ 1e149 is fine, but exact integer
    arithmetic is the independent reference); the product form must agree."""
    for n, c, k in [(500, 3, 250), (500, 1, 1), (500, 499, 2), (200, 50, 10)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15)


def test_pass_at_k_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 2, 5)


# ---------------------------------------------------------------------------------------------------
# The pool


def _samples(rates: list[float], capability: str = "add") -> list[Sample]:
    return [
        Sample(prompt=f"p{i}", columns={"capability": capability, "rate": r}, uid=f"{capability}{i}")
        for i, r in enumerate(rates)
    ]


def _stub_pass(pool: PromptPool, n: int, step: int, shift: float = 0.0) -> dict[str, tuple[int, int]]:
    """A stub policy that solves prompt i in exactly round(n * rate_i) of n samples (+ ``shift``).

    The filter-pass logic is under test, not sampling: a deterministic success count isolates the
    pool's decisions from sampling noise, so the expected statuses can be written down exactly.
    The real policy path (vLLM sampling + reward) is exercised by tests/test_rl_stage.py.
    """
    out = {}
    for uid in pool.due_for_check():
        rate = min(1.0, pool.samples[uid].columns["rate"] + shift)
        out[uid] = (n, round(n * rate))
    return out


RATES = [i / 8 for i in range(9)] * 2  # 0, 1/8, ..., 1, twice: 18 prompts


def test_filter_pass_keeps_exactly_the_band() -> None:
    """Band [0.25, 0.75], retire after 1 all-correct check, 8 samples: prompts at 2/8..6/8 stay
    active; 8/8 retire; 0/8 and 1/8 go to the backlog; 7/8 are easy (out, but not retired)."""
    pool = PromptPool(_samples(RATES), CurriculumConfig(pool_size=100, band=(0.25, 0.75), retire_after=1))
    assert len(pool.uids("new")) == 18
    report = pool.filter_pass(_stub_pass(pool, n=8, step=0), step=0)
    by_rate = {uid: pool.samples[uid].columns["rate"] for uid in pool.samples}
    assert sorted(by_rate[u] for u in pool.uids("active")) == sorted(r for r in RATES if 0.25 <= r <= 0.75)
    assert sorted(by_rate[u] for u in pool.uids("retired")) == [1.0, 1.0]
    assert sorted(by_rate[u] for u in pool.uids("backlog")) == [0.0, 0.0, 0.125, 0.125]
    assert sorted(by_rate[u] for u in pool.uids("easy")) == [0.875, 0.875]
    assert report.checked == 18 and report.moved == {"active": 10, "retired": 2, "backlog": 4, "easy": 2}
    # pass@1 = mean rate = 0.5; pass@8 = 1 - (#prompts with c = 0) / 18 = 16/18
    assert report.pass_at["pass@1"] == pytest.approx(0.5)
    assert report.pass_at["pass@8"] == pytest.approx(16 / 18)
    assert report.pass_at["add/pass@1"] == pytest.approx(0.5)


def test_retire_only_when_reliably_solved() -> None:
    """Default band [0, 1]: a prompt at 7/8 stays trainable however often it is checked (its last
    step to 1.0 still teaches); 8/8 retires only on the ``retire_after``-th consecutive all-correct
    check, and a training group counts as a check."""
    pool = PromptPool(_samples([0.875, 1.0, 1.0]), CurriculumConfig(pool_size=10, retire_after=2))
    for step in range(3):
        pool.filter_pass({"add0": (8, 7)}, step=step)
    assert pool.stats["add0"].status == "active"
    pool.filter_pass({"add1": (8, 8), "add2": (8, 8)}, step=3)
    assert pool.stats["add1"].status == "active" and pool.stats["add1"].solved_streak == 1
    pool.observe("add1", n=8, c=8, step=4)  # second all-correct check in a row: retire
    pool.observe("add2", n=8, c=7, step=4)  # streak broken
    assert pool.stats["add1"].status == "retired"
    assert pool.stats["add2"].status == "active" and pool.stats["add2"].solved_streak == 0
    assert pool.stats["add2"].train_correct == 7 and pool.stats["add2"].rate == 7 / 8


def test_backlog_is_rechecked_and_returns_when_the_policy_improves() -> None:
    pool = PromptPool(_samples([0.0, 0.5]), CurriculumConfig(pool_size=10, backlog_recheck_every=2))
    pool.filter_pass(_stub_pass(pool, 8, step=0), step=0)
    assert pool.stats["add0"].status == "backlog"
    assert "add0" not in pool.due_for_check()  # skipped by the next pass ...
    pool.filter_pass(_stub_pass(pool, 8, step=10), step=10)
    assert "add0" in pool.due_for_check()  # ... re-checked by the one after
    pool.filter_pass(_stub_pass(pool, 8, step=20, shift=0.25), step=20)  # the policy got better
    assert pool.stats["add0"].status == "active"


def test_refill_tops_up_the_trainable_set_from_the_dataset() -> None:
    pool = PromptPool(_samples(RATES), CurriculumConfig(pool_size=6, band=(0.25, 0.75), retire_after=1))
    assert len(pool.uids("new")) == 6 and pool.metrics(0)["curriculum/pool/unused"] == 12
    pool.filter_pass(_stub_pass(pool, 8, step=0), step=0)
    assert len(pool.uids("new", "active")) == 6  # whatever left was replaced by fresh prompts
    assert pool.metrics(0)["curriculum/pool/drawn"] == 6 + len(pool.uids("new"))


def test_band_moves_toward_harder_prompts_on_schedule() -> None:
    """band [0.25, 1] -> [0.125, 0.5] over 100 steps: at step 50 it is [0.1875, 0.75]; a prompt at 6/8
    is active then, and easy at step 100."""
    s = CurriculumConfig(pool_size=10, band=(0.25, 1.0), band_final=(0.125, 0.5), band_steps=100)
    pool = PromptPool(_samples([0.75]), s)
    assert pool.band_at(50) == pytest.approx((0.1875, 0.75))
    assert pool.band_at(1000) == pytest.approx((0.125, 0.5))
    pool.filter_pass({"add0": (8, 6)}, step=50)
    assert pool.stats["add0"].status == "active"
    pool.filter_pass({"add0": (8, 6)}, step=100)
    assert pool.stats["add0"].status == "easy"


def test_pool_and_sampler_state_equal_after_save_and_load() -> None:
    """Save mid-run through JSON (what a checkpoint holds), load into fresh objects built from the same
    data, and continue both: the states and the draws stay identical."""
    data = _samples(RATES, "add") + _samples(RATES, "mul")
    settings = CurriculumConfig(pool_size=12, band=(0.25, 1.0), retire_after=2)
    pool, sampler = PromptPool(data, settings, seed=3), StratifiedSampler({"add": 2.0, "mul": 1.0}, seed=5)
    pool.filter_pass(_stub_pass(pool, 8, step=0), step=0)
    for uid in sampler.sample(pool.trainable_by_capability(), 6):
        pool.observe(uid, 8, 8, step=1)
    pool.refill()
    saved = json.loads(json.dumps({"pool": pool.state_dict(), "sampler": sampler.state_dict()}))

    pool2, sampler2 = PromptPool(data, settings, seed=3), StratifiedSampler({"add": 2.0, "mul": 1.0}, seed=99)
    pool2.load_state_dict(saved["pool"])
    sampler2.load_state_dict(saved["sampler"])
    assert pool2.state_dict() == pool.state_dict()
    assert pool2.metrics(1) == pool.metrics(1)
    for step in (2, 3):
        a = sampler.sample(pool.trainable_by_capability(), 6)
        b = sampler2.sample(pool2.trainable_by_capability(), 6)
        assert a == b
        for p, uids in ((pool, a), (pool2, b)):
            for uid in uids:
                p.observe(uid, 8, 8, step=step)
            p.filter_pass(_stub_pass(p, 8, step=step, shift=0.125), step=step)
    assert pool2.state_dict() == pool.state_dict()


def test_load_rejects_a_different_prompt_set() -> None:
    pool = PromptPool(_samples(RATES), CurriculumConfig())
    other = PromptPool(_samples(RATES[:-1]), CurriculumConfig())
    with pytest.raises(ValueError, match="different prompt set"):
        other.load_state_dict(pool.state_dict())


def test_duplicate_uids_are_an_error() -> None:
    with pytest.raises(ValueError, match="unique"):
        PromptPool([Sample("a", uid="x"), Sample("b", uid="x")], CurriculumConfig())


# ---------------------------------------------------------------------------------------------------
# Stratified sampling


def _by_cap(sizes: dict[str, int]) -> dict[str, list[str]]:
    return {c: [f"{c}{i}" for i in range(n)] for c, n in sizes.items()}


def test_stratified_batches_hold_the_weighted_shares_exactly() -> None:
    """Weights add 2 : mul 1 : rev 1 and a batch of 16 -> exactly 8 / 4 / 4 in every batch, distinct."""
    sampler = StratifiedSampler({"add": 2.0, "mul": 1.0, "rev": 1.0}, seed=0)
    pools = _by_cap({"add": 50, "mul": 50, "rev": 50})
    for _ in range(20):
        batch = sampler.sample(pools, 16)
        assert len(set(batch)) == 16
        assert Counter(u[:3] for u in batch) == {"add": 8, "mul": 4, "rev": 4}


def test_stratified_long_run_shares_with_fractional_quotas() -> None:
    """Batch of 10 with weights 0.5 / 0.3 / 0.2 split 5 / 3 / 2 exactly; with 1 / 1 / 1 a batch of 10
    has 3 / 3 / 3 + one slot drawn evenly, so over 3000 batches each share is 1/3 +- 0.01."""
    sampler = StratifiedSampler({"a": 0.5, "b": 0.3, "c": 0.2}, seed=1)
    assert Counter(u[0] for u in sampler.sample(_by_cap({"a": 20, "b": 20, "c": 20}), 10)) == {
        "a": 5,
        "b": 3,
        "c": 2,
    }
    even = StratifiedSampler({}, seed=2)
    counts: Counter[str] = Counter()
    for _ in range(3000):
        batch = even.sample(_by_cap({"a": 20, "b": 20, "c": 20}), 10)
        assert sorted(Counter(u[0] for u in batch).values()) in ([3, 3, 4],)
        counts.update(u[0] for u in batch)
    for cap in "abc":
        assert counts[cap] / 30000 == pytest.approx(1 / 3, abs=0.01)


def test_stratified_gives_slots_of_a_short_capability_to_the_others() -> None:
    """mul has 2 prompts left, its quota is 8 of 16: it gives 2, add takes the remaining 14."""
    sampler = StratifiedSampler({"add": 1.0, "mul": 1.0}, seed=0)
    batch = sampler.sample(_by_cap({"add": 30, "mul": 2}), 16)
    assert Counter(u[:3] for u in batch) == {"add": 14, "mul": 2}
    excluded = sampler.sample(_by_cap({"add": 30, "mul": 2}), 16, exclude=["mul0", "mul1"])
    assert all(u.startswith("add") for u in excluded) and len(excluded) == 16


# --------------------------------------------------------------------------------------------------
# The curriculum's rules for prompts that would otherwise linger


def test_unscorable_prompts_get_a_status_and_never_train() -> None:
    pool = PromptPool(_samples([0.5, 0.5]), CurriculumConfig(pool_size=10))
    pool.filter_pass({"add0": (8, 4)}, step=0, unscored=["add1"])
    assert pool.stats["add1"].status == "unscorable"
    assert "add1" not in [u for v in pool.trainable_by_capability().values() for u in v]
    assert "add1" not in pool.due_for_check() and pool.metrics(0)["curriculum/pool/unscorable"] == 1
    pool.observe_unscored("add0")  # a training group whose completions all scored None
    assert pool.stats["add0"].status == "unscorable"


def test_a_new_prompts_first_training_group_is_its_check() -> None:
    """band [0.25, 0.75]: a new prompt trained once at 8/8 is easy (above) at once, at 0/8 backlog, at
    4/8 active — it does not train on until the next filter pass decides."""
    pool = PromptPool(
        _samples([0.0, 0.5, 1.0]), CurriculumConfig(pool_size=10, band=(0.25, 0.75), retire_after=3)
    )
    for uid, c in (("add0", 0), ("add1", 4), ("add2", 8)):
        assert pool.stats[uid].status == "new"
        pool.observe(uid, 8, c, step=1)
    assert [pool.stats[u].status for u in ("add0", "add1", "add2")] == ["backlog", "active", "easy"]


def test_prompts_outside_the_band_are_abandoned_after_max_rechecks() -> None:
    pool = PromptPool(
        _samples([1.0]), CurriculumConfig(pool_size=10, band=(0.0, 0.5), max_rechecks=3, retire_after=99)
    )
    for step in range(3):
        assert "add0" in pool.due_for_check()
        pool.filter_pass({"add0": (8, 7)}, step=step)
    assert pool.stats["add0"].status == "abandoned" and "add0" not in pool.due_for_check()


def test_retired_prompts_are_rechecked_a_few_at_a_time() -> None:
    pool = PromptPool(_samples([1.0] * 6), CurriculumConfig(pool_size=6, retire_after=1, retired_recheck=2))
    pool.filter_pass({f"add{i}": (8, 8) for i in range(6)}, step=0)
    assert all(pool.stats[f"add{i}"].status == "retired" for i in range(6))
    due = [u for u in pool.due_for_check() if pool.stats[u].status == "retired"]
    assert len(due) == 2
    pool.filter_pass({due[0]: (8, 5), due[1]: (8, 8)}, step=1)  # the policy forgot one of them
    assert pool.stats[due[0]].status == "active" and pool.stats[due[1]].status == "retired"
    later = [u for u in pool.due_for_check() if pool.stats[u].status == "retired"]
    assert due[1] not in later  # the ones checked longest ago come first


def test_the_band_metric_is_explicit_and_bands_can_be_per_capability() -> None:
    """1 of 8 correct: pass@1 = 0.125, pass@4 = 1 - C(7,4)/C(8,4) = 1 - 35/70 = 0.5. Band [0.4, 1]."""
    samples = _samples([0.125], "add") + _samples([0.125], "mul")
    cfg = CurriculumConfig(pool_size=10, band=(0.4, 1.0), pass_k=4, retire_after=9)
    by_pass1 = PromptPool(samples, cfg)
    by_passk = PromptPool(samples, dataclasses.replace(cfg, band_metric="pass@k"))
    per_cap = PromptPool(samples, dataclasses.replace(cfg, bands={"mul": (0.1, 0.2)}))
    for p in (by_pass1, by_passk, per_cap):
        p.filter_pass({"add0": (8, 1), "mul0": (8, 1)}, step=0)
    assert by_pass1.stats["add0"].status == "backlog" and by_passk.stats["add0"].status == "active"
    assert per_cap.stats["add0"].status == "backlog" and per_cap.stats["mul0"].status == "active"
    assert per_cap.metrics(0)["curriculum/pool/active/mul"] == 1


def test_kept_groups_follow_the_capability_quotas() -> None:
    """Informative groups come mostly from the easy capability (the hard one is often all-wrong); the
    kept set still takes the sampler's shares (2:1 here), not the draw order's."""
    from posttrain.stages.rl import _by_quota

    by_uid = {f"a{i}": Sample("x", {"capability": "add"}, f"a{i}") for i in range(10)}
    by_uid |= {f"m{i}": Sample("x", {"capability": "mul"}, f"m{i}") for i in range(10)}
    informative = [f"m{i}" for i in range(6)] + [f"a{i}" for i in range(6)]
    kept = _by_quota(informative, 6, StratifiedSampler({"add": 2.0, "mul": 1.0}, seed=0), by_uid)
    assert sorted(kept) == ["a0", "a1", "a2", "a3", "m0", "m1"]
