"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation, mixed
precision, periodic evaluation, checkpoints, metrics, a loss plot and samples at the end.

Every rank of a distributed run executes this same loop; how the model, optimizer and
gradients are spread over ranks is the strategy's business (gptforge/train/strategy.py). Metrics are
averaged over ranks, and only rank 0 logs and writes files. The evaluation and the samples are
gptforge/train/evaluation.py's; loading the checkpoint a run resumes, gptforge/train/resume.py's."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from gptforge import kernels
from gptforge.data import DataError, check_token_ids, ensure_prepared, load_meta, load_tokenizer, load_tokens
from gptforge.gpt.documents import cu_seqlens_from_eot
from gptforge.gpt.model import build_model
from gptforge.gpt.tokenizer import TokenizerUnavailableError
from gptforge.train import checkpoint
from gptforge.train.ceiling import run_ceilings
from gptforge.train.compile_policy import choose_compile
from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.console import eta_seconds, timestamped, wants_progress_bar
from gptforge.train.device import check_backends, peak_memory_mib, seed_everything
from gptforge.train.evaluation import evaluate, write_samples
from gptforge.train.faults import (
    EXIT_NONFINITE,
    EXIT_PREEMPTED,
    MAX_SKIPPED_IN_A_ROW,
    FaultInjection,
    NonFiniteError,
    RunLock,
    StopSignals,
    TrainingStopped,
)
from gptforge.train.metrics import Metrics, log_line
from gptforge.train.resume import resume_checkpoint, resume_config
from gptforge.train.sampler import BatchSampler, make_samplers
from gptforge.train.strategies import make_strategy
from gptforge.train.strategy import Strategy
from gptforge.train.tracking import open_trackers

# errors whose message is for the user; a rank that hits one tells the others (see Trainer._together)
USER_ERRORS = (ConfigError, kernels.BackendError, DataError, checkpoint.CheckpointError, TokenizerUnavailableError,
               FileNotFoundError)


