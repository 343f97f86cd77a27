"""Expert parallelism (EP) for transformers MoE students on DeepSpeed ZeRO.

With ``parallel.ep_size = E``, the ranks form expert-parallel groups of E consecutive ranks. Each rank
of a group keeps ``num_experts / E`` routed experts of every MoE block; a token goes to the rank that
holds its expert with an all-to-all (uneven splits) and its expert output comes back the same way.
The router and the shared expert stay replicated, as do all dense weights. Ranks that hold the same
experts (one per group: the expert-data-parallel group) reduce the experts' gradients among
themselves; everything else is reduced over all ranks.

The machinery is DeepSpeed's own, so ZeRO 1, 2 and 3 partition, reduce, clip and checkpoint the
experts correctly: every MoE block is replaced by AutoEP's ``AutoEPMoELayer``, whose expert
parameters carry DeepSpeed's MoE marks (``allreduce=False``, ``group_name='ep_size_E'``, the
ZeRO-3 placement family), the process groups come from ``deepspeed.utils.groups``, and
``moe_param_groups`` splits optimizer groups with
``split_params_into_different_moe_groups_for_optimizer``. Per model family:

  llama4 (Llama4ForCausalLM)   a layer spec built here — AutoEP has no Llama 4 preset — plus
                               ``Llama4EPRouter``: top-k of the raw router logits, then a sigmoid of the
                               chosen logits, which scales the expert's *input*; shared expert added.
                               Exactly transformers' ``Llama4TextMoe`` math, ties included.
  qwen3_moe, qwen2_moe, mixtral   AutoEP's own presets.

The replacement is dropless (no capacity factor): no token is ever dropped or overflows.

Use (``posttrain.strategy`` does this when ``parallel.ep_size > 1``)::

    ep = apply_expert_parallel(model, ep_size)          # after torch.distributed is up, before ZeRO
    groups = moe_param_groups([{"name": "decay", "params": ...}, ...])
    ... deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(groups), ...)
    ep.metrics()                                        # collective: load balance, all-to-all time
    hf = ep.hf_state_dict(model_state_dict)             # collective: experts gathered, HF names back

Both collectives must be called on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from posttrain.parallel import check_ep_size, num_routed_experts
from posttrain.schema import ConfigError

# DeepSpeed is imported inside the functions that use it: this module is imported by the strategy only
# when ep_size > 1.

# The model families whose MoE blocks can be made expert-parallel (HF ``config.model_type``).
SUPPORTED_MODEL_TYPES = ("llama4_text", "llama4", "qwen3_moe", "qwen2_moe", "mixtral")
_A2A_TIMER = "all_to_all_single"  # deepspeed.comm's timer name for the dispatch/combine all-to-all


# --------------------------------------------------------------------------------------------------
# MoE blocks


def find_moe_blocks(model: nn.Module) -> list[str]:
    """Names of the MoE blocks of an HF model: modules with an ``experts`` child holding 3-D expert weights
    or a list of expert modules. Independent of AutoEP's detection, so it can check it."""
    names = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or getattr(module, "_is_autoep_layer", False):
            continue
        fused = any(p.ndim == 3 for p in experts.parameters(recurse=False))
        if fused or isinstance(experts, nn.ModuleList):
            names.append(name)
    return names


# --------------------------------------------------------------------------------------------------
# Llama 4


