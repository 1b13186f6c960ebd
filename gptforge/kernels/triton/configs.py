"""Launch configurations of the Triton kernels: the autotuner's candidate lists for attention,
and the rule that sizes LayerNorm's tiles from the row length.

These tables are what ``gptforge/kernels/aot_specs.py`` enumerates for ahead-of-time compilation, so a
configuration added here is checked for spills and shared memory without a GPU
(``python -m gptforge.kernels.aot``; tests/test_aot.py).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import triton

from gptforge.kernels.triton import tuning
from gptforge.kernels.triton.common import INTERPRET

# --------------------------------------------------------------------------------------------
# Attention: autotuned per kernel, GPU generation, head dim, element size and dropout
# --------------------------------------------------------------------------------------------

HEAD_DIMS = (16, 32, 64, 128)
# The fixed tile sizes used under the interpreter (autotune cannot run there). Unequal M and N
# so the diagonal logic is exercised; tests may change these to cover other shapes.
INTERPRET_CONFIG = {"fwd": (32, 16), "bwd_dkdv": (16, 32), "bwd_dq": (32, 16)}
PREPROCESS_BLOCK_M = 64
# The autotuner re-tunes per distinct key: lengths and batch * heads are bucketed to powers of
# two, so decoding (T grows by 1) does not re-tune, while a grid of 16 programs and one of
# 16,000 (which want different tiles) are tuned apart.
TUNE_KEY = ["BH_KEY", "T_Q_KEY", "T_K_KEY", "CAUSAL"]

# The kernels' switches: constexprs that change how the same computation is scheduled or fed.
#   LONGEST_FIRST      launch causal blocks longest first (attention_forward._program_block)
#   TMA                tiles move through tensor descriptors, Hopper's copy engine (sm_90)
#   PRESCALED          backward: the resident operand carries the softmax scale (the tutorial's
#                      pre-scaled K), so no multiply per score
#   INTERIOR_UNMASKED  backward dK/dV: query tiles wholly inside T_Q load without bounds masks
KERNEL_SWITCHES = {
    "fwd": ("LONGEST_FIRST", "TMA"),
    "bwd_dkdv": ("LONGEST_FIRST", "TMA", "PRESCALED", "INTERIOR_UNMASKED"),
    "bwd_dq": ("LONGEST_FIRST", "TMA", "PRESCALED", "INTERIOR_UNMASKED"),
}
# A variant is a named set of switches; candidate configs name theirs. "today" has none: the
# kernel as first written (pointer loads, ascending launch order). Its plain (no dropout)
# 16-bit entries on sm_90 are mostly the tiles it first had, the race's baseline; entries that
# sat at the register cap (on either generation, with triton 3.6 or 3.9) were replaced.
VARIANTS: dict[str, tuple[str, ...]] = {
    "today": (),
    "longest_first": ("LONGEST_FIRST",),
    "tutorial_bwd": ("PRESCALED", "INTERIOR_UNMASKED"),
    "tma": ("TMA",),
    "tma+longest_first": ("TMA", "LONGEST_FIRST"),
    "tma+tutorial_bwd": ("TMA", "PRESCALED", "INTERIOR_UNMASKED"),
}
# What the interpreter takes for the GPU when it autotunes (the GPU suite's rehearsal): the
# Hopper lists, which hold every variant.
INTERPRETER_GENERATION = "sm90"
# Test switch: False forces 64-bit dropout counters even where 32-bit ones fit.
PHILOX_32_ALLOWED = True
_forced_variant: str | None = None


def philox_32bit(batch_heads: int, t_q: int, t_k: int) -> bool:
    """Whether every dropout counter ``bh * T_q * T_k + row * T_k + col`` fits in int32, padded
    rows and columns of the last tiles (up to 256) included: then the kernels compute their
    counters in 32-bit arithmetic (the same numbers; attention_forward._rng_counters)."""
    return PHILOX_32_ALLOWED and (batch_heads * t_q + 256) * (t_k + 256) < 2**31


@contextlib.contextmanager
def force_variant(name: str | None) -> Iterator[None]:
    """Inside the block every attention kernel runs variant ``name``: under the interpreter
    its switches with INTERPRET_CONFIG's tiles; on a GPU its candidates only (a kernel that has
    none, such as the forward for "tutorial_bwd", keeps its whole list)."""
    global _forced_variant
    if name is not None and name not in VARIANTS:
        raise ValueError(f"unknown attention variant {name!r}; known: {', '.join(VARIANTS)}")
    before, _forced_variant = _forced_variant, name
    try:
        yield
    finally:
        _forced_variant = before


# (BLOCK_M, BLOCK_N, num_warps, num_stages, variant) candidates per GPU generation, kernel,
# head-dim group, element size and dropout, best guess first. Larger query tiles for the
# forward and dQ, larger key tiles for dK/dV; 8 warps where the fp32 accumulators are big
# (D = 128); dropout's Philox state needs registers, so its lists use smaller tiles; fp32 inputs
# take twice the bytes per element. No entry sits at the 255-register cap on its generation,
# none spills, and every one fits shared memory (python -m gptforge.kernels.aot --all; tests/test_aot.py).
#
# sm80 (Ampere, and any GPU but Hopper): the pointer kernel. sm90 (Hopper): every variant, so
# that the autotuner chooses between them and the GPU suite can race them; until the suite has
# measured them on a Hopper card the lists lead with the Triton tutorial's choices (TMA in the
# forward; 32 x 128 dK/dV tiles (32 x 64 at D = 128, where 128 keys spill) and 128 x 32 dQ
# tiles, 5 stages, the pre-scaled operand in the backward).
Tile = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
Config = tuple[int, int, int, int, str]  # a tile and its variant
Lists = dict[str, list[Config]]  # {"plain": [...], "dropout": [...]}


def _variant(name: str, *tiles: Tile) -> list[Config]:
    return [(*tile, name) for tile in tiles]


# The lists of one generation and element size share a shape; these build it from the tiles
# that vary. A variant that takes a single tile takes the first of the list it follows, unless
# the entry names another.


def _fp32(plain: list[Tile], dropout: list[Tile]) -> Lists:
    """fp32 inputs (tf32 dots), every generation: today's kernel only."""
    return dict(plain=_variant("today", *plain), dropout=_variant("today", *dropout))


