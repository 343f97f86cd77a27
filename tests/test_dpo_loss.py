"""``losses.dpo_loss`` against the published formulas, a hand-derived case, and TRL 1.16's DPOTrainer.

Hand-derived case (one pair, beta = 0.5): policy log-probs chosen -2, rejected -3; reference -2.5
both. Log-ratios rho_c = 0.5, rho_r = -0.5, h = 1, beta h = 0.5.
  sigmoid  -log sigma(0.5) = log(1 + e^-0.5)                          = 0.474077
  hinge    max(0, 1 - 0.5)                                            = 0.5
  ipo      (h - 1/(2 beta))^2 = (1 - 1)^2                             = 0
  robust   eps 0.1: (0.9 * 0.474077 - 0.1 * log(1 + e^0.5)) / 0.8
           = (0.426669 - 0.0974077) / 0.8                             = 0.411577
  rewards  chosen beta rho_c = 0.25, rejected -0.25, margin 0.5, accuracy 1
  RPO      alpha 1, chosen of 4 tokens: + 2/4 = 0.5 on top of sigmoid   = 0.974077
  *_norm   with 2 chosen and 4 rejected tokens: rho_c = 0.25, rho_r = -0.125, h = 0.375:
           sigmoid_norm log(1 + e^-0.1875) = log 1.829029 = 0.603785; ipo_norm (0.375 - 1)^2 = 0.390625
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.losses import DPO_LOSS_TYPES, dpo_loss

REPO = Path(__file__).resolve().parents[1]


def naive(
    pc: float, pr: float, rc: float, rr: float, nc: int, nr: int, beta: float, kind: str, eps: float
) -> float:
    """One pair, written out from the papers (Rafailov; Chowdhury; SLiC; Azar Eq. 17; TRL's normalised)."""
    a, b = pc - rc, pr - rr
    if kind.endswith("_norm"):
        a, b = a / nc, b / nr
    h = a - b
    lsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731  log sigma(x)
    if kind in ("sigmoid", "sigmoid_norm"):
        return -(1 - eps) * lsig(beta * h) - eps * lsig(-beta * h)
    if kind == "robust":
        return (-(1 - eps) * lsig(beta * h) + eps * lsig(-beta * h)) / (1 - 2 * eps)
    if kind == "hinge":
        return max(0.0, 1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("kind", DPO_LOSS_TYPES)
@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_dpo_loss_equals_the_formulas_on_random_inputs(kind: str, eps: float) -> None:
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(64, generator=gen, dtype=torch.float64) for _ in range(4))
    nc, nr = (torch.randint(1, 20, (64,), generator=gen) for _ in range(2))
    losses, m = dpo_loss(pc, pr, rc, rr, nc, nr, beta=0.3, loss_type=kind, label_smoothing=eps)
    want = [
        naive(*(float(x[i]) for x in (pc, pr, rc, rr)), int(nc[i]), int(nr[i]), 0.3, kind, eps)
        for i in range(64)
    ]
    assert (losses - torch.tensor(want, dtype=torch.float64)).abs().max() <= 1e-6
    norm = kind.endswith("_norm")
    assert torch.allclose(m["rewards_chosen"], 0.3 * (pc - rc) / (nc if norm else 1), atol=1e-12)
    assert torch.equal(m["accuracy"], (m["margin"] > 0).double())


def test_a_hand_derived_pair() -> None:
    t = lambda *x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    args = (t(-2.0), t(-3.0), t(-2.5), t(-2.5), t(4), t(4))
    expect = {"sigmoid": 0.474077, "hinge": 0.5, "ipo": 0.0}
    for kind, value in expect.items():
        assert float(dpo_loss(*args, beta=0.5, loss_type=kind)[0]) == pytest.approx(value, abs=1e-6)
    assert float(dpo_loss(*args, beta=0.5, loss_type="robust", label_smoothing=0.1)[0]) == pytest.approx(
        0.411577, abs=1e-6
    )
    assert float(dpo_loss(*args, beta=0.5, rpo_alpha=1.0)[0]) == pytest.approx(0.974077, abs=1e-6)
    _, m = dpo_loss(*args, beta=0.5)
    assert [float(m[k]) for k in ("rewards_chosen", "rewards_rejected", "margin", "accuracy")] == [
        0.25,
        -0.25,
        0.5,
        1.0,
    ]
    norm = (t(-2.0), t(-3.0), t(-2.5), t(-2.5), t(2), t(4))
    assert float(dpo_loss(*norm, beta=0.5, loss_type="sigmoid_norm")[0]) == pytest.approx(0.603785, abs=1e-6)
    assert float(dpo_loss(*norm, beta=0.5, loss_type="ipo_norm")[0]) == pytest.approx(0.390625, abs=1e-9)


def test_gradients_push_chosen_up_and_rejected_down() -> None:
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    losses, _ = dpo_loss(
        pc, pr, torch.tensor([-2.5]), torch.tensor([-2.5]), torch.tensor([3]), torch.tensor([3])
    )
    losses.sum().backward()
    assert pc.grad is not None and pr.grad is not None
    assert float(pc.grad) < 0 < float(pr.grad)  # descending the loss raises chosen, lowers rejected
    assert float(pc.grad) == pytest.approx(-0.1 * float(torch.sigmoid(torch.tensor(-0.1))), abs=1e-7)


# TRL 1.16's names for the types it shares (its "ipo" is the per-token-averaged one: our ipo_norm; its
# label smoothing applies to robust, not to sigmoid).
TRL_TYPES = {"sigmoid": ("sigmoid", 0.0), "hinge": ("hinge", 0.0), "ipo_norm": ("ipo", 0.0),
             "robust": ("robust", 0.1), "sigmoid_norm": ("sigmoid_norm", 0.0)}  # fmt: skip


@pytest.mark.parametrize("kind", sorted(TRL_TYPES))
def test_parity_with_trl_dpo_trainer(kind: str, tmp_path: Path) -> None:
    """The same tiny policy and reference (different weights), the same 8 chat-formatted pairs: TRL's
    DPOTrainer.compute_loss equals the mean of posttrain's dpo_loss over sequence log-probs from
    ``posttrain.stages.dpo.sequence_logps`` (both in float32)."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from posttrain.config import ModelConfig
    from posttrain.models import build_model
    from posttrain.schema import parse
    from posttrain.stages.dpo import Pair, _completion_ids, _prompt_ids, sequence_logps

    cfg = parse(
        ModelConfig, yaml.safe_load((REPO / "recipes" / "model" / "tiny_llama.yaml").read_text()), "model"
    )
    policy, tok = build_model(cfg, seed=0)
    reference, _ = build_model(cfg, seed=1)
    rows = [
        {"prompt": [{"role": "user", "content": f"{i}+{i}="}], "chosen": [{"role": "assistant", "content": str(2 * i)}],
         "rejected": [{"role": "assistant", "content": str(2 * i + 11 * (i % 3))}]}
        for i in range(1, 9)
    ]  # fmt: skip
    trl_type, eps = TRL_TYPES[kind]
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True, bf16=False, fp16=False,
                     report_to=[], loss_type=[trl_type], beta=0.3, label_smoothing=eps, max_steps=1)  # fmt: skip
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(policy, batch))

    pairs = [Pair(_prompt_ids(tok, r["prompt"]), _completion_ids(tok, r["chosen"]), _completion_ids(tok, r["rejected"]), row=i)
             for i, r in enumerate(rows)]  # fmt: skip
    for p, ex in zip(pairs, trainer.train_dataset, strict=True):  # the same tokens on both sides
        assert (p.prompt, p.chosen, p.rejected) == (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"])
    with torch.no_grad():
        lp, n, _ = sequence_logps(policy, pairs, chunk=1024, pad_id=tok.pad_token_id)
        ref, _, _ = sequence_logps(reference, pairs, chunk=1024, pad_id=tok.pad_token_id)
    losses, _ = dpo_loss(
        lp[:8], lp[8:], ref[:8], ref[8:], n[:8], n[8:], beta=0.3, loss_type=kind, label_smoothing=eps
    )
    assert abs(float(losses.mean()) - trl_loss) <= 1e-5 * max(1.0, abs(trl_loss)), (
        kind,
        float(losses.mean()),
        trl_loss,
    )
    assert abs(trl_loss - math.log(2)) > 1e-3 or kind not in (
        "sigmoid",
        "sigmoid_norm",
    )  # not the trivial value
