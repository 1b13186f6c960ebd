"""What the SFT and RL stages share on top of the pre-training Trainer (gptforge/train/loop.py):
the starting weights with the chat template's tokens, and the held-out score.

The Trainer stays what it is: strategies, mixed precision, checkpoints, exact resume, stop
signals, NaN handling and metrics are its own. A stage replaces the data (``_open_data``),
the starting model (``_initial_model``) and what an evaluation measures, and RL also the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptforge.gpt.chat import ChatTokenizer
from gptforge.gpt.completions import complete
from gptforge.gpt.io import read_info
from gptforge.gpt.model import GPT
from gptforge.gpt.tokenizer import tokenizer_from_meta
from gptforge.train import checkpoint
from gptforge.train.config import ConfigError
from gptforge.train.finetune.tasks import Problem, get_task
from gptforge.train.loop import Trainer
from gptforge.train.resume import explicit_keys


def sharded(strategy) -> bool:
    """Whether the model's weights are spread over the ranks, so that a forward pass is a
    collective every rank must run alike (FSDP, ZeRO-3)."""
    if strategy.name == "fsdp":
        return True
    return strategy.name == "deepspeed" and strategy.engine.zero_optimization_stage() == 3


class FinetuneTrainer(Trainer):
    """A stage that starts from trained weights (``--init_from``) and speaks the chat template."""

    stage = "sft"

    def _open_data(self) -> None:
        cfg = self.cfg
        if cfg.model == "bigram":
            raise ConfigError(f"--stage={cfg.stage} fine-tunes a GPT; the bigram model has no attention to mask")
        if not cfg.task and not cfg.finetune_data:
            raise ConfigError(f"--stage={cfg.stage} needs its data: --task=NAME (built in: reverse, sort, add) or "
                              "--finetune_data=FILE.jsonl")
        self.task = get_task(cfg.task) if cfg.task else None
        self.tokenizer, self._weights = self._starting_point()
        if self._weights is not None:  # its shape is the run's from here on (block_size included)
            self._fit_weights(self._weights)
        self.meta = {"tokenizer": self.tokenizer.to_meta(), "vocab_size": self.tokenizer.vocab_size}
        self.eot = None  # examples carry their own boundaries
        self._open_examples()

    def _open_examples(self) -> None:
        raise NotImplementedError

    def _starting_point(self) -> tuple[ChatTokenizer, GPT | None]:
        """The tokenizer (with the chat tokens) and the starting weights; no weights when
        resuming: the checkpoint brings them, and its model.json the tokenizer."""
        cfg = self.cfg
        if cfg.init_from == "scratch":
            raise ConfigError(f"--stage={cfg.stage} fine-tunes trained weights: set --init_from to a run's out_dir, "
                              "a model directory, or gpt2")
        if cfg.init_from == "resume":
            found = checkpoint.list_checkpoints(cfg.out_dir)
            if not found:
                raise ConfigError(f"--resume: no checkpoint in {cfg.out_dir}/checkpoints")
            meta = read_info(found[-1]).get("tokenizer")
            return self._chat_tokenizer(meta, str(found[-1])), None
        from gptforge.gpt.pretrained import load_pretrained  # only a fresh fine-tune reads weights from elsewhere

        try:
            model, meta = load_pretrained(cfg.init_from, dropout=cfg.dropout)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"--init_from={cfg.init_from}: {err}") from None
        if not isinstance(model, GPT):
            raise ConfigError(f"--init_from={cfg.init_from} holds a {type(model).__name__}; fine-tuning needs a GPT")
        return self._chat_tokenizer(meta, f"--init_from={cfg.init_from}"), model

    @staticmethod
    def _chat_tokenizer(meta: dict | None, source: str) -> ChatTokenizer:
        if meta is None:
            raise ConfigError(f"{source}: the weights do not say which tokenizer they were trained with, and "
                              "fine-tuning must extend that one with the chat tokens")
        tokenizer = tokenizer_from_meta(meta)
        return tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer(tokenizer)

    def _fit_weights(self, model: GPT) -> None:
        """Rows for the chat tokens, the context cropped to an explicit --block_size; the config
        takes the weights' shape."""
        cfg, old_vocab = self.cfg, model.config.vocab_size
        model.grow_vocab(self.tokenizer.vocab_size)
        if "block_size" in explicit_keys(cfg) and cfg.block_size < model.config.block_size:
            from gptforge.gpt.pretrained import crop_block_size

            crop_block_size(model, cfg.block_size)
        self.cfg = cfg.with_model(model.config)
        grown = f", vocabulary {old_vocab} -> {model.config.vocab_size} (the chat tokens)" \
            if model.config.vocab_size > old_vocab else ""
        self.log(f"--stage={cfg.stage} from {cfg.init_from}: {model.num_params() / 1e6:.2f}M parameters, "
                 f"block_size {model.config.block_size}{grown}")

    def _initial_model(self) -> torch.nn.Module:
        if self._weights is None:  # resuming: a model of the saved shape, loaded from the checkpoint later
            return super()._initial_model()
        model, self._weights = self._weights, None
        return model

    # --- held-out problems ---

    def _prompts(self, problems: list[Problem]) -> list[list[int]]:
        prompts = []
        for problem in problems:
            try:
                ids = self.tokenizer.prompt_ids([dict(role="user", content=problem.prompt)])
            except ValueError as err:  # e.g. digits for a character model of Tiny Shakespeare
                raise ConfigError(f"task {self.task.name}: {err}") from None
            if len(ids) + self.cfg.max_new_tokens > self.cfg.block_size:
                raise ConfigError(f"task {self.task.name}: a prompt of {len(ids)} tokens and --max_new_tokens="
                                  f"{self.cfg.max_new_tokens} do not fit in block_size {self.cfg.block_size}")
            prompts.append(ids)
        return prompts

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], temperature: float = 0.0,
                     generator: torch.Generator | None = None) -> list[list[int]]:
        """The model's response to each prompt (greedy by default): its new token ids, up to and
        including ``<|end|>`` where it stopped; under a sharded model every step of every group."""
        strategy = self.strategy
        with strategy.autocast(), strategy.eager():
            return complete(strategy.model, prompts, self.cfg.max_new_tokens, temperature,
                            self.cfg.top_k or None, self.cfg.top_p if self.cfg.top_p < 1 else None, generator,
                            stop_id=self.tokenizer.end_id, every_step=sharded(strategy),
                            vocab_limit=self.tokenizer.vocab_size)

    def generate_answers(self, prompts: list[list[int]]) -> list[str]:
        """The model's greedy response to each prompt, as text."""
        return [self.tokenizer.response_text(row) for row in self.generate_ids(prompts)]

    def held_out_score(self, prompts: list[list[int]], score: Callable[[int, str], float]) -> float:
        """The mean of ``score(i, greedy answer to prompt i)`` over the held-out prompts, shared out
        over the ranks (under a sharded model every rank answers all of them: a forward is a
        collective there, so every rank must run the same ones)."""
        everywhere = sharded(self.strategy)
        mine = range(len(prompts)) if everywhere else range(self.group.rank, len(prompts), self.group.world_size)
        answers = self.generate_answers([prompts[i] for i in mine])
        # a user's reward function may raise: on every rank alike, or the others would wait in the sum below
        total = self._together(lambda: sum(score(i, answer) for i, answer in zip(mine, answers, strict=True)))
        if everywhere:
            return total / len(prompts)
        total = self.group.all_reduce_sum(torch.tensor(float(total), device=self.device, dtype=torch.float64))
        return total.item() / len(prompts)

    def _write_samples(self) -> list[str]:
        """A few held-out problems and the model's answers, instead of free samples."""
        if not self.task or not self.cfg.num_samples:
            return []
        problems = self.held_out[: self.cfg.num_samples]
        answers = self.generate_answers(self.held_out_prompts[: len(problems)])
        lines = [f"{p.prompt!r} -> {a!r} ({'right' if self.task.check(p, a) else f'expected {p.answer!r}'})"
                 for p, a in zip(problems, answers, strict=True)]
        self.log("held-out problems:\n" + "\n".join(lines))
        return lines
