"""Shared test set-up: tiny models only, W&B off unless a test turns it on, quiet thread use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _fresh_rank_env(monkeypatch):
    """An in-process run sets the rank variables of a world of one (posttrain.strategy); they must not
    reach later tests, whose child `posttrain run` would take itself for an already-launched rank."""
    for name in _RANK_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def run_cli(tmp_path):
    """Run ``posttrain ARGS`` in a subprocess inside tmp_path; returns CompletedProcess (text)."""

    def run(
        *args: str, timeout: float = 600, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, "-m", "posttrain.cli", *args],
            cwd=tmp_path, capture_output=True, text=True, timeout=timeout, env=full_env,
        )  # fmt: skip

    return run


# A few-step SFT recipe on the tiny dense model (tests/recipes/tiny_sft.yaml): what end-to-end tests run.
TINY_RECIPE = f"recipe={REPO / 'tests' / 'recipes' / 'tiny_sft.yaml'}"
TINY_OVERRIDES: list[str] = []
