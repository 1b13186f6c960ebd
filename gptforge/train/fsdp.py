"""PyTorch FSDP2 (``--strategy=fsdp``): weights, gradients and AdamW state sharded over the
ranks, and checkpoints that load at any number of ranks.

Each Transformer block, then the whole model, is wrapped with ``fully_shard``: every rank keeps
1/N of each parameter (a DTensor sharded along its first dimension). A block's full weights are
all-gathered just before its forward, freed after it, and gathered again for its backward;
gradients are reduce-scattered, so each rank keeps only its shard's gradients, and AdamW updates
only that shard. Memory per rank for weights, gradients and optimizer state falls as 1/N.

Mixed precision is FSDP2's policy: the fp32 shards are the master weights, gathered in the
compute dtype (bf16/fp16), with gradients reduced in fp32. fp16's loss scaler must agree over
the ranks on whether a step overflowed, though each rank sees only its own shards' gradients:
``RankAgreedGradScaler`` all-reduces its found-inf flag.

Checkpoints use Distributed Checkpoint (DCP): every rank writes its shards of the model and of
the optimizer state into ``step_N/dcp/``, whose metadata records where each shard sits in the
full tensor, so the checkpoint loads at any number of ranks, and into ``single`` and ``ddp``
as well. A ``model.safetensors`` with the full weights sits beside it for sampling and export;
our manifest hashes every file, DCP's included.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from gptforge.train import checkpoint
from gptforge.train.checkpoint import DCP_DIR
from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.dcp_shards import first_cause
from gptforge.train.device import pick_device
from gptforge.train.distributed import TorchGroup
from gptforge.train.optim import build_optimizer
from gptforge.train.strategy import Strategy, local_shard

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}  # the collectives FSDP2 needs, per device


class FSDPStrategy(Strategy):
    """PyTorch FSDP2 over every rank of the launch (torchrun; one process alone is a group of one)."""

    name = "fsdp"

    def __init__(self, cfg: TrainConfig):
        if cfg.optimizer != "adamw":
            raise ConfigError(f"--optimizer={cfg.optimizer} is not available with --strategy=fsdp: Muon "
                              "orthogonalises whole matrices, and under FSDP each rank holds a shard of them; use "
                              "--optimizer=adamw, or --strategy=single or ddp for Muon")
        device = pick_device(cfg.device)
        if device.type not in BACKENDS:
            raise ConfigError(f"--strategy=fsdp runs on cpu or cuda, not {device.type}")
        if dist.is_initialized() and dist.get_backend() != BACKENDS[device.type]:
            raise ConfigError(f"--strategy=fsdp on {device.type} needs a {BACKENDS[device.type]} process group, but "
                              f"this process already joined a {dist.get_backend()} one; launch with torchrun and "
                              "let the trainer create the group")
        group = TorchGroup(device)
        super().__init__(cfg, group)  # checks the accumulation before waiting on other ranks
        group.init()
        self.mesh = init_device_mesh(self.device.type, (group.world_size,))

    def setup(self, model: torch.nn.Module) -> None:
        self._checkpoint_activations(model)
        blocks = getattr(getattr(model, "transformer", None), "h", None) or []
        if self.cfg.compile == "true":  # per block, before sharding: FSDP's hooks stay outside the compiled graphs
            for i, block in enumerate(blocks):  # (state-dict keys lose the wrapper's "_orig_mod." again)
                blocks.register_module(str(i), torch.compile(block))
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for block in blocks:  # each block gathers its own weights; the root holds the embeddings and head
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        self.model = self.compiled = self.train_module = model
        self.optimizer = self._optimizer(model, fused=True)  # over the shards: each rank updates its own
        self.scaler = RankAgreedGradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def _sync_gradients(self, sync: bool) -> None:
        # accumulate unsharded gradients until the step's last micro-batch: one reduce-scatter a
        # step, but meanwhile each rank holds the full gradients (in fp32)
        self.model.set_requires_gradient_sync(sync)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if self.device.type == "cpu":  # the blocks themselves are compiled: run them eagerly (see Strategy)
            with self.eager():
                return super().eval_loss(x, y, cu_seqlens)
        return super().eval_loss(x, y, cu_seqlens)

    def eager(self) -> contextlib.AbstractContextManager:
        """Under --compile the model's blocks are compiled modules: evaluation on the CPU and
        sampling (a new sequence length every token) run them eagerly instead of recompiling."""
        return torch.compiler.set_stance("force_eager") if self.cfg.compile == "true" else contextlib.nullcontext()

    def clip_gradients(self) -> torch.Tensor | None:
        norm = super().clip_gradients()  # the norm of the sharded gradients is itself a (replicated) DTensor
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def local_parameters(self) -> list[torch.Tensor]:
        return [local_shard(p).detach() for p in self.model.parameters()]

    # --- checkpoints ---

    def save(self, out_dir: Path, step: int, config: dict, tokenizer_meta: dict, trainer_state: dict) -> Path | None:
        def write_shards(staging: Path) -> None:
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            try:
                dcp.save(dict(model=model_state, optimizer=optimizer_state), checkpoint_id=staging / DCP_DIR)
            except CheckpointException as err:  # a BaseException: made an ordinary error with the first cause
                raise RuntimeError(first_cause(err)) from None

        def full_weights() -> dict:  # gathered on every rank, kept (on the CPU) by rank 0 only
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        return self._save_sharded(out_dir, step, config, tokenizer_meta, trainer_state, write_shards, full_weights)

    def load(self, directory: Path) -> dict:
        """Resume from an fsdp checkpoint written at any number of ranks, or from a single or ddp one."""
        if (directory / "deepspeed").is_dir():
            raise ConfigError(f"checkpoint {directory} was written by DeepSpeed (its optimizer state is in "
                              "deepspeed/); resume it with --strategy=deepspeed")
        sharded = (directory / DCP_DIR).is_dir()
        if sharded:  # the model and optimizer state are in the shards
            trainer, tensors = checkpoint.load_training_state(directory)
        else:  # single or ddp: the full weights, and the optimizer state in state.pt
            resumed = checkpoint.load_checkpoint(directory, "cpu")
            trainer, tensors = resumed.trainer, resumed.tensors
        try:
            if sharded:  # each rank reads the parts of the shards it now holds
                model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
                dcp.load(dict(model=model_state, optimizer=optimizer_state), checkpoint_id=directory / DCP_DIR)
                set_state_dict(self.model, self.optimizer, model_state_dict=model_state,
                               optim_state_dict=optimizer_state)
            else:  # each rank keeps its shard of the full state
                model_state, optimizer_state = self._full_state(resumed.model, tensors["optimizer"])
                set_state_dict(self.model, self.optimizer, model_state_dict=model_state,
                               optim_state_dict=optimizer_state, options=StateDictOptions(full_state_dict=True))
        except (CheckpointException, RuntimeError, ValueError, KeyError) as err:
            raise checkpoint.CheckpointError(f"its model and optimizer state cannot be loaded "
                                             f"({first_cause(err)})") from None
        if tensors["scaler"] is not None:
            self.scaler.load_state_dict(tensors["scaler"])
        self._restore_rng(tensors, trainer)
        return trainer

    def _full_state(self, model: torch.nn.Module, optimizer_state: dict) -> tuple[dict, dict]:
        """A single-process checkpoint's weights (``model``, loaded) and AdamW state, the latter
        keyed by parameter name (as ``set_state_dict`` takes it) instead of by position."""
        cfg = self.cfg
        optimizer = build_optimizer(model, "adamw", cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        optimizer.load_state_dict(optimizer_state)
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


class RankAgreedGradScaler(torch.amp.GradScaler):
    """fp16's loss scaler for sharded gradients: after unscaling, the found-inf flag is the
    maximum over the ranks, so that all skip an overflowing step (and back off) together.
    (torch's ShardedGradScaler sums the flags, and its flag's shape breaks fused AdamW; fused
    AdamW skips only on a flag of exactly 1, so a sum of 2 would apply a NaN update.)"""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if self.is_enabled():
            for found_inf in self._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
