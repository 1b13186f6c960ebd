"""Launch configurations of the Triton kernels: the autotuner's candidate lists for attention,
and the rule that sizes LayerNorm's tiles from the row length.

These tables are what ``kernels/aot_specs.py`` enumerates for ahead-of-time compilation, so a
configuration added here is checked for spills and shared memory without a GPU
(``python -m kernels.aot``; tests/test_aot.py).
"""

from __future__ import annotations

import functools

import torch
import triton

from kernels.triton import tuning
from kernels.triton.common import INTERPRET

# --------------------------------------------------------------------------------------------
# Attention: autotuned per kernel, head dim, element size and dropout
# --------------------------------------------------------------------------------------------

HEAD_DIMS = (16, 32, 64, 128)
# The fixed tile sizes used under the interpreter (autotune cannot run there). Unequal M and N
# so the diagonal logic is exercised; tests may change these to cover other shapes.
INTERPRET_CONFIG = {"fwd": (32, 16), "bwd_dkdv": (16, 32), "bwd_dq": (32, 16)}
PREPROCESS_BLOCK_M = 64
# the autotuner re-tunes per distinct key: bucket the lengths so decoding (T grows by 1) does not
TUNE_KEY = ["T_Q_KEY", "T_K_KEY", "CAUSAL"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, per kernel, head-dim group, element size
# and dropout, for sm_80/sm_90. Larger query tiles for the forward and dQ, larger key tiles for
# dK/dV; 8 warps where the fp32 accumulators are big (D = 128); dropout's Philox state needs
# registers, so its lists use smaller tiles; fp32 inputs take twice the bytes per element. Every
# entry compiles for sm_80 and sm_90 without register spills and within shared memory
# (``python -m kernels.aot --all``; tests/test_aot.py).
Config = tuple[int, int, int, int]
ATTENTION_CONFIGS: dict[tuple[str, str, str], dict[str, list[Config]]] = {
    # kind, head dims, precision: {"plain": [...], "dropout": [...]}
    ("fwd", "d16-32", "16bit"): dict(
        plain=[(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
        dropout=[(64, 64, 4, 4), (128, 64, 8, 3)]),
    ("fwd", "d64", "16bit"): dict(
        plain=[(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)],
        dropout=[(64, 64, 4, 4), (128, 64, 8, 3)]),
    ("fwd", "d128", "16bit"): dict(
        plain=[(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
        dropout=[(64, 32, 4, 3)]),
    ("fwd", "d16-32", "fp32"): dict(plain=[(64, 32, 4, 2), (64, 64, 4, 2)], dropout=[(64, 32, 4, 2)]),
    ("fwd", "d64", "fp32"): dict(plain=[(64, 32, 4, 2), (64, 64, 4, 2)], dropout=[(64, 32, 4, 2)]),
    ("fwd", "d128", "fp32"): dict(plain=[(32, 32, 4, 2), (64, 32, 8, 2)], dropout=[(32, 32, 4, 2)]),
    ("bwd_dkdv", "d16-32", "16bit"): dict(
        plain=[(32, 128, 4, 3), (32, 64, 4, 4), (32, 64, 4, 3)],
        dropout=[(32, 64, 4, 4), (32, 64, 4, 3)]),
    ("bwd_dkdv", "d64", "16bit"): dict(
        plain=[(32, 64, 4, 4), (32, 128, 8, 3), (32, 64, 4, 3)],
        dropout=[(32, 64, 4, 4), (32, 64, 4, 3)]),
    ("bwd_dkdv", "d128", "16bit"): dict(
        plain=[(32, 64, 4, 3), (32, 64, 8, 2)],
        dropout=[(32, 64, 8, 2), (16, 64, 4, 3)]),
    ("bwd_dkdv", "d16-32", "fp32"): dict(plain=[(16, 64, 4, 2), (16, 32, 4, 2)], dropout=[(16, 32, 4, 2)]),
    ("bwd_dkdv", "d64", "fp32"): dict(plain=[(32, 32, 4, 2)], dropout=[(16, 32, 4, 2)]),
    ("bwd_dkdv", "d128", "fp32"): dict(plain=[(32, 32, 4, 2)], dropout=[(16, 32, 4, 2)]),
    ("bwd_dq", "d16-32", "16bit"): dict(
        plain=[(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
        dropout=[(128, 32, 4, 3), (64, 32, 4, 4)]),
    ("bwd_dq", "d64", "16bit"): dict(
        plain=[(128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)],
        dropout=[(64, 32, 4, 4), (128, 32, 8, 3)]),
    ("bwd_dq", "d128", "16bit"): dict(
        plain=[(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 3)],
        dropout=[(128, 32, 8, 2), (64, 32, 4, 3)]),
    ("bwd_dq", "d16-32", "fp32"): dict(plain=[(64, 32, 4, 2), (32, 32, 4, 2)], dropout=[(32, 32, 4, 2)]),
    ("bwd_dq", "d64", "fp32"): dict(plain=[(32, 32, 4, 2)], dropout=[(32, 32, 4, 2)]),
    ("bwd_dq", "d128", "fp32"): dict(plain=[(32, 32, 4, 2), (64, 32, 8, 2)], dropout=[(32, 32, 4, 2)]),
}  # fmt: skip


def attention_configs(kind: str, head_dim: int, fp32: bool, dropout: bool) -> list[Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, best guess first."""
    group = "d16-32" if head_dim <= 32 else f"d{head_dim}"
    return ATTENTION_CONFIGS[(kind, group, "fp32" if fp32 else "16bit")]["dropout" if dropout else "plain"]


def attention_kernel(kind: str, fn, head_dim: int, dtype: torch.dtype, dropout: bool) -> tuple[object, dict]:
    """The attention kernel ``fn`` (of ``kind``) to launch, and the meta-parameters it still needs."""
    if INTERPRET and not tuning.limited():  # no GPU timer for autotune: one fixed, small config
        block_m, block_n = INTERPRET_CONFIG[kind]
        return fn, dict(BLOCK_M=block_m, BLOCK_N=block_n)
    name, configs = _candidates(kind, head_dim, dtype == torch.float32, dropout)
    return tuning.autotuned(name, fn, configs, TUNE_KEY), {}


@functools.cache
def _candidates(kind: str, head_dim: int, fp32: bool, dropout: bool) -> tuple[str, list[triton.Config]]:
    """The autotuner's name for this kernel variant, and its candidate configs."""
    configs = [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
        for m, n, w, s in attention_configs(kind, head_dim, fp32, dropout)
    ]
    return f"attn_{kind}[D{head_dim},{'fp32' if fp32 else '16bit'}{',dropout' * dropout}]", configs


# --------------------------------------------------------------------------------------------
# LayerNorm: a fixed rule from the row length (the interpreter cannot autotune, and a rule lets
# the AOT specs list every configuration the GPU may launch). Every kernel launches with
# num_stages=1: the loops gain from several resident programs per SM rather than from software
# pipelining (which would stage another tile in shared memory).
# --------------------------------------------------------------------------------------------

# Longest row a program holds whole in registers (BLOCK_N); longer rows go in chunks.
MAX_BLOCK_N = 8192
# Longest row we accept: a chunked row is re-read from cache, and 64K fp32 values fill an SM's L1.
MAX_N = 65536
# Elements one program handles at a time (BLOCK_M rows x BLOCK_N columns) when rows are short.
TILE_ELEMENTS = 2048
# Elements per thread and tensor the warp count aims at: one 16-byte load for bf16/fp16.
ELEMENTS_PER_THREAD = 8
# Longest BLOCK_N whose backward keeps dweight/dbias running sums in registers.
PARAM_GRADS_IN_ROW_KERNEL_MAX = 4096
# Chunk (columns) and warps of the kernels for rows longer than MAX_BLOCK_N.
LONG_ROW_CHUNK, LONG_ROW_NUM_WARPS = 4096, 16
# Tile of the column-sum kernel used for longer rows.
COLUMN_SUMS_BLOCK_M, COLUMN_SUMS_BLOCK_N, COLUMN_SUMS_NUM_WARPS = 8, 256, 8
# Resident warps per SM the backward's program count aims at.
WARPS_PER_SM = 32
# What the interpreter takes for the SM count (it only sets how many partial rows there are).
INTERPRETER_SM_COUNT = 4


def layer_norm_config(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n_cols elements, the same for both passes.

    A tile holds max(BLOCK_N, TILE_ELEMENTS) elements, and the warps give each thread
    ELEMENTS_PER_THREAD of them. (Rows past MAX_BLOCK_N use the long-row kernels instead.)
    """
    block_n = triton.next_power_of_2(n_cols)
    tile = max(block_n, TILE_ELEMENTS)
    num_warps = min(32, max(1, tile // (32 * ELEMENTS_PER_THREAD)))
    return tile // block_n, block_n, num_warps