def _sm80(plain: list[Tile], dropout: list[Tile]) -> Lists:
    """sm80, 16-bit: today's kernel, its first plain tile launched longest first too."""
    return dict(
        plain=_variant("today", *plain) + _variant("longest_first", plain[0]), dropout=_variant("today", *dropout)
    )


def _sm90_fwd(tma: list[Tile], today: list[Tile], dropout: list[Tile]) -> Lists:
    """sm90 forward: TMA, then today's kernel, each followed by its first tile launched longest
    first; dropout: today's kernel, then its first tile through TMA."""
    plain = _variant("tma", *tma) + _variant("tma+longest_first", tma[0])
    plain += _variant("today", *today) + _variant("longest_first", today[0])
    return dict(plain=plain, dropout=_variant("today", *dropout) + _variant("tma", dropout[0]))


def _sm90_bwd(
    tutorial: list[Tile], today: list[Tile], dropout: list[Tile],
    tma_tutorial: Tile | None = None, tma: Tile | None = None, dropout_tutorial: Tile | None = None,
) -> Lists:  # fmt: skip
    """sm90 backward: the tutorial's variant, one tile of it through TMA (``tma_tutorial``);
    today's kernel, its first tile launched longest first, one tile through TMA (``tma``).
    Dropout: today's kernel, then one tile of the tutorial's variant (``dropout_tutorial``)."""
    plain = _variant("tutorial_bwd", *tutorial) + _variant("tma+tutorial_bwd", tma_tutorial or tutorial[0])
    plain += _variant("today", *today) + _variant("longest_first", today[0]) + _variant("tma", tma or today[0])
    dropout = _variant("today", *dropout) + _variant("tutorial_bwd", dropout_tutorial or dropout[0])
    return dict(plain=plain, dropout=dropout)


