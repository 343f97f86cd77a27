"""Metrics reach real W&B (offline mode, no network) and metrics.jsonl; a resumed stage continues the
same W&B run; an online W&B that cannot be reached fails in one line within its timeout.

The offline run file is read back with a small reader of W&B's record log (LevelDB log framing:
32 KiB blocks of [crc32 u32, length u16, type u8] + payload, after a 7-byte ``:W&B`` header) and
W&B's own protobuf ``Record`` — so the test checks what W&B wrote, not what posttrain meant to send.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from posttrain.config import TrackingConfig, WandbConfig
from posttrain.tracking import Tracker, TrackingError


def wandb_records(run_file: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", run_file
    block, pos, payloads, partial = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:  # full
            payloads.append(chunk)
        elif kind == 2:  # first
            partial = chunk
        elif kind == 3:  # middle
            partial += chunk
        elif kind == 4:  # last
            payloads.append(partial + chunk)
    records = []
    for raw in payloads:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def history(run_file: Path) -> list[dict[str, Any]]:
    rows = []
    for rec in wandb_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_offline_wandb_run_holds_the_metrics_and_tables_and_a_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest disables W&B for every other test
    stage = tmp_path / "warmup"
    stage.mkdir()
    cfg = TrackingConfig(wandb=WandbConfig(mode="offline"))

    t = Tracker(cfg, stage, "run", "warmup", {"lr": 0.1})
    for step in (1, 2, 3):
        t.log({"train/loss": 1.0 / step}, step)
        t.table("rollouts", [{"prompt": f"{step}+1=", "reward": float(step % 2)}], step)
    t.close()
    run_id = (stage / "wandb_id").read_text()
    (first,) = stage.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    rows = history(first)
    assert [r["_step"] for r in rows] == [1, 2, 3]
    assert [r["train/loss"] for r in rows] == [1.0, 0.5, 1.0 / 3]
    # the rollout table grows: one increment (its new rows only) per logged step, none overwritten
    assert [(r["rollouts/_type"], r["rollouts/nrows"]) for r in rows] == [
        ("incremental-table-file", n) for n in (1, 2, 3)
    ]
    parts = [json.loads((first.parent / "files" / r["rollouts/path"]).read_text()) for r in rows]
    assert [p["data"] for p in parts] == [[[1, "1+1=", 1.0]], [[2, "2+1=", 0.0]], [[3, "3+1=", 1.0]]]

    # the stage crashed after step 3 with its last state saved at step 2: the resume starts at 2
    time.sleep(1.1)  # W&B names offline runs by the second
    t = Tracker(cfg, stage, "run", "warmup", {"lr": 0.1})
    t.resume_at(2)
    for step in (3, 4):
        t.log({"train/loss": 0.1 * step}, step)
    t.close()
    assert (stage / "wandb_id").read_text() == run_id  # the same W&B run
    runs = sorted(stage.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(runs) == 2 and runs[0] == first
    assert [(r["_step"], r["train/loss"]) for r in history(runs[1])] == [(3, 0.1 * 3), (4, 0.1 * 4)]
    lines = [json.loads(x) for x in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in lines] == [(1, 1.0), (2, 0.5), (3, 0.1 * 3), (4, 0.1 * 4)]
    samples = [json.loads(x) for x in (stage / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in samples] == [1, 2]  # rows after the resumed step are dropped


def test_unreachable_online_wandb_fails_in_one_line_within_its_timeout(tmp_path, monkeypatch):
    """No network here: online W&B with a well-formed key must fail fast, not block for minutes."""
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    cfg = TrackingConfig(wandb=WandbConfig(mode="online", init_timeout_s=5))
    t0 = time.monotonic()
    with pytest.raises(
        TrackingError,
        match=r"W&B \(online\) did not start within tracking.wandb.init_timeout_s=5: .*mode=offline",
    ) as e:
        Tracker(cfg, tmp_path, "run", "warmup", {})
    assert time.monotonic() - t0 < 60
    assert "\n" not in str(e.value)
