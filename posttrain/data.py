"""Datasets in, token batches out: load (``datasets``), chat template, tokenise, pack or length-group, collate.

Sources (``DataConfig.source``): ``tiny`` (the tiny world, generated from the seed), a local
``.jsonl``/``.json``/``.parquet``/``.csv`` file, a ``save_to_disk`` dataset dir, or a hub dataset name.
Every problem with a source is a ``DataError`` whose one-line message names the file, row or column.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from posttrain.config import DataConfig
from posttrain.errors import UserError
from posttrain.losses import IGNORE_INDEX
from posttrain.tasks import tiny_dataset
from posttrain.types import Sample

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


log = logging.getLogger(__name__)


class DataError(UserError):
    """A dataset that cannot be used as given; the message names the file/row/column and the fix."""


# --------------------------------------------------------------------------------------------------
# loading


def load_rows(cfg: DataConfig, split: str, seed: int, required: Sequence[str]) -> datasets.Dataset:
    """The stage's dataset for ``split`` ("train" or "eval"), checked for ``required`` columns
    (``"a|b"``: either column)."""
    if cfg.source == "tiny":
        n = cfg.num_train if split == "train" else cfg.num_eval
        ds = tiny_dataset(cfg.tasks, split, n, seed)
        where = f"tiny world ({', '.join(sorted(cfg.tasks))})"
    else:
        source = cfg.source if split == "train" else (cfg.eval_source or cfg.source)
        ds, where = _load_source(source, cfg.split if split == "train" else "train")
    missing = [" or ".join(c.split("|")) for c in required if not set(c.split("|")) & set(ds.column_names)]
    if missing:
        raise DataError(
            f"{where}: missing required column(s) {', '.join(missing)} (has: {', '.join(ds.column_names)}); "
            "add them or rename columns"
        )
    check_values(ds, where)
    return ds


def check_source(cfg: DataConfig, key: str, required: Sequence[str]) -> None:
    """Fail early on a missing/malformed file or missing columns (``a|b`` = either column)."""
    held_out = key.startswith("eval")  # the eval section reads eval_source, else source (as load_rows)
    source = (cfg.eval_source or cfg.source) if held_out else cfg.source
    ds, where = _load_source(source, "train" if held_out else cfg.split)
    check_values(ds, f"{where} ({key})")
    for need in required:
        options = need.split("|")
        if not any(o in ds.column_names for o in options):
            raise DataError(
                f"{where} ({key}): missing required column '{' or '.join(options)}' "
                f"(has: {', '.join(ds.column_names)}); add it or rename a column"
            )


def _load_source(source: str, split: str) -> tuple[datasets.Dataset, str]:
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in FILE_FORMATS or path.exists():
        if not path.exists():
            raise DataError(
                f"{source}: dataset file not found; check data.source (relative paths are from the working dir)"
            )
        if path.is_dir():
            if not any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
                raise DataError(
                    f"{source}: a dir, but not a dataset saved with save_to_disk; point data.source at one"
                )
            ds = _readable(lambda: datasets.load_from_disk(str(path)), source, "a save_to_disk dataset dir")
            return _non_empty(ds, source), source
        if path.stat().st_size == 0:
            raise DataError(f"{source}: the file is empty; it needs one example per row")
        if suffix == ".jsonl":
            _check_jsonl(path)
        kind = FILE_FORMATS.get(suffix, "json")
        ds = _readable(lambda: datasets.load_dataset(kind, data_files=str(path), split="train"), source, kind)
        return _non_empty(ds, source), source
    try:
        return datasets.load_dataset(source, split=split), source
    except Exception as e:  # the hub's many failure types (not found, offline, bad split) become one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"{source}: no such local file or dir, and loading it as a hub dataset failed ({first}); "
            "check data.source (a .jsonl/.json/.parquet/.csv file, a save_to_disk dir or a hub dataset name)"
        ) from None


def _readable(load: Any, source: str, kind: str) -> datasets.Dataset:
    """``load()``, with a file that does not parse as ``kind`` (truncated parquet, ragged csv, …) as one line."""
    try:
        return load()
    except DataError:
        raise
    except Exception as e:  # pyarrow's and datasets' many parse errors
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise DataError(f"{source}: cannot be read as {kind} ({first}); fix or replace the file") from None


def _non_empty(ds: datasets.Dataset, source: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise DataError(f"{source}: the dataset has no rows; it needs one example per row")
    return ds


TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected")


def check_values(ds: datasets.Dataset, where: str, columns: Sequence[str] = TEXT_COLUMNS) -> None:
    """Every value of the text columns present is a string (a number is taken as its text) or a list of
    chat messages: a missing, list or mapping value is a ``DataError`` naming the row and the column."""
    for column in columns:
        if column not in ds.column_names:
            continue
        for i, value in enumerate(ds[column]):
            if _is_messages(value):  # conversational rows (DPO pairs): a list of {"role", "content"}
                continue
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                kind = "empty (null)" if value is None else f"a {type(value).__name__}"
                raise DataError(
                    f"{where}: row {i + 1}, column '{column}' is {kind}; it must be text — fix the row or drop it"
                )


def _is_messages(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "content" in m for m in value)
    )


def _check_jsonl(path: Path) -> None:
    """Parse every line so a bad row is reported by number (datasets' own error does not say which)."""
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}: row {i} is not valid JSON ({e.msg} at column {e.colno}); fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: row {i} is a {type(row).__name__}, expected a JSON object")


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, written to a temporary file and renamed: a reader never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# tokenising


