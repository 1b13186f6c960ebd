"""The training loop: AdamW, warmup + cosine schedule, gradient accumulation, mixed
precision, periodic evaluation, checkpoints, metrics, a loss plot and samples at the end.

Every rank of a distributed run executes this same loop; how the model, optimizer and
gradients are spread over ranks is the strategy's business (train/strategy.py). Metrics are
averaged over ranks, and only rank 0 logs and writes files."""

from __future__ import annotations

import json
import math
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
from gpt.tokenizer import tokenizer_from_meta
from train import checkpoint
from train.config import ConfigError, TrainConfig
from train.data import ensure_prepared, load_meta, load_tokens
from train.device import peak_flops
from train.sampler import BatchSampler
from train.strategy import Strategy, make_strategy


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
    def __init__(self, cfg: TrainConfig, log=print, strategy: Strategy | None = None):
        self.strategy = strategy = strategy or make_strategy(cfg)
        self.cfg, self.log = cfg, log if strategy.is_main else (lambda *_: None)
        self.device, self.dtype = strategy.device, strategy.dtype
        self.out_dir = Path(cfg.out_dir)
        for op, name in (("attention", cfg.attn_backend), ("layer_norm", cfg.ln_backend)):
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
        self.meta = load_meta(data)
        self.tokenizer = tokenizer_from_meta(self.meta["tokenizer"])
        train_tokens, val_tokens = load_tokens(data, "train"), load_tokens(data, "val")
        B, T = cfg.batch_size, cfg.block_size
        # each rank takes its own slice of every step's global batch
        self.sampler = BatchSampler(train_tokens, T, B, strategy.accum_steps, seed=cfg.seed,
                                    rank=strategy.rank, world_size=strategy.world_size)
        # evaluation reads fixed windows (its own seeds), so every evaluation sees the same data
        self.eval_samplers = dict(
            train=BatchSampler(train_tokens, T, B, seed=cfg.seed + 1),
            val=BatchSampler(val_tokens, T, B, seed=cfg.seed + 2),
        )
        self.tokens_per_step = cfg.gradient_accumulation_steps * B * T  # global: over all ranks

        model = build_model(cfg.model_config(self.meta["vocab_size"])).to(self.device)
        # counted before the strategy may partition the weights over ranks (ZeRO-3)
        self.num_params, self.flops_per_token = model.num_params(), model.flops_per_token(T)
        strategy.setup(model)
        if strategy.world_size > 1:  # the same initial weights everywhere, but each rank its own dropout
            torch.manual_seed(cfg.seed + strategy.rank)
        self.step, self.best_val = 0, float("inf")
        if cfg.resume:
            self._resume()
        elif checkpoint.list_checkpoints(self.out_dir) and not cfg.overwrite:
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

    def _prepare_data(self) -> Path:
        """Rank 0 prepares the data while the others wait; then the first rank of every other
        node, in case its filesystem is not shared; then everyone opens it."""
        cfg, strategy = self.cfg, self.strategy
        args = (cfg.dataset, cfg.data_dir, cfg.input or None, cfg.tokenizer or None)
        if strategy.is_main:
            ensure_prepared(*args)
        strategy.barrier()
        if strategy.local_rank == 0 and not strategy.is_main:
            ensure_prepared(*args)
        strategy.barrier()
        return ensure_prepared(*args)

    def _resume(self) -> None:
        # rank 0 verifies the checkpoints (hashing every file once) and tells the others which to load
        directory = checkpoint.latest_valid(self.out_dir, warn=self.log) if self.strategy.is_main else None
        directory = self.strategy.broadcast_object(directory)
        if directory is None:
            raise ConfigError(f"--resume: no usable checkpoint in {self.out_dir / 'checkpoints'}")
        saved = GPTConfig.from_dict(json.loads((directory / "model.json").read_text())["config"])
        if saved != self.model.config:
            raise ConfigError(
                f"checkpoint {directory} holds a model of shape {saved.to_dict()}, "
                f"but this run asks for {self.model.config.to_dict()}"
            )
        trainer_state = self.strategy.load(directory)
        self.step = trainer_state["step"]
        self.best_val = trainer_state.get("best_val", float("inf"))
        self.log(f"resumed from {directory} at step {self.step}")

    def _batch(self, sampler: BatchSampler, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = sampler.batch(step, micro)
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def train_step(self) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches; returns its mean loss (on the device)."""
        strategy = self.strategy
        strategy.set_lr(lr_at(self.step, self.cfg))
        accum = strategy.accum_steps
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self._batch(self.sampler, self.step, micro)
            with strategy.micro_step(last=micro == accum - 1):  # DDP syncs gradients on the last only
                with strategy.autocast():
                    _, loss = self.forward(x, y)
                strategy.backward(loss)
            total += loss.detach() / accum
        strategy.step()
        self.step += 1
        return total

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed batches, shared out over the ranks: batch i goes to
        rank i % world_size. Every rank runs the same number of forwards (ZeRO-3 gathers
        weights collectively), padding with a repeated batch that is not counted."""
        strategy, n = self.strategy, self.cfg.eval_iters
        self.model.eval()
        losses = {}
        for split, sampler in self.eval_samplers.items():
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for first in range(0, n, strategy.world_size):
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
        """Checkpoint (on every rank: DeepSpeed writes shards); its path on rank 0, else None."""
        return self.strategy.save(self.out_dir, self.step, self.meta["tokenizer"], dict(best_val=self.best_val))

    def _record(self, row: dict) -> None:
        self.history.append(row)
        if self.strategy.is_main:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _eval_and_save(self) -> None:
        losses = self.evaluate()
        self.best_val = min(self.best_val, losses["val"])
        self._record(dict(step=self.step, train_loss=losses["train"], val_loss=losses["val"]))
        self.log(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    def run(self) -> dict:
        """Train to max_iters; returns the last evaluation's losses and the run's throughput."""
        cfg, strategy = self.cfg, self.strategy
        if strategy.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if not cfg.resume:  # a fresh run: the earlier run's metrics and checkpoints go
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
                for old in checkpoint.list_checkpoints(self.out_dir):
                    shutil.rmtree(old)
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
            stack.enter_context(kernels.use_backend(attention=cfg.attn_backend, layer_norm=cfg.ln_backend))
            bar = stack.enter_context(
                tqdm(total=cfg.max_iters, initial=self.step, disable=not (cfg.progress and strategy.is_main),
                     unit="step", dynamic_ncols=True)
            )
            if self.step == 0 and cfg.max_iters > 0:
                self._eval_and_save()
            t_last, step_last, start = time.perf_counter(), self.step, time.perf_counter()
            while self.step < cfg.max_iters:
                loss = self.train_step()
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_iters:
                    loss = strategy.all_reduce_mean(loss)  # the mean over the global batch
                    now = time.perf_counter()
                    tokens_per_s = (self.step - step_last) * self.tokens_per_step / (now - t_last)
                    mfu = self.flops_per_token * tokens_per_s / self.peak if self.peak else None
                    row = dict(step=self.step, loss=loss.item(), lr=lr_at(self.step - 1, cfg),
                               tokens_per_s=tokens_per_s, mfu=mfu)
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
            elapsed = time.perf_counter() - start
            evals = [r for r in self.history if "val_loss" in r]
            result = {**(evals[-1] if evals else {}), "step": self.step, "seconds": elapsed}
            if evals and strategy.is_main:
                plot_losses(self.out_dir / "metrics.jsonl", self.out_dir / "loss.png")
            if cfg.num_samples and cfg.sample_tokens:
                result["samples"] = self.write_samples()
        return result

    def write_samples(self) -> list[str]:
        """Sample from the trained model, print the samples and save them to samples.txt. Every
        rank samples the same (ZeRO-3 needs all ranks for a forward); rank 0 writes."""
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        start = self.tokenizer.encode("\n") if self.tokenizer.name == "char" else [self.tokenizer.eot_token]
        idx = torch.tensor([start] * self.cfg.num_samples, device=self.device)
        with self.strategy.autocast():
            out = generate(self.model, idx, self.cfg.sample_tokens, temperature=0.8, top_k=200, generator=generator)
        samples = [self.tokenizer.decode(row.tolist()) for row in out]
        text = "\n\n---------------\n\n".join(s.strip("\n") for s in samples) + "\n"
        if self.strategy.is_main:
            (self.out_dir / "samples.txt").write_text(text)
        self.log("samples:\n" + text)
        return samples


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Training loss (log lines) and train/val loss (eval lines) against the step."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
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


def train(cfg: TrainConfig, log=print) -> dict:
    strategy = make_strategy(cfg)
    try:
        return Trainer(cfg, log=log, strategy=strategy).run()
    finally:
        strategy.teardown()
