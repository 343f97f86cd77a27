"""Typed recipe schema: frozen dataclasses, and a checker that turns a composed Hydra config into them.

Every error names the offending key by its full dotted path; an unknown key also names the closest
valid one, and a wrong type names the expected type:

    >>> parse(RunConfig, {"nmae": "x"}, "run")
    Traceback (most recent call last):
    ...
    posttrain.config.ConfigError: unknown key 'run.nmae' (did you mean 'run.name'?)

Stage types register their config class in ``STAGE_TYPES`` (``sft`` here; rl, dpo and distill add
theirs in their own modules' config classes below).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from posttrain.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A recipe that does not fit the schema. The message is one line that says what to fix."""


# --------------------------------------------------------------------------------------------------
# The checker


def parse(cls: type[T], data: Any, path: str) -> T:
    """Build dataclass ``cls`` from plain ``data`` (dicts/lists/scalars), checking keys and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must be a mapping of {cls.__name__} settings, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            nested = _find_nested(cls, str(key), path)
            if close:
                hint = f" (did you mean '{_join(path, close[0])}'?)"
            elif nested:
                hint = f" (did you mean '{nested}'?)"
            else:
                hint = f" (valid: {', '.join(fields)})"
            raise ConfigError(f"unknown key '{_join(path, str(key))}'{hint}")
        base = _default(fields[key])
        if dataclasses.is_dataclass(base) and isinstance(value, dict):
            # A partial section overrides the field's own default instance, not the class defaults
            # (RL's optimizer defaults differ from OptimConfig's, for instance).
            value = _deep_merge(to_dict(base), value)
        kwargs[key] = _coerce(hints[key], value, _join(path, key))
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            raise ConfigError(f"missing required key '{_join(path, name)}'")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(path)
    return obj


def _default(f: Any) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _find_nested(cls: type, key: str, path: str, depth: int = 2) -> str | None:
    """The dotted path of a field called ``key`` inside nested sections (``lr`` -> ``optim.lr``)."""
    if depth == 0:
        return None
    for name, tp in get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            if key in {f.name for f in dataclasses.fields(tp)}:
                return _join(_join(path, name), key)
            found = _find_nested(tp, key, _join(path, name), depth - 1)  # type: ignore[arg-type]
            if found:
                return found
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"'{path}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"'{path}' must be one of {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path)  # type: ignore[arg-type]
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' must be a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping, got {value!r}")
        _k, v_tp = get_args(tp) or (str, Any)
        return {k: _coerce(v_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{path}' must be bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"'{path}' must be int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"'{path}' must be float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"'{path}' must be str, got {value!r}")
    raise ConfigError(f"'{path}': unsupported schema type {tp!r}")  # a bug in the schema, not the recipe


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (for saving the resolved recipe and logging it)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def first_difference(saved: Any, wanted: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first (dotted key, saved value, wanted value) where two plain trees differ (lists and tuples
    compare by items), or None when they are equal."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for k in list(saved) + [k for k in wanted if k not in saved]:
            if d := first_difference(saved.get(k), wanted.get(k), f"{path}.{k}" if path else str(k)):
                return d
        return None
    if isinstance(saved, list | tuple) and isinstance(wanted, list | tuple):
        saved, wanted = list(saved), list(wanted)
    return None if saved == wanted else (path, saved, wanted)


# --------------------------------------------------------------------------------------------------
# Shared sections


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: str = "runs"  # run dir = <dir>/<name>
    seed: int = 0
    overwrite: bool = False  # allow replacing a finished run's outputs


@dataclass(frozen=True)
class WandbConfig:
    # offline writes <run dir>/wandb and never touches the network; online needs WANDB_API_KEY;
    # disabled logs to metrics.jsonl only. The WANDB_MODE environment variable overrides this.
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "posttrain"
    entity: str | None = None
    init_timeout_s: float = 30.0


@dataclass(frozen=True)
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    log_every: int = 10
    progress: bool = True  # tqdm bar with ETA per stage


@dataclass(frozen=True)
class ModelConfig:
    """Either ``name_or_path`` (any HF model dir or hub id) or a tiny model built from ``arch`` + ``config``."""

    name_or_path: str | None = None
    arch: Literal["llama", "llama4", "qwen3_moe", "mixtral"] | None = None
    config: dict[str, Any] = field(default_factory=dict)  # HF config kwargs for ``arch``
    tokenizer: str | None = "char"  # "char" (the tiny world's), a path/hub id, or null = from name_or_path
    dtype: Literal["float32", "bfloat16"] = "float32"
    description: str = ""

    def check(self, path: str) -> None:
        if self.name_or_path is None and self.arch is None:
            raise ConfigError(
                f"'{path}' needs either name_or_path (an HF model dir or hub id) or arch + config"
            )


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = False  # fp16 does not run on CPU; bf16 does
    gradient_clipping: float = 1.0
    # Extra keys merged into the generated DeepSpeed JSON (expert users; keys are DeepSpeed's own).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParallelConfig:
    ep_size: int = 1  # expert-parallel group size for MoE students

    def check(self, path: str) -> None:
        if self.ep_size < 1:
            raise ConfigError(f"'{path}.ep_size' must be >= 1, got {self.ep_size}")


@dataclass(frozen=True)
class LauncherConfig:
    nproc_per_node: int = 1  # >1: `posttrain run` re-launches itself under torchrun with this many ranks
    nnodes: int = 1  # >1: start `posttrain run` on every node with torchrun or the DeepSpeed launcher


@dataclass(frozen=True)
class TinyTaskConfig:
    """One synthetic capability of the tiny world. ``digits``/``lengths`` set the difficulty levels."""

    kind: Literal["add", "mul", "reverse", "sort"]
    levels: tuple[int, ...] = (2,)  # digits for add/mul, string length for reverse/sort
    weight: float = 1.0  # sampling weight (SFT mixture, RL capability mix)


@dataclass(frozen=True)
class DataConfig:
    """Where a stage's examples come from.

    ``source: tiny`` generates the tiny world's tasks from ``seed``; otherwise ``source`` is a
    ``.jsonl``/``.json``/``.parquet`` file or a ``datasets`` dataset name/dir, with columns
    ``prompt`` and ``answer`` (RL, eval) or ``prompt`` + ``completion`` (SFT; ``answer`` is used
    when ``completion`` is absent), and optionally ``capability`` and ``difficulty``.
    """

    source: str = "tiny"
    split: str = "train"
    tasks: dict[str, TinyTaskConfig] = field(default_factory=dict)  # for source=tiny
    num_train: int = 20000
    num_eval: int = 200  # held-out prompts (disjoint from train) per capability
    eval_source: str | None = None  # the eval section's held-out file (default: its source)
    max_prompt_len: int = 64
    max_completion_len: int = 16


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.1


@dataclass(frozen=True)
class RewardSpec:
    """One reward in a weighted combination: a registry name, entry point, or 'pkg.module:fn'."""

    name: str
    weight: float = 1.0
    # per batch call; None: the reward's own default, else 30 s (<= 0: no limit)
    timeout_s: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the reward function


@dataclass(frozen=True)
class RewardsConfig:
    specs: tuple[RewardSpec, ...] = (RewardSpec(name="exact_match"),)
    strict: bool = False  # True: a failing reward stops the run; False: isolate, count, go on


@dataclass(frozen=True)
class EvalConfig:
    """The held-out set every stage is measured on (one row per stage in the final table)."""

    data: DataConfig = field(default_factory=DataConfig)  # its eval split (tiny: num_eval per capability)
    reward: str = "exact_match"  # a sample counts as solved when this reward is 1.0
    max_new_tokens: int = 16
    sampled: bool = True  # also measure sampled pass@1 at temperature 1
    batch_size: int = 256
    include_base: bool = True  # also evaluate the recipe's starting model


@dataclass(frozen=True)
class SamplingConfig:
    """How a rollout engine samples: ``n`` completions per prompt. ``temperature: 0`` is greedy."""

    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()  # stop strings (not included in the text); EOS always stops
    seed: int | None = None  # None: the engine's own random stream

    def check(self, path: str) -> None:
        if self.n < 1:
            raise ConfigError(f"'{path}.n' must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ConfigError(f"'{path}.temperature' must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"'{path}.top_p' must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ConfigError(f"'{path}.max_tokens' must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class EngineConfig:
    """The rollout engine. vLLM is the default; ``hf`` (transformers ``generate``) is opt-in only."""

    kind: Literal["vllm", "hf"] = "vllm"
    # auto: float32 on CPU, checkpoint's on GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    enforce_eager: bool = True  # no torch.compile / CUDA graphs (fast start; the only mode tested on CPU)
    gpu_memory_utilization: float = 0.3  # GPU: share of GPU memory for vLLM when colocated with training
    kv_cache_space_gib: int = 1  # CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    sleep_during_training: bool = True  # GPU: free vLLM's memory between rollouts (no-op on CPU)
    hf_batch_size: int = 256  # kind=hf: sequences per generate() call
    extra: dict[str, Any] = field(default_factory=dict)  # more vllm.LLM(...) keyword arguments (vLLM's names)

    def check(self, path: str) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"'{path}.gpu_memory_utilization' must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.kv_cache_space_gib < 1:
            raise ConfigError(f"'{path}.kv_cache_space_gib' must be >= 1, got {self.kv_cache_space_gib}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"'{path}.max_model_len' must be >= 2 or null, got {self.max_model_len}")
        if self.hf_batch_size < 1:
            raise ConfigError(f"'{path}.hf_batch_size' must be >= 1, got {self.hf_batch_size}")


# --------------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class CodistillConfig:
    """Codistillation: the loss becomes ``(1 − λ_t)·CE + λ_t·τ²·D(teacher_τ ‖ student_τ)``.

    Targets come from ``teacher`` run online in the same step (no grad), or from ``targets``, a dir of
    offline top-k targets (``python -m posttrain.teacher``; a distill stage writes it itself when the
    dir is missing and ``teacher`` is set). λ_t: see ``posttrain.losses.codistill_loss``.
    """

    # a trained teacher: name_or_path (+ tokenizer: null), or arch + config
    teacher: ModelConfig | None = None
    targets: str | None = None  # offline top-k targets dir (Arrow); when set, training reads these
    modes: tuple[Literal["fixed", "schedule", "teacher_confidence", "teacher_entropy"], ...] = ("fixed",)
    lambda0: float = 0.5  # λ for "fixed", or the schedule's start; scales the per-token modes
    lambda1: float = 0.5  # the schedule's end (the stage's last step uses it)
    schedule: Literal["linear", "cosine"] = "linear"
    temperature: float = 1.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5  # generalized JSD mixture weight, in (0, 1)
    top_k: int = 0  # 0: full teacher logits (online); k >= 1: top-k + a tail bucket (offline needs k >= 1)

    def check(self, path: str) -> None:
        if self.teacher is None and self.targets is None:
            raise ConfigError(
                f"'{path}' needs 'teacher' (online targets) or 'targets' (an offline targets dir)"
            )
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"'{path}.modes' must list each mode at most once, got {list(self.modes)}")
        if "fixed" in self.modes and "schedule" in self.modes:
            raise ConfigError(f"'{path}.modes': 'fixed' and 'schedule' both set the base λ; keep one")
        for key in ("lambda0", "lambda1"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"'{path}.{key}' must be in [0, 1], got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"'{path}.temperature' must be > 0, got {self.temperature}")
        if self.divergence == "jsd" and not 0.0 < self.jsd_beta < 1.0:
            raise ConfigError(f"'{path}.jsd_beta' must be in (0, 1) (0 is forward_kl, 1 is reverse_kl)")
        if self.top_k < 0 or (self.targets is not None and self.teacher is not None and self.top_k < 1):
            raise ConfigError(
                f"'{path}.top_k' must be >= 1 to write offline targets (0 = full logits, online only)"
            )


@dataclass(frozen=True)
class SFTConfig:
    type: Literal["sft"] = "sft"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 0  # held-out eval every N steps (0: only at the end of the stage)
    max_steps: int = 500
    micro_batch_size: int = 64  # sequences per micro-batch per rank
    grad_accum: int = 1
    pack: bool = True  # pack several examples per row (position ids restart; no cross-attention)
    seq_len: int = 64  # row length when packing
    # Unpacked batches only: group examples of similar length (less padding). Off by default: when
    # length correlates with the answer (3-digit sums start with 1), same-length batches leak the
    # label into the batch and training stalls — measured on the tiny world.
    group_by_length: bool = False
    save_every: int = 100  # resume-state checkpoint interval (steps)
    data_filters: tuple[str, ...] = ()  # names in the data-filter registry, applied in order
    codistill: CodistillConfig | None = None  # set: the loss becomes codistill_loss against this teacher

    def check(self, path: str) -> None:
        if self.codistill is not None and (
            self.codistill.targets is not None or self.codistill.teacher is None
        ):
            raise ConfigError(
                f"'{path}.codistill': sft codistills from an online teacher; set 'teacher' and drop 'targets' "
                "(offline targets are read by a stage of type distill)"
            )


STAGE_TYPES: dict[str, type] = {"sft": SFTConfig}


@dataclass(frozen=True)
class DistillConfig:
    """A distillation stage: the SFT loop with ``codistill_loss`` (online teacher or offline targets)."""

    type: Literal["distill"] = "distill"
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval_every: int = 0  # held-out eval every N steps (0: only at the end of the stage)
    max_steps: int = 500
    micro_batch_size: int = 64  # sequences per micro-batch per rank
    grad_accum: int = 1
    pack: bool = True  # pack several examples per row (position ids restart; no cross-attention)
    seq_len: int = 64  # row length when packing
    group_by_length: bool = False  # unpacked batches only; see SFTConfig.group_by_length
    save_every: int = 100  # resume-state checkpoint interval (steps)

    def check(self, path: str) -> None:
        self.codistill.check(f"{path}.codistill")


STAGE_TYPES["distill"] = DistillConfig


@dataclass(frozen=True)
class CurriculumConfig:
    """Continuous curriculum over a prompt pool (see posttrain/curriculum.py for the status rules)."""

    enabled: bool = False  # False: prompts drawn from the whole train set, no filter passes
    pool_size: int = 256  # trainable prompts the pool keeps topped up from the dataset
    band: tuple[float, ...] = (0.0, 1.0)  # [lo, hi] pass-rate band kept for training
    band_final: tuple[float, ...] | None = None  # the band reached at band_steps (toward harder: lower)
    band_steps: int = 0
    refilter_every: int = 50  # steps between filter passes (pass 0 runs before step 1); 0: never
    filter_samples: int = 8  # completions per prompt in a filter pass (the n of c-of-n)
    pass_k: int = 8  # the k of the logged pass@k (<= filter_samples)
    retire_after: int = 2  # consecutive all-correct checks (filter pass or training group) to retire
    backlog_recheck_every: int = 2  # a backlog prompt is re-checked every this many filter passes

    def check(self, path: str) -> None:
        for name, band in (("band", self.band), ("band_final", self.band_final)):
            if band is not None and not (len(band) == 2 and 0.0 <= band[0] <= band[1] <= 1.0):
                raise ConfigError(
                    f"'{path}.{name}' must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(band)}"
                )
        if not 1 <= self.pass_k <= self.filter_samples:
            raise ConfigError(
                f"'{path}.pass_k' must be in [1, filter_samples={self.filter_samples}], got {self.pass_k}"
            )
        for name in ("pool_size", "filter_samples", "retire_after", "backlog_recheck_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"'{path}.{name}' must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RLLossConfig:
    """Clipped policy gradient (GRPO; DAPO's asymmetric clip with clip_high > clip_low) + optional k3 KL and entropy."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0  # > 0 keeps a frozen copy of the starting model as the KL reference
    entropy_coef: float = 0.0
    scale_by_std: bool = True  # advantage (r - mean) / (std + adv_eps); False: r - mean
    adv_eps: float = 1e-4
    log_kl: bool = True  # log KL to the starting model even when kl_coef is 0 (one no-grad forward more)


@dataclass(frozen=True)
class RLConfig:
    """Online RL: rollouts -> rewards -> group advantages -> drop zero-advantage groups, refill -> update -> sync.

    Defaults are the recipe measured on the tiny world (DESIGN.md): GRPO, 16 prompts x 8 samples at
    temperature 1, advantage (r - mean)/(std + 1e-4), token-mean loss, one on-policy update per
    batch, AdamW lr 1e-4 betas (0.9, 0.99) no weight decay, 10-step warmup then constant, no KL.
    """

    type: Literal["rl"] = "rl"
    data: DataConfig = field(default_factory=DataConfig)  # prompt + answer (+ capability) rows
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # n = group size
    engine: EngineConfig = field(default_factory=EngineConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    loss: RLLossConfig = field(default_factory=RLLossConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, warmup_steps=10, schedule="constant"
        )
    )
    max_steps: int = 300  # policy updates
    prompts_per_step: int = 16  # informative groups per update
    filter_zero_advantage: bool = True  # drop groups whose rewards are all equal, and refill
    max_gen_batches: int = 4  # generation rounds per step before training on what there is
    capability_weights: dict[str, float] = field(
        default_factory=dict
    )  # default: data.tasks weights, else equal
    pass_threshold: float = 1.0  # a completion "passes" (pass@k, filter passes) when its reward >= this
    # Optimizer updates per step: the step's sequences split into this many mini-batches, one update
    # each (PPO-style reuse of the rollouts; the later updates are off-policy and the clip bounds them).
    # The lr schedule (warmup_steps included) counts optimizer updates: max_steps * minibatches.
    minibatches: int = 1
    # Sequences per forward/backward per rank. Each update runs
    # ceil(prompts_per_step * sampling.n / (minibatches * ranks * micro_batch_size)) micro-batches per rank.
    micro_batch_size: int = 256
    eval_every: int = 0  # held-out eval every N steps (0: only at the end of the stage)
    save_every: int = 50
    log_samples_every: int = 10  # rows appended to the rollout table every N steps
    samples_per_log: int = 4

    def check(self, path: str) -> None:
        if self.prompts_per_step < 1 or self.max_gen_batches < 1 or self.max_steps < 0:
            raise ConfigError(f"'{path}': prompts_per_step and max_gen_batches must be >= 1, max_steps >= 0")
        if self.sampling.n < 2:
            raise ConfigError(
                f"'{path}.sampling.n' must be >= 2 (group-relative advantages need a group), got {self.sampling.n}"
            )
        if self.micro_batch_size < 1 or self.minibatches < 1:
            raise ConfigError(f"'{path}': micro_batch_size and minibatches must be >= 1")
        loss = self.loss
        if (
            loss.clip_low < 0
            or loss.clip_high < 0
            or loss.adv_eps <= 0
            or loss.kl_coef < 0
            or loss.entropy_coef < 0
        ):
            raise ConfigError(
                f"'{path}.loss': clip_low, clip_high, kl_coef, entropy_coef must be >= 0 and adv_eps > 0"
            )
        if self.curriculum.refilter_every < 0:
            raise ConfigError(f"'{path}.curriculum.refilter_every' must be >= 0 (0: no filter passes)")


STAGE_TYPES["rl"] = RLConfig


# --------------------------------------------------------------------------------------------------
# The whole recipe


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig  # required: pick a model group (model=tiny_llama4) or set model.name_or_path
    description: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    stages: dict[str, Any] = field(default_factory=dict)  # ordered: name -> stage config


def parse_recipe(data: dict[str, Any]) -> Recipe:
    data = dict(data)
    stages_raw = data.pop("stages", None) or {}
    if not isinstance(stages_raw, dict):
        raise ConfigError("'stages' must be a mapping of stage name -> settings (ordered)")
    recipe = parse(Recipe, data, "")
    stages: dict[str, Any] = {}
    for name, raw in stages_raw.items():
        path = f"stages.{name}"
        if not isinstance(raw, dict) or "type" not in raw:
            raise ConfigError(f"'{path}' needs a 'type' (one of: {', '.join(sorted(STAGE_TYPES))})")
        kind = raw["type"]
        if kind not in STAGE_TYPES:
            close = difflib.get_close_matches(str(kind), list(STAGE_TYPES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"'{path}.type' is {kind!r}{hint}; valid: {', '.join(sorted(STAGE_TYPES))}")
        stages[name] = parse(STAGE_TYPES[kind], raw, path)
    if not stages:
        raise ConfigError("the recipe has no stages; add at least one under 'stages'")
    return dataclasses.replace(recipe, stages=stages)


__all__ = [
    "ConfigError",
    "Recipe",
    "parse",
    "parse_recipe",
    "to_dict",
    "STAGE_TYPES",
    "typing",
]
