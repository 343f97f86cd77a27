"""Reference tests for ``codistill_loss``.

The hand-derived case (used by most tests): one sequence, 2 tokens, 3 classes, both labels = class 0.

    teacher  t1 = (1/2, 1/4, 1/4)   t2 = (1/4, 1/2, 1/4)     (logits = log-probs; argmax 0 and 1)
    student  s1 = (1/3, 1/3, 1/3)   s2 = (1/2, 1/4, 1/4)

    hard (CE)          h1 = ln 3                               h2 = ln 2
    forward KL(t‖s)    F1 = 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8)
                       F2 = 1/4 ln(1/2) + 1/2 ln 2 + 0 = 1/4 ln 2
    reverse KL(s‖t)    R1 = 1/3 ln(2/3) + 2/3 ln(4/3) = 1/3 ln(32/27)
                       R2 = 1/2 ln 2 + 1/4 ln(1/2) + 0 = 1/4 ln 2
    JSD(β=1/2)         m = (t + s)/2; J = 1/2 KL(t‖m) + 1/2 KL(s‖m)
                       m1 = (5/12, 7/24, 7/24): J1 = 1/4 ln(36/35) + 1/6 ln(4/5) + 1/3 ln(8/7)
                       m2 = (3/8, 3/8, 1/4):    J2 = 1/4 ln(2/3) + 1/2 ln(4/3)
    τ = 2, forward     t1_τ ∝ t1^(1/2) = (√2 − 1, 1 − 1/√2, 1 − 1/√2), s1_τ = uniform;
                       soft1 = τ² Σ t1_τ ln(3 t1_τ)
    p_teacher(gold)    (1/2, 1/4)                  -> teacher_confidence factor
    teacher entropy    H1 = H2 = 3/2 ln 2          -> teacher_entropy factor 1 − (3/2 ln 2)/ln 3
    agreement          argmax (0, 1) vs labels (0, 0) -> 1/2

    loss_t = (1 − λ_t) h_t + λ_t soft_t
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posttrain.losses import TeacherTargets, aggregate, codistill_lambda_base, codistill_loss

LN = math.log
H = (LN(3), LN(2))
FWD = (0.5 * LN(9 / 8), 0.25 * LN(2))
REV = (LN(32 / 27) / 3, 0.25 * LN(2))
JSD = (0.25 * LN(36 / 35) + LN(4 / 5) / 6 + LN(8 / 7) / 3, 0.25 * LN(2 / 3) + 0.5 * LN(4 / 3))
P_GOLD = (0.5, 0.25)
ENTROPY_FACTOR = 1 - 1.5 * LN(2) / LN(3)


def hand_case(requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    teacher = torch.tensor([[[1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]]]).log()  # [1, 2, 3]
    student = torch.tensor([[[1 / 3, 1 / 3, 1 / 3], [1 / 2, 1 / 4, 1 / 4]]]).log()  # [1, 2, 3]
    labels = torch.tensor([[0, 0]])  # [1, 2]
    return student.requires_grad_(requires_grad), teacher.requires_grad_(requires_grad), labels


def expected(lams: tuple[float, float], soft: tuple[float, float]) -> torch.Tensor:
    return torch.tensor([[(1 - lam) * h + lam * s for lam, h, s in zip(lams, H, soft, strict=True)]])


def close(actual: torch.Tensor, want: torch.Tensor | float, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(want, dtype=actual.dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize(
    ("divergence", "soft"),
    [("forward_kl", FWD), ("reverse_kl", REV), ("jsd", JSD)],
    ids=["fwd", "rev", "jsd"],
)
def test_fixed_lambda_each_divergence(divergence: str, soft: tuple[float, float]) -> None:
    student, teacher, labels = hand_case()
    loss, m = codistill_loss(
        student, labels, TeacherTargets(logits=teacher), modes=("fixed",), lambda0=0.8, divergence=divergence
    )
    close(loss, expected((0.8, 0.8), soft))
    close(m["hard"], torch.tensor([H]))
    close(m["soft"], torch.tensor([soft]))
    close(m["lambda_mean"], 0.8)
    close(m["hard_mean"], sum(H) / 2)
    close(m["soft_mean"], sum(soft) / 2)
    close(m["teacher_label_agreement"], 0.5)


def test_temperature_scales_both_models_and_multiplies_by_tau_squared() -> None:
    student, teacher, labels = hand_case()
    t1 = [math.sqrt(2) - 1, 1 - 1 / math.sqrt(2), 1 - 1 / math.sqrt(2)]
    soft1 = 4 * sum(p * LN(3 * p) for p in t1)
    loss, m = codistill_loss(
        student[:, :1], labels[:, :1], TeacherTargets(logits=teacher[:, :1]), lambda0=1.0, temperature=2.0
    )
    close(m["soft"], [[soft1]])
    close(loss, [[soft1]])  # λ = 1: soft part only
    close(m["hard"], [[LN(3)]])  # the hard part stays at temperature 1


def test_teacher_confidence_mode() -> None:
    student, teacher, labels = hand_case()
    loss, m = codistill_loss(
        student, labels, TeacherTargets(logits=teacher), modes=("teacher_confidence",), lambda0=0.8
    )
    lams = (
        0.8 * P_GOLD[0],
        0.8 * P_GOLD[1],
    )  # (0.4, 0.2): the teacher is wrong on token 2 -> more hard weight
    close(m["lambda"], torch.tensor([lams]))
    close(loss, expected(lams, FWD))


def test_teacher_entropy_mode() -> None:
    student, teacher, labels = hand_case()
    loss, m = codistill_loss(
        student, labels, TeacherTargets(logits=teacher), modes=("teacher_entropy",), lambda0=0.8
    )
    lams = (0.8 * ENTROPY_FACTOR, 0.8 * ENTROPY_FACTOR)
    close(m["lambda"], torch.tensor([lams]))
    close(loss, expected(lams, FWD))


def test_schedule_linear_and_cosine() -> None:
    """λ0 = 0.2 -> λ1 = 1.0 over 7 updates (steps 0..6), at step 2 (p = 2/6 = 1/3):
    linear 0.2 + 0.8/3; cosine 0.2 + 0.8 (1 − cos(π/3))/2 = 0.2 + 0.8 · 1/4 = 0.4; the first update
    (step 0) 0.2, the last (step 6) exactly 1.0."""
    kw = {"lambda0": 0.2, "lambda1": 1.0, "total_steps": 7}
    assert codistill_lambda_base(("schedule",), shape="linear", step=2, **kw) == pytest.approx(0.2 + 0.8 / 3)
    assert codistill_lambda_base(("schedule",), shape="cosine", step=2, **kw) == pytest.approx(0.4)
    assert codistill_lambda_base(("schedule",), shape="cosine", step=0, **kw) == pytest.approx(0.2)
    assert codistill_lambda_base(("schedule",), shape="linear", step=6, **kw) == 1.0  # the last update
    assert codistill_lambda_base(("schedule",), shape="linear", step=9, **kw) == pytest.approx(1.0)  # clamped
    student, teacher, labels = hand_case()
    loss, m = codistill_loss(
        student, labels, TeacherTargets(logits=teacher), modes=("schedule",), schedule="cosine", step=2, **kw
    )
    close(m["lambda"], torch.tensor([[0.4, 0.4]]))
    close(loss, expected((0.4, 0.4), FWD))


def test_schedule_times_confidence_combine() -> None:
    student, teacher, labels = hand_case()
    loss, m = codistill_loss(
        student,
        labels,
        TeacherTargets(logits=teacher),
        modes=("schedule", "teacher_confidence"),
        lambda0=0.2,
        lambda1=1.0,
        schedule="cosine",
        step=2,
        total_steps=7,
    )
    lams = (0.4 * P_GOLD[0], 0.4 * P_GOLD[1])  # (0.2, 0.1)
    close(m["lambda"], torch.tensor([lams]))
    close(loss, expected(lams, FWD))


def test_topk_tail_bucket_by_hand() -> None:
    """Top-1 targets: token 1 keeps class 0 (1/2), token 2 keeps class 1 (1/2); each tail holds 1/2.

    Student buckets: token 1 (1/3 | tail 2/3), token 2 (1/4 | tail 3/4).
    Forward KL over buckets: 1/2 ln(3/2) + 1/2 ln(3/4) = 1/2 ln(9/8) (= the full value: the teacher's
    tail has the student's shape there), and 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) < 1/4 ln 2 (merging
    classes lowers KL). The gold token 0 is outside token 2's top-1, so its confidence counts as 0.
    Entropy of the buckets (1/2, 1/2) is ln 2.
    """
    student, _, labels = hand_case()
    targets = TeacherTargets(
        topk_logprobs=torch.tensor([[[LN(0.5)], [LN(0.5)]]]), topk_indices=torch.tensor([[[0], [1]]])
    )
    _, m = codistill_loss(student, labels, targets, lambda0=1.0)
    close(m["soft"], torch.tensor([[0.5 * LN(9 / 8), 0.5 * LN(4 / 3)]]))
    close(m["teacher_label_agreement"], 0.5)
    _, m = codistill_loss(student, labels, targets, modes=("teacher_confidence",), lambda0=1.0)
    close(m["lambda"], torch.tensor([[0.5, 0.0]]))
    _, m = codistill_loss(student, labels, targets, modes=("teacher_entropy",), lambda0=1.0)
    close(m["lambda"], torch.tensor([[1 - LN(2) / LN(3)] * 2]))


def test_topk_tail_bucket_by_hand_reverse_kl_jsd_and_temperature() -> None:
    """The same top-1 targets as above, buckets (kept | tail): teacher t = (1/2, 1/2) at both tokens,
    student s1 = (1/3, 2/3), s2 = (1/4, 3/4).

    reverse KL(s‖t)  R1 = 1/3 ln(2/3) + 2/3 ln(4/3)             R2 = 1/4 ln(1/2) + 3/4 ln(3/2)
    JSD(β=1/2)       m1 = (5/12, 7/12): J1 = 1/2 [1/2 ln(6/5) + 1/2 ln(6/7)] + 1/2 [1/3 ln(4/5) + 2/3 ln(8/7)]
                     m2 = (3/8, 5/8):   J2 = 1/2 [1/2 ln(4/3) + 1/2 ln(4/5)] + 1/2 [1/4 ln(2/3) + 3/4 ln(6/5)]
    τ = 2 with a teacher keeping class 0 at 0.8 (tail 0.2), student uniform: both are reduced to the
    buckets (kept | tail) at τ = 1 and those are tempered the same way, q^(1/2) renormalised:
                     teacher (0.8, 0.2)^(1/2) ∝ (2, 1)  -> (2/3, 1/3)
                     student (1/3, 2/3)^(1/2) ∝ (1, √2) -> (1, √2) / (1 + √2)
                     soft = τ² KL = 4 [2/3 ln(2/3 · (1 + √2)) + 1/3 ln(1/3 · (1 + √2)/√2)]
                          = 4 [ln((1 + √2)/3) + 2/3 ln 2 − 1/6 ln 2] = 4 ln((1 + √2) √2 / 3)
                          = 4 ln((2 + √2)/3) ≈ 0.5173
    """
    student, _, labels = hand_case()
    targets = TeacherTargets(
        topk_logprobs=torch.tensor([[[LN(0.5)], [LN(0.5)]]]), topk_indices=torch.tensor([[[0], [1]]])
    )
    _, m = codistill_loss(student, labels, targets, lambda0=1.0, divergence="reverse_kl")
    close(m["soft"], torch.tensor([[LN(2 / 3) / 3 + 2 / 3 * LN(4 / 3), 0.25 * LN(0.5) + 0.75 * LN(1.5)]]))
    j1 = 0.5 * (0.5 * LN(6 / 5) + 0.5 * LN(6 / 7)) + 0.5 * (LN(4 / 5) / 3 + 2 / 3 * LN(8 / 7))
    j2 = 0.5 * (0.5 * LN(4 / 3) + 0.5 * LN(4 / 5)) + 0.5 * (0.25 * LN(2 / 3) + 0.75 * LN(6 / 5))
    _, m = codistill_loss(student, labels, targets, lambda0=1.0, divergence="jsd", jsd_beta=0.5)
    close(m["soft"], torch.tensor([[j1, j2]]))
    tempered = TeacherTargets(topk_logprobs=torch.tensor([[[LN(0.8)]]]), topk_indices=torch.tensor([[[0]]]))
    _, m = codistill_loss(student[:, :1], labels[:, :1], tempered, lambda0=1.0, temperature=2.0)
    close(m["soft"], torch.tensor([[4 * LN((2 + math.sqrt(2)) / 3)]]))


def test_topk_at_temperature_2_by_hand() -> None:
    """V = 4, top-2 targets, τ = 2, one position.

    teacher probs (36, 9, 3, 1)/49: kept ids 0, 1 with 36/49, 9/49; tail 1 − 45/49 = 4/49
    student probs (4, 4, 1/2, 1/2)/9: kept 4/9, 4/9; tail 1/9
    Each side's 3 classes (kept, kept, tail) at τ = 1, tempered as 3-class distributions, q^(1/2)
    renormalised:
        teacher (36, 9, 4)/49 -> (6, 3, 2)/7 -> t = (6, 3, 2)/11
        student (4, 4, 1)/9   -> (2, 2, 1)/3 -> s = (2, 2, 1)/5
    forward  4 KL(t‖s) = 4 [6/11 ln((6/11)/(2/5)) + 3/11 ln((3/11)/(2/5)) + 2/11 ln((2/11)/(1/5))]
                       = 4 [6/11 ln(15/11) + 3/11 ln(15/22) + 2/11 ln(10/11)]             ≈ 0.1896
    reverse  4 KL(s‖t) = 4 [2/5 ln(11/15) + 2/5 ln(22/15) + 1/5 ln(11/10)]                 ≈ 0.1928
    JSD(β=1/2)  m = (t + s)/2 = (52, 37, 21)/110
             KL(t‖m) = 6/11 ln(60/52) + 3/11 ln(30/37) + 2/11 ln(20/21)
             KL(s‖m) = 2/5 ln(44/52) + 2/5 ln(44/37) + 1/5 ln(22/21);   soft = 4 · (KL(t‖m) + KL(s‖m))/2
    A student with probs (36, 9, 2, 2)/49 has the teacher's classes (36, 9, 4)/49: soft 0 for each D,
    although its tail tokens differ from the teacher's (3, 1)/49 — only the kept ids and the tail's
    total are compared.
    """
    teacher = torch.tensor([36 / 49, 9 / 49, 3 / 49, 1 / 49], dtype=torch.float64).log()
    targets = TeacherTargets(
        topk_logprobs=teacher[:2].reshape(1, 1, 2), topk_indices=torch.tensor([[[0, 1]]])
    )
    student = torch.tensor([[[4 / 9, 4 / 9, 1 / 18, 1 / 18]]], dtype=torch.float64).log()
    labels = torch.tensor([[0]])
    kl_tm = 6 / 11 * LN(60 / 52) + 3 / 11 * LN(30 / 37) + 2 / 11 * LN(20 / 21)
    kl_sm = 2 / 5 * LN(44 / 52) + 2 / 5 * LN(44 / 37) + 1 / 5 * LN(22 / 21)
    want = {
        "forward_kl": 4 * (6 / 11 * LN(15 / 11) + 3 / 11 * LN(15 / 22) + 2 / 11 * LN(10 / 11)),
        "reverse_kl": 4 * (2 / 5 * LN(11 / 15) + 2 / 5 * LN(22 / 15) + 1 / 5 * LN(11 / 10)),
        "jsd": 4 * (kl_tm + kl_sm) / 2,
    }
    assert want["forward_kl"] == pytest.approx(0.1896, abs=1e-4)
    assert want["reverse_kl"] == pytest.approx(0.1928, abs=1e-4)
    same_classes = torch.tensor([[[36 / 49, 9 / 49, 2 / 49, 2 / 49]]], dtype=torch.float64).log()
    for divergence, soft in want.items():
        kw = {"lambda0": 1.0, "temperature": 2.0, "divergence": divergence, "jsd_beta": 0.5}
        _, m = codistill_loss(student, labels, targets, **kw)  # type: ignore[arg-type]
        close(m["soft"], [[soft]], tol=1e-9)
        _, m = codistill_loss(same_classes, labels, targets, **kw)  # type: ignore[arg-type]
        close(m["soft"], [[0.0]], tol=1e-12)


def random_case(
    seed: int, b: int = 2, t: int = 5, v: int = 7
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, t, v, generator=g) * 2
    teacher = torch.randn(b, t, v, generator=g) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 0] = -100
    return student, teacher, labels


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_topk_with_k_equal_vocab_matches_full_logits(divergence: str, temperature: float) -> None:
    student, teacher, labels = random_case(seed=1)
    values, index = torch.topk(F.log_softmax(teacher, -1), k=teacher.shape[-1], dim=-1)
    kw = {"modes": ("schedule", "teacher_confidence", "teacher_entropy"), "lambda0": 0.3, "lambda1": 0.9}
    kw |= {
        "step": 3,
        "total_steps": 10,
        "temperature": temperature,
        "divergence": divergence,
        "jsd_beta": 0.3,
    }
    grads = []
    results = []
    for targets in (TeacherTargets(logits=teacher), TeacherTargets(topk_logprobs=values, topk_indices=index)):
        s = student.clone().requires_grad_(True)
        loss, m = codistill_loss(s, labels, targets, **kw)  # type: ignore[arg-type]
        aggregate(loss, m["mask"]).backward()
        grads.append(s.grad)
        results.append((loss, m))
    (loss_full, m_full), (loss_topk, m_topk) = results
    close(loss_topk, loss_full)
    for key in ("lambda", "soft", "agree", "lambda_mean", "soft_mean", "teacher_label_agreement"):
        close(m_topk[key], m_full[key])
    close(grads[1], grads[0])
    assert loss_full[0, 0] == 0 and not m_full["mask"][0, 0]  # the ignored position adds nothing


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("k", [1, 5, 50, 0], ids=["top1", "top5", "topV", "logits"])
def test_student_equal_to_teacher_gets_no_soft_loss_or_gradient(
    divergence: str, temperature: float, k: int, dtype: torch.dtype
) -> None:
    """V = 50; top-k targets built as ``posttrain.teacher`` builds them (top-k of the teacher's
    log-softmax; k = 0: full logits). A student with the teacher's logits has the teacher's classes, so
    every divergence is 0 at every τ, and so is its gradient (λ = 1: the soft part only). When the
    teacher's tail was tempered as one class and the student's token by token, this case gave soft
    losses of 0.01–12 with k < V at τ ≠ 1.

    In float32 the gradient is only 0 up to rounding, bounded by 1e-5 here: the teacher's tail
    1 − Σ top-k is known to ~1e-7 (the stored log-probs' precision) while the student's is exact, and
    tempering magnifies the relative difference of a small tail (5e-4 at one position of this seed)."""
    g = torch.Generator().manual_seed(18)
    logits = (torch.randn(2, 3, 50, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 50, (2, 3), generator=g)
    if k:
        values, index = torch.topk(F.log_softmax(logits, -1), k=k, dim=-1)
        targets = TeacherTargets(topk_logprobs=values, topk_indices=index)
    else:
        targets = TeacherTargets(logits=logits)
    student = logits.clone().requires_grad_(True)
    loss, m = codistill_loss(
        student, labels, targets, lambda0=1.0, temperature=temperature, divergence=divergence, jsd_beta=0.3
    )
    loss.sum().backward()
    assert float(m["soft"].abs().max()) <= 1e-6
    assert float(student.grad.abs().max()) <= (1e-6 if dtype == torch.float64 else 1e-5)  # type: ignore[union-attr]


def naive_divergence(t: list[float], s: list[float], kind: str, beta: float) -> float:
    """Textbook definitions, one class at a time."""
    if kind == "forward_kl":
        return sum(ti * math.log(ti / si) for ti, si in zip(t, s, strict=True))
    if kind == "reverse_kl":
        return sum(si * math.log(si / ti) for ti, si in zip(t, s, strict=True))
    m = [beta * ti + (1 - beta) * si for ti, si in zip(t, s, strict=True)]
    return beta * naive_divergence(t, m, "forward_kl", 0) + (1 - beta) * naive_divergence(
        s, m, "forward_kl", 0
    )


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_matches_naive_loop_on_random_inputs(divergence: str) -> None:
    student, teacher, labels = random_case(seed=2)
    tau, beta, lam0 = 1.7, 0.3, 0.6
    loss, _ = codistill_loss(
        student.double(),
        labels,
        TeacherTargets(logits=teacher.double()),
        modes=("teacher_confidence",),
        lambda0=lam0,
        temperature=tau,
        divergence=divergence,
        jsd_beta=beta,
    )
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            y = int(labels[b, t])
            if y < 0:
                assert loss[b, t] == 0
                continue

            def softmax(z: list[float]) -> list[float]:
                e = [math.exp(x - max(z)) for x in z]
                return [x / sum(e) for x in e]

            s1 = softmax(student[b, t].tolist())
            t1 = softmax(teacher[b, t].tolist())
            s_tau = softmax([x / tau for x in student[b, t].tolist()])
            t_tau = softmax([x / tau for x in teacher[b, t].tolist()])
            lam = lam0 * t1[y]
            want = (1 - lam) * -math.log(s1[y]) + lam * tau**2 * naive_divergence(
                t_tau, s_tau, divergence, beta
            )
            assert float(loss[b, t]) == pytest.approx(want, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_topk_matches_naive_loop_on_random_inputs(divergence: str) -> None:
    """Top-3 of V = 7 at τ = 1.7, one class at a time: the K + 1 classes at τ = 1 (the kept tokens, the
    teacher's tail 1 − Σ kept, the student's tail Σ non-kept), each raised to 1/τ and renormalised."""
    student, teacher, labels = random_case(seed=7)
    student, teacher = student.double(), teacher.double()
    tau, beta = 1.7, 0.3
    values, index = torch.topk(F.log_softmax(teacher, -1), k=3, dim=-1)
    _, m = codistill_loss(
        student,
        labels,
        TeacherTargets(topk_logprobs=values, topk_indices=index),
        lambda0=1.0,
        temperature=tau,
        divergence=divergence,
        jsd_beta=beta,
    )
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            kept = index[b, t].tolist()
            s1 = F.softmax(student[b, t], -1).tolist()
            t_cls = [math.exp(x) for x in values[b, t].tolist()]
            t_cls.append(1 - sum(t_cls))
            s_cls = [s1[i] for i in kept] + [sum(p for i, p in enumerate(s1) if i not in kept)]

            def temper(q: list[float]) -> list[float]:
                w = [x ** (1 / tau) for x in q]
                return [x / sum(w) for x in w]

            want = tau**2 * naive_divergence(temper(t_cls), temper(s_cls), divergence, beta)
            assert float(m["soft"][b, t]) == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("dtype", "low"), [(torch.float32, -95.0), (torch.float64, -100.0)])
def test_reverse_kl_reads_finite_teacher_log_probs_as_they_are(dtype: torch.dtype, low: float) -> None:
    """Teacher logits (0, L) with L below LOG_FLOOR = −87 but finite: log t = (−ln(1 + e^L), L − ln(1 + e^L))
    ≈ (0, L). Student uniform (1/2, 1/2):
        KL(s‖t) = 1/2 ln((1/2)/1) + 1/2 (ln(1/2) − L) = ln(1/2) − L/2
    = 46.807 at L = −95, 49.307 at L = −100 (flooring log t at −87 would give 42.807 for both).
    The same from top-1 targets in float64: the kept log-prob ln(1 − e^−100) ≈ −3.7e-44 leaves the
    tail e^−100, log −100 (computing 1 − Σ exp in floating point would round that tail to 0)."""
    teacher = torch.tensor([[[0.0, low]]], dtype=dtype)
    student = torch.zeros(1, 1, 2, dtype=dtype)
    labels = torch.tensor([[0]])
    _, m = codistill_loss(
        student, labels, TeacherTargets(logits=teacher), lambda0=1.0, divergence="reverse_kl"
    )
    close(m["soft"], [[LN(0.5) - low / 2]], tol=1e-6)
    if dtype == torch.float64:
        kept = torch.tensor([[[math.log1p(-math.exp(low))]]], dtype=dtype)
        targets = TeacherTargets(topk_logprobs=kept, topk_indices=torch.tensor([[[0]]]))
        _, m = codistill_loss(student, labels, targets, lambda0=1.0, divergence="reverse_kl")
        close(m["soft"], [[LN(0.5) - low / 2]], tol=1e-9)


def test_empty_topk_tail_gives_finite_values_and_gradients() -> None:
    """V = 3, top-1 targets holding all the teacher's mass (log-prob 0): the tail bucket is empty,
    log t = −inf. Buckets (kept | tail): teacher (1, 0); student probs (1/2, 1/4, 1/4) -> (1/2, 1/2); τ = 1:
      forward  KL(t‖s) = 1 · ln(1/(1/2)) = ln 2                           (the empty bucket adds 0)
      reverse  KL(s‖t) = 1/2 ln(1/2) + 1/2 (ln(1/2) − LOG_FLOOR) = ln(1/2) + 43.5
               (truly +inf — the student has mass where the teacher has none; only there does the
               floor stand in for log 0)
      JSD(β=1/2)  m = (3/4, 1/4): 1/2 ln(4/3) + 1/2 [1/2 ln(2/3) + 1/2 ln 2] = 3/4 ln(4/3)
               (exact: the floor moves m's tail by e^−87 / 2)
    Values and gradients stay finite at τ = 2 too, and with a student that has no tail mass either
    (logits (0, −inf, −inf)): there every divergence is 0.
    """
    targets = TeacherTargets(
        topk_logprobs=torch.zeros(1, 1, 1), topk_indices=torch.zeros(1, 1, 1, dtype=torch.long)
    )
    labels = torch.tensor([[0]])
    want = {"forward_kl": LN(2), "reverse_kl": LN(0.5) + 43.5, "jsd": 0.75 * LN(4 / 3)}
    for divergence, soft in want.items():
        for tau in (1.0, 2.0):
            for probs in ([0.5, 0.25, 0.25], [1.0, 0.0, 0.0]):
                student = torch.tensor([[probs]]).log().requires_grad_(True)
                loss, m = codistill_loss(
                    student, labels, targets, lambda0=1.0, temperature=tau, divergence=divergence
                )
                loss.sum().backward()
                assert torch.isfinite(m["soft"]).all() and torch.isfinite(student.grad).all()  # type: ignore[arg-type]
                if probs[2] == 0.0:
                    close(m["soft"], [[0.0]])
                elif tau == 1.0:
                    close(m["soft"], [[soft]])


@pytest.mark.parametrize("kind", ["full", "topk"])
def test_gradients_reach_the_student_only(kind: str) -> None:
    """d/ds of τ²·KL(t_τ ‖ softmax(s/τ)) = τ (softmax(s/τ) − t_τ): with λ = 1 that is the whole gradient.
    For top-k with K = V the same holds; the teacher tensors get no gradient in either path."""
    student, teacher, labels = random_case(seed=3)
    tau = 2.0
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    if kind == "full":
        targets = TeacherTargets(logits=teacher)
        teacher_tensors = [teacher]
    else:
        values, index = torch.topk(F.log_softmax(teacher, -1), k=teacher.shape[-1], dim=-1)
        values = values.detach().requires_grad_(True)
        targets = TeacherTargets(topk_logprobs=values, topk_indices=index)
        teacher_tensors = [values]
    loss, m = codistill_loss(student, labels, targets, lambda0=1.0, temperature=tau)
    loss.sum().backward()
    want = tau * (F.softmax(student.detach() / tau, -1) - F.softmax(teacher.detach() / tau, -1))
    want = want * m["mask"].unsqueeze(-1)
    close(student.grad, want)  # type: ignore[arg-type]
    assert all(t.grad is None for t in teacher_tensors)


def test_topk_gradient_flows_through_the_tail_bucket() -> None:
    """With K < V the student's tail bucket is a logsumexp over its non-kept logits: the non-kept logits
    get gradient too, and finite-difference checks agree (double precision)."""
    student, teacher, labels = random_case(seed=4, b=1, t=2, v=5)
    values, index = torch.topk(F.log_softmax(teacher.double(), -1), k=2, dim=-1)
    targets = TeacherTargets(topk_logprobs=values, topk_indices=index)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):

        def f(s: torch.Tensor, divergence: str = divergence) -> torch.Tensor:
            loss, _ = codistill_loss(
                s,
                labels,
                targets,
                modes=("teacher_confidence",),
                lambda0=0.7,
                temperature=1.5,
                divergence=divergence,
            )
            return loss.sum()

        assert torch.autograd.gradcheck(f, (student.double().requires_grad_(True),))


def test_masked_positions_add_nothing_and_aggregate_uses_denom() -> None:
    student, teacher, labels = hand_case()
    labels = torch.tensor([[0, -100]])
    loss, m = codistill_loss(student, labels, TeacherTargets(logits=teacher), lambda0=0.8)
    close(loss, torch.tensor([[0.2 * H[0] + 0.8 * FWD[0], 0.0]]))
    close(m["lambda_mean"], 0.8)
    close(m["hard_mean"], H[0])
    close(aggregate(loss, m["mask"], denom=4), (0.2 * H[0] + 0.8 * FWD[0]) / 4)


def test_bad_inputs_fail_with_one_clear_line() -> None:
    student, teacher, labels = hand_case()
    wide = torch.zeros(1, 2, 5)
    with pytest.raises(ValueError, match=r"teacher logits have vocabulary 5 but the student's has 3"):
        codistill_loss(student, labels, TeacherTargets(logits=wide))
    with pytest.raises(ValueError, match=r"share one tokenizer"):
        codistill_loss(
            student,
            labels,
            TeacherTargets(topk_logprobs=torch.zeros(1, 2, 1), topk_indices=torch.full((1, 2, 1), 4)),
        )
    with pytest.raises(ValueError, match=r"'fixed' and 'schedule'"):
        codistill_loss(student, labels, TeacherTargets(logits=teacher), modes=("fixed", "schedule"))
    with pytest.raises(ValueError, match=r"teacher_confidence"):
        codistill_loss(student, labels, TeacherTargets(logits=teacher), modes=("confidence",))
    with pytest.raises(ValueError, match=r"jsd_beta must be in \(0, 1\)"):
        codistill_loss(student, labels, TeacherTargets(logits=teacher), divergence="jsd", jsd_beta=0.0)
    with pytest.raises(ValueError, match=r"either logits"):
        TeacherTargets(topk_logprobs=torch.zeros(1, 2, 1))


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_matches_trl_generalized_jsd(beta: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parity with TRL's GKD ``generalized_jsd_loss`` (β = 0 is forward KL, 1 is reverse KL there).
    Slow only because importing trl.experimental takes ~15 s on these machines."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    student, teacher, labels = random_case(seed=5)
    tau = 2.0
    trl = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=tau, reduction="none"
    )
    divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    _, m = codistill_loss(
        student,
        labels,
        TeacherTargets(logits=teacher),
        lambda0=1.0,
        temperature=tau,
        divergence=divergence,
        jsd_beta=beta,
    )
    close(m["soft"][m["mask"]] / tau**2, trl.sum(-1))
