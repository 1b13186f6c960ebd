"""How training is spread over processes: one small interface, three strategies.

    single     one process, one device
    ddp        torch DistributedDataParallel, one process per device (torchrun); gloo on CPU, nccl on CUDA
    deepspeed  DeepSpeed ZeRO stages 0-3 (torchrun or the deepspeed launcher)

The trainer (train/loop.py) only talks to a ``Strategy``: ``setup`` wraps the model and builds
the optimizer, ``micro_step``/``autocast``/``backward`` run one micro-batch, ``step`` updates the
weights, ``save``/``load`` checkpoint, ``all_reduce_*`` average metrics, ``barrier`` and
``teardown`` manage the process group. Every rank runs the same code; only ``is_main`` (rank 0)
writes files. Checkpoints of a multi-node run must go to a filesystem all nodes share.

``gradient_accumulation_steps`` is the total over all ranks, so one command trains on the same
global batch on any number of ranks: each rank does ``accum_steps = total / world_size``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from gpt.model import build_model
from train import checkpoint
from train.config import ConfigError, TrainConfig
from train.device import DTYPES, autocast, pick_device, pick_dtype


def per_rank_accum(total: int, world_size: int) -> int:
    """Micro-steps of one rank when ``total`` are spread over ``world_size`` ranks."""
    if total % world_size:
        raise ConfigError(
            f"gradient_accumulation_steps ({total}) is the total over all ranks and must divide evenly "
            f"by the {world_size} ranks; use a multiple of {world_size}"
        )
    return total // world_size


class Strategy:
    """One process on one device (``--strategy=single``); the others extend it."""

    name = "single"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.rank, self.local_rank, self.world_size = 0, 0, 1
        self.device = pick_device(cfg.device)
        self.dtype = pick_dtype(cfg.dtype, self.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def accum_steps(self) -> int:
        return per_rank_accum(self.cfg.gradient_accumulation_steps, self.world_size)

    # --- model and optimizer ---

    def setup(self, model: torch.nn.Module) -> None:
        """Builds ``model`` (the plain module: sampling, checkpoints), ``forward`` (what a training
        micro-step calls), ``eval_forward`` (no gradient sync), the AdamW ``optimizer`` and the
        fp16 ``scaler``."""
        cfg = self.cfg
        self.model = model
        self.optimizer = torch.optim.AdamW(
            model.optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
            fused=self.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.forward = self.eval_forward = torch.compile(model) if cfg.compile else model

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Wraps forward and backward of one micro-batch; ``last`` is the one that syncs gradients."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss``: the mean loss of one micro-batch."""
        self.scaler.scale(loss / self.accum_steps).backward()

    can_skip_steps = True  # whether step(skip=True) can drop a step's update (DeepSpeed's engine cannot)

    def clip_grad_norm(self) -> torch.Tensor:
        """Unscale (fp16), clip to grad_clip if set, and return the total gradient norm (on the
        device, before clipping): the trainer checks it for NaN/inf before ``step``."""
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in params])

    def step(self, skip: bool = False) -> None:
        """Update the weights (the scaler skips fp16 overflows itself), or with ``skip`` leave
        weights and optimizer state as they are; then clear the gradients."""
        if not skip:
            self.scaler.step(self.optimizer)
        if self.scaler.is_enabled():
            self.scaler.update()  # after a skip too: unscale_ recorded the overflow, the scale backs off
        self.optimizer.zero_grad(set_to_none=True)

    # --- collectives (no-ops in one process) ---

    def barrier(self) -> None:
        pass

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(value.detach().clone()) / self.world_size

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def gather_objects(self, obj: object) -> list:
        return [obj]

    def teardown(self) -> None:
        pass

    # --- checkpoints ---

    def _rank_rng(self) -> dict:
        """Every rank's torch RNG states (ranks draw different dropout masks), for state.pt."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.empty(0)
        states = self.gather_objects((torch.get_rng_state(), cuda))
        return dict(rank_torch_rng=[s[0] for s in states], rank_cuda_rng=[s[1] for s in states])

    def restore_rng(self, tensors: dict, trainer: dict) -> None:
        checkpoint.set_rng_states(tensors, trainer)
        if len(tensors.get("rank_torch_rng", [])) == self.world_size:  # else a changed world size: rank 0's
            torch.set_rng_state(tensors["rank_torch_rng"][self.rank])
            if self.device.type == "cuda" and tensors["rank_cuda_rng"][self.rank].numel():
                torch.cuda.set_rng_state(tensors["rank_cuda_rng"][self.rank], self.device)

    def save(self, out_dir: Path, step: int, tokenizer_meta: dict, trainer_state: dict) -> Path | None:
        """Called on every rank; rank 0 writes the checkpoint of ``step`` and returns its path."""
        rng, path, error = self._rank_rng(), None, None
        if self.is_main:
            try:
                path = checkpoint.save_checkpoint(
                    out_dir, step, self.model, self.optimizer, self.scaler if self.scaler.is_enabled() else None,
                    self.cfg.to_dict(), tokenizer_meta, trainer_state, keep_last=self.cfg.keep_last, extra_state=rng,
                )
            except checkpoint.CheckpointError as err:  # a full disk: every rank stops, none waits
                error = err
        self.barrier()
        self.raise_any(error)
        return path

    def raise_any(self, error: Exception | None) -> None:
        """Raise on every rank the error any rank had (one collective), so none is left waiting."""
        errors = [e for e in self.gather_objects(error) if e is not None]
        if errors:
            raise errors[0]

    def load(self, directory: Path) -> dict:
        """Restore model, optimizer, scaler and this rank's RNG; returns trainer.json."""
        resumed = checkpoint.load_checkpoint(directory, self.device)
        if resumed.tensors["optimizer"] is None:
            raise ConfigError(f"checkpoint {directory} was written by DeepSpeed (its optimizer state is in "
                              "deepspeed/); resume it with --strategy=deepspeed")
        self.model.load_state_dict(resumed.model.state_dict())
        self.optimizer.load_state_dict(resumed.tensors["optimizer"])
        if resumed.tensors["scaler"] is not None:
            self.scaler.load_state_dict(resumed.tensors["scaler"])
        self.restore_rng(resumed.tensors, resumed.trainer)
        return resumed.trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DistributedStrategy(Strategy):
    """A torch.distributed process group from the launcher's environment (torchrun and the
    deepspeed launcher both set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if "WORLD_SIZE" not in os.environ:  # started without a launcher: a group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = int(os.environ["WORLD_SIZE"])
        per_rank_accum(cfg.gradient_accumulation_steps, self.world_size)  # fail before waiting on other ranks
        if self.device.type == "cuda":  # one device per process
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                                  "start at most one process per GPU (--nproc_per_node)")
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            device_id = self.device if self.backend == "nccl" else None
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if restart is None:
                dist.init_process_group(backend=self.backend, device_id=device_id)
            else:
                # torchrun keeps one store across restarts, and the group's keys of the attempt that
                # died (its ranks' addresses) would mislead this one: give each attempt its own prefix
                store, rank, world_size = next(dist.rendezvous("env://"))
                store = dist.PrefixStore(f"attempt_{restart}", store)
                dist.init_process_group(backend=self.backend, store=store, rank=rank, world_size=world_size,
                                        device_id=device_id)

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def broadcast_object(self, obj: object) -> object:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: object) -> list:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def teardown(self) -> None:
        if dist.is_initialized():
            # gloo's worker threads may still be releasing the last collective's tensors, which needs
            # the GIL; the group's destructor joins them while holding it: without this pause a rank
            # that leaves right after a barrier can hang at exit (seen on a busy 2-core machine)
            time.sleep(0.1)
            dist.destroy_process_group()


class DDPStrategy(DistributedStrategy):
    """DistributedDataParallel: gradients are all-reduced in buckets while backward runs,
    and only on the last micro-step of a step (``no_sync`` before it)."""

    name = "ddp"

    def setup(self, model: torch.nn.Module) -> None:
        super().setup(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.forward, device_ids=device_ids)
        self.forward = self.ddp

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


class DeepSpeedStrategy(DistributedStrategy):
    """DeepSpeed ZeRO: its engine holds the (partitioned) weights, gradients and AdamW state,
    accumulates micro-steps, clips, and checkpoints its shards into our checkpoint directory."""

    name = "deepspeed"

    can_skip_steps = False  # the engine updates inside backward; see step()

    def __init__(self, cfg: TrainConfig):
        if cfg.nan_policy == "skip":
            raise ConfigError("--nan_policy=skip is not available with --strategy=deepspeed: its engine updates "
                              "the weights inside backward (its fp16 loss scaler skips overflows itself); "
                              "use --nan_policy=stop")
        user_config = read_user_config(cfg.deepspeed_config)  # before any process group: fail fast
        if pick_device(cfg.device).type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        try:
            import deepspeed
        except ImportError as err:
            raise ConfigError(f"--strategy=deepspeed needs the deepspeed package ({err})") from None
        super().__init__(cfg)
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
        deepspeed.init_distributed(dist_backend=self.backend)  # takes over the process group made above
        self.ds_config = deepspeed_config(cfg, self.world_size, self.dtype, user_config)

    def setup(self, model: torch.nn.Module) -> None:
        cfg = self.cfg
        # our AdamW with our parameter groups; the lr is set before every step from lr_at
        self.optimizer = torch.optim.AdamW(model.optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                           betas=(cfg.beta1, cfg.beta2))
        self.engine, *_ = self.deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        if cfg.compile:
            self.engine.compile()
        self.model = self.eval_forward = self.engine.module
        self.forward = self.engine
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)  # DeepSpeed scales fp16 itself

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine holds the model in bf16/fp16 already

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        self.engine.step()  # counts micro-steps; updates (and clips) only at the last one

    def clip_grad_norm(self) -> torch.Tensor:
        """The norm DeepSpeed computed for its clipping, when it reports one (else 0: only the
        loss is checked). The update has happened already: NaN is caught after the fact."""
        norm = self.engine.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32, device=self.device)

    def step(self, skip: bool = False) -> None:
        pass  # the engine stepped at the last micro-step's backward

    def _full_state_dict(self) -> dict:
        """fp32 weights on the CPU, on rank 0 (ZeRO-3 gathers them from every rank: call on all)."""
        params = list(self.model.parameters()) if self.engine.zero_optimization_stage() == 3 else []
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=bool(params)):
            if not self.is_main:
                return {}
            return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def save(self, out_dir: Path, step: int, tokenizer_meta: dict, trainer_state: dict) -> Path | None:
        staging, path, error = checkpoint.staging_dir(out_dir, step), None, None
        if self.is_main:
            try:
                shutil.rmtree(staging, ignore_errors=True)
                staging.mkdir(parents=True)
            except OSError as err:
                error = checkpoint.CheckpointError(f"could not write the checkpoint of step {step} into "
                                                   f"{staging.parent}: {err.strerror or err}")
        self.raise_any(error)  # every rank stops alike, none waits at a barrier
        # every rank writes its shards into staging/deepspeed; rank 0 then completes and renames it
        try:
            self.engine.save_checkpoint(str(staging), tag="deepspeed", save_latest=False)
        except OSError as err:  # a full disk while the shards are written
            error = checkpoint.CheckpointError(f"could not write the DeepSpeed shards of step {step} into "
                                               f"{staging}: {err.strerror or err}")
        self.raise_any(error)
        weights, rng = self._full_state_dict(), self._rank_rng()
        self.barrier()
        if self.is_main:
            model = build_model(self.model.config)
            model.load_state_dict(weights)
            try:
                path = checkpoint.save_checkpoint(out_dir, step, model, None, None, self.cfg.to_dict(),
                                                  tokenizer_meta, trainer_state, keep_last=self.cfg.keep_last,
                                                  extra_state=rng, staged=staging)
            except checkpoint.CheckpointError as err:
                error = err
        self.barrier()
        self.raise_any(error)
        return path

    def load(self, directory: Path) -> dict:
        trainer, tensors = checkpoint.load_training_state(directory)
        if not (directory / "deepspeed").is_dir():
            written_by = trainer["config"].get("strategy", "single")
            raise ConfigError(f"checkpoint {directory} was written by --strategy={written_by}, not by DeepSpeed; "
                              "resume it with that strategy")
        saved_ranks = len(tensors.get("rank_torch_rng", []))
        if self.engine.zero_optimization_stage() > 0 and saved_ranks != self.world_size:  # shards per rank
            raise ConfigError(f"checkpoint {directory} holds ZeRO shards of {saved_ranks} ranks; resume it with "
                              f"{saved_ranks} ranks, not {self.world_size}")
        path, _ = self.engine.load_checkpoint(str(directory), tag="deepspeed", load_lr_scheduler_states=False)
        if path is None:
            raise checkpoint.CheckpointError(f"DeepSpeed could not load its checkpoint from {directory / 'deepspeed'}")
        self.restore_rng(tensors, trainer)
        return trainer


# --- the DeepSpeed config: generated from our flags, or a user's file checked against them ---

def read_user_config(path: str) -> dict:
    if not path:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"--deepspeed_config {path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed_config {path} must hold a JSON object, not {type(config).__name__}")
    return config


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg: TrainConfig, world_size: int, dtype: torch.dtype, user: dict | None = None) -> dict:
    """DeepSpeed's config for our flags. ``user`` (from --deepspeed_config) may add any other
    setting (offload, bucket sizes, ...) but may not contradict a flag: its keys must agree
    with ours or say "auto". The optimizer and lr schedule are always ours."""
    user = user or {}
    stage = cfg.zero_stage if cfg.zero_stage >= 0 else user.get("zero_optimization", {}).get("stage", 1)
    ours = {
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps,  # the global batch
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": per_rank_accum(cfg.gradient_accumulation_steps, world_size),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    for block in ("optimizer", "scheduler"):
        if block in user:
            raise ConfigError(f"--deepspeed_config {cfg.deepspeed_config}: remove its {block!r} block; training "
                              "uses its own AdamW (--learning_rate, --weight_decay, --beta1/2) and lr schedule")
    ours_flat, user_flat = _flatten(ours), _flatten(user)
    conflicts = [f"{key} is {user_flat[key]!r} in the file but {value!r} from our flags"
                 for key, value in ours_flat.items() if key in user_flat and user_flat[key] not in ("auto", value)]
    if conflicts:
        raise ConfigError(f"--deepspeed_config {cfg.deepspeed_config} contradicts the training flags: "
                          + "; ".join(conflicts))
    defaults = {
        "zero_allow_untested_optimizer": True,  # our torch AdamW, not DeepSpeed's own
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return _merge(_merge(defaults, user), ours)


def make_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy ``cfg.strategy`` names; ``auto``: ddp when launched with several ranks."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    name = cfg.strategy
    if name == "auto":
        name = "ddp" if ranks > 1 else "single"
    if name == "single":
        if ranks > 1:
            raise ConfigError(f"--strategy=single, but the launcher started {ranks} ranks; use ddp or deepspeed")
        return Strategy(cfg)
    return DDPStrategy(cfg) if name == "ddp" else DeepSpeedStrategy(cfg)
