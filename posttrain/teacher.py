"""Teacher targets for codistillation, two ways.

**Online**: the teacher runs forward in the same step as the student, under ``no_grad``, on the same
batch (``online_targets``). The stages hold the teacher through ``Strategy.frozen``: eval mode, no
optimizer, in the training dtype, ZeRO-3-partitioned when the student is and expert-parallel when
``parallel.ep_size > 1`` (it may be larger than the student and MoE, e.g.
``recipes/model/tiny_behemoth.yaml``).

**Offline**: ``write_offline_targets`` runs the teacher once over a tokenised corpus and stores, for
every loss position of every example, the teacher's top-k log-probabilities (temperature 1) and
token ids, with ``datasets`` (Arrow, memory-mapped). The distill stage reads rows of that dataset
batch by batch (``OfflineTargets``), so the teacher is not needed while the student trains.

    posttrain teacher-targets recipe=distill_tiny stage=distill [key=value …]

writes the targets of stage ``distill`` to its ``codistill.targets`` dir (the distill stage also
does this itself when the dir does not exist yet and a teacher is configured).

Arrow layout (one row per example)::

    input_ids      list[int32]            [L]   the tokenised example (chat template applied)
    labels         list[int32]            [L]   -100 on the prompt, completion ids + EOS
    topk_logprobs  list[list[float32]]    [N, K] one row per loss position (labels[t+1] != -100), in order
    topk_indices   list[list[int32]]      [N, K]

and ``teacher_targets.json`` beside it: vocabulary size, a fingerprint of the tokenizer's vocabulary,
k, the teacher's name, and the provenance of the rows (teacher config, data config, seed, max length).
A student whose tokenizer differs is refused with one line naming both; a stage whose teacher, data,
seed, k or max length differ from what the targets were written for is refused with one line naming
the first difference (stale targets are never reused silently).

Teacher and student must share one tokenizer (same token -> id map): the loss compares their
distributions id by id. ``check_same_vocab`` enforces it for both paths.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F

from posttrain.config import ModelConfig
from posttrain.data import Example, collate_padded
from posttrain.losses import IGNORE_INDEX, TeacherTargets
from posttrain.models import build_model
from posttrain.schema import ConfigError, first_difference, to_dict
from posttrain.strategy import FrozenModel

META_FILE = "teacher_targets.json"
FORMAT_VERSION = 2  # 2: provenance recorded


class VocabMismatchError(ConfigError):
    """Teacher and student tokenizers differ; the message names both."""


# --------------------------------------------------------------------------------------------------
# vocabulary checks


def vocab_fingerprint(tokenizer: Any) -> str:
    """A short hash of the tokenizer's token -> id map (equal maps <=> equal fingerprints)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def _tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_same_vocab(
    teacher_vocab: int, teacher_fp: str, teacher_name: str, student_tokenizer: Any, student_vocab: int
) -> None:
    """Fail with one line unless the teacher's vocabulary (size + token map) is the student's."""
    student_fp = vocab_fingerprint(student_tokenizer)
    if teacher_vocab != student_vocab or teacher_fp != student_fp:
        raise VocabMismatchError(
            f"teacher vocabulary ({teacher_name}: {teacher_vocab} tokens, vocab {teacher_fp}) differs from the "
            f"student's ({_tokenizer_name(student_tokenizer)}: {student_vocab} tokens, vocab {student_fp}); "
            "codistillation needs one shared tokenizer: use a teacher trained with the student's tokenizer"
        )


def model_vocab(model: Any) -> int:
    """Rows of the model's output layer (the V of its logits)."""
    return int(model.get_output_embeddings().weight.shape[0])


# --------------------------------------------------------------------------------------------------
# online


def load_teacher(cfg: ModelConfig, student_tokenizer: Any, student_vocab: int, seed: int = 0) -> Any:
    """The teacher model in eval mode with no grad, checked against the student's vocabulary."""
    model, tokenizer = build_model(cfg, seed=seed)
    name = f"teacher {cfg.name_or_path or cfg.arch} tokenizer {_tokenizer_name(tokenizer)}"
    check_same_vocab(model_vocab(model), vocab_fingerprint(tokenizer), name, student_tokenizer, student_vocab)
    model.train(False)
    model.requires_grad_(False)
    return model


@torch.no_grad()
def online_targets(
    teacher: FrozenModel | Any, batch: dict[str, torch.Tensor], top_k: int = 0
) -> TeacherTargets:
    """Teacher targets for ``batch`` (input_ids [B, T] + attention_mask or position_ids), aligned with
    ``shift_for_next_token``: position t predicts token t + 1, so the result covers [B, T-1].

    ``top_k`` > 0 keeps only the top-k log-probs (what offline targets store); 0 keeps full logits.
    """
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    if not isinstance(teacher, FrozenModel):  # a plain HF model: run it where its weights are
        teacher = FrozenModel(teacher, next(teacher.parameters()).device)
    out = teacher(**inputs)  # no KV cache (it would ignore the position_ids restarts of packed rows)
    logits = out.logits[:, :-1, :].float()  # [B, T-1, V]
    if top_k <= 0:
        return TeacherTargets(logits=logits)
    values, index = torch.topk(F.log_softmax(logits, dim=-1), k=min(top_k, logits.shape[-1]), dim=-1)
    return TeacherTargets(topk_logprobs=values, topk_indices=index)  # [B, T-1, K] each


