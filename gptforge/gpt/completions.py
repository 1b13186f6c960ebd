"""Many prompts of different lengths completed at once: the rollouts of RL and accuracy checks.

``generate`` (gptforge/gpt/generate.py) extends a batch of prompts of one length. Here the
prompts are grouped by length, each group is one KV-cached batch, and every row stops at its
own stop token: a finished row rides along until the whole group is done (its later tokens
are dropped), and the group stops as soon as every row has finished.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn as nn

from gptforge.gpt.generate import generate_tokens


def complete(
    model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None, *, stop_id: int | None = None, every_step: bool = False,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (in the prompts' order), at most ``max_new_tokens``,
    ending with ``stop_id`` where it was produced. ``every_step``: run each group for all
    ``max_new_tokens`` steps even when its rows have finished (where every rank must run the same
    forward passes: a model sharded over ranks). Rows draw from ``generator`` in a fixed order
    (groups by increasing length, rows in prompt order), so a seeded generator repeats a run."""
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = defaultdict(list)
    for i, prompt in enumerate(prompts):
        groups[len(prompt)].append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for length in sorted(groups):
        rows = groups[length]
        idx = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        new = []
        steps = generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator,
                                vocab_limit=vocab_limit)
        for next_id in steps:
            new.append(next_id[:, 0].clone())
            if stop_id is not None:
                done |= new[-1] == stop_id
                if done.all() and not every_step:
                    break
        steps.close()
        tokens = torch.stack(new, dim=1).tolist() if new else [[] for _ in rows]
        for i, row in zip(rows, tokens, strict=True):
            out[i] = row[: row.index(stop_id) + 1] if stop_id in row else row
    return out