class Trainer:
    """One run: set up (data, model, strategy, resume), then ``run()`` trains to max_iters,
    evaluating, logging and checkpointing at their intervals. ``train_step`` is one optimizer
    step; the sections below follow the order a run goes through."""

    def __init__(self, cfg: TrainConfig, log=tqdm.write, strategy: Strategy | None = None):
        if strategy is None:  # train() does both before it builds the strategy
            cfg = resume_config(cfg, log)
            strategy = make_strategy(cfg)
        self.strategy, self.group = strategy, strategy.group
        self.progress_bar = self.group.is_main and wants_progress_bar(cfg.progress)  # else time-stamped lines
        self.cfg = cfg
        self.log = (log if self.progress_bar else timestamped(log)) if self.group.is_main else (lambda *_: None)
        self.device, self.dtype = strategy.device, strategy.dtype
        self.out_dir = Path(cfg.out_dir)
        # one run per out_dir: rank 0 holds the lock until run() ends (or close())
        self.lock = RunLock(self.out_dir)
        self._together(lambda: self.lock.acquire(self.log) if self.group.is_main else None)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        cfg, strategy, group = self.cfg, self.strategy, self.group
        self.faults = FaultInjection(group.rank)
        check_backends(cfg.backends(), self.device)
        seed_everything(cfg.seed, self.device)
        self._open_data()
        model = self._initial_model().to(self.device)  # may take the shape of pretrained weights into self.cfg
        # counted before the strategy may partition the weights over ranks (ZeRO-3)
        self.num_params, self.flops_per_token = model.num_params(), model.flops_per_token(cfg.block_size)
        # MFU's denominators, all devices together: the measured matmul ceiling, and a GPU's datasheet peak
        self.peak, self.datasheet_peak = run_ceilings(self.cfg, self.device, self.dtype, group, self.log)
        choose_compile(self.cfg, strategy, self.flops_per_token * self.tokens_per_step, self.peak, self.log)
        strategy.setup(model)
        if group.world_size > 1:  # the same initial weights everywhere, but each rank its own dropout
            torch.manual_seed(cfg.seed + group.rank)
        self.step, self.best_val, self.skipped_steps, self.saved_step = 0, float("inf"), 0, -1
        self.skipped_in_a_row = 0
        self.step_stats: dict = {}  # logged with the step's row (see _log_row)
        self.memory: dict | None = None  # what this rank holds, measured at the run's first update
        self.signals = StopSignals(self.log)  # installed while run() runs
        self.stop_signal: str | None = None  # set (on every rank alike) when a rank got SIGTERM/SIGINT
        trackers = self._together(lambda: open_trackers(self.cfg, self.out_dir, self.log) if group.is_main else [])
        self.metrics = Metrics(self.out_dir, write=group.is_main, log=self.log, trackers=trackers)
        self.resumed = self._resume()

    # the plain model (for evaluation, sampling and checkpoints), its optimizer and fp16 scaler
    model = property(lambda self: self.strategy.model)
    optimizer = property(lambda self: self.strategy.optimizer)
    scaler = property(lambda self: self.strategy.scaler)
    history = property(lambda self: self.metrics.history)

    def _together(self, fn):
        """``fn()`` on every rank; if it raises a user error on any rank, it is raised on all of
        them (else the healthy ranks would wait for the failed one in the next collective)."""
        try:
            result, error = fn(), None
        except USER_ERRORS as err:
            result, error = None, err
        self.group.raise_any(error)
        return result

    def close(self) -> None:
        """Release the lock on out_dir and close the trackers (run() does so when it ends)."""
        if hasattr(self, "metrics"):
            self.metrics.close()
        self.lock.release()

    # --- set-up: data, model, resume ---

    def _open_data(self) -> None:
        """Rank 0 prepares the data while the others wait; then the first rank of every other
        node, in case its filesystem is not shared; then every rank opens it."""
        cfg, group = self.cfg, self.group
        args = (cfg.dataset, cfg.data_dir, cfg.input or None, cfg.tokenizer or None)
        self._together(lambda: ensure_prepared(*args) if group.is_main else None)
        self._together(lambda: ensure_prepared(*args) if group.local_rank == 0 and not group.is_main else None)
        data = ensure_prepared(*args)
        if cfg.input:
            self.log(f"--input {cfg.input}: dataset {cfg.dataset!r} in {data}")
        self.meta = load_meta(data)  # its fields, and its vocabulary against its tokenizer's
        self.tokenizer = load_tokenizer(data)  # rebuilt and checked against the meta: a DataError if they differ
        self.eot = self.tokenizer.eot_id if cfg.document_mask else None  # where documents end (--document_mask)
        if cfg.document_mask and self.eot is None:
            raise ConfigError(f"--document_mask=true finds documents by the end-of-text token, and the "
                              f"{self.meta['tokenizer'].get('name')} tokenizer of dataset {cfg.dataset!r} has none: "
                              "train on data prepared with one (gpt2, or a trained tokenizer) or --document_mask=false")
        vocab_size = self.meta["vocab_size"]
        # ids beyond the vocabulary would index past the embedding: the recorded largest ids now
        # (no token read), then every window's ids as the sampler reads it (gptforge/data/checks.py)
        train_tokens, val_tokens = self._together(lambda: [check_token_ids(data, s, load_tokens(data, s), vocab_size)
                                                           for s in ("train", "val")])
        B, T = cfg.batch_size, cfg.block_size
        try:
            self.sampler, self.eval_samplers = make_samplers(train_tokens, val_tokens, B, T, self.strategy.accum_steps,
                                                             cfg.seed, group.rank, group.world_size)
        except ValueError as err:
            raise ConfigError(f"{data}: {err}") from None
        self.tokens_per_step = cfg.gradient_accumulation_steps * B * T  # global: over all ranks

    def _initial_model(self) -> torch.nn.Module:
        """A fresh model of the configured shape, or (--init_from=gpt2|PATH) pretrained weights,
        whose shape then replaces the config's."""
        cfg, spec, vocab = self.cfg, self.cfg.init_from, self.meta["vocab_size"]
        if spec in ("scratch", "resume"):
            if spec == "resume":  # a resumed fine-tune keeps its weights' vocabulary, maybe padded past the data's
                vocab = max(vocab, getattr(cfg, "checkpoint_vocab_size", None) or 0)
            return build_model(cfg.model_config(vocab))
        from gptforge.gpt.pretrained import load_for_finetuning  # only fine-tuning needs it

        try:
            model, notes = load_for_finetuning(spec, self.meta["tokenizer"], vocab, cfg.dropout, cfg.block_size,
                                               data=f"the dataset {cfg.dataset!r}")
        except ValueError as err:
            raise ConfigError(f"--init_from={spec}: {err}") from None
        for note in notes:
            self.log(f"init_from={spec}: {note}")
        self.cfg = cfg.with_model(model.config)
        overridden = [f"{k} {old} -> {new}" for k, old, new in cfg.model_changes(self.cfg)]
        self.log(f"init_from={spec}: {model.num_params() / 1e6:.2f}M parameters, vocab {model.config.vocab_size}"
                 + (f"; the weights' shape overrides the config: {', '.join(overridden)}" if overridden else ""))
        return model

    def _resume(self) -> bool:
        """Load the checkpoint this run continues from, if any (``resume_checkpoint``); whether
        there was one."""
        state = resume_checkpoint(self.cfg, self.strategy, self.log, self.meta["tokenizer"])
        if state is not None:
            self.step = self.saved_step = state["step"]
            self.best_val = state.get("best_val", float("inf"))
            self.skipped_steps = state.get("skipped_steps", 0)
        return state is not None

    # --- one step ---

    def _batch(self, sampler: BatchSampler, step: int, micro: int) -> tuple[torch.Tensor, ...]:
        """Inputs, targets and (--document_mask) the packed documents' cu_seqlens, else None. These
        are found on the CPU, before the copy: their count would otherwise wait for the GPU."""
        x, y = sampler.batch(step, micro)
        batch = (x, y, None if self.eot is None else cu_seqlens_from_eot(x, self.eot))
        if self.device.type == "cuda":
            return tuple(t if t is None else t.pin_memory().to(self.device, non_blocking=True) for t in batch)
        return batch

    def train_step(self) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns its mean loss (on the device).
        Raises NonFiniteError (weights untouched) under --nan_policy=stop."""
        strategy, number = self.strategy, self.step + 1  # number: as the logs count steps
        self.faults.before_step(number)
        accum = strategy.accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y, cu_seqlens = self._batch(self.sampler, self.step, micro)
            # DDP reduces the last one's gradients only
            loss = strategy.forward(x, y, sync=micro == accum - 1, cu_seqlens=cu_seqlens)
            if self.faults.poison(number):
                loss = loss * float("nan")
            strategy.backward(loss)
            total += loss.detach() / accum
        grad_norm = strategy.clip_gradients()  # before any update: vote on it now
        held = strategy.held_bytes() if self.memory is None else None  # the gradients exist only until the update
        # a sum is finite only if both terms are (a norm >= 0 cannot cancel an inf); fp16's
        # overflowing gradients are the loss scaler's business, so there only the loss counts
        checked = total if grad_norm is None or self.dtype == torch.float16 else total + grad_norm
        if self._vote(checked):
            self._skip_step(number, total, grad_norm)
        else:
            strategy.optimizer_step(self.cfg.lr_at(self.step))
            self.skipped_in_a_row = 0
            if held is not None:  # the run's first update: AdamW's state exists now
                self._report_memory(number, gradients=held["gradients"])
            if self.faults.poison_weights(number):
                with torch.no_grad():
                    next(self.model.parameters()).mul_(float("nan"))
        self.step += 1
        return total

    def _report_memory(self, number: int, gradients: int | None) -> None:
        """Log and record the bytes of weights, gradients and optimizer state each rank holds."""
        self.memory = {**self.strategy.held_bytes(), "gradients": gradients}
        per_rank = self.group.gather_objects(self.memory)
        self.metrics.record(dict(step=number, memory_per_rank=per_rank))

        def mib(n: int | None) -> str:
            return "n/a" if n is None else f"{n / 2**20:.2f}"

        self.log("held per rank, MiB (parameters / gradients / optimizer state): " + "; ".join(
            f"rank {r}: {mib(m['parameters'])} / {mib(m['gradients'])} / {mib(m['optimizer_state'])}"
            for r, m in enumerate(per_rank[:4])) + ("; ..." if len(per_rank) > 4 else ""))

    def _vote(self, checked: torch.Tensor | None = None) -> bool:
        """Whether ``checked`` is non-finite on any rank; also sets ``stop_signal`` if any rank got
        SIGTERM/SIGINT. One all-reduce of three flags (a step's one host sync), so that all ranks
        skip, stop or go on together; in one process, without ``checked``, no sync at all."""
        name = self.signals.received
        if checked is None and self.group.world_size == 1:
            self.stop_signal = name or self.stop_signal
            return False
        bad = torch.zeros((), device=self.device) if checked is None else ~torch.isfinite(checked)
        flags = torch.stack([bad, torch.tensor(name == "SIGTERM", device=self.device),
                             torch.tensor(name == "SIGINT", device=self.device)]).float()
        nonfinite, sigterm, sigint = (self.group.all_reduce_sum(flags) > 0).tolist()
        if sigterm or sigint:
            self.stop_signal = "SIGTERM" if sigterm else "SIGINT"
        return nonfinite

    def _skip_step(self, number: int, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> None:
        """A non-finite step: drop its update (--nan_policy=skip), or raise NonFiniteError."""
        norm = "n/a" if grad_norm is None else f"{grad_norm.item():.4g}"
        what = f"non-finite loss or gradient norm at step {number} (loss {loss.item():.4g}, grad norm {norm} " \
               f"on rank {self.group.rank})"
        if not self.strategy.can_skip_steps:
            raise NonFiniteError(what)
        self.strategy.optimizer_step(self.cfg.lr_at(self.step), skip=True)  # clears the gradients
        if self.cfg.nan_policy == "stop":
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
        self.metrics.record(dict(step=number, skipped="non-finite loss or gradient norm",
                                 skipped_steps=self.skipped_steps))

    def weights_finite(self) -> bool:
        """Whether every weight is finite, on every rank (all ranks get the same answer)."""
        bad = torch.zeros((), device=self.device)
        for p in self.strategy.local_parameters():
            bad += (~torch.isfinite(p)).any()
        return self.group.all_reduce_sum(bad).item() == 0

    # --- evaluation, checkpoints, stopping ---

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (the same answer on every rank)."""
        self._vote()
        return bool(self.stop_signal)

    def _eval_and_record(self) -> None:
        losses = evaluate(self.strategy, self.eval_samplers, self.cfg.eval_iters, self._batch, self._stop_requested)
        if losses is None:  # stopped by a signal: the caller checkpoints and leaves
            return
        self.best_val = min(self.best_val, losses["val"])
        self.metrics.record(dict(step=self.step, train_loss=losses["train"], val_loss=losses["val"]))
        self.log(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def save(self) -> Path | None:
        """Checkpoint (on every rank: DeepSpeed writes shards); its path on rank 0, else None.
        Non-finite weights are never checkpointed: they raise NonFiniteError instead."""
        if not self.weights_finite():
            raise NonFiniteError(f"the weights are non-finite at step {self.step} (an update made them so, though "
                                 "its loss and gradient norm were finite: is the learning rate too high?)")
        self.saved_step = self.step
        state = dict(best_val=self.best_val, skipped_steps=self.skipped_steps)
        return self.strategy.save(self.out_dir, self.step, self.cfg.to_dict(), self.meta["tokenizer"], state)

    def _saved_now(self) -> Path:
        """The checkpoint of this step: written now unless it was already."""
        return self.save() if self.saved_step != self.step else checkpoint.list_checkpoints(self.out_dir)[-1]

    def _stop_on_signal(self) -> TrainingStopped:
        """Every rank got the same stop flag: checkpoint this step (if not done yet) and leave."""
        return TrainingStopped(f"received {self.stop_signal} at step {self.step}: checkpoint written to "
                               f"{self._saved_now()}; resume with --resume", EXIT_PREEMPTED,
                               announce=self.group.is_main)

    def _stop_on_nonfinite(self, err: NonFiniteError) -> TrainingStopped:
        found = checkpoint.list_checkpoints(self.out_dir)
        newest = str(found[-1]) if found else "none (no checkpoint yet)"
        if self.strategy.can_skip_steps and self.weights_finite():
            # the bad step was not applied, and the weights are finite: the last good state
            where = f"the last good state (step {self.step}, finite weights) is checkpointed in {self._saved_now()}"
            advice = ("resume with --resume and a lower --learning_rate" + (
                ", or with --nan_policy=skip" if self.cfg.nan_policy == "stop" else "") +
                "; if it fails again at once, the weights had diverged already: start over with a lower "
                "learning rate")  # fmt: skip
        elif self.strategy.can_skip_steps:
            where = f"non-finite weights are never checkpointed: the newest checkpoint is {newest}"
            advice = "resume from it with --resume and a lower --learning_rate, or start over with one"
        else:
            where = f"the update was not applied, but DeepSpeed's engine cannot drop the step's gradients, so " \
                    f"nothing more was saved; the newest checkpoint is {newest}"
            advice = "resume from it with --resume and a lower --learning_rate"
        return TrainingStopped(f"stopped: {err}; {where}. To go on, {advice}", EXIT_NONFINITE,
                               announce=self.group.is_main)

    # --- the run ---

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

    def _run(self) -> dict:
        cfg, group = self.cfg, self.group
        if group.is_main:  # holding the lock: an earlier run's files go, a resumed run's are trimmed
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.metrics.start(resumed_at=self.step if self.resumed else None)
            checkpoint.tidy(self.out_dir, fresh=not self.resumed)
        group.barrier()
        ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
        self.log(f"training {cfg.model} with {self.num_params / 1e6:.2f}M parameters on {self.device} "
                 f"({str(self.dtype).removeprefix('torch.')}) with strategy {self.strategy.name}, "
                 f"steps {self.step} -> {cfg.max_iters}")
        self.log(f"global batch: {cfg.batch_size} sequences x {self.strategy.accum_steps} micro-steps x "
                 f"{group.world_size} rank(s) x {cfg.block_size} tokens = {self.tokens_per_step:,} tokens per step")
        with ExitStack() as stack:
            # a backend named in the config wins; "auto" leaves the choice to GPT_KERNELS, then to auto
            stack.enter_context(kernels.use_backend(**{k: v for k, v in cfg.backends().items() if v != "auto"}))
            bar = stack.enter_context(tqdm(total=cfg.max_iters, initial=self.step, unit="step", dynamic_ncols=True,
                                           disable=not self.progress_bar))
            if self.step == 0 and cfg.max_iters > 0:
                self._eval_and_record()
                if self.stop_signal:
                    raise self._stop_on_signal()
            start, last = time.perf_counter(), (time.perf_counter(), self.step)
            self.started = start, self.step  # the ETA's pace counts from here
            while self.step < cfg.max_iters:
                loss = self.train_step()  # NonFiniteError under --nan_policy=stop: see run()
                bar.update(1)
                end = self.step == cfg.max_iters
                if self.step % cfg.log_interval == 0 or end:
                    row = self._log_row(loss, *last)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
                    last = time.perf_counter(), self.step
                if self.step % cfg.eval_interval == 0 or end:
                    self._eval_and_record()
                if self.step % ckpt_every == 0 or end:
                    self.save()
                if self.stop_signal:
                    raise self._stop_on_signal()
            if self.resumed and self.step == cfg.max_iters > 0 and not self._evaluated_at(self.step):
                self._eval_and_record()  # resumed at its end: stopped during its final evaluation
                if self.stop_signal:
                    raise self._stop_on_signal()
            result = {**self.metrics.last_eval(), "step": self.step, "seconds": time.perf_counter() - start}
            if self.metrics.last_eval():
                self.metrics.plot()
            result["samples"] = self._write_samples()
            if result["samples"]:
                self.metrics.text("samples", "\n\n".join(result["samples"]))
        return result

    def _write_samples(self) -> list[str]:
        """Samples of the trained model, printed and saved to samples.txt (a fine-tuning stage
        shows its answers to held-out problems instead)."""
        cfg = self.cfg
        if not (cfg.num_samples and cfg.sample_tokens):
            return []
        out_file = self.out_dir / "samples.txt" if self.group.is_main else None
        return write_samples(self.strategy, self.tokenizer, cfg.num_samples, cfg.sample_tokens, cfg.seed, out_file,
                             self.log)

    def _log_row(self, loss: torch.Tensor, since: float, since_step: int) -> dict:
        """Record and print the mean loss over the global batch and the throughput since the last log."""
        loss = self.group.all_reduce_mean(loss)
        tokens_per_s = (self.step - since_step) * self.tokens_per_step / (time.perf_counter() - since)
        mfu = self.flops_per_token * tokens_per_s / self.peak if self.peak else None
        row = dict(step=self.step, loss=loss.item(), lr=self.cfg.lr_at(self.step - 1), tokens_per_s=tokens_per_s,
                   mfu=mfu, peak_memory_mib=peak_memory_mib(self.device))
        if self.datasheet_peak:  # a GPU: MFU against its datasheet too
            row["mfu_datasheet"] = self.flops_per_token * tokens_per_s / self.datasheet_peak
        if self.skipped_steps:
            row["skipped_steps"] = self.skipped_steps
        row.update(self.step_stats)  # a stage's own figures of its last step (RL: reward, KL, ...)
        self.metrics.record(row)
        self.log(log_line(row, eta_seconds(*self.started, self.step, self.cfg.max_iters)))
        return row

    def _evaluated_at(self, step: int) -> bool:
        """Whether ``step`` was evaluated (rank 0 reads metrics.jsonl, every rank hears)."""
        return bool(self.group.broadcast_object(self.metrics.evaluated_at(step)))


def train(cfg: TrainConfig, log=tqdm.write, trainer: type[Trainer] = Trainer) -> dict:
    """Run ``cfg`` to its end with ``trainer`` (a fine-tuning stage's subclass: gptforge/train/stages.py)."""
    log = log if wants_progress_bar(cfg.progress) else timestamped(log)
    cfg = resume_config(cfg, log if int(os.environ.get("RANK", "0")) == 0 else lambda *_: None)
    strategy = make_strategy(cfg)
    try:
        return trainer(cfg, log=log, strategy=strategy).run()
    finally:
        strategy.teardown()
