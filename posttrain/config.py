"""Every setting of a recipe: one frozen dataclass per section and per stage type, and the stage table.

This file is the reference of what a recipe may say. A field's type says its valid values (``PosInt``
is an int >= 1, ``Prob`` a float in [0, 1], ``Literal[...]`` a fixed set); the checker that turns a
composed Hydra config into these classes, with one-line errors naming the key, is
``posttrain/schema.py``. Checks that relate several fields are each class's ``check(path)``.

A stage type is one row of ``STAGES`` (its config class and the function that runs it) plus one file
in ``posttrain/stages/``.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from posttrain.schema import (
    ConfigError,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Prob,
    Range,
    first_difference,
    parse,
    to_dict,
)

# --------------------------------------------------------------------------------------------------
# Shared sections


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    dir: str = "runs"  # run dir = <dir>/<name>
    seed: int = 0
    overwrite: bool = False  # allow replacing a finished run's outputs
    # A step whose loss or gradient is NaN/inf is skipped (weights, optimizer and lr untouched) and
    # counted; this many in a row stop the run with one line naming the stage and step.
    max_nonfinite_steps: PosInt = 3


@dataclass(frozen=True)
class WandbConfig:
    # offline writes <run dir>/wandb and never touches the network; online needs WANDB_API_KEY;
    # disabled logs to metrics.jsonl only. The WANDB_MODE environment variable overrides this.
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "posttrain"
    entity: str | None = None
    init_timeout_s: PosFloat = 30.0


@dataclass(frozen=True)
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    log_every: PosInt = 10
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
    # Total parameters in billions, for the hardware estimate of a hub model (``posttrain validate``
    # reads no weights); a model built from arch + config is counted instead.
    num_params_b: PosFloat | None = None

    def check(self, path: str) -> None:
        if self.name_or_path is None and self.arch is None:
            raise ConfigError(
                f"'{path}' needs either name_or_path (an HF model dir or hub id) or arch + config"
            )


@dataclass(frozen=True)
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    bf16: bool = False  # fp16 does not run on CPU; bf16 does
    gradient_clipping: NonNegFloat = 1.0  # 0: no clipping
    # Extra keys merged into the generated DeepSpeed JSON (expert users; keys are DeepSpeed's own).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ParallelConfig:
    ep_size: PosInt = 1  # expert-parallel group size for MoE students (and frozen MoE teachers)


@dataclass(frozen=True)
class HardwareConfig:
    """What a recipe needs to run: ``posttrain validate`` prints it and refuses a recipe whose estimated
    per-GPU memory does not fit (``posttrain.preflight.check_hardware``). 0 GPUs: any machine (CPU)."""

    gpus: NonNegInt = 0  # GPUs in all (= launcher.nproc_per_node x launcher.nnodes)
    gpu_memory_gib: NonNegFloat = 0.0  # per GPU
    notes: str = ""


@dataclass(frozen=True)
class LauncherConfig:
    nproc_per_node: PosInt = 1  # >1: `posttrain run` re-launches itself under torchrun with this many ranks
    nnodes: PosInt = 1  # >1: start `posttrain run` on every node with torchrun or the DeepSpeed launcher


@dataclass(frozen=True)
class TinyTaskConfig:
    """One synthetic capability of the tiny world. ``levels`` set the difficulty levels."""

    kind: Literal["add", "mul", "reverse", "sort"]
    levels: tuple[PosInt, ...] = (2,)  # digits for add/mul, string length for reverse/sort
    weight: NonNegFloat = 1.0  # sampling weight (SFT mixture, RL capability mix)

    def check(self, path: str) -> None:
        if not self.levels:
            raise ConfigError(f"'{path}.levels' must list at least one level")


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
    num_train: PosInt = 20000
    num_eval: PosInt = 200  # held-out prompts (disjoint from train) per capability
    eval_source: str | None = None  # the eval section's held-out file (default: its source)
    max_prompt_len: PosInt = 64
    max_completion_len: PosInt = 16


@dataclass(frozen=True)
class OptimConfig:
    lr: PosFloat = 3e-3
    betas: tuple[Annotated[float, Range(ge=0, lt=1)], ...] = (0.9, 0.95)
    weight_decay: NonNegFloat = 0.0
    warmup_steps: NonNegInt = 20
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: Prob = 0.1

    def check(self, path: str) -> None:
        if len(self.betas) != 2:
            raise ConfigError(f"'{path}.betas' must be [beta1, beta2], got {list(self.betas)}")


@dataclass(frozen=True)
class RewardSpec:
    """One reward in a weighted combination: a registry name, entry point, or 'pkg.module:fn'."""

    name: str
    weight: float = 1.0  # negative: a penalty
    # per batch call; None: the reward's own default, else 30 s (<= 0: no limit)
    timeout_s: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the reward function


@dataclass(frozen=True)
class RewardsConfig:
    specs: tuple[RewardSpec, ...] = (RewardSpec(name="exact_match"),)
    strict: bool = False  # True: a failing reward stops the run; False: isolate, count, go on
    # A reward that fails on every sample (raises, times out, NaN, wrong length) for this many RL steps in
    # a row stops the run, naming it and its first error; partial failures are counted and the run goes on.
    max_failed_steps: PosInt = 3


@dataclass(frozen=True)
class EvalConfig:
    """The held-out set every stage is measured on (one row per stage in the final table)."""

    data: DataConfig = field(default_factory=DataConfig)  # its eval split (tiny: num_eval per capability)
    reward: str = "exact_match"  # a sample counts as solved when this reward is 1.0
    max_new_tokens: PosInt = 16
    sampled: bool = True  # also measure sampled pass@1 at temperature 1
    batch_size: PosInt = 256
    include_base: bool = True  # also evaluate the recipe's starting model


@dataclass(frozen=True)
class SamplingConfig:
    """How a rollout engine samples: ``n`` completions per prompt. ``temperature: 0`` is greedy."""

    n: PosInt = 8
    temperature: NonNegFloat = 1.0
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    max_tokens: PosInt = 16
    stop: tuple[str, ...] = ()  # stop strings (not included in the text); EOS always stops
    seed: int | None = None  # None: the engine's own random stream


@dataclass(frozen=True)
class EngineConfig:
    """The rollout engine. vLLM is the default; ``hf`` (transformers ``generate``) is opt-in only."""

    kind: Literal["vllm", "hf"] = "vllm"
    # auto: float32 on CPU, checkpoint's on GPU
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: Annotated[int, Range(ge=2)] | None = None  # None: the model's max_position_embeddings
    enforce_eager: bool = True  # no torch.compile / CUDA graphs (fast start; the only mode tested on CPU)
    # GPU: share of GPU memory for vLLM when colocated with training
    gpu_memory_utilization: Annotated[float, Range(gt=0, le=1)] = 0.3
    kv_cache_space_gib: PosInt = 1  # CPU: KV cache size (VLLM_CPU_KVCACHE_SPACE)
    sleep_during_training: bool = True  # GPU: free vLLM's memory between rollouts (no-op on CPU)
    hf_batch_size: PosInt = 256  # kind=hf: sequences per generate() call
    # GPU: one vLLM engine per group of this many consecutive ranks, tensor-parallel across their GPUs
    # (each rank's engine on its own GPU when 1), so a model larger than one GPU can be sampled.
    tensor_parallel_size: PosInt = 1
    extra: dict[str, Any] = field(default_factory=dict)  # more vllm.LLM(...) keyword arguments (vLLM's names)


# --------------------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class CodistillConfig:
    """Codistillation: the loss becomes ``(1 − λ_t)·CE + λ_t·τ²·D(teacher_τ ‖ student_τ)``.

    Targets come from ``teacher`` run online in the same step (no grad; a frozen model held by the
    strategy: ZeRO-3-sharded when the student is, expert-parallel for MoE), or from ``targets``, a dir
    of offline top-k targets (``posttrain teacher-targets``; a distill stage writes it itself when the
    dir is missing and ``teacher`` is set). λ_t: see ``posttrain.losses.codistill_loss``.
    """

    # a trained teacher: name_or_path (+ tokenizer: null), or arch + config
    teacher: ModelConfig | None = None
    targets: str | None = None  # offline top-k targets dir (Arrow); when set, training reads these
    modes: tuple[Literal["fixed", "schedule", "teacher_confidence", "teacher_entropy"], ...] = ("fixed",)
    lambda0: Prob = 0.5  # λ for "fixed", or the schedule's start; scales the per-token modes
    lambda1: Prob = 0.5  # the schedule's end (the stage's last step uses it)
    schedule: Literal["linear", "cosine"] = "linear"
    temperature: PosFloat = 1.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: Annotated[float, Range(gt=0, lt=1)] = 0.5  # generalized JSD mixture weight
    top_k: NonNegInt = (
        0  # 0: full teacher logits (online); k >= 1: top-k + a tail bucket (offline needs k >= 1)
    )

    def check(self, path: str) -> None:
        if self.teacher is None and self.targets is None:
            raise ConfigError(
                f"'{path}' needs 'teacher' (online targets) or 'targets' (an offline targets dir)"
            )
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ConfigError(f"'{path}.modes' must list each mode at most once, got {list(self.modes)}")
        if "fixed" in self.modes and "schedule" in self.modes:
            raise ConfigError(f"'{path}.modes': 'fixed' and 'schedule' both set the base λ; keep one")
        if self.targets is not None and self.teacher is not None and self.top_k < 1:
            raise ConfigError(
                f"'{path}.top_k' must be >= 1 to write offline targets (0 = full logits, online only)"
            )


@dataclass(frozen=True)
class SupervisedLoopConfig:
    """What every stage trained by the supervised loop (``posttrain.stages.sft.train_supervised``) shares."""

    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    max_steps: NonNegInt = 500
    micro_batch_size: PosInt = 64  # sequences (packed rows) per micro-batch per rank
    grad_accum: PosInt = 1
    pack: bool = True  # pack several examples per row (position ids restart; no cross-attention)
    seq_len: Annotated[int, Range(ge=2)] = 64  # row length when packing
    # Unpacked batches only: group examples of similar length (less padding). Off by default: when
    # length correlates with the answer (3-digit sums start with 1), same-length batches leak the
    # label into the batch and training stalls — measured on the tiny world.
    group_by_length: bool = False
    eval_every: NonNegInt = 0  # held-out eval every N steps (0: only at the end of the stage)
    save_every: NonNegInt = 100  # resume-state checkpoint interval (steps; 0: never)


@dataclass(frozen=True)
class JudgeConfig:
    """The model a judge filter runs, batched through the rollout engine (``posttrain/filters.py``)."""

    model: str  # an HF checkpoint dir, or the name of an earlier stage of the recipe (its checkpoint)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # pass_rate: n completions per prompt; llm_rating reads next-token log-probs and samples only when
    # the judge's tokenizer cannot give each rating one token
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(n=8, temperature=1.0, max_tokens=16)
    )
    batch_size: PosInt = 256  # prompts per engine call: the progress bar's and the cache's unit


@dataclass(frozen=True)
class DataFilterSpec:
    """One difficulty judge of an SFT stage: a registry name, entry point or 'pkg.module:fn'. It scores
    every row (difficulty in [0, 1], 1 = hardest); ``data_selection`` then picks the rows to keep.
    Written as just its name when it needs nothing more (``data_filters: [completion_length]``)."""

    __shorthand__ = "name"

    name: str
    weight: NonNegFloat = 1.0  # several filters: a row's difficulty is the weighted mean of their scores
    judge: JudgeConfig | None = None  # filters that run a model need one (`posttrain filters` says which)
    kwargs: dict[str, Any] = field(default_factory=dict)  # the filter's own options (checked by validate)


@dataclass(frozen=True)
class SelectionConfig:
    """Which rows an SFT stage keeps, from the difficulty its data filters gave them (posttrain/selection.py).

    ``drop_easiest`` drops that share of the scored rows, easiest first, within each capability
    (``per_capability``) or overall, or in ``proportions`` (the kept set's share per capability);
    ``min_difficulty``/``max_difficulty`` keep the rows inside a band instead. Ties are broken by a
    seeded hash of the row id. A capability the selection would empty keeps its hardest
    ``min_capability_keep`` share; a selection that keeps no row at all is refused.
    """

    drop_easiest: Prob | None = None  # 0.5: Maverick-style; 0.95: Behemoth-style
    min_difficulty: Prob | None = None
    max_difficulty: Prob | None = None
    per_capability: bool = True  # drop_easiest within each capability (each keeps the same share)
    proportions: dict[str, Prob] = field(default_factory=dict)  # capability -> share of the kept rows
    min_capability_keep: Prob = 0.01  # share of a capability kept (its hardest) if selection drops it all
    unscored: Literal["keep", "drop"] = "keep"  # rows no filter scored (unusable judge answers, too long)

    def check(self, path: str) -> None:
        band = self.min_difficulty is not None or self.max_difficulty is not None
        if band and self.drop_easiest is not None:
            raise ConfigError(f"'{path}': set either drop_easiest or min_difficulty/max_difficulty, not both")
        lo, hi = self.min_difficulty or 0.0, 1.0 if self.max_difficulty is None else self.max_difficulty
        if lo > hi:
            raise ConfigError(f"'{path}': min_difficulty {lo} is above max_difficulty {hi}")
        if self.proportions:
            if self.drop_easiest is None:
                raise ConfigError(
                    f"'{path}.proportions' shares out the rows drop_easiest keeps; set drop_easiest too"
                )
            if abs(sum(self.proportions.values()) - 1.0) > 1e-6:
                raise ConfigError(
                    f"'{path}.proportions' must sum to 1, got {sum(self.proportions.values()):g}"
                )


@dataclass(frozen=True)
class SFTConfig(SupervisedLoopConfig):
    type: Literal["sft"] = "sft"
    # difficulty judges run before tokenising (the LLM-judge filter of lightweight SFT): pass_rate,
    # llm_rating, completion_length, random, or your own (`posttrain filters`)
    data_filters: tuple[DataFilterSpec, ...] = ()
    data_selection: SelectionConfig = field(default_factory=SelectionConfig)
    # judgments on disk, keyed by judge fingerprint, settings and example hash; None: <run.dir>/judgment_cache,
    # shared by every recipe whose run.dir is the same
    judgment_cache: str | None = None
    codistill: CodistillConfig | None = None  # set: the loss becomes codistill_loss against this teacher

    def check(self, path: str) -> None:
        names = [f.name for f in self.data_filters]
        if len(set(names)) != len(names):
            raise ConfigError(f"'{path}.data_filters' lists a filter twice ({names}); list each once")
        if self.data_filters and not any(f.weight > 0 for f in self.data_filters):
            raise ConfigError(f"'{path}.data_filters': every weight is 0; give one filter a weight > 0")
        if self.codistill is not None and (
            self.codistill.targets is not None or self.codistill.teacher is None
        ):
            raise ConfigError(
                f"'{path}.codistill': sft codistills from an online teacher; set 'teacher' and drop 'targets' "
                "(offline targets are read by a stage of type distill)"
            )


@dataclass(frozen=True)
class DistillConfig(SupervisedLoopConfig):
    """A distillation stage: the supervised loop with ``codistill_loss`` (online teacher or offline targets)."""

    type: Literal["distill"] = "distill"
    codistill: CodistillConfig = field(default_factory=CodistillConfig)

    def check(self, path: str) -> None:
        self.codistill.check(f"{path}.codistill")


@dataclass(frozen=True)
class CurriculumConfig:
    """Continuous curriculum over a prompt pool (see posttrain/curriculum.py for the status rules)."""

    enabled: bool = False  # False: prompts drawn from the whole train set, no filter passes
    pool_size: PosInt = 1024  # trainable prompts the pool keeps topped up from the dataset
    band: tuple[Prob, ...] = (0.0, 1.0)  # [lo, hi] pass-rate band kept for training
    band_final: tuple[Prob, ...] | None = None  # the band reached at band_steps (toward harder: lower)
    band_steps: NonNegInt = 0
    refilter_every: NonNegInt = 50  # steps between filter passes (pass 0 runs before step 1); 0: never
    filter_samples: PosInt = 4  # completions per prompt in a filter pass (the n of c-of-n)
    pass_k: PosInt = 4  # the k of the logged pass@k (<= filter_samples)
    retire_after: PosInt = 2  # consecutive all-correct checks (filter pass or training group) to retire
    backlog_recheck_every: PosInt = 2  # a backlog prompt is re-checked every this many filter passes
    # a prompt checked this many times in a row outside the band (easy or backlog) is abandoned: not
    # re-checked again, so the easy and backlog sets stop growing the filter passes' cost
    max_rechecks: PosInt = 4
    retired_recheck: NonNegInt = 4  # retired prompts re-checked per filter pass (the oldest checks first)
    # what the band is compared with: pass@1 (c/n of filter_samples) or the unbiased pass@k (k = pass_k)
    band_metric: Literal["pass@1", "pass@k"] = "pass@1"
    bands: dict[str, tuple[Prob, ...]] = field(default_factory=dict)  # per-capability [lo, hi] (fixed)

    def check(self, path: str) -> None:
        named = [("band", self.band), ("band_final", self.band_final)]
        named += [(f"bands.{cap}", b) for cap, b in self.bands.items()]
        for name, band in named:
            if band is not None and not (len(band) == 2 and band[0] <= band[1]):
                raise ConfigError(
                    f"'{path}.{name}' must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(band)}"
                )
        if self.pass_k > self.filter_samples:
            raise ConfigError(
                f"'{path}.pass_k' must be in [1, filter_samples={self.filter_samples}], got {self.pass_k}"
            )


@dataclass(frozen=True)
class RLLossConfig:
    """Clipped policy gradient (GRPO; DAPO's asymmetric clip with clip_high > clip_low) + optional k3 KL and entropy."""

    clip_low: NonNegFloat = 0.2
    clip_high: NonNegFloat = 0.2
    kl_coef: NonNegFloat = (
        0.0  # > 0: a frozen copy of the starting model (held by the strategy) is the KL reference
    )
    entropy_coef: NonNegFloat = 0.0
    scale_by_std: bool = True  # advantage (r - mean) / (std + adv_eps); False: r - mean
    adv_eps: PosFloat = 1e-4
    # Log the KL to the starting model when kl_coef is 0. Off by default: it keeps that frozen model
    # (sharded like the policy) and costs one more forward per micro-batch, for a metric.
    log_kl: bool = False
    # Importance correction from the engine's behaviour log-probs to the trainer's proximal ones (the
    # weights before this step's update; the clip is anchored there): off-policy samples (asynchronous
    # rollouts) and engine/trainer numerics that differ (bf16, MoE routing) both need it. truncate:
    # w = min(pi_prox / pi_behav, is_cap); mask: tokens with w outside [1/is_cap, is_cap] leave the loss.
    is_correction: Literal["none", "truncate", "mask"] = "none"
    is_cap: Annotated[float, Range(gt=1)] = 2.0
    # What the clipped ratio is taken against. behaviour: the engine's log-probs of the weights that
    # sampled (PPO's trust region around the sampling policy: a token the last updates already pushed
    # past 1 + clip_high is not pushed again); proximal: the trainer's log-probs before this step's
    # update (ratio 1 at the first update, so one update per batch has no trust region). auto:
    # behaviour when rollouts can be stale (asynchronous, max_staleness >= 1) and is_correction is
    # none, else proximal (the synchronous loop, or decoupled PPO with an importance correction).
    clip_anchor: Literal["auto", "behaviour", "proximal"] = "auto"


@dataclass(frozen=True)
class AsyncConfig:
    """Asynchronous rollouts: the engine generates the next steps' first rounds while the trainer updates
    (``posttrain/stages/rl.py``). ``max_staleness`` K bounds how many policy versions a trained sample
    may lag: at most K steps are generated ahead (admission control), so staleness <= K by
    construction; K = 0 is the synchronous loop."""

    enabled: bool = False
    max_staleness: NonNegInt = 1


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
    max_steps: NonNegInt = 300  # policy updates
    prompts_per_step: PosInt = 16  # informative groups per update
    filter_zero_advantage: bool = True  # drop groups whose rewards are all equal, and refill
    max_gen_batches: PosInt = 4  # generation rounds per step before training on what there is
    # a refill round asks for the missing groups over the informative rate so far, at most this many
    # times the missing number (a constant reward would otherwise ask for ~30x per step)
    max_ask_ratio: Annotated[float, Range(ge=1)] = 4.0
    # steps in a row without an informative group (no update) that stop the stage in one line
    max_idle_steps: PosInt = 10
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)
    # Completions cut at sampling.max_tokens (no EOS): trained on like any other (train), left out of
    # the loss (mask), or their reward lowered linearly over the last overlong_buffer tokens down to
    # -overlong_penalty at the limit (penalty; DAPO's soft overlong punishment). Counted either way.
    truncated: Literal["train", "mask", "penalty"] = "train"
    overlong_buffer: NonNegInt = 0
    overlong_penalty: NonNegFloat = 1.0
    # the sampler's capability weights; default: data.tasks weights, else equal
    capability_weights: dict[str, NonNegFloat] = field(default_factory=dict)
    pass_threshold: float = 1.0  # a completion "passes" (pass@k, filter passes) when its reward >= this
    # Optimizer updates per step: the step's sequences split into this many mini-batches, one update
    # each (PPO-style reuse of the rollouts; the later updates are off-policy and the clip bounds them).
    # The lr schedule (warmup_steps included) counts optimizer updates: max_steps * minibatches.
    minibatches: PosInt = 1
    # Tokens (prompt + completion, as padded) per forward/backward per rank: each update's sequences are
    # packed into as few micro-batches of at most this many tokens as they need (a longer sequence gets
    # one of its own), so memory follows the tokens, not a sequence count.
    micro_batch_tokens: PosInt = 8192
    # Completion positions whose float32 log-softmax is computed at once (memory: this x vocabulary).
    logprob_chunk_tokens: PosInt = 1024
    eval_every: NonNegInt = 0  # held-out eval every N steps (0: only at the end of the stage)
    save_every: NonNegInt = 50
    log_samples_every: NonNegInt = 10  # rows appended to the rollout table every N steps
    samples_per_log: PosInt = 4

    @property
    def clip_anchor(self) -> Literal["behaviour", "proximal"]:
        """``loss.clip_anchor`` resolved (see RLLossConfig)."""
        if self.loss.clip_anchor != "auto":
            return self.loss.clip_anchor
        stale = self.asynchronous.enabled and self.asynchronous.max_staleness > 0
        return "behaviour" if stale and self.loss.is_correction == "none" else "proximal"

    def check(self, path: str) -> None:
        if self.sampling.n < 2:
            raise ConfigError(
                f"'{path}.sampling.n' must be >= 2 (group-relative advantages need a group), got {self.sampling.n}"
            )
        if self.sampling.temperature == 0:
            raise ConfigError(
                f"'{path}.sampling.temperature' is 0 (greedy): every completion of a prompt is the same, so every "
                "group is zero-advantage; RL samples at a temperature > 0 (1.0 is the usual choice)"
            )
        if self.truncated == "penalty" and not 0 < self.overlong_buffer <= self.sampling.max_tokens:
            raise ConfigError(
                f"'{path}.overlong_buffer' must be in [1, sampling.max_tokens={self.sampling.max_tokens}] for "
                f"truncated: penalty, got {self.overlong_buffer}"
            )
        if self.sampling.top_p < 1:
            raise ConfigError(
                f"'{path}.sampling.top_p' is {self.sampling.top_p}: the policy gradient takes log-probs of the "
                "tempered full distribution, which top-p sampling truncates; RL needs top_p: 1.0"
            )
        if self.loss.clip_anchor == "behaviour" and self.loss.is_correction != "none":
            raise ConfigError(
                f"'{path}.loss.is_correction' is {self.loss.is_correction} with clip_anchor: behaviour, whose "
                "ratio to the behaviour log-probs already corrects for them; set is_correction: none, or "
                "clip_anchor: proximal for decoupled PPO"
            )


@dataclass(frozen=True)
class DPOPairsConfig:
    """Where a DPO stage's preference pairs come from.

    ``dataset``: rows of ``data`` with ``prompt``, ``chosen``, ``rejected`` (plain text, or
    conversational: ``prompt`` a list of messages, ``chosen``/``rejected`` assistant messages).
    ``on_policy``: the hard prompts of ``data`` (pass rate in ``band``: from the previous RL stage's
    final prompt pool when it trained on the same data, else measured with ``measure_samples``
    completions each) are sampled ``n`` times with the current policy, scored by the stage's rewards,
    and paired best against worst when their reward margin is at least ``min_margin``.
    """

    source: Literal["dataset", "on_policy"] = "on_policy"
    n: Annotated[int, Range(ge=2)] = 8
    min_margin: NonNegFloat = 0.5
    band: tuple[Prob, ...] = (0.0, 0.75)  # pass-rate band of the prompts kept (hard: lower)
    max_prompts: PosInt = 256  # hard prompts sampled for pairs
    measure_samples: Annotated[int, Range(ge=2)] = (
        8  # completions per prompt when pass rates are measured here
    )
    measure_prompts: PosInt = 1024  # prompts measured when there is no RL pool to read

    def check(self, path: str) -> None:
        if not (len(self.band) == 2 and self.band[0] <= self.band[1]):
            raise ConfigError(
                f"'{path}.band' must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(self.band)}"
            )


@dataclass(frozen=True)
class DPOConfig:
    """Lightweight DPO on hard prompts (``posttrain/stages/dpo.py``): pairs -> reference log-probs,
    computed once through a frozen copy of the starting model and cached -> ``losses.dpo_loss``."""

    type: Literal["dpo"] = "dpo"
    data: DataConfig = field(default_factory=DataConfig)
    pairs: DPOPairsConfig = field(default_factory=DPOPairsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # on-policy pairs
    engine: EngineConfig = field(default_factory=EngineConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    pass_threshold: float = 1.0  # a completion passes (pass rates) when its reward >= this
    beta: PosFloat = 0.1
    loss_type: Literal["sigmoid", "robust", "hinge", "ipo", "ipo_norm", "sigmoid_norm"] = "sigmoid"
    label_smoothing: Annotated[float, Range(ge=0, lt=0.5)] = 0.0  # cDPO (sigmoid) / rDPO (robust)
    rpo_alpha: NonNegFloat = 0.0  # > 0: + alpha x the chosen completion's NLL (RPO)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=5, schedule="constant", weight_decay=0.0)
    )
    max_steps: NonNegInt = 50
    # "lightweight": at most this many passes over the pairs (a stage with few pairs takes few steps)
    epochs: PosFloat = 2.0
    pairs_per_step: PosInt = 32  # pairs per optimizer update, all ranks
    micro_batch_tokens: PosInt = 8192  # tokens (chosen + rejected, as padded) per forward/backward per rank
    logprob_chunk_tokens: PosInt = 1024
    eval_every: NonNegInt = 0
    save_every: NonNegInt = 25


# --------------------------------------------------------------------------------------------------
# The stage table and the whole recipe


@dataclass(frozen=True)
class StageType:
    config: type  # the stage's settings (a frozen dataclass with a ``type`` field)
    runner: str  # "module:function" taking a posttrain.stages.context.StageContext
    summary: str


STAGES: dict[str, StageType] = {
    "sft": StageType(
        SFTConfig, "posttrain.stages.sft:run_sft", "supervised fine-tuning (optionally codistilled)"
    ),
    "distill": StageType(
        DistillConfig,
        "posttrain.stages.distill:run_distill",
        "codistillation from a teacher (online or offline targets)",
    ),
    "rl": StageType(RLConfig, "posttrain.stages.rl:run_rl", "continuous online RL with vLLM rollouts"),
    "dpo": StageType(DPOConfig, "posttrain.stages.dpo:run_dpo", "lightweight DPO on hard prompts"),
}


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig  # required: pick a model group (model=tiny_llama4) or set model.name_or_path
    description: str = ""
    run: RunConfig = field(default_factory=RunConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig | None = None  # the held-out set of the per-stage table; none: no evaluation
    stages: dict[str, Any] = field(default_factory=dict)  # ordered: name -> stage config


def parse_recipe(data: dict[str, Any]) -> Recipe:
    data = dict(data)
    stages_raw = data.pop("stages", None) or {}
    if not isinstance(stages_raw, dict):
        raise ConfigError("'stages' must be a mapping of stage name -> settings (ordered)")
    recipe = parse(Recipe, data, "")
    stages: dict[str, Any] = {}
    valid = ", ".join(sorted(STAGES))
    for name, raw in stages_raw.items():
        path = f"stages.{name}"
        if not isinstance(raw, dict) or "type" not in raw:
            raise ConfigError(f"'{path}' needs a 'type' (one of: {valid})")
        kind = raw["type"]
        if kind not in STAGES:
            close = difflib.get_close_matches(str(kind), list(STAGES), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"'{path}.type' is {kind!r}{hint}; valid: {valid}")
        stages[name] = parse(STAGES[kind].config, raw, path)
    if not stages:
        raise ConfigError("the recipe has no stages; add at least one under 'stages'")
    return dataclasses.replace(recipe, stages=stages)


__all__ = [
    "STAGES",
    "ConfigError",
    "Recipe",
    "StageType",
    "first_difference",
    "parse",
    "parse_recipe",
    "to_dict",
]
