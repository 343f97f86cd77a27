"""Dashboards and the report: a real run logs exactly the names docs/metrics.md lists, W&B gets the
resolved recipe, one group per run and the histograms, and ``posttrain report`` renders in a real
headless browser (Debian's chromium, which ``make test`` installs) with every plot drawn.

The run: a tiny SFT stage then a tiny RL stage with vLLM (curriculum on, KL logged, periodic eval),
W&B disabled — what the docs call ``always`` for sft and rl must be in it, and what it logs must be
documented. The browser check loads a copy of the page with a small script that, on ``load``, writes
into the DOM how many ``<img>`` there are, how many decoded with a non-zero natural size and how many
resources the page fetched; ``--dump-dom`` prints that DOM and chromium's stderr carries every console
message (``:CONSOLE``), of which there must be none. A page with a broken image and a script error
shows that the check sees both.
"""

from __future__ import annotations

import doctest
import html
import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import posttrain.tracking
from posttrain.config import TrackingConfig, WandbConfig, parse_recipe
from posttrain.pipeline import run_pipeline
from posttrain.plugins import reward
from posttrain.report import build_report, read_metrics
from posttrain.schema import to_dict
from posttrain.tracking import Tracker
from tests.test_tracking import wandb_records

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "metrics.md"

# The run below sets these (docs/metrics.md's "when" column): their names must be logged too.
CONDITIONS_SET = {
    "`curriculum.enabled`",
    "a step that ran a filter pass",
    "a filter pass that moved prompts",
    "`eval_every > 0`",
    "`eval_every > 0` and `eval.sampled`",
    "`loss.kl_coef > 0` or `loss.log_kl`",
    "data with a `difficulty` column",
}


@reward("report_test_parity")
def report_test_parity(prompts: list[str], completions: list[str], **_: Any) -> list[float | None]:
    """1.0 when the completion has an even number of characters: a random policy gets about half.

    >>> report_test_parity(["a", "b"], ["xy", "x"])
    [1.0, 0.0]
    """
    return [float(len(c) % 2 == 0) for c in completions]


