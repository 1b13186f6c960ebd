"""Ahead-of-time compilation of the Triton kernels for sm_80 and sm_90, no GPU needed (gptforge/kernels/aot.py).

The default run compiles each kernel module's default configurations (for attention: the
first config of every variant in the bf16 lists at head dims 64 and 128, today's kernel at
every head dim, dropout at 64); the ``slow`` run compiles every configuration the autotuners
may pick. Each must compile with zero register spills, below the 255-register cap (attention),
and with shared memory within the chip's limit; on sm_90 the bf16 attention kernels must use
Hopper's ``wgmma`` tensor-core instructions, and the TMA variants the bulk tensor copy.
"""

from __future__ import annotations

import pytest

from gptforge.kernels import aot
from gptforge.kernels.triton import configs

MISSING = aot.toolchain_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"AOT compile toolchain unavailable: {MISSING}")

TRITON_TYPES = {"i1", "i8", "i16", "i32", "i64", "u32", "u64", "fp16", "bf16", "fp32", "fp64"}
ATTENTION_DOT_KERNELS = ("attn_fwd[", "attn_bwd_dkdv[", "attn_bwd_dq[")


def _failures(results: list[aot.Result]) -> str:
    bad = [r for r in results if not r.ok]
    return f"{len(bad)} of {len(results)} configurations failed:\n{aot.format_table(bad)}"


def test_specs_are_well_formed():
    specs = aot.collect_specs()
    assert any(s["name"].startswith("attn_fwd") for s in specs)
    names = [s["name"] for s in specs]
    assert len(names) == len(set(names)), "spec names must be unique"
    for spec in specs:
        assert {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"} <= spec.keys(), spec["name"]
        arg_names = aot._jit_function(spec["fn"]).arg_names
        covered = set(spec["signature"]) | set(spec["constexprs"])
        assert covered == set(arg_names), f"{spec['name']}: signature + constexprs != {arg_names}"
        for name, ty in spec["signature"].items():
            assert ty.removeprefix("*") in TRITON_TYPES, f"{spec['name']}: {name} has unknown type {ty!r}"


@pytest.fixture(scope="module")
def default_results() -> list[aot.Result]:
    return aot.report(everything=False)


def test_default_configs_compile_without_spills(default_results):
    assert {r.arch for r in default_results} == set(aot.ARCHS)
    assert all(r.ok for r in default_results), _failures(default_results)


def test_hopper_attention_uses_wgmma(default_results):
    _check_hopper_attention(default_results)
    hopper = [r for r in default_results if r.arch == 90 and r.name.startswith(ATTENTION_DOT_KERNELS)]
    assert {r.variant for r in hopper} == set(configs.race_variants("sm90")), "every variant compiled"


def test_attention_stays_below_the_register_cap(default_results):
    _check_register_cap(default_results)


def _check_hopper_attention(results: list[aot.Result]) -> None:
    hopper = [r for r in results if r.arch == 90 and r.name.startswith(ATTENTION_DOT_KERNELS)]
    assert {r.name.split("[")[0] for r in hopper} == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"}
    # bf16 must run on wgmma; fp32 (tf32) may fall back to mma for the smallest tiles
    missing = [r.name for r in hopper if ",bf16," in r.name and not r.wgmma]
    assert not missing, f"no wgmma in the sm_90 PTX of: {missing}"
    # tensor descriptors must become bulk tensor copies, and only where asked for
    wrong = [r.name for r in hopper if r.tma != ("TMA" in configs.VARIANTS[r.variant])]
    assert not wrong, f"cp.async.bulk.tensor present without TMA, or missing with it: {wrong}"


def _check_register_cap(results: list[aot.Result]) -> None:
    capped = [r for r in results if r.name.startswith(ATTENTION_DOT_KERNELS) and r.at_cap]
    assert not capped, f"{len(capped)} attention configs at the register cap:\n{aot.format_table(capped)}"


@pytest.mark.slow
def test_every_config_compiles_without_spills():
    results = aot.report(everything=True)
    assert all(r.ok for r in results), _failures(results)
    _check_hopper_attention(results)
    _check_register_cap(results)
