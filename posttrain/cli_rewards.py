"""``posttrain rewards``: list reward plugins, and try one on a JSONL file.

    posttrain rewards                                   every reward, where it comes from, one line of doc
    posttrain rewards check NAME --data FILE.jsonl      score each row, print a table, exit 1 on failures

Each row of ``FILE.jsonl`` is an object with ``prompt`` and ``completion`` strings; its other keys
are the reward's columns (``answer``, ``test``, ...). ``--kwargs '{"pattern": "..."}'`` passes
what a recipe's ``kwargs`` would.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from posttrain.config import RewardsConfig, RewardSpec
from posttrain.errors import UserError
from posttrain.plugins import reward_info
from posttrain.registry import REWARDS
from posttrain.reward_runner import FAILURES, RewardRunner


class RewardsCommandError(UserError):
    """Bad input to ``posttrain rewards``; the message is one line that says what to fix."""


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``rewards`` (and ``rewards list`` / ``rewards check``) to the ``posttrain`` parser."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "rewards", help="list reward plugins; `rewards check NAME --data FILE.jsonl` tries one on samples"
    )
    p.set_defaults(func=cmd_list)
    sub = p.add_subparsers(dest="rewards_command", metavar="{list,check}")
    sub.add_parser("list", help="list rewards (the default)").set_defaults(func=cmd_list)
    check = sub.add_parser("check", help="score the rows of a JSONL file with one reward")
    check.add_argument("name", help="a reward name, or an import path pkg.module:fn")
    check.add_argument(
        "--data", required=True, help="JSONL rows with 'prompt', 'completion' and the reward's columns"
    )
    check.add_argument("--kwargs", default="{}", help="JSON object of keyword arguments for the reward")
    check.add_argument(
        "--timeout", type=float, default=None, help="seconds per call (default: the reward's own)"
    )
    check.add_argument("--batch-size", type=int, default=1, help="rows per call (1: a timing per row)")
    check.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    check.set_defaults(func=cmd_check)
    return p


# --------------------------------------------------------------------------------------------------
# posttrain rewards [list]


def reward_table() -> list[tuple[str, str, str]]:
    """(name, source, one-line doc) for every reward the registry can resolve by name."""
    plugins = {ep.name: ep for ep in entry_points(group="posttrain.rewards")}
    rows = []
    for name in REWARDS.names():
        if name in plugins:
            dist = plugins[name].dist
            source = f"plugin {dist.name}" if dist is not None else "plugin"
        else:
            source = "built-in"
        try:
            doc = reward_info(REWARDS.get(name), name).doc
        except Exception as e:  # a broken plugin is listed with the reason, not fatal to the listing
            doc = f"(cannot load: {type(e).__name__}: {e})"
        rows.append((name, source, doc))
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    rows = reward_table()
    w_name = max((len(r[0]) for r in rows), default=0)
    w_src = max((len(r[1]) for r in rows), default=0)
    for name, source, doc in rows:
        print(f"{name.ljust(w_name)}  {source.ljust(w_src)}  {doc}")
    print(
        "\nUse one in a recipe under rewards.specs (name, weight, timeout_s, kwargs); an import path pkg.module:fn works too."
    )
    return 0


# --------------------------------------------------------------------------------------------------
# posttrain rewards check NAME --data FILE.jsonl


def read_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    file = Path(path)
    if not file.is_file():
        raise RewardsCommandError(
            f"--data {path}: no such file; give a JSONL file with 'prompt' and 'completion' keys"
        )
    rows = []
    with file.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RewardsCommandError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); write one object per line"
                ) from None
            if not isinstance(row, dict):
                raise RewardsCommandError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            for key in ("prompt", "completion"):
                if not isinstance(row.get(key), str):
                    raise RewardsCommandError(
                        f"{path}:{lineno}: key {key!r} must be a string; every row needs it"
                    )
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise RewardsCommandError(f"{path}: no rows; write one JSON object per line")
    return rows


def check_reward(
    name: str, rows: list[dict[str, Any]], kwargs: dict[str, Any], timeout_s: float | None, batch_size: int
) -> list[dict[str, Any]]:
    """Score ``rows`` in batches; one result per row: score, status, message, seconds (batch time / size)."""
    spec = (
        RewardSpec(name=name, kwargs=kwargs)
        if timeout_s is None
        else RewardSpec(name, timeout_s=timeout_s, kwargs=kwargs)
    )
    runner = RewardRunner(RewardsConfig(specs=(spec,), strict=False))
    keys = sorted({k for r in rows for k in r} - {"prompt", "completion"})
    out = []
    for start in range(0, len(rows), max(1, batch_size)):
        batch = rows[start : start + max(1, batch_size)]
        columns = {k: [r.get(k) for r in batch] for k in keys}
        report = runner.score_detailed(
            [r["prompt"] for r in batch], [r["completion"] for r in batch], columns
        )
        o = report.outcomes[0]
        for i in range(len(batch)):
            out.append(
                {
                    "score": o.values[i],
                    "status": o.status[i],
                    "message": o.messages[i],
                    "seconds": o.seconds / len(batch),
                }
            )
    return out


def cmd_check(args: argparse.Namespace) -> int:
    try:
        kwargs = json.loads(args.kwargs)
        if not isinstance(kwargs, dict):
            raise RewardsCommandError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
        rows = read_rows(args.data, args.limit)
        results = check_reward(args.name, rows, kwargs, args.timeout, args.batch_size)
    except json.JSONDecodeError as e:
        print(f"posttrain: error: --kwargs is not valid JSON ({e.msg}): {args.kwargs!r}", file=sys.stderr)
        return 2
    except UserError as e:  # bad data file, unknown reward, missing extra, bad kwargs
        print(f"posttrain: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, results))
    failed = [r for r in results if r["status"] in FAILURES]
    scores = [r["score"] for r in results if r["score"] is not None]
    counts = {s: sum(r["status"] == s for r in results) for s in ("ok", "none", *FAILURES)}
    mean = f"{statistics.fmean(scores):.4f}" if scores else "-"
    total_s = sum(r["seconds"] for r in results)
    print(
        f"\n{args.name}: {len(results)} rows, {counts['ok']} scored, {counts['none']} not applicable, "
        f"{len(failed)} failed (errors {counts['error']}, timeouts {counts['timeout']}, nan {counts['nan']}, "
        f"wrong length {counts['wrong_length']}); mean score {mean}; "
        f"{1000 * total_s / len(results):.1f} ms/row, {total_s:.2f} s in all"
    )
    return 1 if failed else 0


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(rows: list[dict[str, Any]], results: list[dict[str, Any]]) -> str:
    lines = [f"{'row':>4}  {'score':>8}  {'status':<12}  {'ms':>8}  {'completion':<32}  failure"]
    for i, (row, r) in enumerate(zip(rows, results, strict=True)):
        score = "-" if r["score"] is None else f"{r['score']:.4f}"
        lines.append(
            f"{i:>4}  {score:>8}  {r['status']:<12}  {1000 * r['seconds']:>8.1f}  "
            f"{_clip(row['completion'], 32):<32}  {_clip(r['message'], 80)}"
        )
    return "\n".join(lines)