ATTENTION_CONFIGS: dict[tuple[str, str, str, str], Lists] = {
    # generation, kind, head dims, precision: _builder(tiles)
    # sm80, 16-bit, by head dims: (plain, dropout) tiles of today's kernel
    ("sm80", "fwd", "d16-32", "16bit"): _sm80(
        [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4)], [(64, 64, 4, 4), (128, 64, 8, 3)]),
    ("sm80", "bwd_dkdv", "d16-32", "16bit"): _sm80(
        [(32, 128, 8, 3), (32, 64, 4, 4), (32, 64, 4, 3)], [(32, 64, 4, 4), (32, 64, 4, 3)]),
    ("sm80", "bwd_dq", "d16-32", "16bit"): _sm80(
        [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)], [(128, 32, 8, 3), (64, 32, 4, 4)]),
    ("sm80", "fwd", "d64", "16bit"): _sm80(
        [(128, 64, 8, 3), (64, 64, 4, 4), (128, 32, 8, 3)], [(64, 32, 4, 3), (128, 64, 8, 3)]),
    ("sm80", "bwd_dkdv", "d64", "16bit"): _sm80(
        [(32, 32, 4, 4), (32, 32, 4, 3), (64, 32, 8, 3)], [(32, 32, 4, 3), (16, 64, 4, 3)]),
    ("sm80", "bwd_dq", "d64", "16bit"): _sm80(
        [(128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)], [(64, 32, 4, 4), (128, 32, 8, 3)]),
    ("sm80", "fwd", "d128", "16bit"): _sm80(
        [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)], [(64, 32, 8, 3), (32, 32, 4, 3)]),
    ("sm80", "bwd_dkdv", "d128", "16bit"): _sm80([(32, 64, 8, 2), (32, 64, 8, 3)], [(16, 64, 8, 2), (16, 32, 4, 3)]),
    ("sm80", "bwd_dq", "d128", "16bit"): _sm80(
        [(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 3)], [(64, 32, 8, 2), (32, 32, 4, 3)]),
    # fp32 inputs, by head dims: (plain, dropout) tiles of today's kernel on every generation
    ("sm80", "fwd", "d16-32", "fp32"): _fp32([(64, 32, 4, 2), (64, 64, 4, 2)], [(64, 32, 4, 2)]),
    ("sm80", "bwd_dkdv", "d16-32", "fp32"): _fp32([(16, 64, 4, 2), (16, 32, 4, 2)], [(16, 32, 4, 2)]),
    ("sm80", "bwd_dq", "d16-32", "fp32"): _fp32([(64, 32, 4, 2), (32, 32, 4, 2)], [(32, 32, 4, 2)]),
    ("sm80", "fwd", "d64", "fp32"): _fp32([(64, 32, 4, 2), (64, 64, 4, 2)], [(64, 16, 4, 2)]),
    ("sm80", "bwd_dkdv", "d64", "fp32"): _fp32([(32, 32, 4, 2)], [(16, 32, 4, 2)]),
    ("sm80", "bwd_dq", "d64", "fp32"): _fp32([(32, 32, 4, 2)], [(32, 32, 4, 2)]),
    ("sm80", "fwd", "d128", "fp32"): _fp32([(32, 32, 4, 2), (64, 32, 8, 2)], [(32, 32, 4, 2)]),
    ("sm80", "bwd_dkdv", "d128", "fp32"): _fp32([(32, 32, 8, 2)], [(16, 32, 8, 2)]),
    ("sm80", "bwd_dq", "d128", "fp32"): _fp32([(32, 32, 4, 2), (64, 32, 8, 2)], [(32, 32, 8, 2)]),
    # Hopper, 16-bit, by kernel: the tutorial's choices first, then today's kernel and the other
    # variants. Forward: (TMA, today's, dropout) tiles; backward: (tutorial's, today's, dropout)
    ("sm90", "fwd", "d16-32", "16bit"): _sm90_fwd(
        [(128, 64, 4, 3), (128, 128, 8, 3)], [(128, 64, 4, 3), (128, 128, 8, 3)], [(64, 32, 4, 4), (128, 32, 8, 3)]),
    ("sm90", "fwd", "d64", "16bit"): _sm90_fwd(
        [(128, 64, 4, 3), (128, 128, 8, 3)], [(128, 64, 4, 3), (128, 128, 8, 3)], [(64, 32, 4, 4), (128, 32, 8, 3)]),
    ("sm90", "fwd", "d128", "16bit"): _sm90_fwd(
        [(128, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)], [(128, 64, 8, 3), (128, 32, 8, 3)], [(64, 32, 4, 3)]),
    ("sm90", "bwd_dkdv", "d16-32", "16bit"): _sm90_bwd(
        [(32, 128, 4, 5), (32, 128, 4, 3)], [(32, 128, 4, 3), (32, 64, 4, 4)], [(32, 64, 4, 4), (32, 64, 4, 3)],
        dropout_tutorial=(32, 64, 8, 4)),
    ("sm90", "bwd_dkdv", "d64", "16bit"): _sm90_bwd(
        [(32, 128, 8, 5), (32, 128, 8, 3)], [(32, 64, 4, 4), (32, 128, 8, 3)], [(32, 64, 4, 4), (32, 64, 4, 3)],
        dropout_tutorial=(32, 64, 8, 4)),
    ("sm90", "bwd_dkdv", "d128", "16bit"): _sm90_bwd(
        [(32, 64, 8, 5), (32, 64, 8, 3)], [(32, 64, 8, 2), (32, 64, 8, 3)], [(16, 64, 8, 2), (16, 64, 8, 3)],
        tma=(32, 64, 8, 3)),
    ("sm90", "bwd_dq", "d16-32", "16bit"): _sm90_bwd(
        [(128, 32, 4, 5), (128, 32, 4, 3)], [(128, 32, 4, 3), (128, 64, 8, 3)], [(128, 32, 8, 3), (64, 32, 4, 4)]),
    ("sm90", "bwd_dq", "d64", "16bit"): _sm90_bwd(
        [(128, 32, 8, 5), (128, 32, 4, 3)], [(128, 64, 8, 3), (64, 32, 4, 4)], [(64, 32, 4, 4), (128, 32, 8, 3)],
        tma_tutorial=(128, 32, 4, 5)),
    ("sm90", "bwd_dq", "d128", "16bit"): _sm90_bwd(
        [(128, 32, 8, 5), (128, 32, 8, 3)], [(128, 32, 8, 2), (64, 32, 4, 3)], [(128, 32, 8, 2), (64, 32, 4, 3)]),
}  # fmt: skip
for (_gen, _kind, _group, _precision), _lists in list(ATTENTION_CONFIGS.items()):
    if _gen == "sm80" and _precision == "fp32":  # fp32 runs today's kernel on every generation
        ATTENTION_CONFIGS[("sm90", _kind, _group, _precision)] = _lists


