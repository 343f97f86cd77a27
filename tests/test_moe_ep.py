"""Expert parallelism (posttrain.moe) against the single-process model, 2 ranks over gloo.

Two real processes run real DeepSpeed ZeRO with ep_size=2 on tiny MoE models (Llama 4: 2 MoE layers x
4 experts, top-1 + shared expert; Qwen3-MoE and Mixtral: AutoEP's presets). Each rank takes half of
a fixed batch. The reference is the same model in this (test) process, without DeepSpeed, on the
whole batch. Checked:

* forward logits and every parameter gradient equal the reference's (relative error <= 1e-5, fp32);
* each rank holds only its 2 of the 4 experts of every layer (parameter counts, values = the
  reference's slice), router and shared expert stay whole;
* the token-per-expert counts equal the reference router's choices;
* after 4 AdamW steps (lr 1e-2, grad clipping 1.0, active since the norms are > 1) the per-step grad
  norms equal the reference's (relative 1e-5) and the exported HF checkpoint — loaded back with
  transformers — equals the single-process run within the stated tolerance: ||w_ep - w_ref|| /
  ||w_ref - w_0|| <= 1e-3 (measured ~5e-5; plain 2-rank data parallelism without EP differs from one
  process by the same ~5e-5, since AdamW magnifies reduction-order rounding on near-zero moments);
* ZeRO-2 and ZeRO-3 (Llama 4) and ZeRO-1 (Mixtral);
* resuming from DeepSpeed's checkpoint of the EP model (saved after step 2) ends bit-equal;
* bad ep_size values fail with one line that names the key.
"""

from __future__ import annotations

import copy
import functools
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from posttrain.config import ModelConfig
from posttrain.models import build_model
from posttrain.schema import ConfigError, parse

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STEPS = 4
LR = 1e-2
TOL = 1e-5  # fp32 relative error, logits and gradients
UPDATE_TOL = 1e-3  # relative error of the 4-step weight update (see the module docstring)

QWEN3_MOE = {
    "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_experts": 4,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "max_position_embeddings": 128,
}  # fmt: skip
MIXTRAL = {
    "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
    "max_position_embeddings": 128,
}  # fmt: skip

# name -> (model config, ZeRO stage, optimizer steps)
SCENARIOS: dict[str, tuple[dict[str, Any], int, int]] = {
    "llama4_zero2": ({"yaml": "tiny_llama4"}, 2, STEPS),
    "llama4_zero3": ({"yaml": "tiny_llama4"}, 3, STEPS),
    "qwen3_moe_zero2": ({"arch": "qwen3_moe", "config": QWEN3_MOE}, 2, 1),
    "mixtral_zero1": ({"arch": "mixtral", "config": MIXTRAL}, 1, 1),
}


def model_config(spec: dict[str, Any]) -> ModelConfig:
    if "yaml" in spec:
        return parse(
            ModelConfig,
            yaml.safe_load((REPO / "recipes" / "model" / f"{spec['yaml']}.yaml").read_text()),
            "model",
        )
    return ModelConfig(arch=spec["arch"], config=spec["config"])


def batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 40, (2 * WORLD, 24), generator=gen) for _ in range(n)]  # [B, T]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# The ranks


