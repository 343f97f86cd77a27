"""Data filters: difficulty judges that score an SFT stage's rows, and the selection that drops the easy ones.

    run_filters(rows, specs, selection, …)
      for each spec: resolve (posttrain.plugins.resolve_filter) -> FilterContext -> fn(rows, ctx) -> FilterScores
      difficulty = weighted mean of the filters' scores (1 = hardest; None: no filter could score the row)
      -> select (posttrain/selection.py) -> FilterRun: kept rows, metrics, notes
    write_selection(stage_dir, run)   data_selection.json (kept / dropped row ids, counts, notes) and
                                      data_scores.jsonl (one line per row: id, capability, label, scores, kept)

A filter that runs a model gets a ``Judge``: the rollout engine (``posttrain.rollout``: vLLM, or ``engine:
hf``) on the spec's judge model, started only when some row is not in the judgment cache, plus the
cache itself and a progress bar with ETA over the judge calls (one call = one prompt sent to the engine).

The judgment cache (``JudgmentCache``) lives on disk under ``<judgment_cache>/<filter>/<key>/``; the key
hashes the judge's fingerprint (its config and every file of its checkpoint dir: weights, tokenizer),
the filter's own settings (template, reward, …) and the sampling settings; inside it each row is keyed by
a hash of the example's columns. Rows are judged in chunks of ``judge.batch_size`` and each chunk is
appended to the cache as soon as it is scored, so a rerun, a resumed run or another recipe over the same
data makes no judge call, and a pass killed half-way makes exactly the calls for the rows it had not
written. Identical examples are judged once. Under several ranks each rank judges its share of the
missing rows and every rank then reads the whole cache (a shared filesystem).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from posttrain.config import DataFilterSpec, JudgeConfig, SelectionConfig
from posttrain.errors import UserError
from posttrain.plugins import DataFilterInfo, resolve_filter
from posttrain.schema import to_dict
from posttrain.selection import Selection, select, selection_metrics
from posttrain.types import RolloutGroup, Sample

SELECTION_FILE = "data_selection.json"  # beside a filtered stage's checkpoint: kept / dropped ids, counts
SCORES_FILE = "data_scores.jsonl"  # one line per row: id, capability, label, each filter's score, kept


class FilterError(UserError):
    """A data filter that returned something the selection cannot use (wrong length, …)."""


@dataclass
class FilterScores:
    """What a filter returns: one difficulty per row in [0, 1] (1 = hardest; None: could not score it),
    its own metrics (logged as ``data/filter/<name>/<key>``) and one-line notes on what it counted."""

    scores: list[float | None]
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# The judgment cache


def example_hash(row: dict[str, Any], columns: Sequence[str]) -> str:
    """A stable hash of the example's ``columns`` (values as JSON; missing columns count as null).

    >>> example_hash({"prompt": "1+1=", "answer": "2", "x": 1}, ["prompt", "answer"]) == example_hash(
    ...     {"answer": "2", "prompt": "1+1="}, ["answer", "prompt"])
    True
    """
    payload = json.dumps({c: row.get(c) for c in sorted(columns)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class JudgmentCache:
    """Judgments of one filter under one key (judge fingerprint + settings): ``{example hash: value}``.

    Stored as JSON lines in ``<root>/<filter>/<key>/``, one file per writing process (appends never
    interleave), a ``settings.json`` saying what the key stands for. A line cut short by a kill is skipped
    on reading: that row is judged again, nothing else.
    """

    def __init__(self, root: Path, filter_name: str, settings: dict[str, Any]) -> None:
        self.dir = Path(root).expanduser() / _safe(filter_name) / settings_hash(settings)
        self.dir.mkdir(parents=True, exist_ok=True)
        info = self.dir / "settings.json"
        if not info.exists():
            tmp = info.with_name(f"settings.json.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))
            tmp.replace(info)
        self._file = self.dir / f"judgments-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.values: dict[str, Any] = {}
        self.reload()

    def reload(self) -> None:
        for path in sorted(self.dir.glob("judgments-*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    item = json.loads(line)
                    self.values[item["x"]] = item["v"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by a kill

    def put(self, items: Sequence[tuple[str, Any]]) -> None:
        """Append judgments and flush them to disk before returning (a kill after this keeps them)."""
        with self._file.open("a") as f:
            f.write("".join(json.dumps({"x": k, "v": v}) + "\n" for k, v in items))
            f.flush()
            os.fsync(f.fileno())
        self.values.update(items)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def model_fingerprint(model_dir: Path, memo: Path | None = None) -> str:
    """A hash of every file in a checkpoint dir (config, weights, tokenizer): two dirs with the same
    files have the same fingerprint. Each file's hash is remembered in ``memo`` by (path, size,
    mtime), so a rerun reads no weights again."""
    known: dict[str, str] = {}
    if memo is not None and memo.exists():
        try:
            known = json.loads(memo.read_text())
        except json.JSONDecodeError:
            known = {}
    parts = []
    changed = False
    for path in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        st = path.stat()
        stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        digest = known.get(stamp)
        if digest is None:
            h = hashlib.sha256()
            with path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            digest = known[stamp] = h.hexdigest()
            changed = True
        parts.append(f"{path.name}:{digest}")
    if memo is not None and changed:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(memo)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------------
# The judge a filter runs


class Judge:
    """A judge model behind the rollout engine, with the judgment cache and the counters of its calls.

    ``map`` is the one way a filter judges rows: it looks every row up in the cache and hands only the
    missing ones, in chunks of ``cfg.batch_size``, to ``compute``; ``generate`` and
    ``next_token_logprobs`` are the engine's, counted. The engine starts on the first uncached chunk.
    """

    def __init__(
        self,
        cfg: JudgeConfig,
        model_dir: Path,
        cache_root: Path,
        work_dir: Path,
        label: str,
        progress: bool = True,
        rank: int = 0,
        world: int = 1,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg, self.model_dir, self.cache_root, self.work_dir = cfg, Path(model_dir), cache_root, work_dir
        self.label, self.progress = label, progress
        self.rank, self.world, self.barrier = rank, world, barrier
        self._engine: Any = None
        self._tokenizer: Any = None
        self._fingerprint: str | None = None
        self.calls = 0  # prompts sent to the engine
        self.completions = 0
        self.tokens = 0
        self.cache_hits = 0  # rows answered from the cache
        self.skipped_overlong = 0
        self.seconds = 0.0  # engine time
        self.start_seconds = 0.0

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model_dir, Path(self.cache_root) / "fingerprints.json")
        return self._fingerprint

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from posttrain.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    @property
    def engine(self) -> Any:
        if self._engine is None:
            from posttrain.rollout import make_engine

            t0 = time.perf_counter()
            self._engine = make_engine(
                self.cfg.engine.kind, self.model_dir, self.tokenizer, self.cfg.engine,
                work_dir=self.work_dir / f"judge_rank{self.rank}",
            )  # fmt: skip
            self.start_seconds += time.perf_counter() - t0
        return self._engine

    def key_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The cache key of a filter's settings under this judge: fingerprint, sampling, engine kind."""
        engine = self.cfg.engine
        return {
            "judge": self.fingerprint,
            "sampling": to_dict(self.cfg.sampling),
            "engine": {"kind": engine.kind, "dtype": engine.dtype, "max_model_len": engine.max_model_len},
            **settings,
        }

    def generate(self, samples: Sequence[Sample], seed: int | None = None) -> list[RolloutGroup]:
        """The judge's ``cfg.sampling`` completions of each prompt (a skipped, too long prompt has no group)."""
        import dataclasses

        engine = self.engine  # started on first use (counted in start_seconds, not in judging time)
        t0 = time.perf_counter()
        params = self.cfg.sampling if seed is None else dataclasses.replace(self.cfg.sampling, seed=seed)
        groups: list[RolloutGroup] = engine.generate(samples, params)
        self._count(len(samples), self.engine.last_stats, time.perf_counter() - t0)
        return groups

    def next_token_logprobs(
        self, samples: Sequence[Sample], token_ids: Sequence[int]
    ) -> list[list[float] | None]:
        engine = self.engine
        t0 = time.perf_counter()
        out: list[list[float] | None] = engine.next_token_logprobs(samples, token_ids)
        self._count(len(samples), self.engine.last_stats, time.perf_counter() - t0)
        return out

    def _count(self, prompts: int, stats: Any, seconds: float) -> None:
        self.calls += prompts
        self.completions += int(stats.completions)
        self.tokens += int(stats.tokens)
        self.skipped_overlong += int(stats.skipped_overlong)
        self.seconds += seconds

    def map(
        self,
        filter_name: str,
        settings: dict[str, Any],
        rows: Sequence[dict[str, Any]],
        columns: Sequence[str],
        compute: Callable[[list[int], int], list[Any]],
    ) -> list[Any]:
        """One cached value per row. ``compute(indices, chunk_no)`` judges the rows at ``indices`` (JSON
        values, one each; ``chunk_no``, the chunk's place among the distinct examples, for seeding);
        ``columns``: the columns that make an example."""
        cache = JudgmentCache(self.cache_root, filter_name, self.key_settings(settings))
        keys = [example_hash(r, columns) for r in rows]
        first: dict[str, int] = {}  # example hash -> first row with it
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        self.cache_hits += sum(1 for k in keys if k in cache.values)
        # Chunks are cut from the distinct examples in row order, whatever the cache holds, and chunk c
        # goes to rank c % world: a chunk is judged with the same rows and seed whether the pass is
        # whole, resumed after a kill (the cache is written a chunk at a time) or run on other ranks.
        size = self.cfg.batch_size
        uniq = list(first.values())
        chunks = list(enumerate(uniq[at : at + size] for at in range(0, len(uniq), size)))
        todo = [(c, idx) for c, idx in chunks if any(keys[i] not in cache.values for i in idx)]
        mine = [(c, idx) for c, idx in todo if c % self.world == self.rank]
        if todo and self.world > 1:
            _ = self.engine  # every rank starts its engine (on GPUs vLLM joins the ranks' group together)
        cached = len(rows) - sum(len(idx) for _, idx in todo)
        bar = self._bar(sum(len(idx) for _, idx in mine), filter_name, cached)
        for chunk_no, chunk in mine:
            values = compute(chunk, chunk_no)
            if len(values) != len(chunk):
                raise FilterError(
                    f"data filter {filter_name!r}: judged {len(chunk)} rows, got {len(values)} values"
                )
            cache.put([(keys[i], v) for i, v in zip(chunk, values, strict=True)])
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        if self.world > 1:
            self.barrier()  # every rank's share is on disk
            cache.reload()
        return [cache.values.get(k) for k in keys]

    def _bar(self, total: int, filter_name: str, hits: int) -> Any:
        if not self.progress or self.rank != 0 or total == 0:
            return None
        from tqdm import tqdm

        return tqdm(
            total=total, desc=f"{self.label}: {filter_name} judge ({hits} cached)", unit="prompt",
            dynamic_ncols=True, file=sys.stderr,
        )  # fmt: skip

    def metrics(self) -> dict[str, float]:
        return {
            "judge_calls": float(self.calls),
            "judge_completions": float(self.completions),
            "judge_tokens": float(self.tokens),
            "cache_hits": float(self.cache_hits),
            "skipped_overlong": float(self.skipped_overlong),
            "judge_seconds": self.seconds,
            "judge_start_seconds": self.start_seconds,
            "judge_prompts_per_s": self.calls / self.seconds if self.seconds > 0 else 0.0,
            "judge_tokens_per_s": self.tokens / self.seconds if self.seconds > 0 else 0.0,
        }

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None