def attention_configs(generation: str, kind: str, head_dim: int, fp32: bool, dropout: bool) -> list[Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, variant) candidates, best guess first."""
    group = "d16-32" if head_dim <= 32 else f"d{head_dim}"
    lists = ATTENTION_CONFIGS[(generation, kind, group, "fp32" if fp32 else "16bit")]
    return lists["dropout" if dropout else "plain"]


def race_variants(gen: str) -> list[str]:
    """The variants a generation's 16-bit lists hold, in order of first appearance: what the
    GPU suite races (benchmarks/suite/kernel_bench.py) and checks (parity.py) on that GPU."""
    names: list[str] = []
    for (g, _kind, _group, precision), lists in ATTENTION_CONFIGS.items():
        if g == gen and precision == "16bit":
            names += [e[4] for e in lists["plain"] if e[4] not in names]
    return names


def variant_kinds(gen: str, variant: str) -> set[str]:
    """The kernels (fwd, bwd_dkdv, bwd_dq) whose 16-bit lists on ``gen`` hold ``variant``."""
    return {
        kind
        for (g, kind, _group, precision), lists in ATTENTION_CONFIGS.items()
        if g == gen and precision == "16bit" and any(e[4] == variant for e in lists["plain"])
    }


def variant_switches(kind: str, variant: str) -> dict[str, bool]:
    """The constexpr switches of ``kind``'s kernel, set as ``variant`` sets them."""
    return {switch: switch in VARIANTS[variant] for switch in KERNEL_SWITCHES[kind]}


