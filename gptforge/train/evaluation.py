"""What a run measures and shows of its model without training it: the mean loss over fixed
evaluation batches, shared out over the ranks, and the samples written at the end of a run.
The loop (gptforge/train/loop.py) calls both, on every rank alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from gptforge.gpt.generate import generate
from gptforge.gpt.tokenizer import AnyTokenizer, start_tokens
from gptforge.train.sampler import BatchSampler
from gptforge.train.strategy import Strategy


@torch.no_grad()
def evaluate(
    strategy: Strategy,
    samplers: dict[str, BatchSampler],
    eval_iters: int,
    batch: Callable[[BatchSampler, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    stop_requested: Callable[[], bool],
) -> dict[str, float] | None:
    """Mean loss over eval_iters fixed batches of each split, shared out over the ranks: batch i
    goes to rank i % world_size. Every rank runs the same number of forwards (ZeRO-3 gathers
    weights collectively), padding with a repeated batch that is not counted. ``batch(sampler,
    i, 0)`` gives batch i on the device: inputs, targets and its packed documents (or None).
    None when ``stop_requested()`` (asked between batches, on every rank alike): a long
    evaluation does not hold up a preemption."""
    group, n, model = strategy.group, eval_iters, strategy.model
    model.eval()
    losses = {}
    for split, sampler in samplers.items():
        total = torch.zeros((), device=strategy.device, dtype=torch.float64)
        for first in range(0, n, group.world_size):
            if stop_requested():
                model.train()
                return None
            i = first + group.rank
            x, y, cu_seqlens = batch(sampler, i % n, 0)
            loss = strategy.eval_loss(x, y, cu_seqlens)
            if i < n:
                total += loss.double()
        losses[split] = group.all_reduce_sum(total).item() / n
    model.train()
    return losses


def write_samples(
    strategy: Strategy,
    tokenizer: AnyTokenizer,
    num_samples: int,
    max_new_tokens: int,
    seed: int,
    out_file: Path | None,
    log: Callable[[str], None],
) -> list[str]:
    """Sample from the trained model, print the samples and save them to ``out_file`` (rank 0's;
    None on the others). Every rank samples the same (ZeRO-3 needs all ranks for a forward)."""
    generator = torch.Generator(strategy.device).manual_seed(seed)
    idx = torch.tensor([start_tokens(tokenizer)] * num_samples, device=strategy.device)
    with strategy.autocast(), strategy.eager():
        out = generate(strategy.model, idx, max_new_tokens, temperature=0.8, top_k=200, generator=generator)
    samples = [tokenizer.decode(row.tolist()) for row in out]
    text = "\n\n---------------\n\n".join(s.strip("\n") for s in samples) + "\n"
    if out_file is not None:
        try:
            out_file.write_text(text)
        except OSError as err:
            log(f"could not write {out_file} ({err.strerror or err})")
    log("samples:\n" + text)
    return samples