@dataclass
class FilterContext:
    """What a filter function receives besides the rows."""

    name: str  # the filter's name in the recipe
    options: Any  # its options dataclass (parsed from the spec's kwargs), or the kwargs dict
    judge: Judge | None  # filters registered with judge=True
    seed: int
    spec: DataFilterSpec | None = None

    def require_judge(self) -> Judge:
        if self.judge is None:
            raise FilterError(
                f"data filter {self.name!r} needs a judge model; add judge: {{model: …}} to its spec"
            )
        return self.judge


# --------------------------------------------------------------------------------------------------
# Running the filters and the selection


@dataclass
class FilterRun:
    ids: list[str]  # row ids (the data's ``id`` column, else the row number)
    capability: list[str]
    labels: list[Any] | None  # the data's own ``difficulty`` column, when it has one
    scores: dict[str, list[float | None]]  # per filter
    difficulty: list[float | None]  # the weighted mean the selection used
    selection: Selection
    metrics: dict[str, Any]
    notes: list[str]


def row_ids(rows: datasets.Dataset) -> list[str]:
    if "id" in rows.column_names:
        return [str(v) for v in rows["id"]]
    return [str(i) for i in range(len(rows))]


def resolve_judge_model(model: str, stages: Sequence[str], run_dir: Path) -> Path:
    """A judge's checkpoint dir: an earlier stage's name means ``<run dir>/<stage>/checkpoint``."""
    if model in stages:
        return run_dir / model / "checkpoint"
    return Path(model).expanduser()


