"""SFT data: JSONL lines -> conversations -> token ids with a loss mask -> batches.

A line is ``{"prompt": ..., "response": ...}`` or ``{"messages": [{"role": ..., "content":
...}, ...]}`` (roles system, user, assistant). The chat template (gptforge/gpt/chat.py) turns it
into ids; the targets of everything but the assistant's messages are IGNORE, so the loss, and
the gradients, come from the responses alone.

A batch is ``batch_size`` rows. Packed (``--packing=true``), each row holds as many whole
examples as fit in ``block_size`` tokens, with ``cu_seqlens`` marking where each begins: the
model attends within each example and restarts its positions there, so an example's loss is
what it would be alone (gptforge/gpt/documents.py). Padded, each row holds one example and
the batch is as long as its longest. Either way the examples of a step are drawn from a
generator seeded with (seed, step), as pre-training draws its windows: a resumed run needs
only the step, and the global batch is the same on any number of ranks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptforge.gpt.chat import ROLES, ChatTokenizer
from gptforge.train.config import ConfigError

IGNORE = -100  # the loss's ignore_index (kernels.linear_cross_entropy's default)


def read_jsonl(path: str | Path, flag: str = "--finetune_data") -> list[tuple[str, dict]]:
    """(``file:line``, object) for each non-blank line; a ConfigError naming the line otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{flag} {path}: cannot be read as UTF-8 text ({getattr(err, 'strerror', None) or err})") \
            from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{where}: not a JSON object ({getattr(err, 'msg', err)}, column "
                              f"{getattr(err, 'colno', '?')})") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        records.append((where, record))
    if not records:
        raise ConfigError(f"{flag} {path}: no examples (the file is empty)")
    return records


def split_held_out(records: list, seed: int, path: str, stage: str) -> tuple[list, list]:
    """(training, held-out) lines of a JSONL file: one in twenty held out (at least one), chosen
    by the seed."""
    if len(records) < 2:
        raise ConfigError(f"--finetune_data {path}: {len(records)} line; --stage={stage} needs at least 2 (one in "
                          "twenty is held out for evaluation)")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = max(1, len(records) // 20)
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def conversation(record: dict, where: str) -> list[dict]:
    """The messages of one SFT line, checked: every response non-empty, at least one."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ConfigError(f"{where}: message {i} must be {{\"role\": one of {', '.join(ROLES)}, "
                                  f"\"content\": a string}}, got {json.dumps(m)[:120]}")
        out = [dict(role=m["role"], content=m["content"]) for m in messages]
    elif "prompt" in record and "response" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["response"], str):
            raise ConfigError(f"{where}: 'prompt' and 'response' must be strings")
        out = [dict(role="user", content=record["prompt"]), dict(role="assistant", content=record["response"])]
    else:
        raise ConfigError(f"{where}: expected {{\"prompt\", \"response\"}} or {{\"messages\": [...]}}, got keys "
                          f"{sorted(record)}")
    responses = [m for m in out if m["role"] == "assistant"]
    if not responses:
        raise ConfigError(f"{where}: no assistant message: nothing to train on")
    if any(not m["content"].strip() for m in responses):
        raise ConfigError(f"{where}: empty response: an example must answer something")
    return out


@dataclass
class Example:
    """One conversation's ids and, for each, whether the model is trained to produce it."""

    ids: np.ndarray  # int64
    trained: np.ndarray  # bool

    def __len__(self) -> int:
        return len(self.ids)


def encode_example(tokenizer: ChatTokenizer, messages: Sequence[dict], block_size: int, where: str) -> Example:
    try:
        ids, trained = tokenizer.encode_conversation(messages)
    except ValueError as err:  # a character the tokenizer does not know
        raise ConfigError(f"{where}: {err}") from None
    if len(ids) - 1 > block_size:  # inputs are all ids but the last, targets all but the first
        raise ConfigError(f"{where}: the example is {len(ids)} tokens, longer than a block ({block_size} + 1 "
                          "tokens): shorten it, or fine-tune with a longer --block_size")
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool))


def encode_records(tokenizer: ChatTokenizer, records: list[tuple[str, dict]], block_size: int) -> list[Example]:
    return [encode_example(tokenizer, conversation(record, where), block_size, where) for where, record in records]


class ExampleBatches:
    """The SFT batches of every step: each rank takes its slice of the step's global rows."""

    def __init__(self, examples: list[Example], batch_size: int, block_size: int, accum_steps: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1, packing: bool = True, pad_id: int = 0):
        if not examples:
            raise ValueError("no examples")
        self.examples, self.packing, self.pad_id = examples, packing, pad_id
        self.batch_size, self.block_size, self.accum_steps = batch_size, block_size, accum_steps
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.lengths = np.array([len(e) - 1 for e in examples])  # tokens each takes in a row

    def step_rows(self, step: int) -> list[list[int]]:
        """The example indices of every row of ``step``'s global batch."""
        rng = np.random.default_rng([self.seed, step])
        count = self.world_size * self.accum_steps * self.batch_size
        if not self.packing:
            return [[int(i)] for i in rng.integers(len(self.examples), size=count)]
        rows: list[list[int]] = []
        row, used = [], 0
        while len(rows) < count:  # next fit: an example that does not fit closes the row
            i = int(rng.integers(len(self.examples)))
            if used + self.lengths[i] > self.block_size:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += self.lengths[i]
        return rows

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Inputs, targets (IGNORE outside the responses and in padding) and, packed, cu_seqlens."""
        first = (self.rank * self.accum_steps + micro_step) * self.batch_size
        rows = self.step_rows(step)[first : first + self.batch_size]
        T = self.block_size if self.packing else max(int(self.lengths[r[0]]) for r in rows)
        x = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        y = np.full((len(rows), T), IGNORE, dtype=np.int64)
        starts = []
        for r, row in enumerate(rows):
            pos = 0
            for i in row:
                example, n = self.examples[i], int(self.lengths[i])
                x[r, pos : pos + n] = example.ids[:-1]
                y[r, pos : pos + n] = np.where(example.trained[1:], example.ids[1:], IGNORE)
                starts.append(r * T + pos)
                pos += n
            if pos < T:  # the padding is a document of its own: nothing attends across into it
                starts.append(r * T + pos)
        cu_seqlens = torch.tensor([*starts, len(rows) * T], dtype=torch.int32) if self.packing else None
        return torch.from_numpy(x), torch.from_numpy(y), cu_seqlens
