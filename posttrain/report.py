"""``posttrain report runs/<run>``: one self-contained HTML page of a run, from its files alone.

Reads ``recipe.yaml`` (stage order and types, when present), ``base/eval.json`` and each stage's
``metrics.jsonl`` and ``eval.json``; W&B is not needed. Writes ``<run>/report/index.html`` with every
plot embedded as a base64 PNG (no external request: the page opens offline, from an attachment,
anywhere) and the same PNGs beside it. A run still in progress is reported as far as it got.

Per stage, the curves of whatever it logged (docs/metrics.md): loss; held-out pass@1 (periodic);
reward; rollout pass@k per capability; zero-advantage fraction; the curriculum pool (size by status,
difficulty band over the pool's pass rates); KL, entropy and clipping; codistillation λ; DPO margins;
expert load; throughput and step time; learning rate and gradient norm. Then the final value of every
metric, and across stages the held-out accuracy table of eval.json.

Rows may hold NaN or ±Infinity (Python's json writes them for a non-finite loss): they are read as
such, left out of the curves, and counted in the plot's note.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from posttrain.errors import UserError


class ReportError(UserError):
    """The path is not a run dir posttrain wrote (the message says what it expected)."""


@dataclass
class Stage:
    name: str
    type: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, float] | None = None
    done: bool = False


@dataclass
class Plot:
    key: str  # file name part: <stage>-<key>.png
    title: str
    png: bytes
    note: str = ""


# --------------------------------------------------------------------------------------------------
# reading


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (NaN/Infinity included); a torn last line (a run being written or
    killed mid-write) is skipped. A step logged twice keeps its last row."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            # step 0 holds set-up counts from several calls: keep them all (keyed by line)
            rows[(row["step"], i if row["step"] == 0 else 0)] = row
    return [rows[k] for k in sorted(rows)]


def read_run(run_dir: Path) -> tuple[list[Stage], dict[str, float] | None]:
    """The run's stages in order (recipe.yaml's, else every dir with metrics or an eval) and the base
    model's held-out metrics (None when not measured)."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a directory; pass a run dir such as runs/quickstart")
    recipe = run_dir / "recipe.yaml"
    order: list[tuple[str, str]] = []
    if recipe.exists():
        try:
            data = yaml.safe_load(recipe.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        for name, cfg in (data.get("stages") or {}).items():
            order.append((str(name), str((cfg or {}).get("type", "?"))))
    if not order:
        order = [
            (d.name, "?")
            for d in sorted(run_dir.iterdir())
            if d.is_dir()
            and d.name != "base"
            and ((d / "metrics.jsonl").exists() or (d / "eval.json").exists())
        ]
    stages = []
    for name, kind in order:
        sd = run_dir / name
        if not sd.is_dir():
            continue  # not started yet
        stage = Stage(name, kind, done=(sd / "DONE").exists())
        if (sd / "metrics.jsonl").exists():
            stage.rows = read_metrics(sd / "metrics.jsonl")
        stage.eval = _read_eval(sd / "eval.json")
        stages.append(stage)
    if not stages:
        raise ReportError(
            f"{run_dir} holds no stage with metrics.jsonl or eval.json; pass a run dir such as runs/quickstart"
        )
    return stages, _read_eval(run_dir / "base" / "eval.json")


def _read_eval(path: Path) -> dict[str, float] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return (
        {k: float(v) for k, v in data.items() if isinstance(v, int | float)}
        if isinstance(data, dict)
        else None
    )


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float], int]:
    """(steps, values, non-finite count) of one metric over the logged steps (set-up rows at step 0
    excluded); non-finite values become NaN, which the curves leave out."""
    steps, values, bad = [], [], 0
    for r in rows:
        v = r.get(key)
        if r["step"] == 0 or not isinstance(v, int | float) or isinstance(v, bool):
            continue
        v = float(v)
        if not math.isfinite(v):
            bad += 1
            v = math.nan
        steps.append(r["step"])
        values.append(v)
    return steps, values, bad


