"""How training is spread over processes: one contract, four strategies.

    single     one process, one device
    ddp        torch DistributedDataParallel, one process per device (torchrun); gloo on CPU, nccl on CUDA
    fsdp       PyTorch FSDP2: weights, gradients and AdamW state sharded over the ranks (gptforge/train/fsdp.py)
    deepspeed  DeepSpeed ZeRO stages 0-3 (torchrun or the deepspeed launcher)

The training loop (gptforge/train/loop.py) runs one step the same way whatever the strategy:

    for each micro-batch:  loss = strategy.forward(x, y, sync=last, cu_seqlens=documents or None)
                           strategy.backward(loss)
    grad_norm = strategy.clip_gradients()         # before any update: the loop votes on NaN here
    strategy.optimizer_step(lr, skip=nonfinite)   # the one place weights change

Each method means the same in every strategy. ``save``/``load`` checkpoint; ``group`` (see
gptforge/train/distributed.py) is this rank's place among the others. Only rank 0 writes files.
``make_strategy`` (gptforge/train/strategies.py) builds the one ``--strategy`` names.
Checkpoints of a multi-node run must go to a filesystem all nodes share.

``gradient_accumulation_steps`` is the total over all ranks, so one command trains on the same
global batch on any number of ranks: each rank does ``accum_steps = total / world_size``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from gptforge.gpt.model import build_model
from gptforge.train import checkpoint
from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.deepspeed_config import deepspeed_config, read_user_config
from gptforge.train.device import DTYPES, autocast, pick_device, pick_dtype
from gptforge.train.distributed import ProcessGroup, TorchGroup, per_rank_accum
from gptforge.train.optim import Optimizers, build_optimizer


def documents(cu_seqlens: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The model's keyword for a batch's packed documents; none without (the bigram model takes
    none). Their count varies from batch to batch: marked dynamic, so torch.compile traces one
    graph for any count instead of recompiling when the second batch brings another."""
    if cu_seqlens is None:
        return {}
    torch._dynamo.maybe_mark_dynamic(cu_seqlens, 0)
    return {"cu_seqlens": cu_seqlens}


