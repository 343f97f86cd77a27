"""Bad input never crashes: a corpus of everyday mistakes, each through the real CLI (``posttrain.cli.main``).

Every case asserts the exit code (2: bad input), exactly one ``posttrain: error:`` line on stderr that
names the file, row, column, key or plugin at fault, no traceback — and that a finished run made
before the corpus is byte-for-byte intact after it (no case may touch an earlier run's outputs).
Cases: recipes (malformed YAML, unknown keys, wrong types, impossible numbers, stage types, missing
sections), data files of every supported format (missing, empty, corrupt, wrong value types, missing
columns for the stage or for the eval's reward), model dirs (missing, no or corrupt config, no or
corrupt weights), rewards and plugins, CLI overrides and run dirs (a finished run, a file in the way,
an unfinished run of another recipe).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from posttrain.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "recipes" / "tiny_sft.yaml"
FAST = ["stages.warmup.max_steps=1", "stages.warmup.save_every=0"]


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished run (``runs/done``) every case must leave as it was, and a tiny model dir."""
    root = tmp_path_factory.mktemp("bad_input")
    assert main(["run", f"recipe={TINY}", f"run.dir={root / 'runs'}", "run.name=done", *FAST]) == 0
    assert (root / "runs" / "done" / "DONE").exists()
    return {
        "root": root,
        "done": root / "runs" / "done",
        "model": root / "runs" / "done" / "warmup" / "checkpoint",
    }


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _model_copy(
    world: dict[str, Path], tmp: Path, *, drop: tuple[str, ...] = (), corrupt: dict[str, bytes] | None = None
) -> Path:
    out = tmp / "model"
    out.mkdir()
    for f in world["model"].iterdir():
        if f.name not in drop:
            (out / f.name).write_bytes((corrupt or {}).get(f.name, f.read_bytes()))
    return out


Case = Callable[[Path, dict[str, Path]], list[str]]  # (case dir, world) -> argv after "run"/"validate"


def data(
    text: str | bytes,
    suffix: str = ".jsonl",
    key: str = "stages.warmup.data.source",
    recipe: Path | str = TINY,
    name: str = "data",
) -> Case:
    return lambda tmp, w: [f"recipe={recipe}", f"{key}={_write(tmp / f'{name}{suffix}', text)}"]


def recipe_file(text: str) -> Case:
    return lambda tmp, w: [f"recipe={_write(tmp / 'mine.yaml', text)}"]


def overrides(*ov: str, recipe: Path | str = TINY) -> Case:
    return lambda tmp, w: [f"recipe={recipe}", *ov]


def model(**kw: object) -> Case:
    return lambda tmp, w: [
        f"recipe={TINY}",
        f"model.name_or_path={_model_copy(w, tmp, **kw)}",
        "model.arch=null",
    ]  # type: ignore[arg-type]


