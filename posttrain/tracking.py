"""Metrics to Weights & Biases (offline unless configured online) and to ``metrics.jsonl``.

One W&B run per stage (name ``<run>/<stage>``, group ``<run>``); its id is kept in the stage dir so a
resumed stage continues the same W&B run. Only rank 0 logs. ``metrics.jsonl`` is cut back to the
resumed step, so a crash and resume leave no duplicate rows. docs/metrics.md lists every metric.

W&B also gets histograms that a row's scalars spell out (``wandb_histograms``): the curriculum pool's
pass rates, the codistillation λ and each MoE layer's expert load, so their panels show the shape over
time; metrics.jsonl keeps the scalars only.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from posttrain.config import TrackingConfig
from posttrain.errors import UserError


class TrackingError(UserError):
    """W&B could not start as configured (the message says what to change)."""


class Tracker:
    def __init__(
        self,
        cfg: TrackingConfig,
        stage_dir: Path,
        run_name: str,
        stage: str,
        config: dict[str, Any],
        enabled: bool = True,
    ):
        self.cfg = cfg
        self.dir = stage_dir
        self.enabled = enabled
        self.metrics_path = stage_dir / "metrics.jsonl"
        self.samples_path = stage_dir / "samples.jsonl"
        self._wandb: Any = None
        self._tables: dict[str, Any] = {}
        self._bar: Any = None
        if not enabled:
            return
        mode = os.environ.get("WANDB_MODE", cfg.wandb.mode)
        if mode == "disabled":
            return
        import wandb

        id_file = stage_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_CACHE_DIR", str(stage_dir / "wandb" / "cache"))
        os.environ.setdefault("WANDB_DATA_DIR", str(stage_dir / "wandb" / "data"))
        try:
            self._wandb = wandb.init(
                project=cfg.wandb.project,
                entity=cfg.wandb.entity,
                name=f"{run_name}/{stage}",
                group=run_name,
                job_type=stage,
                id=run_id,
                resume="allow",
                dir=str(stage_dir),
                mode=mode,  # type: ignore[arg-type]  # checked by the schema (or WANDB_MODE)
                config=config,
                settings=wandb.Settings(init_timeout=cfg.wandb.init_timeout_s, silent=True, console="off"),
            )
        except wandb.errors.Error as e:  # no network, a bad key, an unknown entity: one line, no hang
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrackingError(
                f"W&B ({mode}) did not start within tracking.wandb.init_timeout_s={cfg.wandb.init_timeout_s:g}: {first}; "
                "check WANDB_API_KEY and the network, or set tracking.wandb.mode=offline (sync later with `wandb sync`)"
            ) from None

    # ---------------------------------------------------------------------------------------------

    def resume_at(self, step: int) -> None:
        """Drop rows logged after ``step`` (they are recomputed after a resume), and a torn last line
        (a kill in the middle of a write); rewritten atomically."""
        if not self.enabled:
            return
        for path in (self.metrics_path, self.samples_path):
            if path.exists():
                kept = [
                    ln
                    for ln in path.read_text().splitlines()
                    if (row := _row(ln)) is not None and row.get("step", 0) <= step
                ]
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(ln + "\n" for ln in kept))
                tmp.replace(path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            import numpy as np
            import wandb

            scalars = {k: v for k, v in row.items() if k not in ("step", "time")}
            hists = {
                k: wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
                for k, (counts, edges) in wandb_histograms(scalars).items()
            }
            self._wandb.log(scalars | hists, step=step)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Append rows to a W&B table that grows over the run (never overwritten) and to samples.jsonl."""
        if not self.enabled or not rows:
            return
        with self.samples_path.open("a") as f:
            for r in rows:
                f.write(
                    json.dumps({"step": step, "table": name, **{k: _plain(v) for k, v in r.items()}}) + "\n"
                )
        if self._wandb is not None:
            import wandb

            keys = list(rows[0].keys())
            if name not in self._tables:
                self._tables[name] = wandb.Table(columns=["step", *keys], log_mode="INCREMENTAL")
            for r in rows:
                self._tables[name].add_data(step, *[_plain(r.get(c)) for c in keys])
            self._wandb.log({name: self._tables[name]}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = _plain(v)

    # ---------------------------------------------------------------------------------------------

    def progress(self, total: int, initial: int, desc: str) -> None:
        if self.enabled and self.cfg.progress:
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr
            )

    def advance(self, postfix: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if postfix:
                self._bar.set_postfix(
                    {k: f"{v:.3g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


_BIN = re.compile(r"^(?P<name>.+)/(?P<lo>\d+(?:\.\d+)?)-(?P<hi>\d+(?:\.\d+)?)$")
_EXPERT = re.compile(r"^(?P<layer>moe/L\d+)/tokens/e(?P<e>\d+)$")


def wandb_histograms(metrics: dict[str, Any]) -> dict[str, tuple[list[float], list[float]]]:
    """The histograms a row's scalars spell out, as ``{name: (counts, bin edges)}``:

    - ``<name>/<lo>-<hi>`` bins that tile an interval (``curriculum/pool/rate_hist/0.0-0.2`` …,
      ``codistill/lambda_hist/…``) -> ``<name>`` with those edges;
    - ``moe/L<i>/tokens/e<j>`` -> ``moe/L<i>/load``: routed tokens per expert j (edges 0 … E).

    >>> wandb_histograms({"a/0.5-1.0": 3, "a/0.0-0.5": 1, "a/unknown": 2, "moe/L0/tokens/e1": 5, "moe/L0/tokens/e0": 7})
    {'a': ([1.0, 3.0], [0.0, 0.5, 1.0]), 'moe/L0/load': ([7.0, 5.0], [0.0, 1.0, 2.0])}
    """
    bins: dict[str, list[tuple[float, float, float]]] = {}
    experts: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if not isinstance(value, int | float):
            continue
        if m := _BIN.match(key):
            bins.setdefault(m["name"], []).append((float(m["lo"]), float(m["hi"]), float(value)))
        elif m := _EXPERT.match(key):
            experts.setdefault(f"{m['layer']}/load", {})[int(m["e"])] = float(value)
    out: dict[str, tuple[list[float], list[float]]] = {}
    for name, parts in bins.items():
        parts.sort()
        if all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False)):  # contiguous: a histogram
            out[name] = ([c for _, _, c in parts], [parts[0][0], *(hi for _, hi, _ in parts)])
    for name, per_expert in experts.items():
        if sorted(per_expert) == list(range(len(per_expert))):
            out[name] = (
                [per_expert[e] for e in range(len(per_expert))],
                [float(e) for e in range(len(per_expert) + 1)],
            )
    return out


def _plain(v: Any) -> Any:
    """Tensors and numpy scalars -> Python numbers, so every row is JSON."""
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def _row(line: str) -> dict[str, Any] | None:
    """A metrics.jsonl row, or None for a blank or torn line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None