class Strategy:
    """One process on one device (``--strategy=single``); the others extend it."""

    name = "single"
    can_skip_steps = True  # whether optimizer_step(skip=True) can drop a step (DeepSpeed's engine cannot)

    def __init__(self, cfg: TrainConfig, group: ProcessGroup | None = None):
        self.cfg = cfg
        self.group = group or ProcessGroup(pick_device(cfg.device))
        self.device = self.group.device  # a rank's own GPU under DDP and DeepSpeed
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.accum_steps = per_rank_accum(cfg.gradient_accumulation_steps, self.group.world_size)

    # --- model and optimizer ---

    def setup(self, model: torch.nn.Module) -> None:
        """Take ``model`` (on its device), build its AdamW and the fp16 loss scaler."""
        self._checkpoint_activations(model)
        self.model = model  # the plain module: evaluation, sampling, checkpoints
        # fused AdamW on CUDA and on the CPU: on the CPU one kernel per group instead of
        # PyTorch's default loop over parameters, 3x faster (0.9 against 2.6 ms a step for the
        # 4x128 model; 6.8 against 35.5 ms at 6x384) and faster than a torch.compile'd update
        self.optimizer = self._optimizer(model, fused=True)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.compiled = torch.compile(model) if self.cfg.compile == "true" else model
        self.train_module = self.compiled  # what a training micro-batch runs (DDP wraps it)

    def _checkpoint_activations(self, model: torch.nn.Module) -> None:
        """Mark the blocks that recompute their activations in the backward (--activation_checkpointing)."""
        mode = self.cfg.activation_checkpointing
        if not hasattr(model, "set_activation_checkpointing"):
            if mode != "none":
                raise ConfigError(f"--activation_checkpointing={mode} recomputes Transformer blocks, and the "
                                  f"{self.cfg.model} model has none; use --activation_checkpointing=none")
            return
        model.set_activation_checkpointing(mode)

    def _optimizer(self, model: torch.nn.Module, fused: bool = False) -> torch.optim.Optimizer | Optimizers:
        cfg = self.cfg  # the lr is set before every update (TrainConfig.lr_at)
        try:
            return build_optimizer(model, cfg.optimizer, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                   cfg.weight_decay, fused=fused)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Where the model computes in the training precision (bf16/fp16 autocast; fp32: nothing)."""
        return autocast(self.device, self.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor, sync: bool = True,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss of one training micro-batch. ``sync=False``: its gradients may stay on
        this rank until a later micro-batch's (the last of a step) are reduced. ``cu_seqlens``:
        the batch's packed documents (--document_mask; gptforge/gpt/documents.py)."""
        self._sync_gradients(sync)
        with self.autocast():
            return self.train_module(x, y, **documents(cu_seqlens))[1]

    def logits(self, x: torch.Tensor, sync: bool = True) -> torch.Tensor:
        """The logits (B, T, vocab) of one training micro-batch, for a loss computed outside the
        model (RL's policy gradient); ``backward`` takes that loss. ``sync`` as in ``forward``."""
        self._sync_gradients(sync)
        with self.autocast():
            return self.train_module(x)[0]

    def _sync_gradients(self, sync: bool) -> None:
        """Whether the next backward reduces the gradients over the ranks (one process: nothing to do)."""

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss of one evaluation batch (no gradients are reduced). Eager on the CPU even
        under --compile: a second graph (no grad, eval mode) would cost another compile, which on the
        CPU takes longer than every evaluation of a short run together. Compiled on CUDA."""
        with self.autocast():
            return (self.compiled if self.device.type == "cuda" else self.model)(x, y, **documents(cu_seqlens))[1]

    def eager(self) -> contextlib.AbstractContextManager:
        """Where ``self.model`` runs uncompiled (sampling): it is the plain model here already."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's mean ``loss``; weights stay as they are."""
        self.scaler.scale(loss / self.accum_steps).backward()

    def clip_gradients(self) -> torch.Tensor | None:
        """Unscale (fp16) and clip the step's gradients to grad_clip; their total norm before
        clipping, on the device (None where the update clips by itself: DeepSpeed)."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def optimizer_step(self, lr: float, skip: bool = False) -> None:
        """Update the weights at ``lr`` (the scaler skips fp16 overflows itself), or with ``skip``
        leave weights and optimizer state as they are; then clear the gradients."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not skip:
            self.scaler.step(self.optimizer)
        if self.scaler.is_enabled():
            self.scaler.update()  # after a skip too: unscale_ recorded the overflow, the scale backs off
        self.optimizer.zero_grad(set_to_none=True)

    def local_parameters(self) -> list[torch.Tensor]:
        """The weights this rank holds (under ZeRO-3 its shards: the full parameters are empty)."""
        return [getattr(p, "ds_tensor", p).detach() for p in self.model.parameters()]

    def held_bytes(self) -> dict[str, int | None]:
        """Bytes of the parameters, gradients and optimizer state this rank holds now, counted
        from the tensors themselves (a shard counts its own size). Optimizer state includes
        master copies of the weights the optimizer updates in place of the model's (DeepSpeed's
        fp32 partitions). Gradients: None where the engine keeps them in buffers of its own."""
        params = {id(p) for p in self.model.parameters()}
        state = [local_shard(t) for s in _optimizer_states(self.optimizer) for t in s.values() if torch.is_tensor(t)]
        masters = [local_shard(p) for g in self.optimizer.param_groups for p in g["params"] if id(p) not in params]
        grads = [local_shard(p.grad) for p in self.model.parameters() if p.grad is not None]
        return dict(parameters=_nbytes(self.local_parameters()),
                    gradients=None if self.name == "deepspeed" else _nbytes(grads),
                    optimizer_state=_nbytes(state) + _nbytes(masters))

    # --- checkpoints ---

    def _rank_rng(self) -> dict:
        """Every rank's torch RNG states (ranks draw different dropout masks), for state.pt."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.empty(0)
        states = self.group.gather_objects((torch.get_rng_state(), cuda))
        return dict(rank_torch_rng=[s[0] for s in states], rank_cuda_rng=[s[1] for s in states])

    def _restore_rng(self, tensors: dict, trainer: dict) -> None:
        checkpoint.set_rng_states(tensors, trainer)
        rank = self.group.rank
        if len(tensors.get("rank_torch_rng", [])) == self.group.world_size:
            torch.set_rng_state(tensors["rank_torch_rng"][rank])
            if self.device.type == "cuda" and tensors["rank_cuda_rng"][rank].numel():
                torch.cuda.set_rng_state(tensors["rank_cuda_rng"][rank], self.device)
        elif self.group.world_size > 1:  # another rank count: no saved stream per rank, so each its own new one
            torch.manual_seed((self.cfg.seed + 1_000_003 * (trainer["step"] + 1) + rank) % 2**63)

    def save(self, out_dir: Path, step: int, config: dict, tokenizer_meta: dict, trainer_state: dict) -> Path | None:
        """Called on every rank; rank 0 writes the checkpoint of ``step`` and returns its path."""
        rng, path, error = self._rank_rng(), None, None
        if self.group.is_main:
            try:
                path = checkpoint.save_checkpoint(
                    out_dir, step, self.model, self.optimizer, self.scaler if self.scaler.is_enabled() else None,
                    config, tokenizer_meta, trainer_state, keep_last=self.cfg.keep_last, extra_state=rng,
                )
            except checkpoint.CheckpointError as err:  # a full disk: every rank stops, none waits
                error = err
        self.group.barrier()
        self.group.raise_any(error)
        return path

    def load(self, directory: Path) -> dict:
        """Restore model, optimizer, scaler and this rank's RNG; returns trainer.json."""
        resumed = checkpoint.load_checkpoint(directory, self.device)
        sharded = (directory / checkpoint.DCP_DIR).is_dir()  # an fsdp checkpoint: the optimizer state is in its shards
        if resumed.tensors["optimizer"] is None and not sharded:
            raise ConfigError(f"checkpoint {directory} was written by DeepSpeed (its optimizer state is in "
                              "deepspeed/); resume it with --strategy=deepspeed")
        self.model.load_state_dict(resumed.model.state_dict())
        if sharded:
            from gptforge.train.dcp_shards import load_optimizer_shards  # torch.distributed.checkpoint: when needed

            load_optimizer_shards(self.model, self.optimizer, directory)
        else:
            self.optimizer.load_state_dict(resumed.tensors["optimizer"])
        if resumed.tensors["scaler"] is not None:
            self.scaler.load_state_dict(resumed.tensors["scaler"])
        self._restore_rng(resumed.tensors, resumed.trainer)
        return resumed.trainer

    def _save_sharded(self, out_dir: Path, step: int, config: dict, tokenizer_meta: dict, trainer_state: dict,
                      write_shards: Callable[[Path], None], full_weights: Callable[[], dict]) -> Path | None:
        """A checkpoint whose state is written by every rank: ``write_shards(staging)`` runs on all
        ranks, then ``full_weights()`` (a collective; rank 0's result is used) gives the weights
        for model.safetensors, and rank 0 completes the checkpoint and renames it into place."""
        group, staging, path, error = self.group, checkpoint.staging_dir(out_dir, step), None, None
        if group.is_main:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            except OSError as err:
                error = checkpoint.CheckpointError(f"could not write the checkpoint of step {step} into "
                                                   f"{staging.parent}: {err.strerror or err}")
        group.raise_any(error)  # every rank stops alike, none waits at a barrier (and staging exists now)
        try:
            write_shards(staging)
        except torch.OutOfMemoryError:
            raise  # not the disk's fault
        except (OSError, RuntimeError) as err:  # a full disk while the shards are written
            error = checkpoint.CheckpointError(f"could not write the {self.name} shards of step {step} into "
                                               f"{staging}: {getattr(err, 'strerror', None) or err}")
        group.raise_any(error)
        weights, rng = full_weights(), self._rank_rng()
        group.barrier()
        if group.is_main:
            model = build_model(self.model.config)
            model.load_state_dict(weights)
            scaler = self.scaler if self.scaler.is_enabled() else None
            try:
                path = checkpoint.save_checkpoint(out_dir, step, model, None, scaler, config, tokenizer_meta,
                                                  trainer_state, keep_last=self.cfg.keep_last, extra_state=rng,
                                                  staged=staging)
            except checkpoint.CheckpointError as err:
                error = err
        group.barrier()
        group.raise_any(error)
        return path

    def teardown(self) -> None:
        self.group.teardown()


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank; any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _optimizer_states(optimizer) -> list[dict]:
    """The per-parameter state dicts of ``optimizer`` (of each, for an ``Optimizers``)."""
    inner = optimizer.optimizers.values() if isinstance(optimizer, Optimizers) else [optimizer]
    return [s for opt in inner for s in opt.state.values()]