def load_prompt_samples(
    cfg: DataConfig, tokenizer: Any, seed: int, limit: int, where: str
) -> tuple[list[Sample], list[int]]:
    """Train rows -> ``Sample``s (uid = row number) for prompt-only stages (RL, on-policy pairs). A prompt
    longer than ``limit`` tokens after the chat template is skipped: returns (samples, skipped rows),
    with the row numbers in a warning. No prompt fitting is a ``DataError``."""
    ds = load_rows(cfg, "train", seed, required=["prompt"])
    prompts = [str(p) for p in ds["prompt"]]
    lengths = [
        len(ids)
        for ids in tokenizer([prompt_text(tokenizer, p) for p in prompts], add_special_tokens=False).input_ids
    ]
    columns = {c: ds[c] for c in ds.column_names if c != "prompt"}
    samples, too_long = [], []
    for i, (prompt, n_tok) in enumerate(zip(prompts, lengths, strict=True)):
        if n_tok > limit:
            too_long.append(i)
            continue
        samples.append(Sample(prompt=prompt, columns={c: v[i] for c, v in columns.items()}, uid=str(i)))
    if too_long:
        rows = ", ".join(map(str, too_long[:10])) + (" …" if len(too_long) > 10 else "")
        log.warning(
            "%s: skipped %d prompt(s) longer than %d tokens after the chat template (rows %s); raise "
            "%s.data.max_prompt_len (and the model context) or shorten them",
            cfg.source, len(too_long), limit, rows, where,
        )  # fmt: skip
    if not samples:
        raise DataError(f"{cfg.source}: no prompt fits in {limit} tokens; raise {where}.data.max_prompt_len")
    return samples, too_long


def prompt_text(tokenizer: Any, prompt: str) -> str:
    """The chat-formatted prompt, ending with the assistant turn's opening. A tokenizer without a chat
    template (a base model's) gets the prompt as it is, after its BOS token when it has one."""
    if getattr(tokenizer, "chat_template", None) is None:
        return f"{tokenizer.bos_token or ''}{prompt}"
    return str(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    )


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    return list(tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False).input_ids)


def encode_sft(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels): labels are IGNORE_INDEX on the prompt, the completion + EOS are trained on."""
    p = encode_prompt(tokenizer, prompt)
    c = list(tokenizer(completion, add_special_tokens=False).input_ids) + [tokenizer.eos_token_id]
    return p + c, [IGNORE_INDEX] * len(p) + c


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize_sft(ds: datasets.Dataset, tokenizer: Any, max_len: int, where: str = "dataset") -> list[Example]:
    completions = ds["completion"] if "completion" in ds.column_names else ds["answer"]
    out = []
    skipped = 0
    for prompt, completion in zip(ds["prompt"], completions, strict=True):
        ids, labels = encode_sft(tokenizer, str(prompt), str(completion))
        if len(ids) > max_len:
            skipped += 1
            continue
        out.append(Example(ids, labels))
    if skipped:
        log.warning(
            "%s: skipped %d of %d examples longer than %d tokens after the chat template; raise the stage's "
            "seq_len (packed) or data.max_prompt_len + data.max_completion_len to keep them",
            where, skipped, len(completions), max_len,
        )  # fmt: skip
    if not out:
        raise DataError(f"{where}: every example is longer than {max_len} tokens; raise the stage's seq_len")
    return out


# --------------------------------------------------------------------------------------------------
# batching


def length_grouped_batches(
    examples: Sequence[Example], batch_size: int, rng: random.Random
) -> list[list[int]]:
    """Index batches of similar lengths (little padding), in random order. Deterministic given ``rng``."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    # sort within windows of 50 batches so batches are similar in length but the epoch stays shuffled
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i].input_ids))
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    batches = [b for b in batches if len(b) == batch_size]  # full batches only: every step has the same size
    rng.shuffle(batches)
    return batches


