"""Reinforcement learning from a reward: sample, score, update, step after step.

    python -m gptforge.train --stage=rl --init_from=out/sft --task=reverse --out_dir=out/rl

Each step, on every rank alike:

1. draws ``--rl_prompts`` prompts from a generator seeded with (seed, step); each rank takes
   its share of them;
2. samples ``--group_size`` completions of each with the KV cache, batched, at
   ``--temperature``/``--top_k``/``--top_p`` from a generator seeded with (seed, step, rank);
3. scores each completion with the reward (gptforge/train/finetune/rewards.py);
4. updates the policy ``--ppo_epochs`` times on those rollouts with the loss of
   gptforge/train/finetune/ppo.py, through the strategy like any other step (gradient
   accumulation, clipping, the NaN vote, the optimizer).

The frozen reference model of the KL term is the starting model. It is written once to
``out_dir/reference/`` (with a manifest of its sha256) before the first step, and a resumed run
reads it back from there, so a resume continues bit for bit: the steps' randomness is a
function of the step, and the checkpoint holds weights, optimizer state and RNG.
Rollouts need the whole model on each rank: single, ddp, or deepspeed up to ZeRO-2.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time

import numpy as np
import torch

from gptforge.gpt.io import MANIFEST, load_model, save_model, sha256_of, verify
from gptforge.train.config import ConfigError
from gptforge.train.finetune.base import FinetuneTrainer, sharded
from gptforge.train.finetune.ppo import group_advantages, policy_loss, token_logprobs
from gptforge.train.finetune.rewards import RewardError, load_reward, score
from gptforge.train.finetune.rollouts import encode_prompt, file_prompts, problem_records, sequences
from gptforge.train.finetune.sft import TASK_TRAIN_PROBLEMS
from gptforge.train.finetune.tasks import Problem

REFERENCE_DIR = "reference"


class RLTrainer(FinetuneTrainer):
    stage = "rl"

    def _open_examples(self) -> None:
        cfg, group = self.cfg, self.group
        if sharded(self.strategy):
            raise ConfigError(f"--stage=rl samples on each rank from the whole model, which --strategy="
                              f"{cfg.strategy} shards; use single, ddp, or deepspeed with --zero_stage 2 or less")
        if cfg.rl_prompts % group.world_size:
            raise ConfigError(f"--rl_prompts={cfg.rl_prompts} must be a multiple of the {group.world_size} ranks")
        if cfg.finetune_data:
            train, held_out = file_prompts(cfg.finetune_data, cfg.seed)
        else:
            train = problem_records(self.task.problems("train", TASK_TRAIN_PROBLEMS, cfg.seed),
                                    f"task {cfg.task}, problem")
            held_out = problem_records(self.task.problems("held_out", cfg.eval_problems),
                                       f"task {cfg.task}, held-out problem")
        room = cfg.block_size - cfg.max_new_tokens
        if room < 2:
            raise ConfigError(f"--max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in block_size "
                              f"{cfg.block_size}")
        self.prompts = [encode_prompt(self.tokenizer, record, where, room) for where, record in train]
        self.held_out_set = [encode_prompt(self.tokenizer, record, where, room) for where, record in held_out]
        self.reward_fn = load_reward(cfg.reward, self.task)
        first = self.prompts[0]
        score(self.reward_fn, cfg.reward, first.text, "", first.example)  # a broken function fails now, not at step 1
        # evaluation: greedy answers to the held-out prompts (base.py's held_out_score takes Problems)
        self.held_out = [Problem(p.text, str(p.example.get("answer", ""))) for p in self.held_out_set]
        self.held_out_prompts = [p.ids for p in self.held_out_set]
        self.sampler, self.eval_samplers = None, {}
        # an estimate until the first step counts its sequences' tokens (rollouts vary in length)
        prompt_tokens = sum(len(p.ids) for p in self.prompts[:1000]) / min(len(self.prompts), 1000)
        epochs = cfg.ppo_epochs if cfg.rl_loss == "grpo" else 1
        self.tokens_per_step = int(cfg.rl_prompts * cfg.group_size * (prompt_tokens + cfg.max_new_tokens) * epochs)
        self.last_eval: dict = {}
        self.log(f"RL on {len(self.prompts):,} prompts ({len(self.held_out_set):,} held out): {cfg.rl_prompts} prompts "
                 f"x {cfg.group_size} completions per step, {cfg.rl_loss}, reward {cfg.reward}")

    # --- the reference model ---

    def _initial_model(self) -> torch.nn.Module:
        fresh = self._weights is not None
        model = super()._initial_model()
        if fresh:
            self.reference = copy.deepcopy(model)
        else:
            self.reference = self._read_reference(model.config)
        self.reference.requires_grad_(False).eval().to(self.device)
        return model

    def _read_reference(self, config) -> torch.nn.Module:
        directory = self.out_dir / REFERENCE_DIR
        problem = verify(directory) if directory.is_dir() else "it is missing"
        if problem is None:
            reference, _ = load_model(directory)
            if reference.config != config:
                problem = "it is a model of another shape"
            else:
                return reference
        raise ConfigError(f"--resume: the reference model of this RL run, {directory}, is unusable ({problem}); "
                          "the KL term needs the run's starting model, so start a new run from it")

    def _save_reference(self) -> None:
        """Rank 0 writes the reference model, all at once: a temporary folder, then a rename."""
        final = self.out_dir / REFERENCE_DIR
        tmp = self.out_dir / f".{REFERENCE_DIR}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            save_model(self.reference, tmp, self.meta["tokenizer"])
            files = {p.name: sha256_of(p) for p in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps(dict(files=files), indent=2) + "\n")
            old = self.out_dir / f".{REFERENCE_DIR}.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            raise ConfigError(f"could not write the reference model into {final}: {err.strerror or err}") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- one step ---

    def _seed(self, *parts: int) -> int:
        return int(np.random.SeedSequence([self.cfg.seed, *parts]).generate_state(1, np.uint64)[0] >> 1)

    def _rollouts(self) -> tuple[list, list[list[int]], float]:
        """This rank's prompts of the step (each ``group_size`` times), their completions, and the
        rollout's seconds."""
        cfg, group = self.cfg, self.group
        rng = np.random.default_rng([cfg.seed, self.step])
        chosen = rng.choice(len(self.prompts), size=cfg.rl_prompts, replace=len(self.prompts) < cfg.rl_prompts)
        share = cfg.rl_prompts // group.world_size
        mine = [self.prompts[i] for i in chosen[group.rank * share : (group.rank + 1) * share]]
        rows = [p for p in mine for _ in range(cfg.group_size)]
        generator = torch.Generator(self.device).manual_seed(self._seed(self.step, group.rank))
        start = time.perf_counter()
        completions = self.generate_ids([p.ids for p in rows], cfg.temperature, generator)
        return rows, completions, time.perf_counter() - start

    def _rewards(self, rows: list, completions: list[list[int]]) -> torch.Tensor:
        cfg = self.cfg
        texts = [self.tokenizer.response_text(c) for c in completions]
        try:
            values = self._together(lambda: [score(self.reward_fn, cfg.reward, p.text, t, p.example)
                                             for p, t in zip(rows, texts, strict=True)])
        except RewardError as err:  # nothing of this step is applied: keep it, then stop
            raise RewardError(f"{err} at step {self.step + 1}; checkpoint written to {self._saved_now()}: fix the "
                              "function and continue with --resume") from None
        return torch.tensor(values, dtype=torch.float32).view(-1, cfg.group_size)

    @torch.no_grad()
    def _logprobs(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, micro: list) -> torch.Tensor:
        out = torch.empty(x.shape, dtype=torch.float32, device=self.device)
        with self.strategy.autocast():
            for rows in micro:
                out[rows] = token_logprobs(model(x[rows])[0], y[rows], self.cfg.temperature)[0]
        return out

    def train_step(self) -> torch.Tensor:
        cfg, strategy, number = self.cfg, self.strategy, self.step + 1
        self.faults.before_step(number)
        rows, completions, rollout_s = self._rollouts()
        rewards = self._rewards(rows, completions)
        advantages = group_advantages(rewards, normalise=cfg.rl_loss == "grpo").view(-1).to(self.device)
        x, y, mask = (t.to(self.device) for t in sequences([p.ids for p in rows], completions, self.tokenizer.end_id))
        micro = [torch.from_numpy(m) for m in np.array_split(np.arange(len(rows)), strategy.accum_steps) if len(m)]
        old_logp = self._logprobs(strategy.model, x, y, micro)
        ref_logp = self._logprobs(self.reference, x, y, micro)
        # no learning signal anywhere (every group agrees) and no KL term: an update would only be AdamW's momentum
        signal = self.group.all_reduce_sum((advantages != 0).any().float().view(1)).item() > 0
        updates = (cfg.ppo_epochs if cfg.rl_loss == "grpo" else 1) if signal or cfg.kl_coef > 0 else 0
        stats = torch.zeros(4, device=self.device)  # loss, kl, entropy, clip fraction: summed over micro-batches
        for _ in range(updates):
            stats.zero_()
            for m, rows_m in enumerate(micro):
                logits = strategy.logits(x[rows_m], sync=m == len(micro) - 1)
                logp, entropy = token_logprobs(logits, y[rows_m], cfg.temperature)
                out = policy_loss(logp, old_logp[rows_m], ref_logp[rows_m], advantages[rows_m], mask[rows_m],
                                  cfg.rl_loss, cfg.clip_eps, cfg.kl_coef)
                strategy.backward(out.loss * strategy.accum_steps / len(micro))
                tokens = mask[rows_m].sum().clamp(min=1)
                stats += torch.stack([out.loss.detach(), out.kl, (entropy.detach() * mask[rows_m]).sum() / tokens,
                                      out.clip_fraction])
            self._update(number, stats[0] / len(micro))
        if not updates:
            self.log(f"step {number}: every group's rewards agree and --kl_coef is 0: no update")
        self.step += 1
        self._step_stats(rewards, stats / len(micro), completions, rollout_s, x.numel() * max(updates, 1))
        return stats[0] / len(micro)

    def _update(self, number: int, loss: torch.Tensor) -> None:
        """Clip, vote on non-finite values (and stop signals), then update, as pre-training's step."""
        grad_norm = self.strategy.clip_gradients()
        checked = loss if grad_norm is None or self.dtype == torch.float16 else loss + grad_norm
        if self._vote(checked):
            self._skip_step(number, loss, grad_norm)
        else:
            self.strategy.optimizer_step(self.cfg.lr_at(self.step))
            self.skipped_in_a_row = 0

    def _step_stats(self, rewards: torch.Tensor, means: torch.Tensor, completions: list, rollout_s: float,
                    tokens: int) -> None:
        """The step's figures, averaged over the ranks, for its log row."""
        new_tokens = sum(len(c) for c in completions)
        local = torch.tensor([rewards.mean().item(), (rewards == 1).float().mean().item(), *means.tolist(),
                              new_tokens / max(rollout_s, 1e-9), new_tokens / len(completions)],
                             dtype=torch.float64, device=self.device)
        values = (self.group.all_reduce_sum(local) / self.group.world_size).tolist()
        self.tokens_per_step = tokens * self.group.world_size
        names = ("reward", "sample_accuracy", "policy_loss", "kl", "entropy", "clip_fraction")
        self.step_stats = dict(zip(names, values[:6], strict=True))
        if self.cfg.reward != "task":  # a reward of 1 means "right" only for a task's checker
            del self.step_stats["sample_accuracy"]
        self.step_stats["rollout_tokens_per_s"] = values[6] * self.group.world_size
        self.step_stats["completion_tokens"] = values[7]

    def _log_row(self, loss: torch.Tensor, since: float, since_step: int) -> dict:
        row = super()._log_row(loss, since, since_step)
        s = self.step_stats
        accuracy = f", sampled accuracy {100 * s['sample_accuracy']:.1f}%" if "sample_accuracy" in s else ""
        self.log(f"  rollouts: reward {s['reward']:.3f}{accuracy}, kl {s['kl']:.4f}, entropy {s['entropy']:.3f}, "
                 f"clipped {100 * s['clip_fraction']:.1f}%, {s['completion_tokens']:.1f} tokens per completion, "
                 f"{s['rollout_tokens_per_s']:,.0f} tokens/s")
        return row

    # --- evaluation and the run ---

    def _eval_and_record(self) -> None:
        """Greedy answers to the held-out prompts: their mean reward, and with a task its accuracy."""
        if self._stop_requested():
            return
        answers: dict[int, str] = {}

        def reward_of(i: int, answer: str) -> float:
            answers[i] = answer
            p = self.held_out_set[i]
            return score(self.reward_fn, self.cfg.reward, p.text, answer, p.example)

        reward = self.held_out_score(self.held_out_prompts, reward_of)
        row = dict(step=self.step, val_reward=reward)
        if self.task is not None:  # of the same answers: no second generation
            right = sum(self.task.check(self.held_out[i], a) for i, a in answers.items())
            row["accuracy"] = self.group.all_reduce_sum(torch.tensor(float(right), dtype=torch.float64,
                                                                     device=self.device)).item() / len(self.held_out)
        self.last_eval = row
        self.metrics.record(row)
        accuracy = f", accuracy {100 * row['accuracy']:.1f}%" if "accuracy" in row else ""
        self.log(f"step {self.step}: held-out reward {reward:.4f}{accuracy} ({len(self.held_out)} prompts, greedy)")

    def _evaluated_at(self, step: int) -> bool:
        from gptforge.train.metrics import read_metrics

        rows = self.metrics.history + (read_metrics(self.metrics.path) if self.group.is_main and
                                       self.metrics.path.is_file() else [])
        return bool(self.group.broadcast_object(any(r.get("step") == step and "val_reward" in r for r in rows)))

    def _run(self) -> dict:
        if not self.resumed:
            self._together(lambda: self._save_reference() if self.group.is_main else None)
        result = super()._run()
        if self.group.is_main:
            from gptforge.train.finetune.plots import plot_rl

            plot_rl(self.metrics.path, self.out_dir / "rl.png", self.log)
        return {**result, **{k: v for k, v in self.last_eval.items() if k != "step"}}