class DDPStrategy(Strategy):
    """DistributedDataParallel: gradients are all-reduced in buckets while backward runs, and
    only on the last micro-batch of a step."""

    name = "ddp"

    def __init__(self, cfg: TrainConfig):
        group = TorchGroup(pick_device(cfg.device))
        super().__init__(cfg, group)  # checks the accumulation before waiting on other ranks
        group.init()

    def setup(self, model: torch.nn.Module) -> None:
        super().setup(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # no buffer changes in training (the rotary angles are constants): nothing to broadcast each step
        self.train_module = torch.nn.parallel.DistributedDataParallel(self.compiled, device_ids=device_ids,
                                                                      broadcast_buffers=False)

    def _sync_gradients(self, sync: bool) -> None:
        # what no_sync() sets: read by the next forward and by the backward that follows it
        self.train_module.require_backward_grad_sync = sync


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO: its engine holds the (partitioned) weights, gradients and AdamW state,
    clips inside its update, and checkpoints its shards into our checkpoint directory."""

    name = "deepspeed"
    can_skip_steps = False  # the engine cannot drop a step's accumulated gradients

    def __init__(self, cfg: TrainConfig):
        if cfg.optimizer != "adamw":
            raise ConfigError(f"--optimizer={cfg.optimizer} is not available with --strategy=deepspeed (its engine "
                              "drives one torch optimizer); use --optimizer=adamw, or --strategy=single or ddp")
        if cfg.nan_policy == "skip":
            raise ConfigError("--nan_policy=skip is not available with --strategy=deepspeed: its engine cannot drop "
                              "a step's gradients (its fp16 loss scaler skips overflows itself); use --nan_policy=stop")
        user_config = read_user_config(cfg.deepspeed_config)  # before any process group: fail fast
        device = pick_device(cfg.device)
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        try:
            import deepspeed
        except ImportError as err:
            raise ConfigError(f"--strategy=deepspeed needs the deepspeed package ({err})") from None
        group = TorchGroup(device)
        super().__init__(cfg, group)
        group.init()
        accelerator = deepspeed.get_accelerator().device_name()
        if accelerator != self.device.type:
            raise ConfigError(f"DeepSpeed runs on {accelerator!r} here but training is on {self.device.type!r}; "
                              f"set DS_ACCELERATOR={self.device.type} or --device")
        supported = dict(bf16=deepspeed.get_accelerator().is_bf16_supported(),
                         fp16=deepspeed.get_accelerator().is_fp16_supported())
        for name, ok in supported.items():
            if self.dtype == DTYPES[name] and not ok:
                raise ConfigError(f"DeepSpeed does not support {name} on {accelerator} here; "
                                  f"use --dtype={'bf16' if supported['bf16'] else 'fp32'}")
        # DeepSpeed calls torch collectives that torch marks as deprecated, on every step
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        self.deepspeed = deepspeed
        deepspeed.init_distributed(dist_backend=group.backend)  # takes over the process group made above
        self.ds_config = deepspeed_config(cfg, group.world_size, self.dtype, user_config)

    def setup(self, model: torch.nn.Module) -> None:
        self._checkpoint_activations(model)
        # our AdamW with our parameter groups, driven by the engine
        self.optimizer = self._optimizer(model)
        self.engine, *_ = self.deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        if self.cfg.compile == "true":
            self.engine.compile()
        self.model = self.compiled = self.engine.module
        self.train_module = self.engine
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # DeepSpeed scales fp16 itself

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine holds the weights in bf16/fp16: they compute so already

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by the accumulation steps itself
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # before the last micro-batch the engine's step only counts it

    def clip_gradients(self) -> None:
        return None  # the engine clips (and reduces, under ZeRO) inside its step

    def optimizer_step(self, lr: float, skip: bool = False) -> None:
        if skip:
            raise RuntimeError("DeepSpeed cannot skip a step (can_skip_steps is False)")
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()  # the last micro-batch's: clip, update, clear the gradients

    def _full_state_dict(self) -> dict:
        """fp32 weights on the CPU, on rank 0 (ZeRO-3 gathers them from every rank: call on all)."""
        params = list(self.model.parameters()) if self.engine.zero_optimization_stage() == 3 else []
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if not self.group.is_main:
                return {}
            return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def save(self, out_dir: Path, step: int, config: dict, tokenizer_meta: dict, trainer_state: dict) -> Path | None:
        def write_shards(staging: Path) -> None:  # every rank its shards, into staging/deepspeed
            self.engine.save_checkpoint(str(staging), tag="deepspeed", save_latest=False)

        return self._save_sharded(out_dir, step, config, tokenizer_meta, trainer_state, write_shards,
                                  self._full_state_dict)

    def load(self, directory: Path) -> dict:
        trainer, tensors = checkpoint.load_training_state(directory)
        if not (directory / "deepspeed").is_dir():
            written_by = trainer["config"].get("strategy", "single")
            raise ConfigError(f"checkpoint {directory} was written by --strategy={written_by}, not by DeepSpeed; "
                              "resume it with that strategy")
        saved_ranks, ranks = len(tensors.get("rank_torch_rng", [])), self.group.world_size
        if self.engine.zero_optimization_stage() > 0 and saved_ranks != ranks:  # shards per rank
            raise ConfigError(f"checkpoint {directory} holds ZeRO shards of {saved_ranks} ranks; resume it with "
                              f"{saved_ranks} ranks, not {ranks}")
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_lr_scheduler_states=False)
        if path is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load its checkpoint from {directory / 'deepspeed'}")
        self._restore_rng(tensors, trainer)
        return trainer