# --------------------------------------------------------------------------------------------------
# offline: write


def loss_positions(labels: Sequence[int]) -> list[int]:
    """Positions t whose next token is trained on (the rows of the shifted loss)."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]


def _target_rows(
    teacher: Any, examples: Sequence[Example], top_k: int, batch_size: int, pad_id: int
) -> Iterator[dict[str, Any]]:
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        targets = online_targets(teacher, collate_padded(chunk, pad_id), top_k)
        assert targets.topk_logprobs is not None and targets.topk_indices is not None
        values, index = targets.topk_logprobs.cpu(), targets.topk_indices.cpu()  # [B, T-1, K]
        for b, ex in enumerate(chunk):
            pos = loss_positions(ex.labels)
            yield {
                "input_ids": ex.input_ids,
                "labels": ex.labels,
                "topk_logprobs": values[b, pos].tolist(),
                "topk_indices": index[b, pos].tolist(),
            }


FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "topk_logprobs": datasets.Sequence(datasets.Sequence(datasets.Value("float32"))),
        "topk_indices": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
    }
)


def write_offline_targets(
    teacher: Any,
    teacher_tokenizer: Any,
    examples: Sequence[Example],
    out_dir: str | Path,
    top_k: int,
    batch_size: int = 64,
    teacher_name: str = "teacher",
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Run ``teacher`` over ``examples`` and save top-k targets to ``out_dir`` (Arrow + metadata).

    ``provenance`` (what produced ``examples``: see ``stage_provenance``) is stored and checked again
    when a stage opens the targets.

    Written to ``<out_dir>.partial`` first and renamed when complete, so an interrupted run never
    leaves a half-written dir that looks finished.
    """
    if top_k <= 0:
        raise ConfigError(f"offline teacher targets need top_k >= 1, got {top_k}")
    out = Path(out_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    vocab = model_vocab(teacher)
    k = min(top_k, vocab)
    teacher.eval()
    ds = datasets.Dataset.from_generator(  # streams rows to Arrow files in batches; memory stays flat
        _target_rows,
        features=FEATURES,
        cache_dir=str(partial.with_name(partial.name + ".cache")),
        gen_kwargs={
            "teacher": teacher,
            "examples": examples,
            "top_k": k,
            "batch_size": batch_size,
            "pad_id": teacher_tokenizer.pad_token_id,
        },
        fingerprint=uuid.uuid4().hex,  # a fresh write every time (hashing the teacher would be slow)
    )
    ds.save_to_disk(str(partial))
    shutil.rmtree(partial.with_name(partial.name + ".cache"), ignore_errors=True)
    meta = {
        "format": FORMAT_VERSION,
        "teacher": teacher_name,
        "tokenizer": _tokenizer_name(teacher_tokenizer),
        "vocab_size": vocab,
        "vocab_fingerprint": vocab_fingerprint(teacher_tokenizer),
        "top_k": k,
        "rows": len(ds),
        "provenance": provenance or {},
    }
    (partial / META_FILE).write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return out


# --------------------------------------------------------------------------------------------------
# offline: read


@dataclass
class OfflineTargets:
    """Stored teacher targets, memory-mapped; rows are fetched per micro-batch."""

    ds: datasets.Dataset
    meta: dict[str, Any]

    @classmethod
    def open(
        cls,
        path: str | Path,
        student_tokenizer: Any,
        student_vocab: int,
        provenance: dict[str, Any] | None = None,
    ) -> OfflineTargets:
        """Open stored targets; with ``provenance``, refuse targets written for anything else."""
        p = Path(path)
        meta_path = p / META_FILE
        if not meta_path.exists():
            raise ConfigError(
                f"{p}: no {META_FILE}; not a teacher-targets dir (write one with `posttrain teacher-targets`)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ConfigError(
                f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}; rewrite the targets"
            )
        name = f"offline targets {p} (teacher {meta['teacher']}, tokenizer {meta['tokenizer']})"
        check_same_vocab(
            int(meta["vocab_size"]), str(meta["vocab_fingerprint"]), name, student_tokenizer, student_vocab
        )
        if provenance is not None and (diff := first_difference(meta.get("provenance", {}), provenance)):
            raise ConfigError(
                f"{p} holds teacher targets written for other settings ({diff[0]}: {diff[1]!r} there, "
                f"{diff[2]!r} here); delete the dir to have the "
                "stage rewrite it, or point codistill.targets at a new dir"
            )
        return cls(datasets.load_from_disk(str(p)), meta)

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    def examples(self) -> list[Example]:
        """The corpus as training examples (row i of the dataset = example i)."""
        cols = self.ds.select_columns(["input_ids", "labels"])
        return [Example(list(r["input_ids"]), list(r["labels"])) for r in cols]

    def batch(self, rows: Sequence[Sequence[tuple[int, int]]], width: int) -> TeacherTargets:
        """Targets for a batch laid out as ``rows``: per batch row, (dataset row, start offset) of each
        example in it (one example at offset 0 unless packing). ``width`` = the batch's T; the result
        covers the shifted positions [B, T-1, K]. Positions without a target hold a uniform dummy over
        ids 0..K-1 (finite, and masked out by the loss)."""
        k = self.top_k
        values = torch.full((len(rows), width - 1, k), -float(torch.log(torch.tensor(float(k)))))
        index = torch.arange(k).expand(len(rows), width - 1, k).clone()
        wanted = sorted({i for row in rows for i, _ in row})
        fetched = dict(zip(wanted, self.ds.select(wanted), strict=True))
        for b, row in enumerate(rows):
            for i, offset in row:
                rec = fetched[i]
                pos = [offset + t for t in loss_positions(rec["labels"])]
                if len(pos) != len(rec["topk_logprobs"]):
                    raise ConfigError(
                        f"teacher targets row {i}: {len(rec['topk_logprobs'])} target positions but "
                        f"{len(pos)} loss tokens; the targets were written for other data — rewrite them"
                    )
                if pos:
                    values[b, pos] = torch.tensor(rec["topk_logprobs"], dtype=torch.float32)
                    index[b, pos] = torch.tensor(rec["topk_indices"], dtype=torch.long)
        return TeacherTargets(topk_logprobs=values, topk_indices=index)


