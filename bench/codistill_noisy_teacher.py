"""Codistillation with a teacher that is wrong on a known fraction of the data.

Task: the tiny world's ``reverse`` (``rev abcd=`` -> ``dcba``), clean hard labels. The teacher's
targets are constructed, so its error rate is known exactly:

  * on prompts whose string starts with one of ``--wrong-letters`` (default a-i, 9/26 ≈ 35% of the
    data) the teacher is *systematically* wrong: it copies the string instead of reversing it, with
    probability ``--conf-wrong`` on each copied character (a learnable wrong rule, like a real
    teacher's blind spot);
  * elsewhere it puts ``--conf-right`` on the correct character;
  * the rest of its mass goes 80% to the other letters of the input (plausible alternatives, the
    "dark knowledge" of a real teacher) and 20% uniformly over the vocabulary.

Every arm trains the same student (tiny_llama, same init) on the same batches for the same number
of steps with ``codistill_loss`` (forward KL, τ = 1); only λ differs:

  hard-only (λ = 0), soft-only (λ = 1), fixed λ ∈ {0.25, 0.5, 0.75}, schedule (linear 1 -> 0),
  teacher_confidence (λ_t = p_teacher(gold)), teacher_entropy (λ_t = 1 − H/log V),
  schedule × teacher_confidence.

Reported: held-out greedy exact match, overall and split into the teacher-wrong / teacher-right
regions of the held-out prompts, mean over ``--seeds``.

    OMP_NUM_THREADS=1 python bench/codistill_noisy_teacher.py [--steps 80] [--seeds 0 1] [--out FILE.json]

Measured (2 seeds, 400 held-out prompts, teacher wrong on 34.5% of the training examples; held-out
greedy exact match, overall / teacher-wrong region / teacher-right region):

                               80 steps                120 steps
    hard-only (λ=0)            0.661  0.644  0.670     0.991  0.989  0.992
    soft-only (λ=1)            0.206  0.000  0.311     0.489  0.000  0.738
    fixed λ=0.25               0.651  0.656  0.649     0.971  0.944  0.985
    fixed λ=0.5                0.402  0.274  0.468     0.641  0.211  0.860
    fixed λ=0.75               0.255  0.011  0.379     0.438  0.011  0.655
    schedule 1→0 (linear)      0.919  0.919  0.919     0.853  0.804  0.877
    teacher_confidence         0.984  0.989  0.981     0.990  0.996  0.987
    teacher_entropy            0.181  0.004  0.272     0.496  0.015  0.742
    schedule 1→0 × confidence  0.834  0.837  0.832     0.996  1.000  0.994

Control, the same teacher with no errors (``--wrong-letters ""``), 80 steps: soft-only 0.802,
teacher_confidence 0.810 (hard-only 0.661): correct soft targets do speed learning here. Seeds
differ by up to 0.25 at 80 steps (e.g. schedule 0.995 / 0.843), so read only large gaps.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from posttrain.config import ModelConfig, TinyTaskConfig
from posttrain.data import Example, collate_padded, encode_sft
from posttrain.evaluate import generate
from posttrain.losses import IGNORE_INDEX, TeacherTargets, aggregate, codistill_loss, shift_for_next_token
from posttrain.models import build_model
from posttrain.schema import parse
from posttrain.tasks import generate_rows

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    name: str
    modes: tuple[str, ...]
    lambda0: float
    lambda1: float = 0.0


ARMS = [
    Arm("hard-only (λ=0)", ("fixed",), 0.0),
    Arm("soft-only (λ=1)", ("fixed",), 1.0),
    Arm("fixed λ=0.25", ("fixed",), 0.25),
    Arm("fixed λ=0.5", ("fixed",), 0.5),
    Arm("fixed λ=0.75", ("fixed",), 0.75),
    Arm("schedule 1→0 (linear)", ("schedule",), 1.0, 0.0),
    Arm("teacher_confidence", ("teacher_confidence",), 1.0),
    Arm("teacher_entropy", ("teacher_entropy",), 1.0),
    Arm("schedule 1→0 × confidence", ("schedule", "teacher_confidence"), 1.0, 0.0),
]


def teacher_is_wrong(prompt: str, wrong_letters: str) -> bool:
    """``rev abcd=`` -> is the teacher wrong on this prompt (its string starts with a wrong letter)?"""
    return prompt[len("rev ")] in wrong_letters


def teacher_probs(ex: Example, prompt: str, tok: Any, args: argparse.Namespace) -> torch.Tensor:
    """The teacher's next-token distribution at each shifted position of ``ex``: [L-1, V]."""
    vocab = len(tok)
    s = prompt[len("rev ") : -1]
    wrong = teacher_is_wrong(prompt, args.wrong_letters)
    answer = s if wrong else s[::-1]
    conf = args.conf_wrong if wrong else args.conf_right
    intended = [tok.convert_tokens_to_ids(c) for c in answer] + [tok.eos_token_id]
    letters = sorted({tok.convert_tokens_to_ids(c) for c in s})
    probs = torch.full((len(ex.input_ids) - 1, vocab), 1.0 / vocab)  # [L-1, V]; non-loss rows: uniform
    rows = [t for t in range(len(ex.labels) - 1) if ex.labels[t + 1] != IGNORE_INDEX]
    assert len(rows) == len(intended)
    for t, want in zip(rows, intended, strict=True):
        others = [i for i in letters if i != want]
        p = torch.full((vocab,), (1 - conf) * (0.2 if others else 1.0) / vocab)
        if others:
            p[others] += (1 - conf) * 0.8 / len(others)
        p[want] += conf
        probs[t] = p
    return probs


