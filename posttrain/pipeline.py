"""Runs a recipe's stages in order; each stage hands a Hugging Face checkpoint to the next.

Run dir layout::

    <run.dir>/<run.name>/
      recipe.yaml            the resolved recipe (a rerun with a different one is refused)
      base/eval.json         held-out accuracy of the starting model (eval.include_base)
      <stage>/checkpoint/    save_pretrained model + tokenizer (what the next stage loads)
      <stage>/state/         DeepSpeed resume state (model, optimizer, scheduler, RNG, loop position)
      <stage>/metrics.jsonl  one row per logged step; <stage>/eval.json held-out accuracy
      <stage>/DONE           written last: a stage with DONE is skipped on rerun
      DONE                   the whole run finished: rerunning needs run.overwrite=true

Rerunning the same command resumes: finished stages are skipped, an interrupted stage continues
from its last saved state. Every rank runs this code; rank 0 alone writes shared files.
"""

from __future__ import annotations

import importlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from posttrain.config import STAGES, Recipe
from posttrain.data import load_rows
from posttrain.errors import UserError
from posttrain.evaluate import evaluate
from posttrain.filters import read_selection
from posttrain.models import build_model, load_checkpoint
from posttrain.preflight import preflight
from posttrain.schema import first_difference, to_dict
from posttrain.stages.context import StageContext
from posttrain.strategy import Strategy
from posttrain.tracking import Tracker


class PipelineError(UserError):
    """A run that cannot start as asked (the message says what to do)."""


def run_dir(recipe: Recipe) -> Path:
    return Path(recipe.run.dir).expanduser() / recipe.run.name


def _comparable(recipe: Recipe) -> dict[str, Any]:
    d = to_dict(recipe)
    d.pop("tracking", None)
    d.pop("launcher", None)
    d.pop("hardware", None)
    d["run"].pop("overwrite", None)
    return d


def _conflict(recipe: Recipe) -> str | None:
    """Why the run dir cannot simply be (re)used by this recipe, or None."""
    rd = run_dir(recipe)
    saved = rd / "recipe.yaml"
    if not saved.exists():
        return None
    if (rd / "DONE").exists():
        return "is a finished run"
    diff = first_difference(yaml.safe_load(saved.read_text()), _comparable(recipe))
    return (
        f"holds an unfinished run of a different recipe ({diff[0]}: {diff[1]!r} -> {diff[2]!r})"
        if diff
        else None
    )


def check_run_dir(recipe: Recipe) -> None:
    """Refuse to clobber a finished run, or resume a run of a different recipe, unless run.overwrite."""
    rd = run_dir(recipe)
    for path in (rd, *rd.parents):
        if path.exists() and not path.is_dir():
            raise PipelineError(
                f"{path} is a file, not a directory; set run.dir (and run.name) to a directory path"
            )
    why = _conflict(recipe)
    if why and not recipe.run.overwrite:
        raise PipelineError(
            f"{run_dir(recipe)} {why}; pass run.overwrite=true to replace it, or choose another run.name=…"
        )


def prepare_run_dir(recipe: Recipe, is_main: bool) -> Path:
    """Rank 0 checks and (re)creates the run dir; the other ranks wait for it at the next barrier
    (they already passed ``check_run_dir`` before any rank wrote anything)."""
    rd = run_dir(recipe)
    if not is_main:
        return rd
    check_run_dir(recipe)
    if _conflict(recipe):
        # Keep the old run until the new one finishes: a failed overwrite loses nothing.
        previous = rd.with_name(rd.name + ".previous")
        if (previous / "DONE").exists() and not (rd / "DONE").exists():
            shutil.rmtree(rd)  # an overwrite that failed before: the finished run it replaces stays kept
        else:
            shutil.rmtree(previous, ignore_errors=True)
            rd.rename(previous)
    rd.mkdir(parents=True, exist_ok=True)
    tmp = rd / "recipe.yaml.tmp"
    tmp.write_text(yaml.safe_dump(_comparable(recipe), sort_keys=False))
    tmp.replace(rd / "recipe.yaml")  # atomic: a rank reading it never sees half a file
    return rd


def _runner(kind: str) -> Callable[[StageContext], None]:
    """The stage type's run function, from ``posttrain.config.STAGES`` (a module under posttrain/stages)."""
    module, _, fn = STAGES[kind].runner.partition(":")
    return getattr(importlib.import_module(module), fn)  # type: ignore[no-any-return]


