"""Reference tests for the SFT loss and for step-level aggregation."""

from __future__ import annotations

import math

import torch

from posttrain.losses import aggregate, sft_loss, shift_for_next_token, token_logprobs


def test_sft_loss_hand_derived():
    """Two positions, 3 classes.

    Position 0: logits (0, 0, 0), label 2 -> p = 1/3, NLL = ln 3 = 1.098612.
    Position 1: logits (ln 1, ln 2, ln 1) = (0, 0.693147, 0), label 1 -> p = 2/4, NLL = ln 2 = 0.693147.
    Position 2: label -100 (prompt token) -> 0 and masked out.
    Token mean over the 2 loss tokens = (ln 3 + ln 2) / 2 = 0.895880.
    """
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0], [5.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 1, -100]])
    per_token, aux = sft_loss(logits, labels)
    assert torch.allclose(per_token, torch.tensor([[math.log(3), math.log(2), 0.0]]), atol=1e-6)
    assert aux["mask"].tolist() == [[True, True, False]]
    assert math.isclose(
        float(aggregate(per_token, aux["mask"])), (math.log(3) + math.log(2)) / 2, rel_tol=1e-6
    )


def test_shift_aligns_prediction_with_next_token():
    logits = torch.arange(2 * 4 * 5, dtype=torch.float).reshape(2, 4, 5)
    labels = torch.arange(8).reshape(2, 4)
    lg, lb = shift_for_next_token(logits, labels)
    assert torch.equal(lg, logits[:, :3]) and torch.equal(lb, labels[:, 1:])


def test_sft_matches_torch_cross_entropy_on_random_inputs():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100
    per_token, aux = sft_loss(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(aggregate(per_token, aux["mask"]), ref, atol=1e-6)


def test_aggregate_is_independent_of_the_accumulation_split():
    """Summing aggregate(..., denom=total tokens) over micro-batches equals the full-batch token mean."""
    torch.manual_seed(1)
    logits = torch.randn(6, 5, 9, requires_grad=True)
    labels = torch.randint(0, 9, (6, 5))
    labels[torch.rand(6, 5) < 0.4] = -100
    full_tok, aux = sft_loss(logits, labels)
    full = aggregate(full_tok, aux["mask"])
    (g_full,) = torch.autograd.grad(full, logits)
    denom = int((labels != -100).sum())
    for split in ([0, 6], [0, 1, 6], [0, 2, 3, 6]):
        total = 0.0
        grad = torch.zeros_like(logits)
        for a, b in zip(split[:-1], split[1:], strict=True):
            pt, ax = sft_loss(logits[a:b], labels[a:b])
            part = aggregate(pt, ax["mask"], denom)
            (g,) = torch.autograd.grad(part, logits)
            grad += g
            total += float(part)
        assert math.isclose(total, float(full), rel_tol=1e-6)
        assert torch.allclose(grad, g_full, atol=1e-7)


def test_token_logprobs_equal_log_softmax_gather():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4)
    tokens = torch.randint(0, 4, (2, 3))
    ref = torch.stack(
        [torch.stack([torch.log_softmax(logits[b, t], -1)[tokens[b, t]] for t in range(3)]) for b in range(2)]
    )
    assert torch.allclose(token_logprobs(logits, tokens), ref, atol=1e-6)