def batch_targets(probs: list[torch.Tensor], width: int) -> TeacherTargets:
    """Right-padded [B, width-1, V] teacher logits (log-probs) matching ``collate_padded``."""
    vocab = probs[0].shape[-1]
    out = torch.full((len(probs), width - 1, vocab), 1.0 / vocab)
    for b, p in enumerate(probs):
        out[b, : p.shape[0]] = p
    return TeacherTargets(logits=out.log())


def lr_at(step: int, steps: int, lr: float, warmup: int = 10) -> float:
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def train_arm(arm: Arm, seed: int, data: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    cfg = parse(ModelConfig, yaml.safe_load((ROOT / "recipes/model/tiny_llama.yaml").read_text()), "model")
    model, tok = build_model(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    order = random.Random(seed).sample(range(len(data["examples"])), args.steps * args.batch_size)
    lam_sum = soft_sum = hard_sum = agree_sum = 0.0
    t0 = time.perf_counter()
    for step in range(args.steps):
        idx = order[step * args.batch_size : (step + 1) * args.batch_size]
        batch = collate_padded([data["examples"][i] for i in idx], tok.pad_token_id)
        labels = batch.pop("labels")
        targets = batch_targets([data["probs"][i] for i in idx], labels.shape[1])
        logits, shifted = shift_for_next_token(model(**batch).logits, labels)
        per_token, m = codistill_loss(
            logits, shifted, targets, modes=arm.modes, lambda0=arm.lambda0, lambda1=arm.lambda1,
            step=step, total_steps=args.steps,
        )  # fmt: skip
        loss = aggregate(per_token, m["mask"])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lam_sum += float(m["lambda_mean"])
        soft_sum += float(m["soft_mean"])
        hard_sum += float(m["hard_mean"])
        agree_sum += float(m["teacher_label_agreement"])
    train_s = time.perf_counter() - t0

    ev = data["eval"]
    outs = tok.batch_decode(
        generate(model, tok, [r["prompt"] for r in ev], 8, 0.0, 256, seed), skip_special_tokens=True
    )
    hits = [o == r["answer"] for o, r in zip(outs, ev, strict=True)]
    wrong = [teacher_is_wrong(r["prompt"], args.wrong_letters) for r in ev]

    def acc(sel: list[bool]) -> float:  # nan when the region is empty (a teacher with no errors)
        xs = [h for h, s in zip(hits, sel, strict=True) if s]
        return sum(xs) / len(xs) if xs else float("nan")

    n = args.steps
    return {
        "acc": acc([True] * len(ev)),
        "acc_teacher_wrong": acc(wrong),
        "acc_teacher_right": acc([not w for w in wrong]),
        "lambda_mean": lam_sum / n,
        "soft_mean": soft_sum / n,
        "hard_mean": hard_sum / n,
        "teacher_label_agreement": agree_sum / n,
        "train_s": train_s,
    }


def build_data(args: argparse.Namespace) -> dict[str, Any]:
    tasks = {"reverse": TinyTaskConfig(kind="reverse", levels=(args.length,))}
    cfg = parse(ModelConfig, yaml.safe_load((ROOT / "recipes/model/tiny_llama.yaml").read_text()), "model")
    _, tok = build_model(cfg)
    rows = generate_rows(tasks, "train", args.num_train, seed=1234)
    examples = [Example(*encode_sft(tok, r["prompt"], r["completion"])) for r in rows]
    probs = [teacher_probs(e, r["prompt"], tok, args) for e, r in zip(examples, rows, strict=True)]
    return {
        "examples": examples,
        "probs": probs,
        "eval": generate_rows(tasks, "eval", args.num_eval, seed=1234),
        "wrong_fraction": sum(teacher_is_wrong(r["prompt"], args.wrong_letters) for r in rows) / len(rows),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--length", type=int, default=4, help="string length of the reverse task")
    p.add_argument("--num-train", type=int, default=20000)
    p.add_argument("--num-eval", type=int, default=400)
    p.add_argument("--wrong-letters", default="abcdefghi")
    p.add_argument("--conf-right", type=float, default=0.9)
    p.add_argument("--conf-wrong", type=float, default=0.9)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--arms", nargs="*", default=None, help="subset of arm names (default: all)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    data = build_data(args)
    arms = [a for a in ARMS if args.arms is None or a.name in args.arms]
    print(
        f"reverse len {args.length}: teacher wrong on {data['wrong_fraction']:.1%} of the training examples "
        f"(strings starting with one of {args.wrong_letters!r}; conf right {args.conf_right}, "
        f"wrong {args.conf_wrong}); {args.steps} steps x {args.batch_size}, seeds {args.seeds}",
        flush=True,
    )
    results: dict[str, list[dict[str, float]]] = {}
    for arm in arms:
        for seed in args.seeds:
            r = train_arm(arm, seed, data, args)
            results.setdefault(arm.name, []).append(r)
            print(f"  {arm.name:28s} seed {seed}: acc {r['acc']:.3f} ({r['train_s']:.0f}s)", flush=True)

    def mean(name: str, key: str) -> float:
        return statistics.fmean(r[key] for r in results[name])  # nan stays nan and prints as "nan"

    fixed = [a.name for a in arms if a.modes == ("fixed",)]
    best_fixed = max(fixed, key=lambda n: mean(n, "acc")) if fixed else None
    header = f"{'arm':30s} {'held-out':>9s} {'teacher-wrong':>14s} {'teacher-right':>14s} {'mean λ':>7s} {'agree':>6s}"
    lines = [header, "-" * len(header)]
    for name in results:
        mark = "  <- best fixed λ" if name == best_fixed else ""
        lines.append(
            f"{name:30s} {mean(name, 'acc'):9.3f} {mean(name, 'acc_teacher_wrong'):14.3f} "
            f"{mean(name, 'acc_teacher_right'):14.3f} {mean(name, 'lambda_mean'):7.3f} "
            f"{mean(name, 'teacher_label_agreement'):6.3f}{mark}"
        )
    print("\n".join(lines), flush=True)
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wrong_fraction": data["wrong_fraction"],
        "best_fixed": best_fixed,
        "results": results,
        "table": lines,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
