"""The package's imports read top-down: cli -> pipeline -> stages -> the machinery.

Read from the source with ``ast`` (every ``import``/``from`` statement, also inside functions):
nothing but the entry point imports ``posttrain.cli``; no stage imports ``posttrain.pipeline``; the
machinery (everything outside ``posttrain/stages/``, ``pipeline.py`` and ``cli.py``) imports neither
the stages nor the pipeline; one stage table (``posttrain.config.STAGES``) names every stage runner,
and each names a function of a module under ``posttrain/stages/``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from posttrain.config import STAGES

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("posttrain", "rewards", "data_filters")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _modules() -> dict[str, set[str]]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name] = _imports(path)
    return out


def _imports_module(imports: set[str], module: str) -> bool:
    return any(i == module or i.startswith(module + ".") for i in imports)


def test_only_the_entry_point_imports_the_cli() -> None:
    offenders = [
        m for m, imps in _modules().items() if m != "posttrain.cli" and _imports_module(imps, "posttrain.cli")
    ]
    assert offenders == []


def test_imports_run_downward() -> None:
    modules = _modules()
    stages = [m for m in modules if m.startswith("posttrain.stages")]
    assert "posttrain.stages.context" in stages and len(stages) >= 4
    upward = [m for m in stages if _imports_module(modules[m], "posttrain.pipeline")]
    assert upward == [], f"stages importing the pipeline: {upward}"
    top = {"posttrain.cli", "posttrain.pipeline", *stages}
    machinery = [m for m in modules if m not in top]
    upward = [
        m
        for m in machinery
        if _imports_module(modules[m], "posttrain.stages")
        or _imports_module(modules[m], "posttrain.pipeline")
    ]
    assert upward == [], f"machinery importing stages or the pipeline: {upward}"


def test_one_stage_table_names_every_runner() -> None:
    assert set(STAGES) >= {"sft", "rl", "distill"}
    for kind, row in STAGES.items():
        module, _, fn = row.runner.partition(":")
        assert module.startswith("posttrain.stages."), row
        assert callable(getattr(importlib.import_module(module), fn)), row
        assert row.config.__dataclass_fields__["type"].default == kind
    pipeline = (REPO / "posttrain" / "pipeline.py").read_text()
    assert "posttrain.stages." not in pipeline.replace("posttrain.stages.context", "")


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter"}  # fmt: skip


def test_collectives_only_through_the_strategy() -> None:
    """A collective on a CPU tensor fails under NCCL ("No backend type associated with device type cpu"):
    every collective of the package goes through ``Strategy`` (which reduces on its training device) or
    ``moe.ExpertParallel`` (on its layers' device), or is the rollout engine's gather of prompt objects
    within its tensor-parallel group (an object collective: on the current CUDA device under NCCL). A
    raw ``torch.distributed.<collective>`` call anywhere else fails this test."""
    offenders = []
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if path.relative_to(REPO).as_posix() in (
                "posttrain/strategy.py",
                "posttrain/moe.py",
                "posttrain/rollout.py",
            ):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                    base = ast.unparse(node.value)
                    if base in ("torch.distributed", "dist"):
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {base}.{node.attr}")
    assert offenders == []