def run_filters(
    rows: datasets.Dataset,
    specs: Sequence[DataFilterSpec],
    selection: SelectionConfig,
    *,
    seed: int,
    cache_root: Path,
    work_dir: Path,
    judge_dir: Callable[[str], Path] = lambda m: Path(m).expanduser(),
    label: str = "data",
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
    path: str = "data_filters",
) -> FilterRun:
    """Score ``rows`` with every filter of ``specs`` and select the rows to keep (see the module doc)."""
    n = len(rows)
    scores: dict[str, list[float | None]] = {}
    metrics: dict[str, Any] = {}
    notes: list[str] = []
    for j, spec in enumerate(specs):
        fn, info, options = resolve_filter(spec, f"{path}[{j}]")
        judge = None
        if spec.judge is not None:
            judge = Judge(spec.judge, judge_dir(spec.judge.model), cache_root, work_dir, label, progress,
                          rank, world, barrier)  # fmt: skip
        ctx = FilterContext(spec.name, options, judge, seed, spec)
        t0 = time.perf_counter()
        try:
            out = _as_scores(fn(rows, ctx), n, info)
        finally:
            if judge is not None:
                judge.close()
        name = info.name
        scores[name] = out.scores
        prefix = f"data/filter/{name}/"
        metrics |= {prefix + k: v for k, v in out.metrics.items()}
        if judge is not None:
            for k, v in judge.metrics().items():  # throughput under perf/, counts under data/filter/
                metrics[f"perf/{name}_{k}" if k.endswith("_per_s") else prefix + k] = v
        unscored = sum(s is None for s in out.scores)
        metrics[prefix + "unscored"] = float(unscored)
        metrics[prefix + "seconds"] = time.perf_counter() - t0
        notes += [f"{name}: {line}" for line in out.notes]
    weights = {info_name: spec.weight for info_name, spec in zip(scores, specs, strict=True)}
    difficulty = combine(scores, weights)
    caps = [str(c) for c in rows["capability"]] if "capability" in rows.column_names else ["default"] * n
    labels = list(rows["difficulty"]) if "difficulty" in rows.column_names else None
    ids = row_ids(rows)
    sel = select(difficulty, caps, ids, selection, seed)
    metrics |= selection_metrics(sel, difficulty, caps, labels)
    return FilterRun(ids, caps, labels, scores, difficulty, sel, metrics, notes + sel.notes)


