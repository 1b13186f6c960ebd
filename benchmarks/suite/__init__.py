"""The GPU suite's parts: ``benchmarks/gpu_suite.py`` is the command that runs them.

    results.py       every figure appended to results.jsonl the moment it is measured; the report
    stage.py         what a stage's process shares: its deadline, its recorder, interleaved timing
    card.py          stage a: the card and its measured ceilings
    parity.py        stage b: our kernels against float64 references, natively
    kernel_bench.py  stages c, d: attention and LayerNorm against the peers
    model.py         stages e, f: a GPT-2 124M training step, generation with and without the cache
    planted.py       the rehearsal's planted faults: a stage that overruns, one that crashes
"""