class Llama4EPRouter(nn.Module):
    """The router of an expert-parallel Llama 4 block, with transformers' ``Llama4Router`` math: top-k of
    the raw logits, then the sigmoid of the chosen ones (in the logits' dtype).

    It stands in for AutoEP's ``TokenChoiceTopKRouter`` (same call and outputs, same ``gate``), whose
    sigmoid router takes the top-k of the sigmoid *scores*: when two logits saturate the sigmoid (fp32
    ``sigmoid(17) == sigmoid(20) == 1``) that picks an expert by position, this one by logit.
    """

    score_func = "sigmoid"

    def __init__(self, gate: nn.Linear, top_k: int) -> None:
        super().__init__()
        self.gate = gate  # [E, H] weight, shared with the block it came from
        self.num_experts = gate.out_features
        self.top_k = top_k

    def forward(
        self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> top scores [T, K], chosen experts [T, K], tokens per expert [E] (int32)."""
        if expert_bias is not None:
            raise ValueError("Llama 4 routing has no expert bias (AutoEP load_balance_coeff must stay unset)")
        logits = self.gate(x)  # [T, E]
        top_logits, selected = torch.topk(logits, self.top_k, dim=1)  # [T, K]
        top_scores = torch.sigmoid(top_logits.float()).to(logits.dtype)  # [T, K]
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)  # [E]
        counts.scatter_add_(0, selected.reshape(-1), torch.ones_like(selected.reshape(-1), dtype=torch.int32))
        return top_scores, selected, counts


def _llama4_specs(model: nn.Module) -> list[Any]:
    from deepspeed.module_inject.auto_ep_config import MoELayerSpec
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    specs = []
    for name, block in model.named_modules():
        if not isinstance(block, Llama4TextMoe):
            continue
        specs.append(
            MoELayerSpec(
                moe_module_name=name,
                model_family="llama4",
                router_name="router",
                experts_name="experts",
                expert_storage="fused_3d",
                expert_w1_name="gate_up_proj",  # [E, H, 2I]: gate | up on the last dim
                expert_w2_name="down_proj",  # [E, I, H]
                expert_w3_name=None,
                num_experts=block.num_experts,
                top_k=block.top_k,
                hidden_size=block.hidden_dim,
                ffn_hidden_size=block.experts.intermediate_size,
                score_func="sigmoid",
                score_apply="pre",  # Llama 4 scales the expert's input, not its output
                route_norm=False,
                gate_bias=False,
                # Llama4TextMoe returns (hidden [T, H], raw router logits [T, E]); the decoder unpacks both.
                return_router_logits=True,
                router_logits_capture_target="router",
                router_logits_capture_index=1,
                router_logits_capture_layer_name=None,
                router_logits_capture_mode="raw",
                moe_output_shape="flat",
                has_shared_experts=True,
                shared_experts_name="shared_expert",
                expert_activation="swiglu",
            )
        )
    return specs


def _use_llama4_router(layer: Any) -> None:  # an AutoEPMoELayer
    # the same gate parameter, with AutoEP's replicated-parameter marks
    layer.router = Llama4EPRouter(layer.router.gate, layer.router.top_k)


# --------------------------------------------------------------------------------------------------
# Applying EP


@dataclass(frozen=True)
class _HFLayout:
    """How one block's experts are stored in the HF checkpoint (to put them back on export)."""

    router: str  # HF router child name ("router" for Llama 4, "gate" for Qwen3-MoE / Mixtral)
    experts: str
    w1: str
    w2: str
    w3: str | None  # None: gate and up fused in w1
    fused: Literal["gate_up_first", "hidden_first", "separate"]
    shared: str  # "" when the block has no shared expert
    shared_gate: str


@dataclass
class ExpertParallel:
    """The expert-parallel state of one model: its replaced blocks, groups and metric counters."""

    ep_size: int
    ep_rank: int
    group_name: str  # DeepSpeed's group name, f"ep_size_{ep_size}"
    num_experts: int
    layers: dict[str, Any]  # block name -> AutoEPMoELayer (DeepSpeed)
    layouts: dict[str, _HFLayout]

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def ep_group(self) -> Any:
        from deepspeed.utils import groups

        return groups._get_expert_parallel_group(self.group_name)

    @property
    def device(self) -> torch.device:
        """Where the expert layers live (collectives run there)."""
        device: torch.device = next(iter(self.layers.values())).tokens_per_expert.device
        return device

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.experts.parameters()]

    def local_expert_numel(self) -> int:
        """Routed-expert parameters held by this rank (ZeRO-3 partitioning not counted)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self.expert_parameters())

    def ds_config(self) -> dict[str, Any]:
        """Keys to merge into the DeepSpeed config: time the EP all-to-all with DeepSpeed's comms logger."""
        return {
            "comms_logger": {"enabled": True, "prof_all": False, "prof_ops": [_A2A_TIMER], "verbose": False}
        }

    # ----------------------------------------------------------------------------------------------
    # metrics

    def metrics(self) -> dict[str, float]:
        """Load balance and all-to-all time since the last call (collective: every rank calls).

        ``moe/L<i>/max_load`` is the busiest expert's share of layer i's routed tokens over the mean share
        (1.0 = perfectly balanced, ``num_experts`` = everything on one expert); ``moe/L<i>/min_load`` the
        idlest one's. ``moe/all_to_all_ms`` is this rank's time in dispatch/combine all-to-alls (forward and
        backward), averaged over ranks.
        """
        counts = self.tokens_per_expert()  # [L, E], summed over ranks, reset
        out: dict[str, float] = {}
        for i, row in enumerate(counts):  # MoE layers in model order
            total = float(row.sum())
            if total > 0:
                mean = total / row.numel()
                out[f"moe/L{i}/max_load"] = float(row.max()) / mean
                out[f"moe/L{i}/min_load"] = float(row.min()) / mean
            for e, c in enumerate(row.tolist()):
                out[f"moe/L{i}/tokens/e{e}"] = float(c)
        out["moe/routed_tokens"] = float(counts.sum()) / max(
            1, counts.shape[0]
        )  # token-expert assignments per layer
        # no dropped/overflow metric: the dispatch is dropless, every routed token reaches its expert
        a2a = torch.tensor([_a2a_elapsed_ms()], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(a2a)  # on the layers' device: NCCL takes no CPU tensors
        out["moe/all_to_all_ms"] = float(a2a.cpu()) / torch.distributed.get_world_size()
        return out

    def tokens_per_expert(self, reset: bool = True) -> torch.Tensor:
        """[num_layers, num_experts] routed-token counts since the last reset, summed over all ranks."""
        local = torch.stack([layer.tokens_per_expert.detach().double() for layer in self.layers.values()])
        if reset:
            for layer in self.layers.values():
                layer.tokens_per_expert.zero_()
        torch.distributed.all_reduce(local)  # on the layers' device
        return local.cpu()

    def load_table(self, counts: torch.Tensor) -> list[dict[str, Any]]:
        """Rows (layer, expert, tokens, share) of ``tokens_per_expert()`` for a W&B table."""
        rows = []
        for name, row in zip(self.layers, counts, strict=True):
            total = float(row.sum()) or 1.0
            rows += [
                {"layer": name, "expert": e, "tokens": int(c), "share": float(c) / total}
                for e, c in enumerate(row.tolist())
            ]
        return rows

    # ----------------------------------------------------------------------------------------------
    # export

    def hf_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's HF state dict from this rank's (EP-sharded) ``state``: each block's experts are
        all-gathered over its expert-parallel group and stored back in the HF layout and names.
        Collective: every rank calls, with the same keys (ZeRO-3 parameters already gathered)."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            block = self._block_of(key)
            if block is None:
                out[key] = value
                continue
            rest, lay = key[len(block) + 1 :], self.layouts[block]
            if rest.startswith("experts.") or rest in ("tokens_per_expert", "expert_bias"):
                continue  # gathered below / AutoEP's own counters
            if rest.startswith("router.gate."):
                out[f"{block}.{lay.router}.{rest.removeprefix('router.gate.')}"] = value
            elif rest.startswith("shared_experts_gate.") and lay.shared_gate:
                out[f"{block}.{lay.shared_gate}.{rest.removeprefix('shared_experts_gate.')}"] = value
            elif rest.startswith("shared_experts.") and lay.shared:
                out[f"{block}.{lay.shared}.{rest.removeprefix('shared_experts.')}"] = value
            elif rest.startswith(("router.", f"{lay.router}.")):
                continue  # an alias AutoEP adds for transformers' router-logit recorder
            else:
                raise KeyError(f"expert-parallel export: no HF name for '{key}'")
        for block, lay in self.layouts.items():
            if f"{block}.experts.w1" not in state:
                continue  # a state of some blocks only (streamed weights); every rank skips the same ones
            w1, w2, w3 = (self._gather(state[f"{block}.experts.{w}"]) for w in ("w1", "w2", "w3"))
            # w1 (gate), w3 (up): [E, I, H]; w2 (down): [E, H, I]
            prefix = f"{block}.{lay.experts}"
            if lay.fused == "gate_up_first":
                out[f"{prefix}.{lay.w1}"] = torch.cat([w1, w3], dim=1)  # [E, 2I, H]
                out[f"{prefix}.{lay.w2}"] = w2  # [E, H, I]
            elif lay.fused == "hidden_first":
                out[f"{prefix}.{lay.w1}"] = (
                    torch.cat([w1, w3], dim=1).transpose(1, 2).contiguous()
                )  # [E, H, 2I]
                out[f"{prefix}.{lay.w2}"] = w2.transpose(1, 2).contiguous()  # [E, I, H]
            else:
                assert lay.w3 is not None
                out[f"{prefix}.{lay.w1}"], out[f"{prefix}.{lay.w3}"], out[f"{prefix}.{lay.w2}"] = w1, w3, w2
        return out

    def _block_of(self, key: str) -> str | None:
        for block in self.layers:
            if key.startswith(block + "."):
                return block
        return None

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        """[E_local, ...] on each rank of the EP group -> [E, ...] (expert order = rank order)."""
        local = local.detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(self.ep_size)]
        torch.distributed.all_gather(parts, local, group=self.ep_group)
        return torch.cat(parts, dim=0)


