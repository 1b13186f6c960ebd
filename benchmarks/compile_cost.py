"""Measure what ``--compile=auto``'s cost model (gptforge/train/compile_policy.py) assumes, on this
machine: the compile time of a model (cold: a fresh inductor cache) and the share of a step a
compiled step saves, eager and compiled steps interleaved in one process so that both see the
same load on a shared machine; and the share of the measured matmul ceiling an eager step reaches.

    python -m benchmarks.compile_cost [--config shakespeare_char_cpu] [--rounds 6] [--key=value ...]

Run it on a quiet machine; the numbers it prints are what COST_MODELS in compile_policy.py holds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

STEPS_PER_ROUND = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="shakespeare_char_cpu")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out_dir", default=None)
    args, rest = parser.parse_known_args()
    # a cold compile: an inductor cache of its own (a warm cache makes a repeated compile several times faster)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

    from gptforge.train.ceiling import measured_peak_flops
    from gptforge.train.config import load_config, parse_args
    from gptforge.train.loop import Trainer

    _, overrides = parse_args(rest)
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="compile-cost-")
    cfg = load_config(args.config, {"max_iters": "100000", "eval_interval": "100000", "num_samples": "0",
                                    "progress": "false", "overwrite": "true", "out_dir": out_dir,
                                    "log_interval": "100000", **overrides, "compile": "true"})
    trainer = Trainer(cfg, log=lambda *_: None)
    strategy = trainer.strategy

    def steps(module, k: int) -> list[float]:
        strategy.train_module = module
        times = []
        for _ in range(k):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
        return times

    try:
        steps(strategy.model, 2)  # warm the eager path
        first = steps(strategy.compiled, 1)[0]
        eager, compiled = [], []
        for _ in range(args.rounds):
            eager += steps(strategy.model, STEPS_PER_ROUND)
            compiled += steps(strategy.compiled, STEPS_PER_ROUND)
    finally:
        trainer.close()
    e, c = statistics.median(eager), statistics.median(compiled)
    flops = trainer.flops_per_token * trainer.tokens_per_step
    ceiling = measured_peak_flops(trainer.device, trainer.dtype)
    print(f"{args.config} {overrides or ''} on {trainer.device} ({trainer.dtype}), n_layer {trainer.cfg.n_layer}: "
          f"compile {first - e:.1f} s (first compiled step {first:.1f} s); per step eager {e * 1e3:.0f} ms, "
          f"compiled {c * 1e3:.0f} ms (medians of {len(eager)} interleaved): saving {1 - c / e:.0%} ({e / c:.2f}x); "
          f"eager MFU {flops / e / ceiling:.1%} of the cached ceiling {ceiling / 1e9:,.0f} GFLOP/s")


if __name__ == "__main__":
    main()