def run_pipeline(recipe: Recipe) -> dict[str, dict[str, float]]:
    """Run (or resume) every stage; returns {row name: held-out metrics} and prints the table."""
    preflight(recipe)
    check_run_dir(recipe)
    strategy_probe = Strategy(recipe.deepspeed, recipe.parallel, recipe.run.seed)
    is_main = strategy_probe.is_main
    rd = prepare_run_dir(recipe, is_main)
    strategy_probe.barrier()
    results: dict[str, dict[str, float]] = {}
    started = time.time()

    if recipe.eval is not None and recipe.eval.include_base:
        results["base"] = _evaluate_once(recipe, rd / "base", None, strategy_probe)

    input_dir: Path | None = None
    for i, (name, cfg) in enumerate(recipe.stages.items()):
        sd = rd / name
        if not (sd / "DONE").exists():
            if is_main:
                sd.mkdir(parents=True, exist_ok=True)
                print(f"[posttrain] stage {i + 1}/{len(recipe.stages)}: {name} ({cfg.type})", flush=True)
            strategy_probe.barrier()
            if not (sd / "TRAINED").exists():
                _train_stage(recipe, name, cfg, sd, input_dir)
            _evaluate_once(recipe, sd, sd / "checkpoint", strategy_probe)
            if is_main:
                (sd / "DONE").write_text(json.dumps({"finished": time.time()}))
            strategy_probe.barrier()
        elif is_main:
            print(
                f"[posttrain] stage {i + 1}/{len(recipe.stages)}: {name} already finished, skipped",
                flush=True,
            )
        results[name] = json.loads((sd / "eval.json").read_text())
        input_dir = sd / "checkpoint"

    if is_main:
        (rd / "DONE").write_text(
            json.dumps({"finished": time.time(), "seconds": round(time.time() - started, 1)})
        )
        shutil.rmtree(rd.with_name(rd.name + ".previous"), ignore_errors=True)
        print(format_table(results, recipe), flush=True)
    strategy_probe.barrier()
    return results


def _train_stage(recipe: Recipe, name: str, cfg: Any, sd: Path, input_dir: Path | None) -> None:
    strategy = Strategy(recipe.deepspeed, recipe.parallel, recipe.run.seed)
    tracker = Tracker(
        recipe.tracking,
        sd,
        recipe.run.name,
        name,
        {"recipe": to_dict(recipe), "stage": name},
        enabled=strategy.is_main,
    )
    ctx = StageContext(recipe, name, cfg, sd, input_dir, strategy, tracker, seed=recipe.run.seed)
    try:
        _runner(cfg.type)(ctx)
    finally:
        ctx.close()  # the stage's engines, also after an error
        tracker.close()
        strategy.close()
    if strategy.is_main:
        (sd / "TRAINED").write_text(json.dumps({"finished": time.time()}))
    strategy.barrier()


def _evaluate_once(recipe: Recipe, sd: Path, checkpoint: Path | None, strategy: Strategy) -> dict[str, float]:
    """Held-out metrics of a checkpoint (None: the recipe's starting model), cached in <sd>/eval.json.
    Every rank loads it on its device and evaluates its share of the prompts (``evaluate``)."""
    out = sd / "eval.json"
    if recipe.eval is None:  # no held-out set: nothing to measure (the table says so)
        if strategy.is_main:
            sd.mkdir(parents=True, exist_ok=True)
            out.write_text("{}")
        strategy.barrier()
        return {}
    if not out.exists():
        if checkpoint is None:
            model, tok = build_model(recipe.model, seed=recipe.run.seed)
        else:
            model, tok = load_checkpoint(checkpoint, recipe.model.dtype)
        ds = load_rows(recipe.eval.data, "eval", recipe.run.seed, ["prompt"])
        metrics = evaluate(
            model.to(strategy.device), tok, ds, recipe.eval, seed=recipe.run.seed, strategy=strategy
        )
        del model
        if strategy.is_main:
            sd.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text(json.dumps(metrics, indent=1))
            tmp.replace(out)
    strategy.barrier()
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def format_table(results: dict[str, dict[str, float]], recipe: Recipe) -> str:
    """Held-out accuracy per stage: overall and per capability, greedy and sampled pass@1."""
    if recipe.eval is None:
        return f"{recipe.run.name}: finished {len(recipe.stages)} stage(s); no held-out table (add an eval: section)"
    caps = sorted({k.split("/")[0] for r in results.values() for k in r if "/" in k})
    modes = ["greedy", "sampled"] if recipe.eval.sampled else ["greedy"]
    header = (
        ["stage", "type"]
        + [f"{m} pass@1" for m in modes]
        + ["greedy len"]
        + [f"{c} ({'/'.join(m[0] for m in modes)})" for c in caps]
    )
    rows = []
    for name, r in results.items():
        kind = "-" if name == "base" else recipe.stages[name].type
        cells = [name, kind] + [f"{r.get(f'{m}_pass@1', float('nan')):.3f}" for m in modes]
        cells += [f"{r.get('greedy_len', float('nan')):.2f}"]  # mean completion tokens, EOS included
        cells += ["/".join(f"{r.get(f'{c}/{m}_pass@1', float('nan')):.2f}" for m in modes) for c in caps]
        rows.append(cells)
    selections = {name: read_selection(run_dir(recipe) / name) for name in results if name != "base"}
    if any(selections.values()):  # an SFT stage with data filters: how much of its data it kept
        header.append("data kept")
        for name, cells in zip(results, rows, strict=True):
            s = selections.get(name)
            cells.append(f"{s['kept']}/{s['rows']} ({s['kept'] / max(1, s['rows']):.0%})" if s else "-")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()  # noqa: E731
    data = recipe.eval.data
    per_cap = f"; {data.num_eval} prompts per capability" if data.source == "tiny" else ""
    title = f"held-out accuracy per stage ({recipe.run.name}{per_cap})"
    return "\n".join([title, fmt(header), line, *map(fmt, rows)])