def generation(device: torch.device) -> str:
    """Which candidate lists a device takes: "sm90" for Hopper, "sm80" for any other GPU."""
    if device.type != "cuda":
        return INTERPRETER_GENERATION
    return "sm90" if torch.cuda.get_device_capability(device)[0] == 9 else "sm80"


def tma_eligible(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether tensor descriptors can address every (B, H, T, D) tensor: unit stride along D, a
    16-byte aligned start, and 16-byte multiples for the strides a program steps by (the copy
    engine's rules). Other layouts run the pointer kernels."""
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(n > 1 and (stride * size) % 16 for n, stride in zip(t.shape[:-1], t.stride()[:-1], strict=True)):
            return False
    return True


def attention_kernel(
    kind: str, fn, q: torch.Tensor, dropout: bool, tensors: tuple[torch.Tensor, ...], documents: bool = False
) -> tuple[object, dict]:
    """The attention kernel ``fn`` (of ``kind``) to launch for queries ``q``, and the
    meta-parameters it still needs. ``tensors``: every (B, H, T, D) tensor it reads or writes.
    ``documents``: packed documents, which take the same candidates (every variant, TMA
    included, applies the document mask) but are tuned apart from plain calls."""
    tma_ok = tma_eligible(tensors)
    if INTERPRET and not tuning.limited():  # no GPU timer for autotune: one fixed, small config
        block_m, block_n = INTERPRET_CONFIG[kind]
        switches = variant_switches(kind, _forced_variant or "today")
        switches["TMA"] = switches["TMA"] and tma_ok
        return fn, dict(BLOCK_M=block_m, BLOCK_N=block_n, **switches)
    name, configs = _candidates(
        kind, generation(q.device), q.shape[-1], q.dtype == torch.float32, dropout, tma_ok, _forced_variant, documents
    )
    return tuning.autotuned(name, fn, configs, TUNE_KEY), {}


@functools.cache
def _candidates(
    kind: str, gen: str, head_dim: int, fp32: bool, dropout: bool, tma_ok: bool, forced: str | None,
    documents: bool = False,
) -> tuple[str, list[triton.Config]]:  # fmt: skip
    """The autotuner's name for this kernel variant, and its candidate configs."""
    entries = attention_configs(gen, kind, head_dim, fp32, dropout)
    pointer_only = [e for e in entries if "TMA" not in VARIANTS[e[4]]]
    tma_dropped = not tma_ok and len(pointer_only) < len(entries)
    if tma_dropped:
        entries = pointer_only
    forced = forced if forced is not None and any(e[4] == forced for e in entries) else None
    if forced is not None:
        entries = [e for e in entries if e[4] == forced]
    configs = [
        triton.Config(dict(BLOCK_M=m, BLOCK_N=n, **variant_switches(kind, variant)), num_warps=w, num_stages=s)
        for m, n, w, s, variant in entries
    ]
    tags = [f"D{head_dim}", "fp32" if fp32 else "16bit", gen] + ["dropout"] * dropout + ["documents"] * documents
    tags += ["no-tma"] if tma_dropped else []
    tags += [f"variant={forced}"] if forced else []
    return f"attn_{kind}[{','.join(tags)}]", configs


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
