"""The process group: who this rank is, and the few collectives training needs.

``ProcessGroup`` is one process alone (every collective returns its input); ``TorchGroup``
joins the torch.distributed group the launcher describes (torchrun and the deepspeed
launcher both set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT). Strategies
and the training loop talk to ranks only through these methods.
"""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.distributed as dist

from gptforge.train.config import ConfigError


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def per_rank_accum(total: int, world_size: int) -> int:
    """Micro-steps of one rank when ``total`` are spread over ``world_size`` ranks."""
    if total % world_size:
        raise ConfigError(
            f"gradient_accumulation_steps ({total}) is the total over all ranks and must divide evenly "
            f"by the {world_size} ranks; use a multiple of {world_size}"
        )
    return total // world_size


class ProcessGroup:
    """One process on ``device``: rank 0 of 1, and collectives that return what they are given."""

    rank, local_rank, world_size = 0, 0, 1

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        pass

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks, in place."""
        return value

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(value.detach().clone()) / self.world_size

    def broadcast_object(self, obj: object) -> object:
        """Rank 0's ``obj`` on every rank."""
        return obj

    def gather_objects(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def raise_any(self, error: Exception | None) -> None:
        """Raise on every rank the error any rank had (one collective), so none is left waiting."""
        errors = [e for e in self.gather_objects(error) if e is not None]
        if errors:
            raise errors[0]

    def teardown(self) -> None:
        pass


class TorchGroup(ProcessGroup):
    """The torch.distributed group of the launcher's environment; ``device`` is this rank's
    (CUDA: its ``LOCAL_RANK``-th GPU, made current)."""

    def __init__(self, device: torch.device):
        if "WORLD_SIZE" not in os.environ:  # started without a launcher: a group of one
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:  # else init_process_group fails deep inside, or waits for ranks that never come
            raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} "
                              f"{'is' if len(missing) == 1 else 'are'} not: start distributed runs with torchrun "
                              "(or the deepspeed launcher), which sets them all")
        self.rank = int(os.environ["RANK"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.world_size = int(os.environ["WORLD_SIZE"])
        if device.type == "cuda":  # one device per process
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA devices; "
                                  "start at most one process per GPU (--nproc_per_node)")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        super().__init__(device)
        self.backend = "nccl" if device.type == "cuda" else "gloo"

    def init(self) -> None:
        """Join the group (after every check that can fail alone, so no rank waits for a dead one)."""
        if dist.is_initialized():
            return
        device_id = self.device if self.backend == "nccl" else None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart is None:
            dist.init_process_group(backend=self.backend, device_id=device_id)
            return
        # torchrun keeps one store across restarts, and the group's keys of the attempt that died
        # (its ranks' addresses) would mislead this one: give each attempt its own prefix
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