def pack_rows(examples: Sequence[Example], order: Sequence[int], seq_len: int) -> list[list[int]]:
    """Greedy packing: consecutive examples (in ``order``) share a row of at most ``seq_len`` tokens."""
    rows: list[list[int]] = []
    row: list[int] = []
    used = 0
    for i in order:
        n = len(examples[i].input_ids)
        if used + n > seq_len and row:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


def collate_padded(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels  (each [B, T])."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_completions(
    seqs: Sequence[tuple[Sequence[int], int]], pad_id: int, **per_token: Sequence[Sequence[float] | None]
) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion sequences, ``seqs`` = (ids [T_i], prompt length) each.

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` [B, T], and for each keyword a
    float32 [B, T-1] tensor aligned with the shifted targets (``next_token_logprobs``): sequence i's
    values per completion token, at positions n_prompt - 1 ... T_i - 2; 0 elsewhere and for None.
    """
    width = max(len(ids) for ids, _ in seqs)
    ids_t = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, T]
    attn = torch.zeros(len(seqs), width, dtype=torch.long)  # [B, T]
    comp = torch.zeros(len(seqs), width, dtype=torch.bool)  # [B, T]
    extra = {k: torch.zeros(len(seqs), width - 1, dtype=torch.float32) for k in per_token}  # [B, T-1] each
    for i, (ids, n_prompt) in enumerate(seqs):
        ids_t[i, : len(ids)] = torch.tensor(list(ids))
        attn[i, : len(ids)] = 1
        comp[i, n_prompt : len(ids)] = True
        for k, values in per_token.items():
            if (v := values[i]) is not None:
                extra[k][i, n_prompt - 1 : len(ids) - 1] = torch.tensor(list(v), dtype=torch.float32)
    return {"input_ids": ids_t, "attention_mask": attn, "completion_mask": comp, **extra}


def collate_prompt_completion(
    seqs: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    **per_token: Sequence[Sequence[float] | None],
) -> dict[str, torch.Tensor]:
    """(prompt ids, completion ids) pairs with the prompts left-padded to P and the completions
    right-padded to C, so every completion starts at column P (a forward then needs logits only for
    the last C + 1 columns: ``logits_to_keep``).

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (counting from each row's first real
    token, as the rollout engine does) [B, P + C]; ``completion_ids`` and ``completion_mask`` [B, C];
    and for each keyword a float32 [B, C] tensor of that row's per-completion-token values (0 where
    there is none, and for None). A pair with an empty completion is a placeholder: its tokens are
    attended to but nothing of it is trained on (``completion_mask`` all False).
    """
    width_p = max(len(p) for p, _ in seqs)
    width_c = max(max(len(c) for _, c in seqs), 1)
    ids = torch.full((len(seqs), width_p + width_c), pad_id, dtype=torch.long)  # [B, P + C]
    attn = torch.zeros(len(seqs), width_p + width_c, dtype=torch.long)  # [B, P + C]
    comp = torch.zeros(len(seqs), width_c, dtype=torch.bool)  # [B, C]
    extra = {k: torch.zeros(len(seqs), width_c, dtype=torch.float32) for k in per_token}  # [B, C] each
    for i, (prompt, completion) in enumerate(seqs):
        start = width_p - len(prompt)
        ids[i, start:width_p] = torch.tensor(list(prompt))
        ids[i, width_p : width_p + len(completion)] = torch.tensor(list(completion), dtype=torch.long)
        attn[i, start : width_p + max(len(completion), 1)] = 1
        comp[i, : len(completion)] = True
        for k, values in per_token.items():
            if (v := values[i]) is not None and len(v):
                extra[k][i, : len(v)] = torch.tensor(list(v), dtype=torch.float32)
    position_ids = (attn.cumsum(dim=1) - 1).clamp_min(0)  # [B, P + C]
    return {
        "input_ids": ids, "attention_mask": attn, "position_ids": position_ids,
        "completion_ids": ids[:, width_p:], "completion_mask": comp, **extra,
    }  # fmt: skip


def token_bins(sizes: Sequence[tuple[int, int]], budget: int) -> list[list[int]]:
    """Indices of (prompt, completion) lengths grouped into micro-batches of at most ``budget`` tokens as
    ``collate_prompt_completion`` lays them out (rows x (longest prompt + longest completion)), longest
    first; a sequence longer than the budget gets a micro-batch of its own. Deterministic."""
    order = sorted(range(len(sizes)), key=lambda i: (-(sizes[i][0] + sizes[i][1]), i))
    bins: list[list[int]] = []
    cur: list[int] = []
    wp = wc = 0
    for i in order:
        p, c = sizes[i]
        np_, nc = max(wp, p), max(wc, c)
        if cur and (np_ + nc) * (len(cur) + 1) > budget:
            bins.append(cur)
            cur, np_, nc = [], p, c
        cur.append(i)
        wp, wc = np_, nc
    if cur:
        bins.append(cur)
    return bins


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Packed batch: several examples per row, ``position_ids`` restart at each example.

    With no attention mask, transformers reads the restarts as sequence boundaries and builds a
    block-diagonal causal mask, so packed examples do not attend to each other.
    """
    ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[b, at : at + n] = torch.tensor(e.input_ids)
            labels[b, at : at + n] = torch.tensor(e.labels)
            pos[b, at : at + n] = torch.arange(n)
            at += n
        # padding continues the last example's positions, so it forms no new "sequence" (labels ignore it)
        last = len(row[-1].input_ids)
        pos[b, at:] = torch.arange(last, last + seq_len - at)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}


def collate_rows(
    examples: Sequence[Example], micro: Sequence[Sequence[int]], pack: bool, seq_len: int, pad_id: int
) -> dict[str, torch.Tensor]:
    """One micro-batch (rows of example indices, as ``iterate_forever`` yields them) as tensors: packed
    rows of ``seq_len`` (``collate_packed``) or one right-padded example per row (``collate_padded``)."""
    if pack:
        return collate_packed([[examples[i] for i in row] for row in micro], pad_id, seq_len)
    return collate_padded([examples[row[0]] for row in micro], pad_id)


def batch_layout(examples: Sequence[Example], micro: Sequence[Sequence[int]]) -> list[list[tuple[int, int]]]:
    """Per batch row, (example index, start offset) of each example in it (offsets add up when packing)."""
    out = []
    for row in micro:
        offsets = itertools.accumulate((len(examples[i].input_ids) for i in row[:-1]), initial=0)
        out.append(list(zip(row, offsets, strict=True)))
    return out


def random_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    return [order[j : j + batch_size] for j in range(0, n - batch_size + 1, batch_size)]


def epoch_batches(
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
    epoch: int,
    pack: bool,
    seq_len: int,
    group_by_length: bool = False,
) -> list[list[list[int]]]:
    """The epoch's micro-batches as lists of rows of example indices (a row is one example unless packing)."""
    rng = random.Random(f"{seed}:{epoch}")
    if not pack:
        batches = (
            length_grouped_batches(examples, batch_size, rng)
            if group_by_length
            else random_batches(len(examples), batch_size, rng)
        )
        return [[[i] for i in b] for b in batches]
    order = list(range(len(examples)))
    rng.shuffle(order)
    rows = pack_rows(examples, order, seq_len)
    return [rows[j : j + batch_size] for j in range(0, len(rows) - batch_size + 1, batch_size)]


def iterate_forever(
    examples: Sequence[Example],
    batch_size: int,
    seed: int,
    pack: bool,
    seq_len: int,
    start: int = 0,
    group_by_length: bool = False,
) -> Iterator[list[list[int]]]:
    """Micro-batches across epochs, starting at global micro-batch index ``start`` (for resume)."""
    epoch, skip = 0, start
    while True:
        batches = epoch_batches(examples, batch_size, seed, epoch, pack, seq_len, group_by_length)
        if not batches:
            raise DataError(
                f"fewer examples ({len(examples)}) than one micro-batch ({batch_size}); lower micro_batch_size"
            )
        if skip >= len(batches):
            skip -= len(batches)
            epoch += 1
            continue
        yield from batches[skip:]
        skip = 0
        epoch += 1