def combine(scores: dict[str, list[float | None]], weights: dict[str, float]) -> list[float | None]:
    """Per row, the weighted mean of the scores the filters with weight > 0 gave it (None: none did).

    >>> combine({"a": [0.0, None, 1.0], "b": [1.0, None, None]}, {"a": 1.0, "b": 3.0})
    [0.75, None, 1.0]
    """
    n = len(next(iter(scores.values()))) if scores else 0
    out: list[float | None] = []
    for i in range(n):
        num = den = 0.0
        for name, values in scores.items():
            w, v = weights.get(name, 1.0), values[i]
            if w > 0 and v is not None:
                num, den = num + w * v, den + w
        out.append(num / den if den > 0 else None)
    return out


def _as_scores(out: Any, n: int, info: DataFilterInfo) -> FilterScores:
    """A filter's return value as ``FilterScores``: a length check, and values outside [0, 1] or NaN
    become None (counted in a note)."""
    result = out if isinstance(out, FilterScores) else FilterScores(list(out))
    if len(result.scores) != n:
        raise FilterError(
            f"data filter {info.name!r} returned {len(result.scores)} scores for {n} rows; return one per row"
        )
    bad = 0
    clean: list[float | None] = []
    for v in result.scores:
        ok = v is not None and isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0
        bad += v is not None and not ok
        clean.append(float(v) if ok and v is not None else None)
    if bad:
        result.notes.append(f"{bad} score(s) outside [0, 1] or not a number were taken as unscored")
        result.metrics["invalid_scores"] = float(bad)
    result.scores = clean
    return result


def write_selection(out_dir: Path, run: FilterRun) -> Path:
    """``data_selection.json`` (kept and dropped row ids, counts, notes) and ``data_scores.jsonl`` in
    ``out_dir``; returns the first."""
    from posttrain.data import write_json_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    sel = run.selection
    summary = {
        "rows": len(run.ids),
        "kept": len(sel.kept),
        "dropped": len(sel.dropped),
        "unscored": sel.unscored,
        "rescued": sel.rescued,
        "notes": run.notes,
        "filters": sorted(run.scores),
        "metrics": {k: v for k, v in run.metrics.items() if not isinstance(v, list)},
        "kept_ids": [run.ids[i] for i in sel.kept],
        "dropped_ids": [run.ids[i] for i in sel.dropped],
    }
    write_json_atomic(out_dir / SELECTION_FILE, summary)
    kept = set(sel.kept)
    lines = []
    for i, row_id in enumerate(run.ids):
        line = {
            "id": row_id,
            "capability": run.capability[i],
            "label": run.labels[i] if run.labels is not None else None,
            "difficulty": run.difficulty[i],
            "scores": {name: values[i] for name, values in run.scores.items()},
            "kept": i in kept,
        }
        lines.append(json.dumps(line, default=str))
    tmp = out_dir / f"{SCORES_FILE}.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(out_dir / SCORES_FILE)
    return out_dir / SELECTION_FILE


def read_selection(stage_dir: Path) -> dict[str, Any] | None:
    """A filtered stage's ``data_selection.json`` (None for a stage without data filters)."""
    path = Path(stage_dir) / SELECTION_FILE
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data