def _a2a_elapsed_ms() -> float:
    """Milliseconds spent in all-to-alls since the last call (DeepSpeed's comms-logger timer), then reset."""
    from deepspeed.comm import comm as ds_comm

    if _A2A_TIMER not in ds_comm.timers.get_timers():
        return 0.0
    elapsed = float(ds_comm.timers(_A2A_TIMER).elapsed(reset=True))
    ds_comm.comms_logger.reset_data()  # the logger keeps every latency otherwise
    return elapsed


def _hf_layout(block: nn.Module, spec: Any) -> _HFLayout:
    from deepspeed.moe.fused_expert_layout import classify_fused_gate_up_layout

    if spec.expert_storage != "fused_3d":
        raise ConfigError(
            f"expert parallelism: '{spec.moe_module_name}' stores experts as a module list; "
            "only fused 3-D expert weights (transformers >= 5) are supported"
        )
    fused: Literal["gate_up_first", "hidden_first", "separate"] = "separate"
    if spec.expert_w3_name is None:
        experts = getattr(block, spec.experts_name)
        w1, w2 = getattr(experts, spec.expert_w1_name), getattr(experts, spec.expert_w2_name)
        layout = classify_fused_gate_up_layout(tuple(w1.shape), tuple(w2.shape))
        if layout is None:
            raise ConfigError(
                f"expert parallelism: unknown expert layout in '{spec.moe_module_name}' ({tuple(w1.shape)}, {tuple(w2.shape)})"
            )
        fused = layout.layout
    return _HFLayout(
        router=spec.router_name,
        experts=spec.experts_name,
        w1=spec.expert_w1_name,
        w2=spec.expert_w2_name,
        w3=spec.expert_w3_name,
        fused=fused,
        shared=spec.shared_experts_name if spec.has_shared_experts else "",
        shared_gate=spec.shared_experts_gate_name,
    )


