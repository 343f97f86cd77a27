"""``posttrain filters``: list data filters (difficulty judges), and try one on a data file.

    posttrain filters                                        every filter, where it comes from, one line of doc
    posttrain filters check NAME --data FILE [--judge DIR]   score each row, print them and a summary

``FILE`` is any data source a stage reads (``.jsonl``/``.json``/``.parquet``/``.csv``, a ``save_to_disk``
dir) with ``prompt`` and the columns the filter reads (``answer`` for ``pass_rate`` with ``exact_match``,
``completion`` or ``answer`` for ``llm_rating``); a ``difficulty`` column, when there, is shown as the
known label beside each score and summarised per label. ``--judge`` is a checkpoint dir for filters that
run a model; ``--kwargs '{"k": 2}'`` passes what a recipe's ``kwargs`` would; ``--drop-easiest 0.5``
also shows what a selection would keep. Judgments go to the same cache a run uses (``--cache``,
default ``runs/judgment_cache``): a second check makes no judge call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from posttrain.config import DataConfig, DataFilterSpec, SelectionConfig
from posttrain.errors import UserError
from posttrain.plugins import data_filter_info
from posttrain.registry import DATA_FILTERS
from posttrain.schema import ConfigError, parse


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``filters`` (and ``filters list`` / ``filters check``) to the ``posttrain`` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "filters", help="list data filters; `filters check NAME --data FILE` scores a data file with one"
    )
    p.set_defaults(func=cmd_list)
    sub = p.add_subparsers(dest="filters_command", metavar="{list,check}")
    sub.add_parser("list", help="list data filters (the default)").set_defaults(func=cmd_list)
    check = sub.add_parser("check", help="score the rows of a data file with one data filter")
    check.add_argument("name", help="a data filter name, or an import path pkg.module:fn")
    check.add_argument(
        "--data", required=True, help="a data file or save_to_disk dir with 'prompt' and the filter's columns"
    )
    check.add_argument(
        "--judge", default=None, help="checkpoint dir of the judge model (filters that run one)"
    )
    check.add_argument("--engine", choices=["vllm", "hf"], default="vllm", help="rollout engine of the judge")
    check.add_argument(
        "--n", type=int, default=8, help="judge samples per prompt (pass_rate; llm_rating's fallback)"
    )
    check.add_argument("--temperature", type=float, default=1.0, help="judge sampling temperature")
    check.add_argument("--max-tokens", type=int, default=16, help="judge tokens per sample")
    check.add_argument("--batch-size", type=int, default=256, help="prompts per judge call (and cache write)")
    check.add_argument(
        "--kwargs", default="{}", help="JSON object: the filter's options, as a recipe's kwargs"
    )
    check.add_argument("--cache", default="runs/judgment_cache", help="judgment cache dir (shared with runs)")
    check.add_argument("--drop-easiest", type=float, default=None, help="also show what this selection keeps")
    check.add_argument("--seed", type=int, default=0, help="seed for sampling and tie-breaking")
    check.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    check.add_argument("--show", type=int, default=20, help="rows to print (the summary covers all)")
    check.set_defaults(func=cmd_check)
    return p


def filter_table() -> list[tuple[str, str, str, str]]:
    """(name, source, kind, one-line doc) for every data filter the registry can resolve by name."""
    plugins = {ep.name: ep for ep in entry_points(group="posttrain.data_filters")}
    rows = []
    for name in DATA_FILTERS.names():
        if name in plugins:
            dist = plugins[name].dist
            source = f"plugin {dist.name}" if dist is not None else "plugin"
        else:
            source = "built-in"
        try:
            info = data_filter_info(DATA_FILTERS.get(name), name)
            kind, doc = ("judge" if info.judge else "model-free"), info.doc
        except Exception as e:  # a broken plugin is listed with the reason, not fatal to the listing
            kind, doc = "?", f"(cannot load: {type(e).__name__}: {e})"
        rows.append((name, source, kind, doc))
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    rows = filter_table()
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    print(
        "\nUse them in an SFT stage: data_filters: [{name, judge: {model: <earlier stage or dir>}, kwargs}] "
        "with data_selection: {drop_easiest: 0.5}; try one with `posttrain filters check NAME --data FILE`."
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        return _check(args)
    except json.JSONDecodeError as e:
        print(f"posttrain: error: --kwargs is not valid JSON ({e.msg}): {args.kwargs!r}", file=sys.stderr)
        return 2
    except UserError as e:  # bad data file, unknown filter, bad options, missing judge
        print(f"posttrain: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


def _check(args: argparse.Namespace) -> int:
    from posttrain.data import load_rows
    from posttrain.filters import run_filters

    kwargs = json.loads(args.kwargs)
    if not isinstance(kwargs, dict):
        raise ConfigError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    spec_data: dict[str, Any] = {"name": args.name, "kwargs": kwargs}
    info = data_filter_info(DATA_FILTERS.get(args.name), args.name)
    if info.judge:
        if args.judge is None:
            raise ConfigError(f"data filter {args.name!r} runs a judge model; give --judge CHECKPOINT_DIR")
        from posttrain.preflight import check_model_path

        check_model_path(args.judge, "--judge")
        spec_data["judge"] = {
            "model": args.judge, "engine": {"kind": args.engine}, "batch_size": args.batch_size,
            "sampling": {"n": args.n, "temperature": args.temperature, "max_tokens": args.max_tokens},
        }  # fmt: skip
    spec = parse(DataFilterSpec, spec_data, "filter")
    selection = parse(SelectionConfig, {"drop_easiest": args.drop_easiest}, "--drop-easiest")
    if not Path(args.data).exists():
        raise ConfigError(f"--data {args.data}: no such file or dir")
    rows = load_rows(DataConfig(source=args.data), "train", args.seed, required=["prompt"])
    if args.limit is not None:
        rows = rows.select(range(min(args.limit, len(rows))))
    t0 = time.perf_counter()
    run = run_filters(
        rows, [spec], selection, seed=args.seed, cache_root=Path(args.cache), work_dir=Path(args.cache) / "work",
        label="filters check", path="filter",
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    scores = run.scores[info.name]
    kept = set(run.selection.kept)
    print(f"{'row':>6}  {'label':>6}  {'difficulty':>10}  {'kept':<4}  prompt")
    prompts = [str(p) for p in rows["prompt"]]
    for i in range(min(args.show, len(rows))):
        label = "-" if run.labels is None else str(run.labels[i])
        score = "-" if scores[i] is None else f"{scores[i]:.4f}"
        prompt = prompts[i].replace("\n", "\\n")
        print(f"{run.ids[i]:>6}  {label:>6}  {score:>10}  {'yes' if i in kept else 'no':<4}  {prompt[:60]}")
    if run.labels is not None:
        print("\nper known difficulty label:")
        by: dict[str, list[int]] = defaultdict(list)
        for i, label in enumerate(run.labels):
            by[str(label)].append(i)
        print(f"{'label':>6}  {'rows':>6}  {'mean difficulty':>15}  {'unscored':>8}  {'kept':>6}")
        for label in sorted(by, key=lambda x: (len(x), x)):
            idx = by[label]
            got = [s for s in (scores[i] for i in idx) if s is not None]
            mean = f"{statistics.fmean(got):.3f}" if got else "-"
            print(
                f"{label:>6}  {len(idx):>6}  {mean:>15}  {len(idx) - len(got):>8}  {sum(i in kept for i in idx):>6}"
            )
    m = run.metrics
    prefix = f"data/filter/{info.name}/"
    scored = len(scores) - int(m[prefix + "unscored"])
    line = f"\n{info.name}: {len(scores)} rows, {scored} scored, {len(scores) - scored} unscored"
    if info.judge:
        line += (
            f"; judge calls {int(m[prefix + 'judge_calls'])} (cache hits {int(m[prefix + 'cache_hits'])}), "
            f"{m[prefix + 'judge_seconds']:.1f} s judging + {m[prefix + 'judge_start_seconds']:.1f} s engine start"
        )
    line += f"; {seconds:.1f} s in all"
    if args.drop_easiest is not None:
        line += f"; drop_easiest {args.drop_easiest:g} keeps {len(kept)} rows"
    print(line)
    for note in run.notes:
        print(f"note: {note}")
    return 0 if scored else 1
