"""RewardRunner: weighted totals, and rewards that raise / hang / return NaN or the wrong length are
isolated to the samples they affect and counted (or stop the run under ``strict``)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest

from posttrain.config import RewardsConfig, RewardSpec
from posttrain.errors import MissingDependencyError
from posttrain.plugins import reward
from posttrain.registry import RegistryError
from posttrain.reward_runner import RewardFailure, RewardRunner

# Test rewards, registered once for this module under names no built-in uses.


@reward("t_first_char", doc="1.0 if the completion starts with 'y', None if it is empty")
def t_first_char(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    return [None if not c else 1.0 if c[0] == "y" else 0.0 for c in completions]


@reward("t_half_if_long")
def t_half_if_long(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    return [0.5 if len(c) > 2 else None for c in completions]


@reward("t_raises_on_boom")
def t_raises_on_boom(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    if any("boom" in c for c in completions):
        raise ValueError("cannot score boom")
    return [1.0] * len(completions)


@reward("t_hangs_on_hang")
def t_hangs_on_hang(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    if any("hang" in c for c in completions):
        time.sleep(30)
    return [1.0] * len(completions)


@reward("t_odd_values")
def t_odd_values(prompts: list[str], completions: list[str], **_: object) -> list[object]:
    table = {"nan": math.nan, "inf": math.inf, "text": "high", "bool": True}
    return [table.get(c, 0.25) for c in completions]


@reward("t_one_too_many")
def t_one_too_many(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    return [1.0] * (len(completions) + 1)


@reward("t_drops_in_batches")
def t_drops_in_batches(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    """Loses the last value when called on more than one sample."""
    values: list[float | None] = [float(len(c)) for c in completions]
    return values[:-1] if len(values) > 1 else values


@reward("t_async")
async def t_async(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    await asyncio.sleep(0.01)
    return [float(len(c)) for c in completions]


@reward("t_async_hangs")
async def t_async_hangs(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    await asyncio.sleep(30)
    return [1.0] * len(completions)


@reward("t_with_kwargs")
def t_with_kwargs(
    prompts: list[str], completions: list[str], target: list[str], bonus: float = 0.0, **_: object
) -> list[float | None]:
    return [(1.0 if c == t else 0.0) + bonus for c, t in zip(completions, target, strict=True)]


@reward("t_own_timeout", timeout_s=0.25)
def t_own_timeout(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    return [0.0] * len(completions)


@reward("t_needs_missing_module", requires={"posttrain_no_such_module": "nothing"})
def t_needs_missing_module(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    return [0.0] * len(completions)


SETUP_CALLS: list[dict[str, object]] = []


@reward("t_with_setup", setup=SETUP_CALLS.append)
def t_with_setup(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    return [1.0] * len(completions)


def runner(*specs: RewardSpec, strict: bool = False) -> RewardRunner:
    return RewardRunner(RewardsConfig(specs=specs, strict=strict))


def score(r: RewardRunner, completions: list[str], **columns: list[object]):  # type: ignore[no-untyped-def]
    return r.score_detailed(["p"] * len(completions), completions, columns)


# --------------------------------------------------------------------------------------------------


def test_weighted_total_by_hand() -> None:
    """Completions "yes", "no", "" with A = t_first_char (weight 2) and B = t_half_if_long (weight -1):

    A = [1, 0, None], B = [0.5, None, None]
      total[0] = 2*1 + (-1)*0.5 = 1.5;  total[1] = 2*0 = 0.0 (B does not apply);  total[2] = None (none apply)
      A: mean 0.5, std 0.5 over [1, 0], 1 not applicable;  B: mean 0.5, std 0, 2 not applicable
      reward/total/mean = (1.5 + 0) / 2 = 0.75
    """
    r = runner(RewardSpec("t_first_char", weight=2.0), RewardSpec("t_half_if_long", weight=-1.0))
    totals, metrics = r.score(["p"] * 3, ["yes", "no", ""], {})
    assert totals == [1.5, 0.0, None]
    assert metrics["reward/t_first_char/mean"] == 0.5 and metrics["reward/t_first_char/std"] == 0.5
    assert metrics["reward/t_first_char/not_applicable"] == 1.0
    assert metrics["reward/t_half_if_long/mean"] == 0.5 and metrics["reward/t_half_if_long/std"] == 0.0
    assert metrics["reward/t_half_if_long/not_applicable"] == 2.0
    assert metrics["reward/total/mean"] == 0.75
    assert metrics["reward/failed_samples"] == 0.0
    for name in ("t_first_char", "t_half_if_long"):
        for key in ("errors", "timeouts", "nan", "wrong_length", "batch_failures"):
            assert metrics[f"reward/{name}/{key}"] == 0.0
        assert metrics[f"reward/{name}/seconds"] >= 0.0


def test_columns_and_spec_kwargs_reach_the_reward() -> None:
    r = runner(RewardSpec("t_with_kwargs", kwargs={"bonus": 0.5}))
    totals, _ = r.score(["p", "p"], ["a", "b"], {"target": ["a", "c"]})
    assert totals == [1.5, 0.5]
    with pytest.raises(ValueError, match="clash with dataset columns"):
        r.score(["p"], ["a"], {"target": ["a"], "bonus": [1.0]})


def test_a_raising_reward_is_isolated_to_the_samples_it_fails_on() -> None:
    r = runner(RewardSpec("t_raises_on_boom"), RewardSpec("t_first_char"))
    report = score(r, ["yes", "no", "boom", "yay"])
    boom = report.outcomes[0]
    assert boom.status == ["ok", "ok", "error", "ok"]
    assert "ValueError: cannot score boom" in boom.messages[2]
    assert boom.batch_failure.startswith("error")
    assert report.totals == [
        2.0,
        1.0,
        None,
        2.0,
    ]  # the other reward still scored sample 2, but its total is void
    assert report.outcomes[1].status == ["ok"] * 4
    assert report.metrics["reward/t_raises_on_boom/errors"] == 1.0
    assert report.metrics["reward/t_raises_on_boom/batch_failures"] == 1.0
    assert report.metrics["reward/failed_samples"] == 1.0
    assert report.metrics["reward/t_raises_on_boom/mean"] == 1.0  # over the 3 samples it scored


def test_a_hanging_reward_times_out_only_where_it_hangs() -> None:
    r = runner(RewardSpec("t_hangs_on_hang", timeout_s=0.5))
    start = time.perf_counter()
    report = score(r, ["a", "hang", "b"])
    elapsed = time.perf_counter() - start
    assert report.outcomes[0].status == ["ok", "timeout", "ok"]
    assert report.totals == [1.0, None, 1.0]
    assert report.metrics["reward/t_hangs_on_hang/timeouts"] == 1.0
    assert elapsed < 5  # one timeout for the batch, one for the one-by-one retries: not 30 s


def test_a_hung_single_sample_times_out() -> None:
    report = score(runner(RewardSpec("t_hangs_on_hang", timeout_s=0.3)), ["hang"])
    assert report.outcomes[0].status == ["timeout"] and report.totals == [None]


def test_nan_inf_and_non_numbers_are_isolated() -> None:
    report = score(runner(RewardSpec("t_odd_values")), ["nan", "inf", "text", "bool", "x"])
    o = report.outcomes[0]
    assert o.status == ["nan", "nan", "error", "ok", "ok"]
    assert o.values == [None, None, None, 1.0, 0.25]
    assert report.totals == [None, None, None, 1.0, 0.25]
    assert report.metrics["reward/t_odd_values/nan"] == 2.0
    assert report.metrics["reward/t_odd_values/errors"] == 1.0
    assert report.metrics["reward/failed_samples"] == 3.0


def test_wrong_length_is_retried_per_sample_and_counted() -> None:
    always = score(runner(RewardSpec("t_one_too_many")), ["a", "b", "c"])
    assert always.outcomes[0].status == ["wrong_length"] * 3
    assert always.metrics["reward/t_one_too_many/wrong_length"] == 3.0
    assert always.totals == [None, None, None]

    batch_only = score(runner(RewardSpec("t_drops_in_batches")), ["a", "bb", "ccc"])
    assert batch_only.outcomes[0].status == ["ok"] * 3  # one by one it works
    assert batch_only.totals == [1.0, 2.0, 3.0]
    assert batch_only.metrics["reward/t_drops_in_batches/batch_failures"] == 1.0
    assert batch_only.outcomes[0].batch_failure == "wrong_length: returned 2 values for 3 samples"


def test_async_rewards_run_and_time_out() -> None:
    totals, _ = runner(RewardSpec("t_async")).score(["p", "p"], ["ab", "abcd"], {})
    assert totals == [2.0, 4.0]
    start = time.perf_counter()
    report = score(runner(RewardSpec("t_async_hangs", timeout_s=0.3)), ["a", "b"])
    assert report.outcomes[0].status == ["timeout", "timeout"]
    assert time.perf_counter() - start < 5


def test_strict_raises_naming_the_reward_and_the_failure() -> None:
    with pytest.raises(
        RewardFailure, match=r"'t_raises_on_boom' raised on a batch of 2: ValueError: cannot score boom"
    ):
        score(runner(RewardSpec("t_raises_on_boom"), strict=True), ["ok", "boom"])
    with pytest.raises(RewardFailure, match=r"'t_odd_values' failed on sample 1 \(nan\)"):
        score(runner(RewardSpec("t_odd_values"), strict=True), ["x", "nan"])
    with pytest.raises(RewardFailure, match="timeout"):
        score(runner(RewardSpec("t_hangs_on_hang", timeout_s=0.3), strict=True), ["hang", "b"])


def test_unknown_reward_lists_the_valid_names() -> None:
    with pytest.raises(
        RegistryError, match=r"unknown reward 'exact_mach'\. Did you mean 'exact_match'\?.*code_exec"
    ):
        runner(RewardSpec("exact_mach"))


def test_import_path_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards_mod.py").write_text(
        "def shorter_is_better(prompts, completions, **_):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    totals, metrics = runner(RewardSpec("my_rewards_mod:shorter_is_better")).score(
        ["p", "p"], ["", "abc"], {}
    )
    assert totals == [1.0, 0.25]
    assert metrics["reward/shorter_is_better/mean"] == 0.625
    with pytest.raises(RegistryError, match="has no attribute 'nope'"):
        runner(RewardSpec("my_rewards_mod:nope"))


def test_missing_optional_dependency_fails_at_start_naming_the_extra() -> None:
    with pytest.raises(MissingDependencyError, match=r"pip install 'posttrain\[nothing\]'"):
        runner(RewardSpec("t_needs_missing_module"))


def test_timeout_comes_from_the_recipe_else_the_reward_else_30_s() -> None:
    assert runner(RewardSpec("t_own_timeout")).rewards[0].timeout_s == 0.25
    assert runner(RewardSpec("t_own_timeout", timeout_s=5.0)).rewards[0].timeout_s == 5.0
    # an explicit 30 is the recipe's choice, even where it equals the fallback
    assert runner(RewardSpec("t_own_timeout", timeout_s=30.0)).rewards[0].timeout_s == 30.0
    assert runner(RewardSpec("t_first_char")).rewards[0].timeout_s == 30.0


def test_setup_hook_runs_once_with_the_spec_kwargs() -> None:
    SETUP_CALLS.clear()
    r = runner(RewardSpec("t_with_setup", kwargs={"judge": "/models/j"}))
    r.score(["p"], ["a"], {})
    r.score(["p"], ["b"], {})
    assert SETUP_CALLS == [{"judge": "/models/j"}]


def test_bad_batch_shapes_name_the_column() -> None:
    r = runner(RewardSpec("t_first_char"))
    with pytest.raises(ValueError, match="2 completions for 3 prompts"):
        r.score(["p"] * 3, ["a", "b"], {})
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 2 samples"):
        r.score(["p"] * 2, ["a", "b"], {"answer": ["x"]})


def test_repeated_rewards_get_distinct_metric_names() -> None:
    r = runner(RewardSpec("exact_match"), RewardSpec("exact_match", weight=0.5))
    totals, metrics = r.score(["p"], ["2"], {"answer": ["2"]})
    assert totals == [1.5]
    assert metrics["reward/exact_match/mean"] == 1.0 and metrics["reward/exact_match_2/mean"] == 1.0


def test_empty_batch() -> None:
    totals, metrics = runner(RewardSpec("exact_match")).score([], [], {"answer": []})
    assert totals == [] and metrics["reward/failed_samples"] == 0.0