RL_ROW = '{"prompt": "1+1=", "answer": "2"}\n'
CASES: dict[str, tuple[Case, str]] = {
    # recipes and overrides
    "yaml_malformed": (recipe_file("stages:\n  a: {type: sft\n"), r"recipe '.*mine.yaml'"),
    "unknown_key": (
        overrides("stages.warmup.max_step=5"),
        r"unknown key 'stages.warmup.max_step' \(did you mean",
    ),
    "wrong_type": (
        overrides("stages.warmup.max_steps=ten"),
        r"'stages.warmup.max_steps' must be int, got 'ten'",
    ),
    "negative_lr": (overrides("stages.warmup.optim.lr=-1"), r"'stages.warmup.optim.lr' must be > 0, got -1"),
    "prob_over_one": (
        overrides("stages.warmup.optim.min_lr_ratio=1.5"),
        r"'stages.warmup.optim.min_lr_ratio' must be in \[0, 1\]",
    ),
    "zero_micro_batch": (
        overrides("stages.warmup.micro_batch_size=0"),
        r"'stages.warmup.micro_batch_size' must be >= 1",
    ),
    "nan_number": (
        overrides("stages.warmup.optim.lr=nan"),
        r"'stages.warmup.optim.lr' must be a finite number",
    ),
    "beta_one": (
        overrides("stages.warmup.optim.betas=[0.9,1.0]"),
        r"'stages.warmup.optim.betas\[1\]' must be in \[0, 1\)",
    ),
    "rl_greedy": (
        overrides("stages.rl.sampling.temperature=0", recipe="quickstart"),
        r"'stages.rl.sampling.temperature' is 0",
    ),
    "rl_top_p": (
        overrides("stages.rl.sampling.top_p=0.5", recipe="quickstart"),
        r"'stages.rl.sampling.top_p' is 0.5",
    ),
    "rl_group_of_one": (
        overrides("stages.rl.sampling.n=1", recipe="quickstart"),
        r"'stages.rl.sampling.n' must be >= 2",
    ),
    "band_reversed": (
        overrides("stages.rl.curriculum.band=[0.9,0.1]", recipe="quickstart"),
        r"'stages.rl.curriculum.band' must be \[lo, hi\]",
    ),
    "stage_type": (
        overrides("stages.warmup.type=sftt"),
        r"'stages.warmup.type' is 'sftt' \(did you mean 'sft'\?\)",
    ),
    "no_stages": (recipe_file("defaults: [{model: tiny_llama}, _self_]\n"), r"the recipe has no stages"),
    "no_model": (recipe_file("stages:\n  a: {type: sft}\n"), r"missing required key 'model'"),
    "not_key_value": (overrides("max_steps"), r"override 'max_steps' is not key=value"),
    "unknown_recipe": (
        lambda tmp, w: ["recipe=quickstrat"],
        r"unknown recipe 'quickstrat' \(did you mean 'quickstart'\?\)",
    ),
    "bad_interpolation": (overrides("run.name=${nope}"), r"recipe '.*': .*nope"),
    "ep_on_dense": (
        overrides("parallel.ep_size=2", "launcher.nproc_per_node=2"),
        r"parallel.ep_size=2 but the model has no routed experts",
    ),
    "hardware_mismatch": (
        overrides("hardware.gpus=8", "hardware.gpu_memory_gib=80"),
        r"hardware.gpus=8 but the launcher starts 1 ranks",
    ),
    # data files
    "data_missing": (
        lambda tmp, w: [f"recipe={TINY}", f"stages.warmup.data.source={tmp / 'nope.jsonl'}"],
        r"nope.jsonl: dataset file not found",
    ),
    "data_empty": (data(""), r"data.jsonl: the file is empty"),
    "jsonl_bad_row": (
        data('{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n'),
        r"data.jsonl: row 2 is not valid JSON",
    ),
    "jsonl_not_object": (
        data('{"prompt": "a", "completion": "b"}\n[1, 2]\n'),
        r"data.jsonl: row 2 is a list, expected a JSON object",
    ),
    "missing_column": (
        data('{"prompt": "a"}\n'),
        r"data.jsonl \(stages.warmup.data\): missing required column 'completion or answer'",
    ),
    "value_is_list": (
        data('{"prompt": "a", "completion": "b"}\n{"prompt": ["x"], "completion": "b"}\n'),
        r"data.jsonl \(stages.warmup.data\): row 2, column 'prompt' is a list",
    ),
    "value_is_null": (
        data('{"prompt": "a", "completion": null}\n'),
        r"row 1, column 'completion' is empty \(null\)",
    ),
    "parquet_corrupt": (
        data(b"PAR1 this is not parquet", suffix=".parquet"),
        r"data.parquet: cannot be read as parquet",
    ),
    "csv_missing_column": (
        data("prompt\n1+1=\n", suffix=".csv"),
        r"data.csv \(stages.warmup.data\): missing required column 'completion or answer'",
    ),
    "dir_not_dataset": (
        lambda tmp, w: [
            f"recipe={TINY}",
            f"stages.warmup.data.source={(tmp / 'adir').mkdir() or tmp / 'adir'}",
        ],
        r"adir: a dir, but not a dataset saved with save_to_disk",
    ),
    "eval_reward_column": (
        data('{"prompt": "1+1="}\n', key="eval.data.source"),
        r"eval.data.*missing required column 'answer'",
    ),
    "rl_data_no_prompt": (
        data('{"question": "1+1="}\n', key="stages.rl.data.source", recipe="quickstart", name="rl"),
        r"rl.jsonl \(stages.rl.data\): missing required column 'prompt'",
    ),
    "rl_reward_column": (
        data('{"prompt": "1+1="}\n', key="stages.rl.data.source", recipe="quickstart", name="rl"),
        r"rl.jsonl \(stages.rl.data\): missing required column 'answer'",
    ),
    "tiny_lacks_column": (
        overrides("eval.reward=code_exec"),
        r"eval.data: the tiny world has no column 'test', 'entry_point', which the eval reward 'code_exec' reads",
    ),
    # model dirs
    "model_dir_missing": (
        lambda tmp, w: [f"recipe={TINY}", f"model.name_or_path={tmp / 'nomodel'}"],
        r"model.name_or_path: model dir '.*nomodel' does not exist",
    ),
    "model_no_config": (model(drop=("config.json",)), r"model.name_or_path: '.*model' has no config.json"),
    "model_bad_config": (model(corrupt={"config.json": b"{not json"}), r"config.json is not valid JSON"),
    "model_no_weights": (model(drop=("model.safetensors",)), r"has a config.json but no weight files"),
    "model_bad_weights": (
        model(corrupt={"model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!"}),
        r"model.name_or_path: '.*model' does not load as a Hugging Face causal LM",
    ),
    # rewards and plugins
    "unknown_reward": (
        overrides("stages.rl.rewards.specs=[{name: exact_mach}]", recipe="quickstart"),
        r"unknown reward 'exact_mach'. Did you mean 'exact_match'\?",
    ),
    "reward_import_path": (
        overrides("stages.rl.rewards.specs=[{name: 'nosuch.module:fn'}]", recipe="quickstart"),
        r"reward 'nosuch.module:fn': cannot import module 'nosuch.module'",
    ),
    "judge_dir": (
        overrides(
            "stages.rl.rewards.specs=[{name: llm_judge, kwargs: {judge: /no/judge}}]", recipe="quickstart"
        ),
        r"llm_judge.*/no/judge",
    ),
    "unknown_filter": (
        overrides("stages.warmup.data_filters=[no_such_filter]"),
        r"unknown data filter 'no_such_filter'",
    ),
    # run dirs
    "finished_run": (
        lambda tmp, w: [
            f"recipe={TINY}",
            f"run.dir={w['root'] / 'runs'}",
            "run.name=done",
            "stages.warmup.max_steps=2",
        ],
        r"runs/done is a finished run; pass run.overwrite=true",
    ),
    "run_dir_is_file": (
        lambda tmp, w: [f"recipe={TINY}", f"run.dir={_write(tmp / 'runsfile', 'x')}"],
        r"runsfile is a file, not a directory",
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_loses_nothing(
    name: str,
    world: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = _tree(world["done"])
    monkeypatch.chdir(tmp_path)  # a case's relative paths (the default run.dir) stay in its own dir
    make, pattern = CASES[name]
    argv = make(tmp_path, world)
    if not any(a.startswith("run.dir=") for a in argv):
        argv.append(f"run.dir={tmp_path / 'runs'}")
    if not any(a.startswith("run.name=") for a in argv):
        argv.append(f"run.name={name}")
    fast = FAST if argv[0] in (f"recipe={TINY}", "recipe=quickstart") else []
    code = main(["run", *fast, *argv])  # the case's own overrides come last and win
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("posttrain: error:")]
    assert code == 2, f"exit {code}: {err[-1500:]}"
    assert len(lines) == 1 and "Traceback" not in err, err[-1500:]
    assert re.search(pattern, lines[0]), lines[0]
    assert _tree(world["done"]) == before  # the finished run is untouched


def test_the_corpus_is_large_and_the_finished_run_is_real(world: dict[str, Path]) -> None:
    assert len(CASES) >= 30
    rows = [json.loads(x) for x in (world["done"] / "warmup" / "metrics.jsonl").read_text().splitlines()]
    assert rows and (world["done"] / "warmup" / "checkpoint" / "model.safetensors").exists()


def test_a_recipe_with_its_own_data_and_no_eval_section_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    rows = "".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(40))
    _write(tmp_path / "sft.jsonl", rows)
    _write(tmp_path / "r.yaml", "defaults: [{model: tiny_llama}, _self_]\nstages:\n  s: {type: sft, data: {source: sft.jsonl}, "
                                "max_steps: 2, micro_batch_size: 4, save_every: 0}\n")  # fmt: skip
    assert main(["run", "recipe=r.yaml"]) == 0
    assert (tmp_path / "runs" / "run" / "s" / "checkpoint" / "model.safetensors").exists()
