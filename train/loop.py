"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation, mixed
precision, periodic evaluation, checkpoints, metrics, a loss plot and samples at the end.

Every rank of a distributed run executes this same loop; how the model, optimizer and
gradients are spread over ranks is the strategy's business (train/strategy.py). Metrics are
averaged over ranks, and only rank 0 logs and writes files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import kernels
from gpt.config import GPTConfig
from gpt.generate import generate
from gpt.model import build_model
from gpt.tokenizer import TokenizerUnavailableError, start_tokens, tokenizer_from_meta
from train import checkpoint
from train.config import ConfigError, TrainConfig
from train.data import DataError, check_token_ids, ensure_prepared, load_meta, load_tokens
from train.device import peak_flops
from train.faults import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    MAX_SKIPPED_IN_A_ROW,
    FaultInjection,
    NonFiniteError,
    RunLock,
    StopSignals,
    TrainingStopped,
)
from train.resume import check_same_run, resume_config, resume_mode
from train.sampler import BatchSampler
from train.strategy import Strategy, make_strategy

# errors whose message is for the user; a rank that hits one tells the others (see Trainer._together)
USER_ERRORS = (ConfigError, kernels.BackendError, DataError, checkpoint.CheckpointError, TokenizerUnavailableError,
               FileNotFoundError)
PRETRAINED_SHAPE = ("model", "n_layer", "n_head", "n_embd", "bias")  # taken from the weights with --init_from


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