def apply_expert_parallel(model: nn.Module, ep_size: int) -> ExpertParallel:
    """Replace every MoE block of ``model`` by an expert-parallel one holding this rank's experts.

    Call on every rank, after torch.distributed is initialised and before ``deepspeed.initialize``,
    with the same full weights on every rank. Raises ``ConfigError`` (one line) when ``ep_size`` does
    not fit the ranks or experts, or the model family has no EP support; asserts that every MoE block
    was replaced, so a run never falls back silently to plain data parallelism.
    """
    from deepspeed.module_inject.auto_ep import AutoEP
    from deepspeed.module_inject.auto_ep_config import AutoEPConfig
    from deepspeed.utils import groups

    config = getattr(model, "config", None)
    world_size = torch.distributed.get_world_size()
    num_experts = num_routed_experts(config) if config is not None else None
    check_ep_size(ep_size, world_size, num_experts)
    assert num_experts is not None
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"parallel.ep_size={ep_size}: model_type '{model_type}' has no expert-parallel support "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}); set parallel.ep_size=1"
        )
    if getattr(config, "router_jitter_noise", 0.0):
        raise ConfigError(
            "parallel.ep_size > 1 needs model.config.router_jitter_noise=0 (the expert-parallel router has no jitter)"
        )
    blocks = find_moe_blocks(model)

    # DeepSpeed's expert-parallel and expert-data-parallel groups (consecutive ranks form an EP group).
    group_name = f"ep_size_{ep_size}"
    if group_name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep_rank = torch.distributed.get_rank(group=groups._get_expert_parallel_group(group_name))

    autoep_config = AutoEPConfig(enabled=True, autoep_size=ep_size)
    autoep = AutoEP(model, autoep_config)
    specs = _llama4_specs(model) if model_type in ("llama4_text", "llama4") else autoep.ep_parser()
    named = dict(model.named_modules())
    layouts = {spec.moe_module_name: _hf_layout(named[spec.moe_module_name], spec) for spec in specs}
    autoep.replace_moe_layers(specs, ep_size=ep_size, ep_rank=ep_rank)
    named = dict(model.named_modules())
    layers = {spec.moe_module_name: named[spec.moe_module_name] for spec in specs}
    if model_type in ("llama4_text", "llama4"):
        for layer in layers.values():
            _use_llama4_router(layer)

    # Never a silent fallback: every MoE block must now hold exactly its share of the experts.
    missing = [b for b in blocks if not getattr(named.get(b), "_is_autoep_layer", False)]
    if missing or not layers:
        raise AssertionError(f"expert parallelism: MoE blocks left data-parallel: {missing or blocks}")
    for name, layer in layers.items():
        held = layer.experts.w1.shape[0]
        if held != num_experts // ep_size or layer.ep_size != ep_size:
            raise AssertionError(
                f"expert parallelism: '{name}' holds {held} experts, expected {num_experts // ep_size}"
            )
    return ExpertParallel(
        ep_size=ep_size,
        ep_rank=ep_rank,
        group_name=group_name,
        num_experts=num_experts,
        layers=layers,
        layouts=layouts,
    )


def moe_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Optimizer groups with the expert parameters moved into DeepSpeed MoE groups (``moe=True``,
    ``name=group_name``), as ZeRO 1/2 require. Each input group needs a unique ``name``."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    if any("name" not in g for g in param_groups):
        raise ValueError("moe_param_groups: every optimizer param group needs a 'name'")
    return split_params_into_different_moe_groups_for_optimizer(param_groups)  # type: ignore[no-any-return]