def _ep_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from posttrain import moe

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    errors = {}
    for bad in (4, 3):
        model, _ = build_model(model_config({"yaml": "tiny_llama4"}), seed=0)
        try:
            moe.apply_expert_parallel(model, bad)
        except ConfigError as e:
            errors[bad] = str(e)
    try:
        moe.apply_expert_parallel(build_model(model_config({"yaml": "tiny_llama"}), seed=0)[0], 2)
    except ConfigError as e:
        errors["dense"] = str(e)
    torch.save(errors, f"{out}/errors_rank{rank}.pt")

    def start(spec: dict[str, Any], stage: int, seed: int) -> tuple[Any, Any, Any]:
        model, _ = build_model(model_config(spec), seed=seed)
        ep = moe.apply_expert_parallel(model, WORLD)
        groups = moe.moe_param_groups([{"name": "all", "params": list(model.parameters())}])
        ds = {
            "train_micro_batch_size_per_gpu": 2, "train_batch_size": 2 * WORLD, "gradient_clipping": 1.0,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9, **ep.ds_config(),
        }  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups, lr=LR), config=ds)
        return model, ep, engine

    def hf_state(model: Any, ep: Any, stage: int) -> dict[str, torch.Tensor]:
        with deepspeed.zero.GatheredParameters(
            list(model.parameters()), modifier_rank=None, enabled=stage == 3
        ):
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return ep.hf_state_dict(state)  # type: ignore[no-any-return]

    def train(engine: Any, x: torch.Tensor) -> Any:
        xs = x[2 * rank : 2 * rank + 2]  # [2, T]: this rank's half of the global batch
        outputs = engine(input_ids=xs, labels=xs, use_cache=False)
        engine.backward(outputs.loss)  # equal token counts per rank: DeepSpeed's mean = the global mean
        return outputs

    for name, (spec, stage, steps) in SCENARIOS.items():
        model, ep, engine = start(spec, stage, seed=0)
        ckpt = f"{out}/{name}_ckpt"
        with deepspeed.zero.GatheredParameters(ep.expert_parameters(), enabled=stage == 3):
            local = {  # this rank's experts as it holds them: [E_local, ...]
                f"{block}.{w}": getattr(layer.experts, w).detach().clone()
                for block, layer in ep.layers.items()
                for w in ("w1", "w2", "w3")
            }
        result: dict[str, Any] = {
            "local_experts": local,
            "expert_numel": ep.local_expert_numel(),
            "param_numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()),
            "norms": [],
        }
        for step, x in enumerate(batches(steps)):
            if step == 2:
                engine.save_checkpoint(ckpt, tag="step2")
            outputs = train(engine, x)
            if step == 0:
                result["logits"] = outputs.logits.detach().clone()
                grads = {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}
                result["grads"] = ep.hf_state_dict(grads)
                result["tokens_per_expert"] = ep.tokens_per_expert()
            engine.step()
            result["norms"].append(float(engine.get_global_grad_norm()))
        result["metrics"] = ep.metrics()
        hf = hf_state(model, ep, stage)
        if rank == 0:
            model.save_pretrained(f"{out}/{name}_export", state_dict=dict(hf))  # it empties the dict it gets
        engine.destroy()
        if steps > 2:  # resume: other initial weights, DeepSpeed's EP checkpoint of step 2, steps 3..N again
            model, ep, engine = start(spec, stage, seed=1)
            engine.load_checkpoint(ckpt, tag="step2")
            for x in batches(steps)[2:]:
                train(engine, x)
                engine.step()
            resumed = hf_state(model, ep, stage)
            result["resume_max_diff"] = max(float((resumed[k] - hf[k]).abs().max()) for k in hf)
            engine.destroy()
        torch.save(result, f"{out}/{name}_rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs every scenario once on 2 ranks; the tests read what the ranks wrote."""
    out = tmp_path_factory.mktemp("ep")
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ep_worker, args=(r, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD, (
        f"ranks exited with {[p.exitcode for p in procs]} (see captured stderr)"
    )
    return out


# --------------------------------------------------------------------------------------------------
# The single-process reference


@functools.cache
def reference(name: str) -> dict[str, Any]:
    """The same model, one process, no DeepSpeed, the whole batch; AdamW + clip_grad_norm_ as the ranks."""
    spec, _stage, steps = SCENARIOS[name]
    model, _ = build_model(model_config(spec), seed=0)
    init = copy.deepcopy(model.state_dict())
    chosen: list[torch.Tensor] = []  # per MoE layer: router logits [T, E] of the first batch
    hooks = [m.register_forward_hook(lambda _m, _i, o: chosen.append(o[1] if isinstance(o, tuple) and o[1].ndim == 2 else o[0]))
             for m in model.modules() if type(m).__name__ in ("Llama4Router",)]  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    out: dict[str, Any] = {"init": init, "norms": []}
    for step, x in enumerate(batches(steps)):
        outputs = model(input_ids=x, labels=x, use_cache=False)
        outputs.loss.backward()
        if step == 0:
            out["logits"] = outputs.logits.detach()
            out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
            for h in hooks:
                h.remove()
            out["router_logits"] = list(chosen)
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
    out["final"] = model.state_dict()
    out["config"] = model.config
    return out


def load(out: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(out / f"{name}_rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.multiproc
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_logits_and_gradients_equal_single_process(ep_run: Path, name: str) -> None:
    ref = reference(name)
    ranks = load(ep_run, name)
    for r, res in enumerate(ranks):
        assert rel(res["logits"], ref["logits"][2 * r : 2 * r + 2]) <= TOL
        assert set(res["grads"]) == set(ref["grads"])
        worst = max((rel(res["grads"][k], g), k) for k, g in ref["grads"].items())
        assert worst[0] <= TOL, f"rank {r}: gradient of {worst[1]} differs by {worst[0]:.1e}"
    assert ranks[0]["norms"][0] == pytest.approx(ref["norms"][0], rel=TOL)


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["llama4_zero2", "llama4_zero3"])
def test_each_rank_holds_only_its_experts(ep_run: Path, name: str) -> None:
    ref = reference(name)
    conf = ref["config"]
    n_exp, hidden, inter = conf.num_local_experts, conf.hidden_size, conf.intermediate_size
    moe_layers = [i for i in range(conf.num_hidden_layers) if i in conf.moe_layers]
    full_expert_numel = len(moe_layers) * n_exp * 3 * hidden * inter
    total = sum(v.numel() for v in ref["init"].values())
    for r, res in enumerate(load(ep_run, name)):
        assert res["expert_numel"] == full_expert_numel // WORLD
        assert res["param_numel"] == total - full_expert_numel // WORLD
        for i in moe_layers:
            block = f"model.layers.{i}.feed_forward"
            gate_up = ref["init"][f"{block}.experts.gate_up_proj"]  # [E, H, 2I]
            mine = gate_up[r * n_exp // WORLD : (r + 1) * n_exp // WORLD]  # this rank's experts
            assert torch.equal(res["local_experts"][f"{block}.w1"], mine[..., :inter].transpose(1, 2))
            assert torch.equal(res["local_experts"][f"{block}.w3"], mine[..., inter:].transpose(1, 2))
            down = ref["init"][f"{block}.experts.down_proj"][r * n_exp // WORLD : (r + 1) * n_exp // WORLD]
            assert torch.equal(res["local_experts"][f"{block}.w2"], down.transpose(1, 2))


@pytest.mark.multiproc
def test_tokens_per_expert_match_the_routers_choices(ep_run: Path) -> None:
    ref = reference("llama4_zero2")
    expected = torch.stack(
        [torch.bincount(lg.argmax(-1), minlength=lg.shape[-1]) for lg in ref["router_logits"]]
    ).double()
    for res in load(ep_run, "llama4_zero2"):
        assert torch.equal(res["tokens_per_expert"], expected)
        m = res["metrics"]  # the later steps' counts, all ranks: top-1, so every layer routes each token once
        assert m["moe/all_to_all_ms"] > 0.0
        for layer in range(expected.shape[0]):
            tokens = [m[f"moe/L{layer}/tokens/e{e}"] for e in range(expected.shape[1])]
            assert sum(tokens) == m["moe/routed_tokens"] > 0
            mean = sum(tokens) / len(tokens)
            assert (
                m[f"moe/L{layer}/max_load"] == pytest.approx(max(tokens) / mean) and max(tokens) / mean >= 1.0
            )
            assert m[f"moe/L{layer}/min_load"] == pytest.approx(min(tokens) / mean)


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["llama4_zero2", "llama4_zero3"])
def test_training_then_export_equals_single_process(ep_run: Path, name: str) -> None:
    from transformers import AutoModelForCausalLM

    ref = reference(name)
    for res in load(ep_run, name):
        assert res["norms"] == pytest.approx(ref["norms"], rel=TOL)
        assert min(res["norms"]) > 1.0  # clipping was active at every step
    exported = AutoModelForCausalLM.from_pretrained(
        ep_run / f"{name}_export", dtype=torch.float32
    ).state_dict()
    final, init = ref["final"], ref["init"]
    assert set(exported) == set(final)
    err = sum(float(((exported[k] - final[k]) ** 2).sum()) for k in final) ** 0.5
    moved = sum(float(((final[k] - init[k]) ** 2).sum()) for k in final) ** 0.5
    assert err / moved <= UPDATE_TOL, f"update differs by {err / moved:.1e}"


@pytest.mark.multiproc
def test_bad_ep_size_is_one_clear_line(ep_run: Path) -> None:
    errors = torch.load(ep_run / "errors_rank0.pt")
    assert "parallel.ep_size=4 is larger than the number of ranks (2)" in errors[4]
    assert "parallel.ep_size=3 is larger than the number of ranks (2)" in errors[3]
    assert "dense model" in errors["dense"]
    assert all("\n" not in e and "parallel.ep_size" in e for e in errors.values())


def test_ep_size_checks() -> None:
    from posttrain.parallel import check_ep_size

    check_ep_size(1, 1, None)
    check_ep_size(2, 4, 4)
    cases = {
        (2, 4, 3): "does not divide the model's 3 routed experts; use one of [1, 3]",
        (4, 2, 4): "is larger than the number of ranks (2)",
        (2, 3, 4): "does not divide the number of ranks (3)",
        (2, 2, None): "dense model",
        (0, 2, 4): "must be >= 1",
    }
    for (ep, world, experts), message in cases.items():
        with pytest.raises(ConfigError, match=r"parallel\.ep_size") as info:
            check_ep_size(ep, world, experts)
        assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["llama4_zero2", "llama4_zero3"])
def test_resume_from_an_ep_checkpoint_is_exact(ep_run: Path, name: str) -> None:
    """DeepSpeed's checkpoint of the EP model (experts in per-expert files) restores weights, optimizer
    and schedule: continuing from step 2 in fresh processes-worth of state (other initial weights) ends
    bit-equal to the uninterrupted run."""
    for res in load(ep_run, name):
        assert res["resume_max_diff"] == 0.0


def test_llama4_router_matches_transformers_when_the_sigmoid_saturates() -> None:
    """Llama 4 takes the top-k of the raw logits, then the sigmoid; a top-k of sigmoid scores (AutoEP's
    own router) cannot tell logits 17 and 20 apart in fp32 (both sigmoid to 1.0). The expert-parallel
    router must pick what transformers' ``Llama4Router`` picks, with the same scores."""
    from deepspeed.moe.ep_router import TokenChoiceTopKRouter
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    from posttrain.moe import Llama4EPRouter

    conf = Llama4TextConfig(hidden_size=4, num_local_experts=4, num_experts_per_tok=1)
    hf = Llama4Router(conf)
    autoep = TokenChoiceTopKRouter(
        dim=4, num_experts=4, num_expert_groups=None, num_limited_groups=None, top_k=1,
        score_func="sigmoid", route_norm=False, route_scale=1.0, gate_bias=False,
    )  # fmt: skip
    with torch.no_grad():
        for r in (hf, autoep.gate):
            r.weight.copy_(torch.eye(4))
    ours = Llama4EPRouter(autoep.gate, top_k=1)
    x = torch.tensor(
        [[17.0, 20.0, 0.0, 0.0], [0.0, 0.0, -1.0, 2.0], [25.0, 18.0, 30.0, 0.0]]
    )  # [T, H] = logits
    hf_scores, _ = hf(x)  # [T, E]: sigmoid(top logit) at the chosen expert, 0 elsewhere
    top, chosen, counts = ours(x)
    assert chosen[:, 0].tolist() == [1, 3, 2] == hf_scores.argmax(-1).tolist()
    assert torch.equal(top[:, 0], hf_scores.max(-1).values)
    assert counts.tolist() == [0, 1, 1, 1]
    # sigmoid first: rows 0 and 2 are ties that top-k breaks by position, not by the logits
    scores = torch.sigmoid(autoep.gate(x))  # [T, E]
    assert scores[0, 0] == scores[0, 1] == 1.0 and scores[2, 0] == scores[2, 2] == 1.0
