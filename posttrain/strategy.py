"""The DeepSpeed seam: the only module that imports DeepSpeed.

Every stage trains through a ``Strategy``: one process on CPU and N ranks under torchrun run the same
code. The loop owns the loss; the strategy owns distribution, precision, accumulation, clipping,
checkpoints and export.

Loss scaling contract. The loop back-propagates ``aggregate(per_token, mask, denom)`` where ``denom``
is the number of loss tokens in the whole optimizer step (all micro-batches, all ranks). The true
gradient is then the *sum* of the per-micro-batch, per-rank gradients. DeepSpeed averages gradients
over data-parallel ranks and (by default) divides the loss by the accumulation steps, so ``backward``
multiplies by the data-parallel size and turns the accumulation division off. The gradient is then
the same for any split of the step — tests/test_strategy.py checks 1 process against 2.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.config import DeepSpeedConfig, OptimConfig, ParallelConfig


def init_distributed() -> None:
    """Start torch.distributed (gloo on CPU; NCCL + gloo with CUDA) and DeepSpeed's view of it, also for a
    single process.

    A world of one (no launcher, or a launcher with one rank) needs no rendezvous: it gets an
    in-memory store and binds no port, so it cannot collide with another process's port — not even
    with a ``MASTER_PORT`` inherited from a parent that is still listening on it.
    """
    import deepspeed

    world = int(os.environ.get("WORLD_SIZE") or 1)
    # DeepSpeed and vLLM read the rank layout from the environment.
    if world == 1:
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1")
        )
        os.environ.setdefault("MASTER_PORT", "0")  # never bound: the store below is in memory
    # DeepSpeed's shared-memory all-reduce op compiles for 75-90 s on first use; gloo is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    cuda = torch.cuda.is_available()
    # With CUDA: NCCL for device tensors and gloo for any CPU tensor (object collectives, small tables),
    # so no collective fails on a tensor's device; the strategy still reduces on the training device.
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        if world == 1:
            store = torch.distributed.HashStore()  # type: ignore[attr-defined]
            torch.distributed.init_process_group(backend, store=store, rank=0, world_size=1)
        else:
            torch.distributed.init_process_group(backend, init_method="env://")  # the launcher's rendezvous
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)  # adopts the group


def lr_lambda(optim: OptimConfig, total_steps: int):  # type: ignore[no-untyped-def]
    """Multiplier of the base lr at optimizer step ``s``: linear warmup, then cosine/linear/constant."""

    def f(step: int) -> float:
        if optim.warmup_steps > 0 and step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, total_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1.0 - progress
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape

    return f


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips an update whose gradients hold a NaN or an infinity on any rank (or that the
    loop poisoned for a non-finite loss): no weight and no optimizer state moves, and ``skipped`` says
    so (``FiniteLambdaLR`` then holds the schedule). DeepSpeed calls ``step`` on every rank together at
    the accumulation boundary (ZeRO 1-3 on each rank's partition), so the all-reduce of the flag is safe."""

    def __init__(self, params: Any, device: torch.device, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.device = device
        self.skipped = False
        self.poisoned = False

    def step(self, closure: Any = None) -> Any:
        bad = self.poisoned or any(
            p.grad is not None and not bool(torch.isfinite(p.grad).all())
            for g in self.param_groups
            for p in g["params"]
        )
        flag = torch.tensor([float(bad)], device=self.device)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        # ZeRO 1-2 call step once per param group: the poison lasts the whole boundary (Strategy.step)
        self.skipped = bool(flag.item() > 0)
        if self.skipped:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


class FiniteLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """The lr schedule, held still on an update ``FiniteAdamW`` skipped (it counts real updates)."""

    def step(self, epoch: Any = None) -> None:
        if getattr(self.optimizer, "skipped", False):
            return
        super().step(epoch)


class Strategy:
    def __init__(self, ds: DeepSpeedConfig, parallel: ParallelConfig | None = None, seed: int = 0):
        init_distributed()
        self.ds = ds
        self.parallel = parallel or ParallelConfig()
        self.seed = seed
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        self.is_main = self.rank == 0
        self.engine: Any = None
        self.ep: Any = None  # posttrain.moe.ExpertParallel when parallel.ep_size > 1
        self.device = (
            torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL's object collectives use the current device
        self._frozen: list[Any] = []  # DeepSpeed engines of frozen models, destroyed by close()
        self.optimizer: Any = None  # the FiniteAdamW of setup()

    # ---------------------------------------------------------------------------------------------
    # set-up

    def ds_config(self, micro_batch_size: int, grad_accum: int) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch_size,
            "gradient_accumulation_steps": grad_accum,
            "train_batch_size": micro_batch_size * grad_accum * self.world_size,
            "gradient_clipping": self.ds.gradient_clipping,
            "zero_optimization": {"stage": self.ds.zero_stage},
            "bf16": {"enabled": self.ds.bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            # FiniteAdamW is torch's AdamW plus the non-finite skip; DeepSpeed only knows the class by name
            "zero_allow_untested_optimizer": True,
        }
        if self.ds.zero_stage == 3:
            # Small models: gather every parameter at once rather than in many tiny prefetches.
            cfg["zero_optimization"].update(
                stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True
            )
        cfg.update(self.ds.extra)
        return cfg

    def setup(
        self,
        model: torch.nn.Module,
        optim: OptimConfig,
        total_steps: int,
        micro_batch_size: int,
        grad_accum: int = 1,
    ) -> Any:
        import deepspeed

        config = self.ds_config(micro_batch_size, grad_accum)
        if self.parallel.ep_size > 1:  # each rank keeps its share of the routed experts (posttrain.moe)
            from posttrain import moe
            from posttrain.parallel import check_ep_zero_stage

            check_ep_zero_stage(self.parallel.ep_size, self.ds.zero_stage, self.ds.gradient_clipping)

            self.ep = moe.apply_expert_parallel(model, self.parallel.ep_size)
            config = {**self.ep.ds_config(), **config}
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [
            {"name": "decay", "params": decay, "weight_decay": optim.weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        ]
        if self.ep is not None:
            groups = moe.moe_param_groups(groups)  # expert grads reduce over the expert-data-parallel group
        optimizer = FiniteAdamW(groups, lr=optim.lr, betas=tuple(optim.betas), device=self.device)
        scheduler = FiniteLambdaLR(optimizer, lr_lambda(optim, total_steps))
        self.optimizer = optimizer
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        return self.engine

    def frozen(self, model: torch.nn.Module) -> FrozenModel:
        """``model`` held for forward passes only (a codistillation teacher, an RL KL reference): no
        optimizer, no gradients, eval mode, in the training dtype; ZeRO-3-partitioned when the student
        is (each rank keeps 1/world of its parameters, gathered layer by layer in the forward), and
        expert-parallel when ``parallel.ep_size > 1`` and it has MoE blocks (each rank keeps its share
        of the routed experts). Its forward is then collective: every rank calls it equally often."""
        import deepspeed

        model.eval().requires_grad_(False)
        if self.ds.bf16:
            model.to(torch.bfloat16)
        ep = None
        if self.parallel.ep_size > 1:
            from posttrain import moe

            if moe.find_moe_blocks(model):
                ep = moe.apply_expert_parallel(model, self.parallel.ep_size)
        if self.ds.zero_stage == 3:
            config = {
                "train_micro_batch_size_per_gpu": 1,
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                "bf16": {"enabled": self.ds.bf16},
                "steps_per_print": 10**9,
            }
            engine, *_ = deepspeed.initialize(model=model, config=config)
            engine.eval()
            self._frozen.append(engine)
            return FrozenModel(engine, self.device, ep)
        return FrozenModel(model.to(self.device), self.device, ep)

    @property
    def module(self) -> torch.nn.Module:
        module: torch.nn.Module = self.engine.module
        return module

    @property
    def model_is_sharded(self) -> bool:
        """True when no rank holds the whole model (ZeRO-3 or expert parallelism): a forward pass then
        needs every rank, so single-rank work (evaluation) must use ``full_state_dict()`` instead."""
        return self.ds.zero_stage == 3 or self.ep is not None

    # ---------------------------------------------------------------------------------------------
    # training

    def forward(self, **batch: Any) -> Any:
        """Training forward. No KV cache: it is useless here, and with one transformers ignores the
        ``position_ids`` restarts that keep packed sequences apart."""
        return self.engine(**_on(batch, self.device), use_cache=False)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> None:
        """Call after every micro-batch: DeepSpeed updates at the accumulation boundary only."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary:
            self.optimizer.poisoned = False

    def accumulation_boundary(self, is_last: bool) -> None:
        """For loops whose number of micro-batches varies from step to step (the RL update packs them by
        tokens): call before each micro-batch's forward, True for the step's last one, which then
        updates the weights. Loops with a fixed count (``grad_accum`` in ``setup``) never call it."""
        self.engine.set_gradient_accumulation_boundary(is_last)

    @property
    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def poison_step(self) -> None:
        """Make the coming optimizer update a skipped one (the loop saw a non-finite loss)."""
        self.optimizer.poisoned = True

    @property
    def last_step_skipped(self) -> bool:
        """True when the last optimizer update was skipped for a non-finite loss or gradient: the
        weights, the AdamW state and the lr schedule are as they were before it."""
        # ZeRO 1-3 find a non-finite gradient themselves and skip before our optimizer runs
        return bool(self.optimizer.skipped) or not self.engine.was_step_applied()

    def grad_norm(self) -> float | None:
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def ep_metrics(self) -> dict[str, float]:
        """Expert-parallel load balance and all-to-all time since the last call; {} without EP.
        Collective under EP: every rank calls it at the same steps."""
        return {} if self.ep is None else self.ep.metrics()

    def all_reduce_sum(self, x: float | torch.Tensor) -> float:
        """The sum of ``x`` over ranks (a collective: every rank calls it)."""
        return float(self.all_reduce_tensor(torch.as_tensor(x, dtype=torch.float64)))

    def all_reduce_max(self, x: float) -> float:
        """The largest ``x`` over ranks (a collective: every rank calls it)."""
        t = torch.tensor([x], dtype=torch.float64)
        if self.world_size > 1:
            t = t.to(self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.cpu())

    def all_reduce_table(self, rows: list[list[float]]) -> list[list[float]]:
        """A small table summed over ranks (every rank passes the same shape)."""
        if self.world_size == 1 or not rows:
            return rows
        table: list[list[float]] = self.all_reduce_tensor(torch.tensor(rows, dtype=torch.float64)).tolist()
        return table

    def all_reduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, on the CPU. The reduction runs on the strategy's device (NCCL takes
        no CPU tensors; gloo takes them), so callers never pick a device themselves."""
        if self.world_size == 1:
            return t.detach().cpu().clone()
        on_device = t.detach().to(self.device, copy=True)
        torch.distributed.all_reduce(on_device)
        return on_device.cpu()

    def all_gather_list(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items`` (picklable), concatenated in rank order, on every rank."""
        if self.world_size == 1:
            return list(items)
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, list(items))
        return [x for part in gathered for x in part]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def release(self, frozen: FrozenModel) -> None:
        """Free a frozen model that is no longer needed (its DeepSpeed engine too, under ZeRO-3)."""
        if frozen.module in self._frozen:
            self._frozen.remove(frozen.module)
            frozen.module.destroy()
        frozen.module = None

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # ---------------------------------------------------------------------------------------------
    # resume state

    def save_state(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        """DeepSpeed checkpoint (model, optimizer, scheduler) + loop state + every rank's RNG.

        Only the newest tag is kept. ``latest`` is written last, by posttrain, once every rank's files
        of the new tag are complete (DeepSpeed's own ``latest`` would point at the tag before the RNG
        files exist): a crash at any point of a save leaves the previous state loadable.
        """
        directory = Path(directory)
        step = int(client_state.get("step", 0))
        tag = f"step{step}"
        self.engine.save_checkpoint(
            str(directory), tag=tag, client_state=dict(client_state), save_latest=False
        )
        # Each rank's RNG lives in its own small file (the DeepSpeed client state is rank 0's).
        torch.save(_rng_state(), directory / tag / f"rng_rank{self.rank}.pt")
        self.barrier()
        if self.is_main:
            tmp = directory / "latest.tmp"
            tmp.write_text(tag)
            tmp.replace(directory / "latest")  # atomic
            for old in directory.glob("step*"):
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def load_state(self, directory: str | Path) -> dict[str, Any] | None:
        directory = Path(directory)
        if not (directory / "latest").exists():
            return None
        path, client_state = self.engine.load_checkpoint(
            str(directory), load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            return None
        tag = (directory / "latest").read_text().strip()
        _set_rng_state(torch.load(directory / tag / f"rng_rank{self.rank}.pt", weights_only=False))
        return dict(client_state or {})

    # ---------------------------------------------------------------------------------------------
    # export

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated model weights in HF names on every rank, in host memory (ZeRO-3 parameters
        gathered, expert-parallel experts gathered from their ranks), streamed from ``hf_weights`` so
        only one module is gathered on the device at a time. Collective under ZeRO-3 or EP."""
        return {k: v.cpu() for k, v in self.hf_weights()}

    def hf_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The model's weights in HF names, streamed one module at a time on the training device: under
        ZeRO-3 only that module's parameters are gathered (and cloned) at once, under expert parallelism
        one MoE block's experts; nothing is copied to host memory. What a rollout engine on the same
        device loads in place (``engine.sync_weights``). Collective under ZeRO-3 or EP: every rank
        iterates it to the end, in step. Yields what ``full_state_dict()`` holds (tests check it)."""
        import deepspeed

        zero3 = self.ds.zero_stage == 3
        model = self.engine.module
        blocks = set(self.ep.layers) if self.ep is not None else set()
        for name, module in model.named_modules():
            if any(name.startswith(b + ".") for b in blocks):
                continue  # inside an expert-parallel block: taken with the block
            whole = name in blocks
            tensors = (
                list(module.parameters())
                if whole
                else [t for t in module._parameters.values() if t is not None]
            )
            with deepspeed.zero.GatheredParameters(tensors, modifier_rank=None, enabled=zero3):
                local = _local_state(module, f"{name}." if name else "", whole)
                state = {k: v.detach().clone() if zero3 else v.detach() for k, v in local.items()}
            if whole and self.ep is not None:
                state = self.ep.hf_state_dict(state)
            yield from state.items()

    def export_hf(self, directory: str | Path, tokenizer: Any) -> None:
        """A Hugging Face checkpoint (``save_pretrained``) written atomically by rank 0."""
        state = self.full_state_dict()
        if self.is_main:
            write_hf_checkpoint(self.engine.module, state, tokenizer, Path(directory))
        self.barrier()

    def close(self) -> None:
        for engine in self._frozen:
            engine.destroy()
        self._frozen = []
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None


class FrozenModel:
    """A model for forward passes only, placed by ``Strategy.frozen``: call it like the HF model."""

    def __init__(self, module: Any, device: torch.device, ep: Any = None) -> None:
        self.module = module  # the HF model, or a DeepSpeed engine wrapping it (ZeRO-3)
        self.device = device
        self.ep = ep  # posttrain.moe.ExpertParallel when its experts are split over ranks

    @torch.no_grad()
    def __call__(self, **batch: Any) -> Any:
        """The model's output on ``batch`` (moved to the device). No KV cache: see ``Strategy.forward``."""
        return self.module(**_on(batch, self.device), use_cache=False)

    def parameter_bytes(self) -> int:
        """Bytes of parameters this rank holds (its ZeRO-3 partition; its experts under EP)."""
        total = 0
        for p in self.module.parameters():
            held = p.ds_tensor if hasattr(p, "ds_tensor") else p
            total += held.numel() * held.element_size()
        return int(total)


def _local_state(module: torch.nn.Module, prefix: str, whole: bool) -> dict[str, torch.Tensor]:
    """The module's own state-dict entries (``whole``: its submodules' too), keys prefixed."""
    if whole:
        return dict(module.state_dict(prefix=prefix))
    out: dict[str, torch.Tensor] = {prefix + k: v for k, v in module._parameters.items() if v is not None}
    skip = module._non_persistent_buffers_set
    out |= {prefix + k: v for k, v in module._buffers.items() if v is not None and k not in skip}
    return out


def _on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors moved to ``device`` (other values, e.g. ``logits_to_keep``, as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def write_hf_checkpoint(model: Any, state: dict[str, torch.Tensor], tokenizer: Any, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def shutdown() -> None:
    """End the process group cleanly (avoids rare aborts at exit of multi-rank runs), through DeepSpeed so
    that it also forgets its groups: a later run in the same process starts afresh."""
    if not torch.distributed.is_initialized():
        return
    import deepspeed.comm.comm as ds_comm

    if ds_comm.cdb is not None:
        ds_comm.destroy_process_group()
        ds_comm.cdb = None
    else:
        torch.distributed.destroy_process_group()
