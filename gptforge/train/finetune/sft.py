"""Supervised fine-tuning: pre-training's loop on conversations, the loss on the responses only.

    python -m gptforge.train --stage=sft --init_from=out/pretrain --task=reverse --out_dir=out/sft
    python -m gptforge.train --stage=sft --init_from=gpt2 --finetune_data=chats.jsonl --out_dir=out/chat

Examples come from ``--finetune_data`` (JSONL, see gptforge/train/finetune/examples.py) or from a
built-in ``--task``'s generated problems. Held out for the validation loss: the task's held-out
problems, or one example in twenty of the file (at least one), chosen by the seed. With a
task, every evaluation also measures the accuracy of greedy answers to its held-out problems.
"""

from __future__ import annotations

import torch

from gptforge.train.finetune.base import FinetuneTrainer
from gptforge.train.finetune.examples import ExampleBatches, encode_records, read_jsonl, split_held_out

TASK_TRAIN_PROBLEMS = 20_000  # a task's training examples: enough that they are not learnt by heart


class SFTTrainer(FinetuneTrainer):
    stage = "sft"

    def _open_examples(self) -> None:
        cfg, group = self.cfg, self.group
        if cfg.finetune_data:
            train_records, val_records = split_held_out(read_jsonl(cfg.finetune_data), cfg.seed, cfg.finetune_data,
                                                        "sft")
        else:
            problems = self.task.problems("train", TASK_TRAIN_PROBLEMS, cfg.seed)
            train_records = [(f"task {self.task.name}, problem {i}", p.to_json()) for i, p in enumerate(problems)]
            val_records = None
        if self.task:
            self.held_out = self.task.problems("held_out", cfg.eval_problems)
            self.held_out_prompts = self._prompts(self.held_out)
            if val_records is None:
                val_records = [(f"task {self.task.name}, held-out problem {i}", p.to_json())
                               for i, p in enumerate(self.held_out)]
        train = encode_records(self.tokenizer, train_records, cfg.block_size)
        val = encode_records(self.tokenizer, val_records, cfg.block_size)
        B, T, pad = cfg.batch_size, cfg.block_size, self.tokenizer.end_id
        self.sampler = ExampleBatches(train, B, T, self.strategy.accum_steps, cfg.seed, group.rank, group.world_size,
                                      cfg.packing, pad)
        self.eval_samplers = dict(train=ExampleBatches(train, B, T, seed=cfg.seed + 1, packing=cfg.packing, pad_id=pad),
                                  val=ExampleBatches(val, B, T, seed=cfg.seed + 2, packing=cfg.packing, pad_id=pad))
        self.tokens_per_step = cfg.gradient_accumulation_steps * B * T  # at most: padding included
        self.log(f"SFT on {len(train):,} examples ({len(val):,} held out), "
                 f"{'packed into' if cfg.packing else 'one per row of'} {T}-token rows")
        self.accuracy: float | None = None

    def _batch(self, sampler: ExampleBatches, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        batch = sampler.batch(step, micro)
        if self.device.type == "cuda":
            return tuple(t if t is None else t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return batch

    def _eval_and_record(self) -> None:
        super()._eval_and_record()  # the response loss of both splits
        if self.task is None or self.stop_signal:
            return
        self.accuracy = self.held_out_score(self.held_out_prompts,
                                            lambda i, answer: float(self.task.check(self.held_out[i], answer)))
        self.metrics.record(dict(step=self.step, accuracy=self.accuracy))
        self.log(f"step {self.step}: held-out accuracy {100 * self.accuracy:.1f}% "
                 f"({round(self.accuracy * len(self.held_out))}/{len(self.held_out)} {self.task.name} problems)")

    def run(self) -> dict:
        result = super().run()
        if self.accuracy is not None:
            result["accuracy"] = self.accuracy
        return result