class Trainer:
    def __init__(self, cfg: TrainConfig, log=tqdm.write, strategy: Strategy | None = None):
        if strategy is None:  # train() does both before it builds the strategy
            cfg = resume_config(cfg, log)
            strategy = make_strategy(cfg)
        self.strategy = strategy
        self.cfg, self.log = cfg, log if strategy.is_main else (lambda *_: None)
        self.device, self.dtype = strategy.device, strategy.dtype
        self.out_dir = Path(cfg.out_dir)
        # one run per out_dir: rank 0 holds the lock until run() ends (or close())
        self.lock = RunLock(self.out_dir)
        self._together(lambda: self.lock.acquire(self.log) if strategy.is_main else None)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg, strategy = self.cfg, self.strategy
        self.faults = FaultInjection(strategy.rank)
        for op, name in (("attention", cfg.attn_backend), ("layer_norm", cfg.ln_backend)):
            if name == "auto":
                name = kernels.selected(op)  # GPT_KERNELS, checked now rather than at the first forward
            if name != "auto" and name not in kernels.available_backends(op, self.device):
                raise ConfigError(
                    f"{op} backend {name!r} cannot run on {self.device.type} here; available: "
                    f"{kernels.available_backends(op, self.device)} (or auto)"
                )
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        data = self._prepare_data()
        if cfg.input:
            self.log(f"--input {cfg.input}: dataset {cfg.dataset!r} in {data}")
        self.meta = load_meta(data)
        self.tokenizer = tokenizer_from_meta(self.meta["tokenizer"])
        train_tokens, val_tokens = load_tokens(data, "train"), load_tokens(data, "val")
        vocab_size = self.meta["vocab_size"]
        # ids beyond the vocabulary would index past the embedding: one pass over the data, on rank 0
        self._together(lambda: [check_token_ids(data, s, t, vocab_size) for s, t in
                                (("train", train_tokens), ("val", val_tokens))] if strategy.is_main else None)
        B, T = cfg.batch_size, cfg.block_size
        try:
            # each rank takes its own slice of every step's global batch
            self.sampler = BatchSampler(train_tokens, T, B, strategy.accum_steps, seed=cfg.seed,
                                        rank=strategy.rank, world_size=strategy.world_size)
            # evaluation reads fixed windows (its own seeds), so every evaluation sees the same data
            self.eval_samplers = dict(
                train=BatchSampler(train_tokens, T, B, seed=cfg.seed + 1),
                val=BatchSampler(val_tokens, T, B, seed=cfg.seed + 2),
            )
        except ValueError as err:
            raise ConfigError(f"{data}: {err}") from None
        self.tokens_per_step = cfg.gradient_accumulation_steps * B * T  # global: over all ranks

        model = self._initial_model().to(self.device)
        cfg = self.cfg  # with the pretrained weights' shape, if any
        # counted before the strategy may partition the weights over ranks (ZeRO-3)
        self.num_params, self.flops_per_token = model.num_params(), model.flops_per_token(T)
        strategy.setup(model)
        if strategy.world_size > 1:  # the same initial weights everywhere, but each rank its own dropout
            torch.manual_seed(cfg.seed + strategy.rank)
        self.step, self.best_val, self.skipped_steps, self.saved_step = 0, float("inf"), 0, -1
        self.skipped_in_a_row = 0
        self.signals = StopSignals(self.log)  # installed while run() runs
        self.stop_signal: str | None = None  # set (on every rank alike) when a rank got SIGTERM/SIGINT
        directory, unusable = self._checkpoint_to_resume(), []
        while directory is not None:
            try:
                self._resume(directory)
                error = None
            except checkpoint.CheckpointError as err:  # it passed its manifest, but cannot be loaded
                error = str(err)
            errors = [e for e in strategy.gather_objects(error) if e is not None]  # every rank falls back alike
            if not errors:
                break
            unusable.append(f"checkpoint {directory} is unusable ({errors[0]})")
            self.log(f"{unusable[-1]}; trying the previous one")
            directory = self._checkpoint_to_resume(before=directory, problems=unusable)
        self.resumed = directory is not None
        if not self.resumed and checkpoint.list_checkpoints(self.out_dir) and not cfg.overwrite:
            raise ConfigError(
                f"{self.out_dir} holds checkpoints of an earlier run; pass --resume to continue it, "
                "--overwrite to start afresh and replace them, or choose another --out_dir"
            )
        self.forward = strategy.forward
        peak = cfg.peak_flops or peak_flops(self.device, self.dtype)
        self.peak = peak * strategy.world_size if peak else None  # MFU of all devices together
        self.history: list[dict] = []

    # the plain model (for evaluation, sampling and checkpoints), its optimizer and fp16 scaler
    model = property(lambda self: self.strategy.model)
    optimizer = property(lambda self: self.strategy.optimizer)
    scaler = property(lambda self: self.strategy.scaler)

    def _together(self, fn):
        """``fn()`` on every rank; if it raises a user error on any rank, it is raised on all of
        them (else the healthy ranks would wait for the failed one in the next collective)."""
        try:
            result, error = fn(), None
        except USER_ERRORS as err:
            result, error = None, err
        errors = [e for e in self.strategy.gather_objects(error) if e is not None]
        if errors:
            raise errors[0]
        return result

    def close(self) -> None:
        """Release the lock on out_dir (run() does so when it ends)."""
        self.lock.release()

    def _prepare_data(self) -> Path:
        """Rank 0 prepares the data while the others wait; then the first rank of every other
        node, in case its filesystem is not shared; then everyone opens it."""
        cfg, strategy = self.cfg, self.strategy
        args = (cfg.dataset, cfg.data_dir, cfg.input or None, cfg.tokenizer or None)
        self._together(lambda: ensure_prepared(*args) if strategy.is_main else None)
        self._together(lambda: ensure_prepared(*args) if strategy.local_rank == 0 and not strategy.is_main else None)
        return ensure_prepared(*args)

    def _initial_model(self) -> torch.nn.Module:
        """A fresh model of the configured shape, or (--init_from=gpt2|PATH) pretrained weights,
        whose shape then replaces the config's."""
        cfg, spec = self.cfg, self.cfg.init_from
        if spec in ("scratch", "resume"):
            vocab = self.meta["vocab_size"]
            if spec == "resume":  # a resumed fine-tune keeps its weights' vocabulary, maybe padded past the data's
                vocab = max(vocab, getattr(cfg, "checkpoint_vocab_size", None) or 0)
            return build_model(cfg.model_config(vocab))
        from gpt.pretrained import load_pretrained  # only fine-tuning needs it

        try:
            model, weights_tokenizer = load_pretrained(spec, device="cpu", dropout=cfg.dropout,
                                                       block_size=cfg.block_size)
        except ValueError as err:
            raise ConfigError(f"--init_from={spec}: {err}") from None
        data_tokenizer = self.meta["tokenizer"]
        if weights_tokenizer is not None and not same_tokenizer(weights_tokenizer, data_tokenizer):
            raise ConfigError(
                f"--init_from={spec}: the weights were trained with the {describe_tokenizer(weights_tokenizer)} "
                f"tokenizer but the dataset {cfg.dataset!r} was prepared with the {describe_tokenizer(data_tokenizer)} "
                f"one; prepare the data with the weights' tokenizer (--tokenizer={weights_tokenizer.get('name')}) "
                "under another dataset name"
            )
        if weights_tokenizer is None:
            self.log(f"init_from={spec}: the weights do not say which tokenizer they were trained with; "
                     f"make sure it is the dataset's ({describe_tokenizer(data_tokenizer)})")
        if model.config.vocab_size < self.meta["vocab_size"]:
            raise ConfigError(f"--init_from={spec}: the weights know {model.config.vocab_size} tokens but the "
                              f"dataset {cfg.dataset!r} uses {self.meta['vocab_size']}")
        shape = {k: getattr(model.config, k) for k in PRETRAINED_SHAPE}
        overridden = [f"{k} {getattr(cfg, k)} -> {v}" for k, v in shape.items() if getattr(cfg, k) != v]
        self.log(f"init_from={spec}: {model.num_params() / 1e6:.2f}M parameters, vocab {model.config.vocab_size}"
                 + (f"; the weights' shape overrides the config: {', '.join(overridden)}" if overridden else ""))
        self.cfg = self.strategy.cfg = dataclasses.replace(cfg, **shape)
        return model

    def _checkpoint_to_resume(self, before: Path | None = None, problems: list[str] = ()) -> Path | None:
        """The checkpoint this run continues from, or None for a fresh start. --resume=true
        needs one; --resume=auto takes one if there is one, as does a torchelastic restart, so
        that the first launch and every restart are the same command. ``before``: only older
        checkpoints than it (it could not be loaded, for the reasons in ``problems``)."""
        mode = resume_mode(self.cfg)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restart > 0 and self.cfg.resume == "false" and self.cfg.init_from != "resume" and before is None:
            self.log(f"torchelastic restart {restart}: continuing from the newest good checkpoint, if any")
        if mode == "false":
            return None
        # rank 0 verifies the checkpoints (hashing every file once) and tells the others which to load
        problems = list(problems)

        def report(problem: str) -> None:
            problems.append(problem)
            self.log(problem)

        directory = checkpoint.latest_valid(self.out_dir, warn=report, before=before) if self.strategy.is_main else None
        directory, problems = self.strategy.broadcast_object((directory, problems))
        if directory is None and (mode == "true" or problems):
            found = f": {'; '.join(problems)}" if problems else ""
            raise ConfigError(f"--resume: no usable checkpoint in {self.out_dir / 'checkpoints'}{found}")
        if directory is not None and problems:
            self.log(f"falling back to {directory}, the newest usable checkpoint")
        return directory

    def _resume(self, directory: Path) -> None:
        saved = GPTConfig.from_dict(json.loads((directory / "model.json").read_text())["config"])
        if saved != self.model.config:
            raise ConfigError(
                f"checkpoint {directory} holds a model of shape {saved.to_dict()}, "
                f"but this run asks for {self.model.config.to_dict()}"
            )
        check_same_run(self.cfg, directory, json.loads((directory / "trainer.json").read_text())["config"])
        trainer_state = self.strategy.load(directory)
        self.step = trainer_state["step"]
        self.best_val = trainer_state.get("best_val", float("inf"))
        self.skipped_steps = trainer_state.get("skipped_steps", 0)
        self.saved_step = self.step
        self.log(f"resumed from {directory} at step {self.step}")

    def _batch(self, sampler: BatchSampler, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sampler.batch(step, micro)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def train_step(self) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns its mean loss (on the device).

        Before the update every rank learns, in one all-reduce of three flags, whether any rank
        saw a non-finite loss or gradient norm, or got SIGTERM/SIGINT: so all ranks skip, stop
        or go on together. Raises NonFiniteError (weights untouched) under --nan_policy=stop."""
        strategy, number = self.strategy, self.step + 1  # number: as the logs count steps
        self.faults.before_step(number)
        strategy.set_lr(lr_at(self.step, self.cfg))
        accum = strategy.accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self._batch(self.sampler, self.step, micro)
            with strategy.micro_step(last=micro == accum - 1):  # DDP syncs gradients on the last only
                with strategy.autocast():
                    _, loss = self.forward(x, y)
                if self.faults.poison(number):
                    loss = loss * float("nan")
                strategy.backward(loss)
            total += loss.detach() / accum
        grad_norm = strategy.clip_grad_norm()
        # one fused check: a sum is finite only if both terms are (a norm >= 0 cannot cancel an inf);
        # fp16's overflowing gradients are the loss scaler's business, so there only the loss counts
        checked = total if self.dtype == torch.float16 else total + grad_norm
        signal_name = self.signals.received
        flags = torch.stack([~torch.isfinite(checked), torch.tensor(signal_name == "SIGTERM", device=self.device),
                             torch.tensor(signal_name == "SIGINT", device=self.device)]).float()
        nonfinite, sigterm, sigint = (strategy.all_reduce_sum(flags) > 0).tolist()  # the step's one host sync
        if sigterm or sigint:
            self.stop_signal = "SIGTERM" if sigterm else "SIGINT"
        if nonfinite:
            strategy.step(skip=True)
            what = f"non-finite loss or gradient norm at step {number} (loss {total.item():.4g}, " \
                   f"grad norm {grad_norm.item():.4g} on rank {strategy.rank})"
            if self.cfg.nan_policy == "stop" or not strategy.can_skip_steps:
                raise NonFiniteError(what)
            self.skipped_in_a_row += 1
            if not self.weights_finite():
                raise NonFiniteError(f"{what}; the weights themselves are non-finite (an earlier update made them "
                                     "so), so skipping steps cannot help")
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise NonFiniteError(f"{what}; that is {self.skipped_in_a_row} non-finite steps in a row, so "
                                     "skipping is not helping")
            self.skipped_steps += 1
            self.log(f"{what}: step skipped, weights unchanged ({self.skipped_steps} skipped so far)")
            self._record(dict(step=number, skipped="non-finite loss or gradient norm",
                              skipped_steps=self.skipped_steps))
        else:
            strategy.step()
            self.skipped_in_a_row = 0
            if self.faults.poison_weights(number):
                with torch.no_grad():
                    next(self.model.parameters()).mul_(float("nan"))
        self.step += 1
        return total

    def weights_finite(self) -> bool:
        """Whether every weight is finite, on every rank (all ranks get the same answer)."""
        bad = torch.zeros((), device=self.device)
        for p in self.model.parameters():
            local = getattr(p, "ds_tensor", p)  # under ZeRO-3 this rank's shard (p itself is empty)
            bad += (~torch.isfinite(local.detach())).any()
        return self.strategy.all_reduce_sum(bad).item() == 0

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT (one small all-reduce, so all ranks agree); sets
        ``stop_signal``."""
        name = self.signals.received
        if self.strategy.world_size == 1:  # nothing to agree on: no tensor, no host sync
            self.stop_signal = name or self.stop_signal
            return name is not None
        flags = torch.tensor([name == "SIGTERM", name == "SIGINT"], device=self.device, dtype=torch.float32)
        sigterm, sigint = (self.strategy.all_reduce_sum(flags) > 0).tolist()
        if sigterm or sigint:
            self.stop_signal = "SIGTERM" if sigterm else "SIGINT"
        return bool(sigterm or sigint)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean loss over eval_iters fixed batches, shared out over the ranks: batch i goes to
        rank i % world_size. Every rank runs the same number of forwards (ZeRO-3 gathers
        weights collectively), padding with a repeated batch that is not counted. None when a
        stop signal came meanwhile: it is checked between batches, so a long evaluation does
        not hold up a preemption."""
        strategy, n = self.strategy, self.cfg.eval_iters
        self.model.eval()
        losses = {}
        for split, sampler in self.eval_samplers.items():
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for first in range(0, n, strategy.world_size):
                if self._stop_requested():
                    self.model.train()
                    return None
                i = first + strategy.rank
                x, y = self._batch(sampler, i % n, 0)
                with strategy.autocast():
                    _, loss = self.strategy.eval_forward(x, y)
                if i < n:
                    total += loss.double()
            losses[split] = strategy.all_reduce_sum(total).item() / n
        self.model.train()
        return losses

    def save(self) -> Path | None:
        """Checkpoint (on every rank: DeepSpeed writes shards); its path on rank 0, else None.
        Non-finite weights are never checkpointed: they raise NonFiniteError instead."""
        if not self.weights_finite():
            raise NonFiniteError(f"the weights are non-finite at step {self.step} (an update made them so, though "
                                 "its loss and gradient norm were finite: is the learning rate too high?)")
        self.saved_step = self.step
        state = dict(best_val=self.best_val, skipped_steps=self.skipped_steps)
        return self.strategy.save(self.out_dir, self.step, self.meta["tokenizer"], state)

    def _latest_checkpoint(self) -> Path:
        return checkpoint.list_checkpoints(self.out_dir)[-1]

    def _stop_on_signal(self) -> TrainingStopped:
        """Every rank got the same stop flag: checkpoint this step (if not done yet) and leave."""
        path = self.save() if self.saved_step != self.step else self._latest_checkpoint()
        return TrainingStopped(f"received {self.stop_signal} at step {self.step}: checkpoint written to {path}; "
                               "resume with --resume", EXIT_PREEMPTED, announce=self.strategy.is_main)

    def _stop_on_nonfinite(self, err: NonFiniteError) -> TrainingStopped:
        found = checkpoint.list_checkpoints(self.out_dir)
        newest = str(found[-1]) if found else "none (no checkpoint yet)"
        if self.strategy.can_skip_steps and self.weights_finite():
            # the bad step was not applied, and the weights are finite: the last good state
            path = self.save() if self.saved_step != self.step else self._latest_checkpoint()
            where = f"the last good state (step {self.step}, finite weights) is checkpointed in {path}"
            advice = ("resume with --resume and a lower --learning_rate" + (
                ", or with --nan_policy=skip" if self.cfg.nan_policy == "stop" else "") +
                "; if it fails again at once, the weights had diverged already: start over with a lower "
                "learning rate")  # fmt: skip
        elif self.strategy.can_skip_steps:
            where = f"non-finite weights are never checkpointed: the newest checkpoint is {newest}"
            advice = "resume from it with --resume and a lower --learning_rate, or start over with one"
        else:
            where = f"DeepSpeed had applied the update already, so nothing was saved; the newest checkpoint is {newest}"
            advice = "resume from it with --resume and a lower --learning_rate"
        return TrainingStopped(f"stopped: {err}; {where}. To go on, {advice}", EXIT_NONFINITE,
                               announce=self.strategy.is_main)

    def _record(self, row: dict) -> None:
        self.history.append(row)
        if self.strategy.is_main:
            try:
                with open(self.out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as err:  # a full disk: the next checkpoint stops the run, on every rank alike
                self.log(f"could not append to {self.out_dir / 'metrics.jsonl'} ({err.strerror or err}): "
                         f"the row of step {row.get('step')} is lost")

    def _eval_and_save(self) -> None:
        losses = self.evaluate()
        if losses is None:  # stopped by a signal: the caller checkpoints and leaves
            return
        self.best_val = min(self.best_val, losses["val"])
        self._record(dict(step=self.step, train_loss=losses["train"], val_loss=losses["val"]))
        self.log(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def run(self) -> dict:
        """Train to max_iters; returns the last evaluation's losses and the run's throughput.
        Raises TrainingStopped after a stop signal or (--nan_policy=stop) a non-finite step."""
        self.signals.install()
        try:
            return self._run()
        except NonFiniteError as err:
            raise self._stop_on_nonfinite(err) from None
        finally:
            self.signals.uninstall()
            self.close()

    def _tidy_out_dir(self) -> None:
        """Rank 0, holding the lock: a fresh run removes the earlier run's metrics and checkpoints;
        a resumed one drops the metrics written after its checkpoint (they are computed again).
        Temporary directories of writes that were killed go in both cases."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.out_dir / "metrics.jsonl"
        if not self.resumed:
            metrics.unlink(missing_ok=True)
            for old in checkpoint.list_checkpoints(self.out_dir):
                shutil.rmtree(old)
        elif metrics.is_file():
            # rows up to the checkpoint's step; a line cut short by a crash or a full disk is dropped
            kept = [row for row in read_metrics(metrics) if row.get("step", 0) <= self.step]
            metrics.write_text("".join(json.dumps(row) + "\n" for row in kept))
        for pattern in (".tmp-*", ".old-*"):
            for leftover in (self.out_dir / "checkpoints").glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)

    def _run(self) -> dict:
        cfg, strategy = self.cfg, self.strategy
        if strategy.is_main:
            self._tidy_out_dir()
        strategy.barrier()
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        self.log(
            f"training {cfg.model} with {self.num_params / 1e6:.2f}M parameters on {self.device} "
            f"({str(self.dtype).removeprefix('torch.')}) with strategy {strategy.name}, "
            f"steps {self.step} -> {cfg.max_iters}"
        )
        self.log(
            f"global batch: {cfg.batch_size} sequences x {strategy.accum_steps} micro-steps x "
            f"{strategy.world_size} rank(s) x {cfg.block_size} tokens = {self.tokens_per_step:,} tokens per step"
        )
        with ExitStack() as stack:
            # a backend named in the config wins; "auto" leaves the choice to GPT_KERNELS, then to auto
            named = {op: name for op, name in (("attention", cfg.attn_backend), ("layer_norm", cfg.ln_backend))
                     if name != "auto"}  # fmt: skip
            stack.enter_context(kernels.use_backend(**named))
            bar = stack.enter_context(
                tqdm(total=cfg.max_iters, initial=self.step, disable=not (cfg.progress and strategy.is_main),
                     unit="step", dynamic_ncols=True)
            )
            if self.step == 0 and cfg.max_iters > 0:
                self._eval_and_save()
                if self.stop_signal:
                    raise self._stop_on_signal()
            t_last, step_last, start = time.perf_counter(), self.step, time.perf_counter()
            while self.step < cfg.max_iters:
                loss = self.train_step()  # NonFiniteError under --nan_policy=stop: see run()
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                    loss = strategy.all_reduce_mean(loss)  # the mean over the global batch
                    now = time.perf_counter()
                    tokens_per_s = (self.step - step_last) * self.tokens_per_step / (now - t_last)
                    mfu = self.flops_per_token * tokens_per_s / self.peak if self.peak else None
                    row = dict(step=self.step, loss=loss.item(), lr=lr_at(self.step - 1, cfg),
                               tokens_per_s=tokens_per_s, mfu=mfu)
                    if self.skipped_steps:
                        row["skipped_steps"] = self.skipped_steps
                    self._record(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    mfu_text = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
                    self.log(f"step {self.step}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
                             f"{tokens_per_s:,.0f} tokens/s, mfu {mfu_text}")
                    t_last, step_last = time.perf_counter(), self.step
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters:
                    self._eval_and_save()
                if self.step % ckpt_every == 0 or self.step == cfg.max_iters:
                    self.save()
                if self.stop_signal:
                    raise self._stop_on_signal()
            if self.resumed and self.step == cfg.max_iters > 0 and not self._evaluated_at(self.step):
                self._eval_and_save()  # resumed at its end: stopped during its final evaluation
                if self.stop_signal:
                    raise self._stop_on_signal()
            elapsed = time.perf_counter() - start
            evals = [r for r in self.history if "val_loss" in r]
            result = {**(evals[-1] if evals else {}), "step": self.step, "seconds": elapsed}
            if evals and strategy.is_main:
                try:
                    plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
                except OSError as err:
                    self.log(f"could not write {self.out_dir / 'loss.png'} ({err.strerror or err})")
            if cfg.num_samples and cfg.sample_tokens:
                result["samples"] = self.write_samples()
        return result

    def _evaluated_at(self, step: int) -> bool:
        """Whether metrics.jsonl has an evaluation of ``step`` (rank 0 reads, every rank hears)."""
        if any(r["step"] == step and "val_loss" in r for r in self.history):
            return True
        found = None
        if self.strategy.is_main:
            metrics = self.out_dir / "metrics.jsonl"
            found = metrics.is_file() and any(r.get("step") == step and "val_loss" in r for r in read_metrics(metrics))
        return bool(self.strategy.broadcast_object(found))

    def write_samples(self) -> list[str]:
        """Sample from the trained model, print the samples and save them to samples.txt. Every
        rank samples the same (ZeRO-3 needs all ranks for a forward); rank 0 writes."""
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        start = start_tokens(self.tokenizer)
        idx = torch.tensor([start] * self.cfg.num_samples, device=self.device)
        with self.strategy.autocast():
            out = generate(self.model, idx, self.cfg.sample_tokens, temperature=0.8, top_k=200, generator=generator)
        samples = [self.tokenizer.decode(row.tolist()) for row in out]
        text = "\n\n---------------\n\n".join(s.strip("\n") for s in samples) + "\n"
        if self.strategy.is_main:
            try:
                (self.out_dir / "samples.txt").write_text(text)
            except OSError as err:
                self.log(f"could not write {self.out_dir / 'samples.txt'} ({err.strerror or err})")
        self.log("samples:\n" + text)
        return samples


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line cut short (a crash, a full disk) is skipped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training loss (log lines) and train/val loss (eval lines) against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    logs = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    if logs:
        ax.plot([r["step"] for r in logs], [r["loss"] for r in logs], label="train (batch)", alpha=0.5)
    for key, style in (("train_loss", "o-"), ("val_loss", "s-")):
        ax.plot([r["step"] for r in evals], [r[key] for r in evals], style, label=key.replace("_", " "))
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)


def same_tokenizer(a: dict, b: dict) -> bool:
    """Whether two tokenizer metas (``to_meta()``) encode text alike."""
    if a.get("name") != b.get("name"):
        return False
    if a.get("name") == "char":
        return a.get("chars") == b.get("chars")
    return a.get("encoding", a.get("name")) == b.get("encoding", b.get("name"))


def describe_tokenizer(meta: dict) -> str:
    return f"{meta.get('name')} ({meta.get('vocab_size')} tokens)"


def train(cfg: TrainConfig, log=tqdm.write) -> dict:
    cfg = resume_config(cfg, log if int(os.environ.get("RANK", "0")) == 0 else lambda *_: None)
    strategy = make_strategy(cfg)
    try:
        return Trainer(cfg, log=log, strategy=strategy).run()
    finally:
        strategy.teardown()
