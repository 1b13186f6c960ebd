"""Which windows of the token stream each rank trains on, at each step.

The batch of a step is a pure function of (seed, step): every step draws its global batch,
``world_size * accum_steps * batch_size`` distinct windows, from a generator seeded with
both, and each rank takes its own slice. So

- no two ranks (and no two micro-steps) of a step see the same window;
- 1 process with 8 accumulation steps and 8 ranks with 1 train on the same global batch;
- resuming needs only the step number: the data position is the step.
"""

from __future__ import annotations

import numpy as np
import torch


class BatchSampler:
    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        accum_steps: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        """``tokens``: the 1-D token stream (a uint16 memmap); ``accum_steps``: micro-steps per
        optimizer step on this rank; windows are ``block_size + 1`` tokens (inputs and targets)."""
        self.n_windows = len(tokens) - block_size  # start positions with a full window after them
        self.per_step = world_size * accum_steps * batch_size
        if self.n_windows < 1:
            raise ValueError(
                f"the data has {len(tokens)} tokens, too few for block_size {block_size}: "
                f"need at least {block_size + 1}; use a smaller block_size or more text"
            )
        if self.per_step > self.n_windows:
            raise ValueError(
                f"a step needs {self.per_step} distinct windows (world_size {world_size} x "
                f"accumulation {accum_steps} x batch_size {batch_size}) but the data has only "
                f"{self.n_windows} windows of {block_size + 1} tokens; use a smaller batch or more text"
            )
        self.tokens = tokens
        self.block_size, self.batch_size, self.accum_steps = block_size, batch_size, accum_steps
        self.seed, self.rank, self.world_size = seed, rank, world_size

    def step_offsets(self, step: int) -> np.ndarray:
        """Start positions of the whole global batch of ``step``: (world_size, accum, batch)."""
        rng = np.random.default_rng([self.seed, step])
        starts = rng.choice(self.n_windows, size=self.per_step, replace=False)
        return starts.reshape(self.world_size, self.accum_steps, self.batch_size)

    def offsets(self, step: int, micro_step: int) -> np.ndarray:
        return self.step_offsets(step)[self.rank, micro_step]

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, (batch_size, block_size) int64 each, on the CPU."""
        starts = self.offsets(step, micro_step)
        windows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]


def make_samplers(train_tokens: np.ndarray, val_tokens: np.ndarray, batch_size: int, block_size: int,
                  accum_steps: int, seed: int, rank: int = 0, world_size: int = 1) -> tuple[BatchSampler, dict]:
    """Training's sampler (each rank its own slice of every step's global batch) and one per split
    for evaluation, which reads fixed windows (its own seeds): every evaluation sees the same data."""
    train = BatchSampler(train_tokens, block_size, batch_size, accum_steps, seed=seed, rank=rank,
                         world_size=world_size)
    evals = dict(train=BatchSampler(train_tokens, block_size, batch_size, seed=seed + 1),
                 val=BatchSampler(val_tokens, block_size, batch_size, seed=seed + 2))
    return train, evals
