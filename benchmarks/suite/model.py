"""Stages e and f: the whole model, training and generating.

Training (stage e): GPT-2 124M (12 layers, 12 heads, 768 wide, vocab 50304), T = 1024, bf16
autocast, fused AdamW, gradient clipping: one optimizer step per call, on a fixed random
batch, the largest batch (a power of two, up to 64) whose step fits in 90% of the card's
memory. Per attention backend (LayerNorm stays on ``auto``: ours on a GPU), eager and
``torch.compile``d: tokens/s, MFU against the matmul ceiling the card stage measured and
against the datasheet's dense bf16 peak, and peak memory. The eager variants are timed in
interleaved rounds, then the compiled ones; a compiled variant that recompiles while being
timed says so in its note (its figure then includes compiling).

Generation (stage f): 500 new tokens from a one-token prompt (temperature 0.8, top-k 200),
with and without the KV cache, for the char model (the CPU preset's shape) and GPT-2 124M's
shape, bf16 autocast; tokens/s, the two paths interleaved.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable

import torch

from benchmarks.suite.stage import Stage
from gptforge import kernels
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.generate import generate
from gptforge.gpt.model import GPT
from gptforge.train.device import peak_flops

GPT2 = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768, dropout=0.0)
CHAR = GPTConfig(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
TOY = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
BATCH_CANDIDATES = (64, 32, 16, 8, 4)
MEMORY_HEADROOM = 0.9  # a batch fits if its step peaks under this share of the card's memory
MAX_WARMUP_STEPS = 8  # warm-up goes on (up to this) while steps still compile something


class TrainStep:
    """One optimizer step of a fresh model on a fixed batch (the attention backend is chosen
    by the caller, with ``kernels.use_backend``, or by ``selected``)."""

    def __init__(self, stage: Stage, config: GPTConfig, batch: int, backend: str, compiled: bool,
                 checkpointing: str = "none") -> None:
        torch.manual_seed(0)
        self.stage, self.backend, self.batch, self.compiled = stage, backend, batch, compiled
        with stage.device:  # built where it runs: initialising 124M parameters on the host takes seconds
            self.model = GPT(config)
        self.model.set_activation_checkpointing(checkpointing)
        self.optimizer = torch.optim.AdamW(self.model.optimizer_groups(0.1), lr=6e-4, betas=(0.9, 0.95),
                                           fused=stage.cuda)  # fmt: skip
        self.forward = self.model
        if compiled:
            # the rehearsal traces with dynamo and AOT autograd but skips inductor's C++ build
            self.forward = torch.compile(self.model, backend="aot_eager" if stage.rehearse else "inductor")
        self.idx = torch.randint(0, config.vocab_size, (batch, config.block_size), device=stage.device)
        self.tokens = self.idx.numel()
        self.peak_memory: float | None = None

    def __call__(self) -> None:
        with torch.autocast(self.stage.device.type, torch.bfloat16):
            _, loss = self.forward(self.idx, self.idx)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def selected(self) -> None:
        """One step with this step's backend selected (eager only: compiled code guards on the
        selection, so switching it between steps would recompile)."""
        with kernels.use_backend(attention=self.backend):
            self()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(stage: Stage, config: GPTConfig) -> int:
    """The largest candidate batch whose eager SDPA step peaks under MEMORY_HEADROOM."""
    if not stage.cuda:
        return 4
    total = torch.cuda.get_device_properties(stage.device).total_memory
    for batch in BATCH_CANDIDATES:
        step, fits = None, False
        try:
            torch.cuda.reset_peak_memory_stats()
            step = TrainStep(stage, config, batch, "sdpa", compiled=False)
            step.selected()
            stage.sync()
            fits = torch.cuda.max_memory_allocated() < MEMORY_HEADROOM * total
        except torch.OutOfMemoryError:
            pass
        except Exception as e:  # not a matter of size: say so, and go on with a small batch
            stage.note("train", "batch size", f"the SDPA step failed ({str(e).strip()[:160]}); batch "
                       f"{BATCH_CANDIDATES[-1]} is used")  # fmt: skip
            return BATCH_CANDIDATES[-1]
        finally:
            del step
            _free()
        if fits:
            return batch
    return BATCH_CANDIDATES[-1]


def _dynamo_frames() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values())


def run_train(stage: Stage) -> None:
    stage.start_tuning()
    config = GPT2 if stage.cuda else TOY
    batch = largest_batch(stage, config)
    group = (f"train step: GPT-2 124M, T{config.block_size}, bf16, fused AdamW" if stage.cuda
             else f"train step: toy GPT, T{config.block_size}, bf16")  # fmt: skip
    backends = [b for b in ("triton", "sdpa") if b in kernels.available_backends("attention", stage.device)]
    if stage.flash_attn_installed():
        backends.append("flash_attn")
    else:
        stage.note(group, "flash_attn", "skipped: flash_attn is not installed here")
    with torch.device("meta"):  # the count needs the shapes only
        flops_per_token = GPT(config).flops_per_token()
    warmup, rounds, per_round = (3, 3, 5) if stage.cuda else (1, 2, 1)
    timer = _timer(stage, per_round)

    def record(name: str, step: TrainStep, times: tuple[float, float, float], baseline: str, recompiled=False):
        median, fastest, slowest = times
        tokens_per_s = step.tokens / median
        stage.figure(group, name, tokens_per_s, "tokens/s", backend=step.backend, batch=step.batch,
                     compiled=step.compiled, baseline=baseline, spread=[step.tokens / slowest, step.tokens / fastest],
                     note=f"B{step.batch}, " + _mfu_note(stage, flops_per_token * tokens_per_s, step.peak_memory,
                                                         recompiled))  # fmt: skip

    def build(backend: str, compiled: bool, run: Callable[[TrainStep], None], batch: int = batch,
              checkpointing: str = "none", group: str = group) -> TrainStep | None:
        """A step, warmed up until nothing compiles any more; None (and a note) if it cannot run."""
        step = None
        try:
            if stage.cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            step = TrainStep(stage, config, batch, backend, compiled, checkpointing)
            for i in range(MAX_WARMUP_STEPS):  # compile, autotune, allocator warm-up
                frames = _dynamo_frames()
                run(step)
                if i + 1 >= warmup and _dynamo_frames() == frames:
                    break  # this step compiled nothing: the compiled code is settled
            stage.sync()
            if stage.cuda:  # what this step needs: its model, optimizer state and activations
                step.peak_memory = (torch.cuda.max_memory_allocated() - before) / 2**30
            return step
        except Exception as e:  # out of memory, or a backend that cannot run this
            variant = checkpointing if checkpointing != "none" else f"{backend}{', compiled' if compiled else ''}"
            reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            stage.note(group, variant, f"cannot run: {reason}")
            del step
            _free()
            return None

    # eager: every backend built and warmed, then timed in interleaved rounds
    steps = {}
    for backend in backends:
        if (step := build(backend, False, TrainStep.selected)) is not None:
            steps[backend] = step
    step = None
    for name, times in stage.interleaved({b: s.selected for b, s in steps.items()}, rounds, timer).items():
        record(name, steps[name], times, baseline="sdpa")
    steps = None
    _free()
    # compiled: one backend at a time, selected once around its compile and its timing
    for backend in backends:
        name = f"{backend}, compiled"
        if stage.left() < (90 if stage.cuda else 15):
            stage.note(group, name, "not reached: out of time")
            continue
        with kernels.use_backend(attention=backend):
            step = build(backend, True, TrainStep.__call__)
            if step is not None:
                frames = _dynamo_frames()
                times = stage.interleaved({name: step}, rounds, timer)[name]
                record(name, step, times, baseline="sdpa, compiled", recompiled=_dynamo_frames() != frames)
        step = None
        _free()
    if stage.cuda and stage.left() > 30:
        # the plain-PyTorch reference attention, last and at a quarter of the batch: its fp32
        # T x T scores (3 GiB a layer at B 64) would not fit beside the rest
        step = build("torch", False, TrainStep.selected, batch=max(1, batch // 4))
        if step is not None:
            record("torch", step, stage.interleaved({"torch": step.selected}, rounds, timer)["torch"], baseline="sdpa")
        step = None
        _free()
    checkpointing_race(stage, config, batch, build, timer, rounds)  # last: the races above are the suite's core
    stage.record_tuning()


def checkpointing_race(stage: Stage, config: GPTConfig, batch: int, build: Callable, timer: Callable,
                       rounds: int) -> None:
    """Activation checkpointing (none, selective: every other block, full: every block) on the
    eager SDPA step of the same batch: each step's peak memory (its model, AdamW state and
    activations, beyond what was allocated before it was built) and its tokens/s, interleaved."""
    group = f"activation checkpointing: GPT-2 124M, T{config.block_size}, B{batch}, bf16, eager SDPA" if stage.cuda \
        else f"activation checkpointing: toy GPT, T{config.block_size}, B{batch}, bf16"
    if stage.left() < (60 if stage.cuda else 10):
        stage.note(group, "all", "not reached: out of time")
        return
    steps = {}
    for mode in ("none", "selective", "full"):  # each peak: beyond what was allocated before its build
        if (step := build("sdpa", False, TrainStep.selected, checkpointing=mode, group=group)) is not None:
            steps[mode] = step
    step = None
    for mode, times in stage.interleaved({m: s.selected for m, s in steps.items()}, rounds, timer).items():
        median, fastest, slowest = times
        run = steps[mode]
        memory = f", peak memory {run.peak_memory:.1f} GiB" if run.peak_memory is not None else ""
        stage.figure(group, mode, run.tokens / median, "tokens/s", checkpointing=mode, batch=run.batch,
                     baseline="none", spread=[run.tokens / slowest, run.tokens / fastest],
                     peak_memory_gib=run.peak_memory, note=f"B{run.batch}{memory}")
    steps = None
    _free()


def _timer(stage: Stage, steps: int) -> Callable[[Callable], float]:
    """Seconds per step over ``steps`` back-to-back steps (the GPU drained before and after)."""

    def seconds_per_step(step: Callable) -> float:
        stage.sync()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        stage.sync()
        return (time.perf_counter() - start) / steps

    return seconds_per_step


def _mfu_note(stage: Stage, flops_per_s: float, peak_memory: float | None, recompiled: bool) -> str:
    parts = []
    matmul = stage.ceiling("matmul")
    if matmul:
        parts.append(f"MFU {100 * flops_per_s / (matmul * 1e12):.1f}% of the measured matmul")
    else:
        parts.append("no MFU against a measured ceiling (the card stage did not run)")
    datasheet = peak_flops(stage.device, torch.bfloat16)
    if datasheet:
        parts.append(f"{100 * flops_per_s / datasheet:.1f}% of the datasheet's {datasheet / 1e12:.0f} TFLOP/s")
    if peak_memory is not None:
        parts.append(f"peak memory {peak_memory:.1f} GiB")
    if recompiled:
        parts.append("RECOMPILED while timed: this figure includes compiling")
    return ", ".join(parts)


def run_generate(stage: Stage) -> None:
    stage.start_tuning()
    new_tokens = 500 if stage.cuda else 24
    models = {"char": CHAR, "gpt2": GPT2} if stage.cuda else {"char": CHAR}
    if not stage.cuda:
        stage.note("generation", "gpt2", "skipped in the rehearsal: GPT-2 124M decoding is minutes on a CPU")
    for model_name, config in models.items():
        if stage.left() < 15:
            stage.note("generation", model_name, "not reached: out of time")
            continue
        torch.manual_seed(0)
        with stage.device:
            model = GPT(config).eval()
        fns = {name: _sampler(stage, model, new_tokens, name == "kv_cache") for name in ("kv_cache", "no_cache")}
        for fn in fns.values():  # warm-up: every sequence length the timed runs meet is tuned here
            fn()
        times = stage.interleaved(fns, stage.rounds(3), timer=_timer(stage, 1))
        group = f"generation, {new_tokens} tokens, {model_name} model{', bf16' if stage.cuda else ''}"
        for name, (median, fastest, slowest) in times.items():
            stage.figure(group, name, new_tokens / median, "tokens/s", baseline="no_cache",
                         spread=[new_tokens / slowest, new_tokens / fastest])  # fmt: skip
        stage.record_tuning()


def _sampler(stage: Stage, model: GPT, new_tokens: int, kv_cache: bool) -> Callable[[], None]:
    """Sampling ``new_tokens`` from a one-token prompt, until the device is done."""
    prompt = torch.zeros(1, 1, dtype=torch.long, device=stage.device)

    def sample() -> None:
        generator = torch.Generator(stage.device).manual_seed(0)
        with torch.autocast(stage.device.type, torch.bfloat16) if stage.cuda else contextlib.nullcontext():
            generate(model, prompt, new_tokens, temperature=0.8, top_k=200, generator=generator, kv_cache=kv_cache)
        stage.sync()

    return sample