def setup_values(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the stage logged before its first step (the step-0 rows, merged: a data-filter pass, the
    RL prompt pool, the DPO pairs)."""
    return {k: v for r in rows if r["step"] == 0 for k, v in r.items() if k not in ("step", "time")}


def keys_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k not in ("step", "time"):
                seen.setdefault(k)
    return list(seen)


# --------------------------------------------------------------------------------------------------
# plots

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]


class _Canvas:
    """A matplotlib figure of ``n`` axes, ``cols`` to a row (no pyplot: no global state, no GUI
    backend). One axis: 6.4 x 3.3 in; several: 2.6 in per row."""

    def __init__(self, n: int = 1, cols: int = 2, width: float = 6.4, height: float | None = None):
        from matplotlib.figure import Figure

        cols = min(n, cols)
        rows = -(-n // cols)
        size = (width, height or (3.3 if n == 1 else 2.6 * rows))
        self.fig = Figure(figsize=size, dpi=100, layout="constrained")
        self.axes = [self.fig.add_subplot(rows, cols, i + 1) for i in range(n)]
        self.bad = 0
        self.steps: dict[int, set[int]] = {}  # axis -> the steps drawn on it
        self.legend = True  # False: each axis is titled by its one series
        from matplotlib.ticker import MaxNLocator

        for ax in self.axes:
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))

    def line(
        self, ax: Any, rows: Sequence[dict[str, Any]], key: str, label: str | None = None, **kw: Any
    ) -> bool:
        steps, values, bad = series(rows, key)
        if not steps:
            return False
        self.bad += bad
        self.steps.setdefault(id(ax), set()).update(steps)
        style = {"marker": "o", "markersize": 3} if len(steps) <= 20 else {}
        ax.plot(steps, values, label=label or key, **{"linewidth": 1.4} | style | kw)
        return True

    def png(self) -> bytes:
        for ax in self.axes:
            if self.legend and ax.get_legend_handles_labels()[0] and ax.get_legend() is None:
                ax.legend(fontsize=7, loc="best", framealpha=0.7)
            if not ax.get_xlabel():
                ax.set_xlabel("step", fontsize=8)
            if len(steps := self.steps.get(id(ax), set())) == 1:  # one point: a step either side
                (only,) = steps
                ax.set_xlim(only - 1, only + 1)
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", metadata={"Software": None})
        return buf.getvalue()


def _caps(keys: Sequence[str], prefix: str, suffix: str) -> list[str]:
    """The middle parts of ``<prefix><cap>/<suffix>`` keys (capabilities), sorted; none when there is
    only one (its curve would repeat the overall one)."""
    pat = re.compile(re.escape(prefix) + r"([^/]+)/" + re.escape(suffix) + "$")
    caps = sorted({m[1] for k in keys if (m := pat.match(k))})
    return caps if len(caps) > 1 else []


def _bins(keys: Sequence[str], prefix: str) -> list[tuple[float, float, str]]:
    """``<prefix><lo>-<hi>`` bin keys, sorted by lo."""
    pat = re.compile(re.escape(prefix) + r"(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)$")
    return sorted((float(m[1]), float(m[2]), k) for k in keys if (m := pat.match(k)))


def _heat(
    c: _Canvas, ax: Any, rows: Sequence[dict[str, Any]], bins: list[tuple[float, float, str]], label: str
) -> bool:
    """Bins over steps as a heat map (each step's column normalised to its share)."""
    import numpy as np

    table = [series(rows, k) for _, _, k in bins]
    steps = table[0][0]
    if not steps or any(len(t[0]) != len(steps) for t in table):
        return False
    grid = np.nan_to_num(np.array([t[1] for t in table], dtype=float))  # [bins, steps]
    grid = grid / np.maximum(grid.sum(axis=0, keepdims=True), 1e-12)
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    image = ax.imshow(
        grid, aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest",
        extent=(steps[0] - half, steps[-1] + half, bins[0][0], bins[-1][1]),
    )  # fmt: skip
    c.fig.colorbar(image, ax=ax, label=label, shrink=0.85).ax.tick_params(labelsize=7)
    return True


def stage_plots(stage: Stage) -> list[Plot]:
    """Every plot the stage's rows can fill, in reading order."""
    rows, keys = stage.rows, keys_of(stage.rows)
    has = set(keys)
    out: list[Plot] = []

    def add(key: str, title: str, draw: Callable[[], _Canvas | None], note: str = "") -> None:
        c = draw()
        if c is not None:
            bad = f"{c.bad} non-finite value(s) not drawn" if c.bad else ""
            out.append(Plot(key, title, c.png(), "; ".join(x for x in (note, bad) if x)))

    def simple(keys_labels: Sequence[tuple[str, str]], ylabel: str = "", **line: Any) -> _Canvas | None:
        present = [(k, lab) for k, lab in keys_labels if k in has]
        if not present:
            return None
        c = _Canvas()
        for k, lab in present:
            c.line(c.axes[0], rows, k, lab, **line)
        c.axes[0].set_ylabel(ylabel, fontsize=8)
        return c

    def multiples(keys_labels: Sequence[tuple[str, str]]) -> _Canvas | None:
        present = [(k, lab) for k, lab in keys_labels if k in has]
        if not present:
            return None
        c = _Canvas(len(present))
        for ax, (k, lab), color in zip(c.axes, present, _PALETTE, strict=False):
            c.line(ax, rows, k, lab, color=color)
            ax.set_title(lab, fontsize=9)
        c.legend = False
        return c

    # ---- lightweight SFT: the judged difficulty of the rows before and after the selection ----
    setup = setup_values(rows)  # the data-filter pass logs at step 0

    def selection() -> _Canvas | None:
        bins = _bins(list(setup), "data/selection/difficulty_before/")
        if not bins:
            return None
        c = _Canvas()
        ax, x = c.axes[0], list(range(len(bins)))
        before = [float(setup[k]) for _, _, k in bins]
        after = [float(setup.get(k.replace("_before/", "_after/"), 0.0)) for _, _, k in bins]
        ax.bar([i - 0.2 for i in x], before, width=0.4, label="all rows", color=_PALETTE[0])
        ax.bar([i + 0.2 for i in x], after, width=0.4, label="kept", color=_PALETTE[1])
        ax.set_xticks(x, [f"{lo:.1f}-{hi:.1f}" for lo, hi, _ in bins], rotation=45, fontsize=7)
        ax.set_xlabel("difficulty the judges gave (0 easy, 1 hard)", fontsize=8)
        ax.set_ylabel("rows", fontsize=8)
        return c

    kept, total = setup.get("data/selection/kept"), setup.get("data/selection/rows")
    note = f"kept {kept:.0f} of {total:.0f} rows" if isinstance(kept, int | float) and total else ""
    add("selection", "Data filters: judged difficulty before and after the selection", selection, note)

    # ---- loss ----
    def loss() -> _Canvas | None:
        c = simple([("train/loss", "loss")], "loss")
        if c is not None and {"codistill/hard", "codistill/soft"} <= has:
            c.line(c.axes[0], rows, "codistill/hard", "hard (CE)", linestyle="--")
            c.line(c.axes[0], rows, "codistill/soft", "soft (teacher)", linestyle=":")
        return c

    add("loss", "Training loss", loss)

    # ---- held-out pass@1 during training ----
    def held_out() -> _Canvas | None:
        modes = [m for m in ("greedy", "sampled") if f"eval/{m}_pass@1" in has]
        if not modes:
            return None
        c = _Canvas()
        for m, color in zip(modes, _PALETTE, strict=False):
            c.line(c.axes[0], rows, f"eval/{m}_pass@1", f"{m} pass@1", color=color, linewidth=2)
            for cap in _caps(keys, "eval/", f"{m}_pass@1"):
                c.line(
                    c.axes[0],
                    rows,
                    f"eval/{cap}/{m}_pass@1",
                    f"{cap} {m}",
                    color=color,
                    alpha=0.45,
                    linewidth=0.9,
                )
        c.axes[0].set_ylim(-0.02, 1.02)
        c.axes[0].set_ylabel("held-out pass@1", fontsize=8)
        return c

    add("eval", "Held-out pass@1 during the stage (eval_every)", held_out)

    # ---- reward ----
    def reward() -> _Canvas | None:
        if "reward/mean" not in has:
            return None
        c = _Canvas()
        ax = c.axes[0]
        c.line(ax, rows, "reward/mean", "mean reward", color=_PALETTE[0], linewidth=2)
        steps, mean, _ = series(rows, "reward/mean")
        s_steps, std, _ = series(rows, "reward/std")
        if s_steps == steps and steps:
            ax.fill_between(steps, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], alpha=0.15, color=_PALETTE[0],
                            label="± std")  # fmt: skip
        for cap, color in zip(_caps(keys, "rollout/", "reward_mean"), _PALETTE[1:], strict=False):
            c.line(ax, rows, f"rollout/{cap}/reward_mean", cap, color=color, linewidth=0.9)
        ax.set_ylabel("reward", fontsize=8)
        return c

    add("reward", "Reward of the step's rollouts", reward)

    # ---- pass@k per capability ----
    def pass_at_k() -> _Canvas | None:
        ks = sorted({k.split("pass@")[1] for k in keys if re.fullmatch(r"rollout/pass@\d+", k)}, key=int)
        if not ks:
            return None
        c = _Canvas()
        ax = c.axes[0]
        styles = ["-", "--", ":", "-."]
        for k, style in zip(ks, styles, strict=False):
            c.line(
                ax, rows, f"rollout/pass@{k}", f"all pass@{k}", color="black", linestyle=style, linewidth=1.8
            )
            for cap, color in zip(_caps(keys, "rollout/", f"pass@{k}"), _PALETTE, strict=False):
                c.line(
                    ax,
                    rows,
                    f"rollout/{cap}/pass@{k}",
                    f"{cap} pass@{k}",
                    color=color,
                    linestyle=style,
                    linewidth=1,
                )
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("pass@k (sampled, unbiased)", fontsize=8)
        return c

    add("pass_at_k", "Rollout pass@k per capability", pass_at_k)

    # ---- zero-advantage fraction ----
    def zero_adv() -> _Canvas | None:
        if "rollout/zero_adv_frac" not in has:
            return None
        c = _Canvas()
        ax = c.axes[0]
        c.line(ax, rows, "rollout/zero_adv_frac", "zero-advantage fraction", color=_PALETTE[1], linewidth=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("fraction of groups", fontsize=8)
        if {"rollout/groups", "rollout/groups_trained"} <= has:
            twin = ax.twinx()
            twin.tick_params(labelsize=8)
            c.line(
                twin,
                rows,
                "rollout/groups",
                "groups generated",
                color=_PALETTE[7],
                linestyle="--",
                linewidth=1,
            )
            c.line(
                twin,
                rows,
                "rollout/groups_trained",
                "groups trained",
                color=_PALETTE[2],
                linestyle=":",
                linewidth=1,
            )
            twin.set_ylabel("groups", fontsize=8)
            twin.legend(fontsize=7, loc="lower right", framealpha=0.7)
        return c

    add("zero_adv", "Zero-advantage groups (dropped before the update)", zero_adv)

    # ---- curriculum: pool size, difficulty band ----
    statuses = [
        s
        for s in ("active", "new", "easy", "backlog", "retired", "unscorable", "abandoned")
        if f"curriculum/pool/{s}" in has
    ]

    def pool() -> _Canvas | None:
        if not statuses:
            return None
        c = _Canvas()
        ax = c.axes[0]
        steps = series(rows, f"curriculum/pool/{statuses[0]}")[0]
        stacks = [series(rows, f"curriculum/pool/{s}")[1] for s in statuses]
        if any(len(s) != len(steps) for s in stacks):
            return None
        ax.stackplot(steps, *stacks, labels=statuses, colors=_PALETTE[: len(statuses)], alpha=0.8)
        ax.set_ylabel("prompts", fontsize=8)
        return c

    add("pool", "Curriculum pool by status", pool)

    def band() -> _Canvas | None:
        bins = _bins(keys, "curriculum/pool/rate_hist/")
        if not bins and "curriculum/pool/band_lo" not in has:
            return None
        c = _Canvas()
        ax = c.axes[0]
        if bins:
            _heat(c, ax, rows, bins, "share of trainable prompts")
        for k, lab, color in (
            ("curriculum/pool/band_lo", "band low", _PALETTE[1]),
            ("curriculum/pool/band_hi", "band high", _PALETTE[1]),
        ):
            c.line(ax, rows, k, lab, color=color, linewidth=2, linestyle="--" if "lo" in k else "-")
        c.line(ax, rows, "curriculum/filter/pass@1", "filter pass@1", color=_PALETTE[3], linewidth=1.2)
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("pass rate", fontsize=8)
        return c

    add("band", "Difficulty band over the pool's pass rates", band)

    # ---- policy: KL, entropy, clipping ----
    add(
        "policy",
        "KL, entropy and clipping of the update",
        lambda: multiples(
            [
                ("train/kl", "KL to the reference"),
                ("train/entropy", "entropy"),
                ("train/clip_frac", "clip fraction"),
                ("train/rollout_logprob_diff", "|trainer − engine| log-prob"),
            ]
        ),  # fmt: skip
    )

    # ---- codistillation ----
    def codistill() -> _Canvas | None:
        if "codistill/lambda_mean" not in has:
            return None
        c = _Canvas()
        ax = c.axes[0]
        bins = _bins(keys, "codistill/lambda_hist/")
        if bins:
            _heat(c, ax, rows, bins, "share of loss tokens")
        c.line(ax, rows, "codistill/lambda_mean", "mean λ", color=_PALETTE[1], linewidth=2)
        c.line(
            ax,
            rows,
            "codistill/teacher_label_agreement",
            "teacher argmax = label",
            color=_PALETTE[2],
            linewidth=1,
        )
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("λ (weight of the soft loss)", fontsize=8)
        return c

    add("codistill", "Codistillation λ", codistill)

    # ---- DPO ----
    add(
        "dpo",
        "DPO: implicit rewards, margin and accuracy",
        lambda: multiples(
            [
                ("dpo/margin", "margin"),
                ("dpo/accuracy", "accuracy"),
                ("dpo/rewards_chosen", "reward chosen"),
                ("dpo/rewards_rejected", "reward rejected"),
            ]
        ),  # fmt: skip
    )

    # ---- expert load ----
    def experts() -> _Canvas | None:
        layers = sorted({int(m[1]) for k in keys if (m := re.match(r"moe/L(\d+)/max_load$", k))})
        if not layers:
            return None
        c = _Canvas(2, cols=1, height=5.6)
        ax, heat = c.axes
        ax.set_title("busiest / idlest expert over the mean", fontsize=9)
        for layer, color in zip(layers, _PALETTE, strict=False):
            c.line(ax, rows, f"moe/L{layer}/max_load", f"L{layer} max", color=color)
            c.line(ax, rows, f"moe/L{layer}/min_load", f"L{layer} min", color=color, linestyle="--")
        ax.axhline(1.0, color="black", linewidth=0.8, alpha=0.5)
        import numpy as np

        n_exp = 1 + max(
            (int(m[1]) for k in keys if (m := re.match(r"moe/L\d+/tokens/e(\d+)$", k))), default=-1
        )
        if n_exp > 0:
            grid = np.array(
                [
                    [np.nansum(series(rows, f"moe/L{layer}/tokens/e{e}")[1]) for e in range(n_exp)]
                    for layer in layers
                ]
            )  # [layers, experts], tokens over the stage
            share = grid / np.maximum(grid.sum(axis=1, keepdims=True), 1e-12)
            image = heat.imshow(share, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
            heat.set_yticks(range(len(layers)), [f"L{i}" for i in layers])
            heat.set_xticks(range(n_exp), [f"e{e}" for e in range(n_exp)])
            heat.set_title("share of routed tokens over the stage", fontsize=9)
            heat.set_xlabel("expert", fontsize=8)
            heat.grid(False)
            c.fig.colorbar(image, ax=heat, shrink=0.85).ax.tick_params(labelsize=7)
        else:
            heat.set_visible(False)
        return c

    add("experts", "Expert load (expert parallelism)", experts)

    # ---- asynchronous RL, importance correction ----
    def asynchronous() -> _Canvas | None:
        if not {"perf/trainer_idle_frac", "perf/engine_idle_frac"} & has:
            return None
        return multiples(
            [("rollout/staleness_mean", "mean staleness (versions)"), ("rollout/staleness_max", "max staleness"),
             ("perf/trainer_idle_frac", "trainer idle fraction"), ("perf/engine_idle_frac", "engine idle fraction")]
        )  # fmt: skip

    add("async", "Asynchronous RL: staleness and idle time", asynchronous)
    add(
        "importance",
        "Importance correction (behaviour -> proximal policy)",
        lambda: multiples(
            [
                ("train/is_weight_mean", "mean weight"),
                ("train/is_weight_max", "max raw ratio"),
                ("train/is_ess", "effective sample size"),
                ("train/is_masked_frac", "truncated / masked share"),
            ]
        ),  # fmt: skip
    )

    # ---- throughput and time ----
    def throughput() -> _Canvas | None:
        perf = [k for k in keys if k.startswith("perf/") and k.endswith("_per_s")]
        times = [k for k in ("time/rollout_s", "time/update_s") if k in has]
        if not perf and not times:
            return None
        c = _Canvas(2 if perf and times else 1, cols=1)
        if perf:
            ax = c.axes[0]
            for k, color in zip(perf, _PALETTE, strict=False):
                c.line(ax, rows, k, k.removeprefix("perf/"), color=color)
            ax.set_ylabel("per second", fontsize=8)
        if times:
            ax = c.axes[-1]
            steps = series(rows, times[0])[0]
            stacks = [series(rows, k)[1] for k in times]
            if all(len(s) == len(steps) for s in stacks):
                ax.stackplot(steps, *[[0.0 if math.isnan(v) else v for v in s] for s in stacks],
                             labels=[k.removeprefix("time/") for k in times], colors=_PALETTE[2:4], alpha=0.8)  # fmt: skip
            ax.set_ylabel("seconds per step", fontsize=8)
        return c

    add("throughput", "Throughput and time per step", throughput)

    # ---- optimiser ----
    add(
        "optim",
        "Learning rate and gradient norm",
        lambda: multiples([("train/lr", "learning rate"), ("train/grad_norm", "gradient norm")]),
    )
    return out


def accuracy_plot(stages: Sequence[Stage], base: dict[str, float] | None) -> bytes | None:
    """Grouped bars: held-out greedy / sampled pass@1 per stage."""
    rows = ([("base", base)] if base else []) + [(s.name, s.eval) for s in stages if s.eval]
    modes = [m for m in ("greedy", "sampled") if any(f"{m}_pass@1" in r for _, r in rows if r)]
    if not rows or not modes:
        return None
    c = _Canvas(width=max(4.0, 1.1 * len(rows) + 2.0), height=3.0)
    ax = c.axes[0]
    width = 0.8 / len(modes)
    for i, (m, color) in enumerate(zip(modes, _PALETTE, strict=False)):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(rows))]
        vals = [(r or {}).get(f"{m}_pass@1", math.nan) for _, r in rows]
        bars = ax.bar(xs, vals, width, label=f"{m} pass@1", color=color)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(range(len(rows)), [n for n, _ in rows])
    ax.set_ylim(0.0, 1.1)
    ax.set_ylabel("held-out pass@1", fontsize=8)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("stage", fontsize=8)
    return c.png()


# --------------------------------------------------------------------------------------------------
# the page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#222}
h1{margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0} .grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(620px,1fr));gap:16px}
figure{margin:0;border:1px solid #e4e4e4;border-radius:6px;padding:8px;background:#fff}
figcaption{font-size:14px;font-weight:600;margin-bottom:6px} .note{font-weight:400;color:#a33;font-size:12px}
img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left} .kv td{text-align:left}
details{margin:10px 0} summary{cursor:pointer;color:#245} pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return html.escape(str(v))
    if isinstance(v, int) or (math.isfinite(v) and v == int(v) and abs(v) < 1e12):
        return f"{int(v)}"
    return f"{v:.4g}"


def accuracy_table(stages: Sequence[Stage], base: dict[str, float] | None) -> str:
    """eval.json per stage: overall metrics, then greedy / sampled pass@1 per capability."""
    rows = ([("base", "-", base)] if base else []) + [
        (s.name, s.type, s.eval) for s in stages if s.eval is not None
    ]
    if not rows:
        return "<p>No held-out evaluation (the recipe has no <code>eval:</code> section, or no stage finished yet).</p>"
    keys = {k for _, _, r in rows for k in (r or {})}
    order = ["greedy_pass@1", "sampled_pass@1", "greedy_len", "sampled_len"]
    overall = [k for k in order if k in keys] + sorted(k for k in keys if "/" not in k and k not in order)
    caps = sorted({k.split("/")[0] for k in keys if "/" in k})
    per_cap = [(cap, m) for cap in caps for m in ("greedy", "sampled") if f"{cap}/{m}_pass@1" in keys]
    head = ["stage", "type", *overall, *(f"{cap} {m}" for cap, m in per_cap)]
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for name, kind, r in rows:
        r = r or {}
        values = [r.get(k) for k in overall] + [r.get(f"{cap}/{m}_pass@1") for cap, m in per_cap]
        digits = [3 if "pass@" in k else 2 for k in overall] + [3] * len(per_cap)
        cells = [html.escape(name), html.escape(kind)] + [
            "" if v is None else f"{v:.{d}f}" for v, d in zip(values, digits, strict=True)
        ]
        lines.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join([*lines, "</table>"])


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _stage_html(stage: Stage, plots: Sequence[Plot]) -> str:
    status = "finished" if stage.done else ("in progress or interrupted" if stage.rows else "not started")
    steps = [r["step"] for r in stage.rows if r["step"] > 0]
    parts = [
        f'<h2 id="stage-{html.escape(stage.name)}">{html.escape(stage.name)} <small>({html.escape(stage.type)})</small></h2>',
        f'<p class="sub">{status}; {len(steps)} logged step(s)'
        + (f", last step {max(steps)}" if steps else "")
        + "</p>",
    ]
    setup = setup_values(stage.rows)
    if setup:
        table = (
            '<table class="kv"><tr><th colspan="2">at the start</th></tr>'
            + "".join(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in setup.items())
            + "</table>"
        )
        # a long one (a data-filter pass logs ~50 values) folds away, as the last values below do
        parts.append(
            table
            if len(setup) <= 12
            else f"<details><summary>{len(setup)} values at the start</summary>{table}</details>"
        )
    if plots:
        parts.append('<div class="grid">')
        for p in plots:
            note = f' <span class="note">({html.escape(p.note)})</span>' if p.note else ""
            parts.append(
                f"<figure><figcaption>{html.escape(p.title)}{note}</figcaption>{_img(p.png, p.title)}</figure>"
            )
        parts.append("</div>")
    else:
        parts.append("<p>No metrics logged yet.</p>")
    last: dict[str, Any] = {}
    for r in stage.rows:
        if r["step"] > 0:
            last.update({k: (r["step"], v) for k, v in r.items() if k not in ("step", "time")})
    if last:
        parts.append(
            f"<details><summary>last value of each of the {len(last)} metrics (docs/metrics.md says what each means)</summary>"
            '<table class="kv"><tr><th>metric</th><th>value</th><th>step</th></tr>'
            + "".join(
                f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td><td>{s}</td></tr>"
                for k, (s, v) in sorted(last.items())
            )
            + "</table></details>"
        )
    return "\n".join(parts)


def build_report(run_dir: Path | str, out_dir: Path | str | None = None) -> Path:
    """Write the report of ``run_dir`` (index.html + PNGs) into ``out_dir`` (default ``<run>/report``);
    returns the HTML file's path."""
    run_dir = Path(run_dir)
    stages, base = read_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} is a file; pass --out a directory")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()

    body = [
        f"<h1>posttrain run: {html.escape(run_dir.name)}</h1>",
        f'<p class="sub">{html.escape(str(run_dir))} — '
        + ("finished" if (run_dir / "DONE").exists() else "not finished")
        + "; from metrics.jsonl and eval.json (W&amp;B not needed). Stages: "
        + ", ".join(
            f'<a href="#stage-{html.escape(s.name)}">{html.escape(s.name)} ({html.escape(s.type)})</a>'
            for s in stages
        )
        + "</p>",
        "<h2>Held-out accuracy per stage</h2>",
        accuracy_table(stages, base),
    ]
    bars = accuracy_plot(stages, base)
    if bars is not None:
        (out / "accuracy.png").write_bytes(bars)
        body.append(f'<figure style="max-width:760px">{_img(bars, "held-out accuracy per stage")}</figure>')
    for stage in stages:
        plots = stage_plots(stage)
        for p in plots:
            (out / f"{_safe(stage.name)}-{p.key}.png").write_bytes(p.png)
        body.append(_stage_html(stage, plots))
    recipe = run_dir / "recipe.yaml"
    if recipe.exists():
        body.append(
            "<details><summary>the resolved recipe (recipe.yaml)</summary><pre>"
            + html.escape(recipe.read_text(errors="replace"))
            + "</pre></details>"
        )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>posttrain report: {html.escape(run_dir.name)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    index = out / "index.html"
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# --------------------------------------------------------------------------------------------------
# CLI


def add_subparser(subparsers: Any) -> None:
    """``posttrain report RUN_DIR [--out DIR]``."""
    p = subparsers.add_parser(
        "report",
        help="an HTML report of a run (curves per stage, the accuracy table): posttrain report runs/NAME",
    )
    p.add_argument("run_dir", help="a run dir, e.g. runs/quickstart")
    p.add_argument(
        "--out", default=None, help="where to write index.html and the PNGs (default: RUN_DIR/report)"
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: Any) -> int:
    index = build_report(args.run_dir, args.out)
    print(f"report: {index} (open it in a browser; the PNGs are beside it)")
    return 0
