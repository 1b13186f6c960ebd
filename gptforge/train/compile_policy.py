"""``--compile=auto`` (the default): compile the model when the run is long enough that it pays.

torch.compile costs a fixed time before the first step and saves a share of every step after
it, so it pays when

    steps_to_run x step_seconds x SAVING  >  COMPILE_BASE_S + COMPILE_PER_LAYER_S x n_layer

The step time is estimated before the run from its FLOPs and this machine's measured matmul
ceiling (gptforge/train/ceiling.py), at the share of that ceiling an eager step reaches
(``eager_mfu``). ``python -m benchmarks.compile_cost`` measures all three on a machine: a cold
compile (a fresh inductor cache), and eager and compiled steps interleaved in one process, so
that both see the same load on a shared machine.

CPU, 2-core AMD EPYC (AVX-512, no AMX), torch 2.13.0, fp32, 2026-12-05, the machine shared with
other work (load average 2 to 6 on its 2 cores while measuring, so the absolute times are
inflated; the interleaved ratios less so):

    model                                      compile            eager     compiled   saved
    4x128, T 128, B 32 (make train's recipe)   70.4 s (cold)      1,896 ms  1,249 ms   34%
    4x128, T 128, B 32, second process         9.6 s (warm cache) 1,197 ms  1,043 ms   13%
    4x128, T 64, B 64 (make speedrun's)        3.0 s (warm cache) 1,773 ms  1,435 ms   19%
    8x128, T 128, B 32                         46.1 s (cold)      6,724 ms  5,493 ms   18%

Issue 15 measured 15 to 35 s per cold compile on 2 cores without the load, and 1.2x at steady
state. The eager MFU comes from the uncontended `make bench` of 2026-11-25 on the same machine
(benchmarks/results/cpu-amd-epyc-2core-2026-11-25.txt): 16,295 tokens/s x 5.2 MFLOP/token =
85 GFLOP/s, 42% of the 200 GFLOP/s fp32 ceiling; loaded, today's runs reached 6 to 10%.

The load swamped how the compile time grows with depth (8 blocks compiled faster than 4, at
another moment), so the per-block share is not measured: the CPU model takes a cold compile of
10 s + 4 s per block (26 s at 4 blocks: the middle of issue 15's 15 to 35 s), 18% saved per
step (the median of 13, 18, 19, 34% and issue 15's 1.2x, 17%), and an eager MFU of 40%. For
make train's recipe (800 steps of about 285 ms) that is about 41 s saved against 26 s: it
compiles; make speedrun (140 steps) and every test stay eager.

CUDA: not measured here (no GPU was lent to this work). Its constants are provisional:
GPT-2-sized models commonly compile in 30 to 60 s and run 1.2 to 1.4x faster; the GPU suite's
train stage (benchmarks/gpu_suite.py) times eager and compiled steps and is where they should
be re-measured.

Inductor compiles C++ on the CPU: with no C++ compiler on PATH, auto stays eager.
``--compile=true`` or ``false`` decides without the model; either way the choice and its reason
are printed.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptforge.train import checkpoint
from gptforge.train.config import TrainConfig
from gptforge.train.strategy import Strategy


@dataclass(frozen=True)
class CostModel:
    compile_base_s: float  # compile time of a model with no blocks (embeddings, head, loss)
    compile_per_layer_s: float  # and per Transformer block
    saving: float  # share of an eager step's time a compiled step saves
    eager_mfu: float  # share of the measured matmul ceiling an eager training step reaches


COST_MODELS = {
    "cpu": CostModel(compile_base_s=10.0, compile_per_layer_s=4.0, saving=0.18, eager_mfu=0.4),  # measured: above
    "cuda": CostModel(compile_base_s=30.0, compile_per_layer_s=2.5, saving=0.2, eager_mfu=0.4),  # provisional
}


@dataclass(frozen=True)
class CompileChoice:
    compile: bool
    reason: str


def decide(setting: str, steps: int, flops_per_step: float, ceiling: float | None, n_layer: int,
           device_type: str) -> CompileChoice:
    """Whether to compile a run of ``steps`` more steps of ``flops_per_step`` FLOPs on a device
    (all ranks together) whose matmul ceiling is ``ceiling`` FLOP/s, and why."""
    if setting != "auto":
        what = "compiling" if setting == "true" else "eager"
        return CompileChoice(setting == "true", f"{what} (--compile={setting})")
    model = COST_MODELS.get(device_type)
    if device_type == "cpu" and not cpp_compiler():
        return CompileChoice(False, "eager: torch.compile needs a C++ compiler on the CPU and none is on PATH "
                                    "(set CXX, or install g++ or clang++)")
    if model is None or not ceiling or flops_per_step <= 0:
        return CompileChoice(False, f"no cost model for {device_type} (or no ceiling or step size to estimate a "
                                    "step): eager; --compile=true to compile anyway")
    cost = model.compile_base_s + model.compile_per_layer_s * n_layer
    step_s = flops_per_step / (ceiling * model.eager_mfu)
    saved = steps * step_s * model.saving
    break_even = int(cost / (step_s * model.saving)) + 1
    estimate = (f"{steps} steps of about {step_s * 1e3:,.0f} ms would save about {saved:,.0f} s against a compile "
                f"of about {cost:,.0f} s; it pays from about {break_even:,} steps")
    if saved > cost:
        return CompileChoice(True, f"compiling: {estimate}")
    return CompileChoice(False, f"eager: {estimate} (--compile=true to compile anyway)")


def cpp_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU ($CXX, else a usual name), if on PATH."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    return next((found for name in names if (found := shutil.which(name))), None)


def steps_to_run(cfg: TrainConfig) -> int:
    """max_iters less the step of the checkpoint a resumed run will continue from (the newest;
    an older one, if the newest fails to load, changes the estimate little)."""
    start = 0
    if cfg.resume != "false" or cfg.init_from == "resume":
        found = checkpoint.list_checkpoints(Path(cfg.out_dir))
        if found:
            start = int(found[-1].name[len(checkpoint.PREFIX):])
    return max(0, cfg.max_iters - start)


def choose_compile(cfg: TrainConfig, strategy: Strategy, flops_per_step: float, ceiling: float | None,
                   log: Callable[[str], None]) -> CompileChoice:
    """Decide on rank 0 (every rank compiles alike), print the choice, and give the strategy a
    config whose ``compile`` is "true" or "false" (before its ``setup``). The run's own config
    keeps "auto": a resumed run decides again for the steps it has left."""
    group = strategy.group
    if cfg.stage == "rl" and cfg.compile == "auto":  # its batches change shape every step: each would recompile
        choice = CompileChoice(False, "eager: RL's rollouts change the batch's shape every step, and each new "
                                      "shape would compile again (--compile=true to compile anyway)")
    else:
        choice = decide(cfg.compile, steps_to_run(cfg), flops_per_step, ceiling, cfg.n_layer,
                        strategy.device.type) if group.is_main else None
    choice = group.broadcast_object(choice)
    log(f"compile: {choice.reason}")
    resolved = copy.copy(strategy.cfg)  # a copy keeps what load_config and resume_config attached
    resolved.compile = "true" if choice.compile else "false"
    strategy.cfg = resolved
    return choice