def _recipe(tmp: Path) -> dict[str, Any]:
    tasks = {"add": {"kind": "add", "levels": [1]}, "reverse": {"kind": "reverse", "levels": [3]}}
    return {
        "run": {"name": "dash", "dir": str(tmp / "runs"), "seed": 0},
        "model": yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama.yaml").read_text()),
        "deepspeed": {"zero_stage": 2},
        "tracking": {"progress": False, "log_every": 1, "wandb": {"mode": "disabled"}},
        "eval": {"data": {"source": "tiny", "tasks": tasks, "num_eval": 4}, "max_new_tokens": 4},
        "stages": {
            "warmup": {
                "type": "sft", "data": {"source": "tiny", "tasks": tasks, "num_train": 64},
                "max_steps": 3, "micro_batch_size": 8, "eval_every": 2, "save_every": 0,
                "optim": {"lr": 3e-3, "warmup_steps": 0, "schedule": "constant"},
            },
            "rl": {
                "type": "rl", "data": {"source": "tiny", "tasks": tasks, "num_train": 64},
                "sampling": {"n": 4, "max_tokens": 4}, "engine": {"kind": "vllm"},
                "rewards": {"specs": [{"name": "report_test_parity"}]},
                "prompts_per_step": 4, "max_gen_batches": 2, "max_steps": 3, "save_every": 0, "eval_every": 2,
                "log_samples_every": 1, "loss": {"log_kl": True},
                "curriculum": {"enabled": True, "pool_size": 8, "refilter_every": 2, "filter_samples": 4, "pass_k": 2},
                "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
            },
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dash")
    run_pipeline(parse_recipe(_recipe(tmp)))
    return tmp / "runs" / "dash"


# --------------------------------------------------------------------------------------------------
# docs/metrics.md


def documented() -> list[dict[str, Any]]:
    """The doc's metric rows: {names, patterns, stages, when}; a name's ``<…>`` parts match one segment."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [
            c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))
        ]  # "\|" is a pipe in a cell
        if len(cells) != 4 or not cells[0].startswith("`") or cells[1] in ("stages", "---"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        patterns = [re.compile(re.sub(r"<[^>]+>", "[^/]+", re.escape(n)) + "$") for n in names]
        rows.append({"names": names, "patterns": patterns, "stages": cells[1].split(), "when": cells[2]})
    return rows


def test_the_doc_parses_into_rows() -> None:
    rows = documented()
    assert len(rows) > 60
    for r in rows:
        assert r["stages"] and set(r["stages"]) <= {"sft", "distill", "rl", "dpo"}, r
        assert all(
            p.match(n.replace("<", "x").replace(">", ""))
            for n, p in zip(r["names"], r["patterns"], strict=True)
        )
    assert any(p.match("rollout/add/pass@4") for r in rows for p in r["patterns"])


def test_metrics_jsonl_holds_exactly_the_documented_names(tiny_run: Path) -> None:
    rows = documented()
    for stage, kind in (("warmup", "sft"), ("rl", "rl")):
        logged = {k for r in read_metrics(tiny_run / stage / "metrics.jsonl") for k in r} - {"step", "time"}
        mine = [r for r in rows if kind in r["stages"]]
        undocumented = sorted(k for k in logged if not any(p.match(k) for r in mine for p in r["patterns"]))
        assert not undocumented, f"{stage} ({kind}) logs names docs/metrics.md does not list: {undocumented}"
        expected = [r for r in mine if r["when"] == "always" or r["when"] in CONDITIONS_SET]
        missing = sorted(
            name
            for r in expected
            for name, p in zip(r["names"], r["patterns"], strict=True)
            if not any(p.match(k) for k in logged)
        )
        assert not missing, f"{stage} ({kind}) never logged these documented names: {missing}"
    rl = read_metrics(tiny_run / "rl" / "metrics.jsonl")
    assert any(r.get("train/loss") is not None for r in rl), "the RL stage never trained"


def test_histograms_for_wandb_doctest() -> None:
    assert doctest.testmod(posttrain.tracking).failed == 0


def _complete_records(run_file: Path) -> list[Any]:
    """The run file's records once W&B has written its exit record (its writer may lag ``finish()``
    on a loaded machine)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            records = wandb_records(run_file)
        except Exception:  # a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def test_wandb_gets_the_recipe_one_group_per_run_a_job_type_per_stage_and_histograms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B for every other test
    recipe = parse_recipe(_recipe(tmp_path))
    stage = tmp_path / "rl"
    stage.mkdir()
    config = {"recipe": to_dict(recipe), "stage": "rl"}  # what pipeline._train_stage passes
    t = Tracker(TrackingConfig(wandb=WandbConfig(mode="offline")), stage, "dash", "rl", config)
    bins = {f"curriculum/pool/rate_hist/{i / 5:.1f}-{(i + 1) / 5:.1f}": float(i) for i in range(5)}
    t.log({"reward/mean": 0.5, **bins, "moe/L0/tokens/e0": 3.0, "moe/L0/tokens/e1": 1.0}, step=1)
    t.close()
    run_id = (stage / "wandb_id").read_text()
    (run_file,) = stage.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    records = _complete_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type, run.display_name) == ("dash", "rl", "dash/rl")
    cfg = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert cfg["stage"] == "rl"
    assert (
        cfg["recipe"]["stages"]["rl"]["curriculum"]["pool_size"] == 8
    )  # the resolved recipe, defaults filled
    assert cfg["recipe"]["stages"]["rl"]["loss"]["clip_low"] == 0.2
    (hist,) = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert hist["reward/mean"] == 0.5 and hist["curriculum/pool/rate_hist/0.4-0.6"] == 2.0
    for name, values, bins in (
        ("curriculum/pool/rate_hist", [0, 1, 2, 3, 4], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
        ("moe/L0/load", [3, 1], [0, 1, 2]),
    ):  # a W&B histogram object: its fields are nested keys under its name
        assert hist[f"{name}/_type"] == "histogram"
        assert hist[f"{name}/values"] == values and hist[f"{name}/bins"] == pytest.approx(bins)
    lines = (stage / "metrics.jsonl").read_text()
    assert '"moe/L0/load"' not in lines and '"curriculum/pool/rate_hist"' not in lines  # scalars only


# --------------------------------------------------------------------------------------------------
# the report, in a browser

_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("pre");
  out.id = "posttrain-check";
  out.textContent = JSON.stringify({
    images: imgs.length,
    drawn: imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    requests: performance.getEntriesByType("resource").map((e) => e.name),
  });
  document.body.appendChild(out);
});
</script>"""


def browse(page: Path, profile: Path) -> tuple[dict[str, Any], list[str]]:
    """Load a copy of ``page`` (beside it) with the check script in headless chromium; returns the
    check's result and chromium's console lines."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(
            "chromium not found: `make test` installs Debian's chromium (or: apt-get install chromium)"
        )
    checked = page.with_name("checked-" + page.name)
    checked.write_text(page.read_text().replace("</body>", _CHECK + "\n</body>"))
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--dump-dom", checked.as_uri()],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    checked.unlink()
    m = re.search(r'<pre id="posttrain-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the page did not load (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(m[1])), [ln for ln in proc.stderr.splitlines() if ":CONSOLE" in ln]


def test_the_browser_check_sees_a_broken_image_and_a_script_error(tmp_path: Path) -> None:
    page = tmp_path / "bad.html"
    page.write_text(
        '<!DOCTYPE html><html><body><img src="data:image/png;base64,AAAA">'
        "<script>no_such_function()</script></body></html>"
    )
    result, console = browse(page, tmp_path / "profile")
    assert result["images"] == 1 and result["drawn"] == 0
    assert any("no_such_function" in ln for ln in console), console


def _report(run_dir: Path, tmp: Path) -> Path:
    """``posttrain report`` through the real CLI."""
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.cli", "report", str(run_dir)],
        capture_output=True, text=True, timeout=300, cwd=tmp,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    index = run_dir / "report" / "index.html"
    assert str(index) in proc.stdout
    return index


def _check_page(index: Path, profile: Path, plots: set[str]) -> None:
    text = index.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", text), "the page requests something"
    written = {p.stem for p in index.parent.glob("*.png")}
    assert plots <= written, sorted(plots - written)
    result, console = browse(index, profile)
    assert console == []
    assert result["requests"] == []
    assert result["images"] == len(written) == text.count("<img ")
    assert result["drawn"] == result["images"]


def test_report_of_a_real_run_draws_every_plot_in_chromium(tiny_run: Path, tmp_path: Path) -> None:
    index = _report(tiny_run, tmp_path)
    sft = {f"warmup-{k}" for k in ("loss", "eval", "throughput", "optim")}
    rl = {f"rl-{k}" for k in ("loss", "eval", "reward", "pass_at_k", "zero_adv", "pool", "band", "policy", "throughput", "optim")}  # fmt: skip
    _check_page(index, tmp_path / "profile", {"accuracy", *sft, *rl})
    text = index.read_text()
    for cell in ("warmup", "rl", "base", "add greedy", "reverse sampled"):  # the accuracy table
        assert f">{cell}<" in text, cell


def _synthetic_run(root: Path) -> Path:
    """A run dir without recipe.yaml: a distill stage (codistillation, expert load, a NaN and an
    Infinity loss, a torn last line), a DPO stage and an SFT stage whose data filters logged their
    selection at step 0, with eval.json."""
    run = root / "synthetic"
    rows_a, rows_b = [], []
    for s in range(1, 9):
        lam = [0.1, 0.2, 0.3, 0.2, 0.2]
        rows_a.append(
            {"step": s, "time": 1.0 * s, "train/loss": math.nan if s == 3 else math.inf if s == 5 else 2.0 / s,
             "train/lr": 1e-3, "train/grad_norm": 1.0, "perf/train_tokens_per_s": 1000.0 + s,
             "codistill/lambda_mean": 0.4, "codistill/hard": 1.0, "codistill/soft": 0.5,
             "codistill/teacher_label_agreement": 0.7,
             **{f"codistill/lambda_hist/{b / 5:.1f}-{(b + 1) / 5:.1f}": v for b, v in enumerate(lam)},
             **{f"moe/L{i}/max_load": 1.5 for i in range(2)}, **{f"moe/L{i}/min_load": 0.5 for i in range(2)},
             **{f"moe/L{i}/tokens/e{e}": float(10 + e + i) for i in range(2) for e in range(4)},
             "moe/routed_tokens": 46.0, "moe/all_to_all_ms": 2.0}
        )  # fmt: skip
        rows_b.append(
            {"step": s, "time": 1.0 * s, "train/loss": 0.69 - 0.01 * s, "dpo/margin": 0.1 * s, "dpo/accuracy": 0.6,
             "dpo/rewards_chosen": 0.1, "dpo/rewards_rejected": -0.1, "train/lr": 1e-4}
        )  # fmt: skip
    bins = [f"{b / 10:.1f}-{(b + 1) / 10:.1f}" for b in range(10)]
    rows_c = [
        {"step": 0, "time": 0.0, "data/selection/rows": 20.0, "data/selection/kept": 10.0,
         **{f"data/selection/difficulty_before/{b}": 2.0 for b in bins},
         **{f"data/selection/difficulty_after/{b}": 2.0 * (i >= 5) for i, b in enumerate(bins)}},
        *({"step": s, "time": 1.0 * s, "train/loss": 1.0 / s} for s in range(1, 4)),
    ]  # fmt: skip
    for name, rows in (("distill", rows_a), ("dpo", rows_b), ("sft", rows_c)):
        sd = run / name
        sd.mkdir(parents=True)
        text = "".join(json.dumps(r) + "\n" for r in rows)
        (sd / "metrics.jsonl").write_text(text + ('{"step": 9, "train/lo' if name == "distill" else ""))
        (sd / "eval.json").write_text(json.dumps({"greedy_pass@1": 0.5, "add/greedy_pass@1": 0.5}))
    assert "NaN" in (run / "distill" / "metrics.jsonl").read_text()
    return run


def test_report_reads_nan_and_torn_rows_and_draws_codistill_moe_and_dpo_in_chromium(tmp_path: Path) -> None:
    run = _synthetic_run(tmp_path)
    assert [r["step"] for r in read_metrics(run / "distill" / "metrics.jsonl")] == list(range(1, 9))
    index = build_report(run)
    plots = {f"distill-{k}" for k in ("loss", "codistill", "experts", "throughput", "optim")}
    _check_page(
        index, tmp_path / "profile", {"accuracy", "dpo-loss", "dpo-dpo", "sft-selection", "sft-loss", *plots}
    )
    assert "kept 10 of 20 rows" in index.read_text()  # the data filters' selection, with its note
    assert "2 non-finite value(s) not drawn" in index.read_text()
