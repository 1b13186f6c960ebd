"""RL's inputs: the prompts (a task's problems or JSONL lines) and, after a rollout, the
sequences the policy-gradient loss reads.

A JSONL line for RL is ``{"prompt": ...}`` or ``{"messages": [...]}`` ending with a user
message; any other fields travel to the reward function with it (``{"prompt": "2+2",
"answer": "4"}``). A task's problems travel as ``{"prompt": ..., "answer": ...}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gptforge.gpt.chat import ROLES, ChatTokenizer
from gptforge.train.config import ConfigError
from gptforge.train.finetune.examples import read_jsonl, split_held_out
from gptforge.train.finetune.tasks import Problem


@dataclass
class Prompt:
    text: str  # the last user message: what the reward function is told the prompt was
    ids: list[int]  # the rendered conversation up to <|assistant|>
    example: dict  # the JSONL object, passed to the reward function


def prompt_messages(record: dict, where: str) -> list[dict]:
    if isinstance(record.get("prompt"), str):
        if not record["prompt"].strip():
            raise ConfigError(f"{where}: empty prompt")
        return [dict(role="user", content=record["prompt"])]
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
        if messages[-1]["role"] != "user":
            raise ConfigError(f"{where}: an RL prompt's messages must end with a user message, not "
                              f"{messages[-1]['role']!r}")
        return [dict(role=m["role"], content=m["content"]) for m in messages]
    raise ConfigError(f"{where}: expected {{\"prompt\": a string}} or {{\"messages\": [{{role, content}}, ...]}} "
                      f"ending with a user message, got keys {sorted(record)}")


def encode_prompt(tokenizer: ChatTokenizer, record: dict, where: str, room: int) -> Prompt:
    """``room``: the tokens a prompt may take (block_size - max_new_tokens)."""
    messages = prompt_messages(record, where)
    try:
        ids = tokenizer.prompt_ids(messages)
    except ValueError as err:  # a character the tokenizer does not know
        raise ConfigError(f"{where}: {err}") from None
    if len(ids) > room:
        raise ConfigError(f"{where}: the prompt is {len(ids)} tokens; with --max_new_tokens it must fit in "
                          f"block_size ({room} tokens left for it): shorten it, or lower --max_new_tokens")
    return Prompt(messages[-1]["content"], ids, record)


def problem_records(problems: Sequence[Problem], what: str) -> list[tuple[str, dict]]:
    return [(f"{what} {i}", dict(prompt=p.prompt, answer=p.answer)) for i, p in enumerate(problems)]


def file_prompts(path: str, seed: int) -> tuple[list[tuple[str, dict]], list[tuple[str, dict]]]:
    """The lines of an RL JSONL file, split into training and held-out prompts (one in twenty,
    at least one, chosen by the seed)."""
    return split_held_out(read_jsonl(path), seed, path, "rl")


def sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
              pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each prompt with its completion, as inputs and targets (B, T) padded on the right, and the
    mask of the targets that are completion tokens (the ones the policy chose)."""
    rows = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        n = len(row) - 1
        x[i, :n] = torch.tensor(row[:-1])
        y[i, :n] = torch.tensor(row[1:])
        mask[i, len(prompt) - 1 : n] = True  # target t is token t + 1: the completion's from the prompt's last
    return x, y, mask