# --------------------------------------------------------------------------------------------------
# what a stage's offline targets depend on, and writing them


def stage_max_len(cfg: Any) -> int:
    """The longest example a (distill / SFT) stage trains on: the packed row, or prompt + completion."""
    return int(cfg.seq_len if cfg.pack else cfg.data.max_prompt_len + cfg.data.max_completion_len)


def stage_provenance(cfg: Any, seed: int) -> dict[str, Any]:
    """What a stage's offline targets depend on: teacher, k, the data rows and how they were cut."""

    cd = cfg.codistill
    return {
        "teacher": to_dict(cd.teacher),
        "teacher_weights": _weight_files(cd.teacher.name_or_path) if cd.teacher is not None else [],
        "top_k": cd.top_k,
        "data": to_dict(cfg.data),
        "seed": seed,
        "max_len": stage_max_len(cfg),
    }


def write_stage_targets(
    recipe: Any, stage: str, student_tokenizer: Any = None, student_vocab: int | None = None
) -> Path:
    """Write the offline targets a recipe's distill stage asks for (``posttrain teacher-targets``, or
    the stage itself when its targets dir does not exist). With a student tokenizer and vocabulary,
    the teacher is checked against them before it runs."""
    from posttrain.data import load_rows, tokenize_sft

    if stage not in recipe.stages:
        raise ConfigError(f"recipe has no stage {stage!r}; stages: {', '.join(recipe.stages)}")
    cfg = recipe.stages[stage]
    cd = getattr(cfg, "codistill", None)
    if cd is None or cd.teacher is None or cd.targets is None:
        raise ConfigError(
            f"stages.{stage}.codistill needs both 'teacher' and 'targets' to write offline targets"
        )
    seed = recipe.run.seed
    if student_tokenizer is not None and student_vocab is not None:
        teacher = load_teacher(cd.teacher, student_tokenizer, student_vocab, seed=seed)
        tokenizer = student_tokenizer
    else:
        teacher, tokenizer = build_model(cd.teacher, seed=seed)
    ds = load_rows(cfg.data, "train", seed, required=["prompt"])
    examples = tokenize_sft(ds, tokenizer, stage_max_len(cfg), where=cfg.data.source)
    name = cd.teacher.name_or_path or f"{cd.teacher.arch} ({cd.teacher.description or 'from config'})"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return write_offline_targets(
        teacher.to(device), tokenizer, examples, cd.targets, cd.top_k, teacher_name=name,
        provenance=stage_provenance(cfg, seed),
    )  # fmt: skip


def _weight_files(name_or_path: str | None) -> list[list[Any]]:
    """[name, bytes, mtime_ns] of a local checkpoint's weight files: a retrained teacher at the same path
    has other targets (a hub id or a teacher built from config: [])."""
    if name_or_path is None or not Path(name_or_path).expanduser().is_dir():
        return []
    files = sorted(
        f for pattern in ("*.safetensors", "*.bin") for f in Path(name_or_path).expanduser().glob(pattern)
    )
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
