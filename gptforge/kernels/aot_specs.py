"""What ``python -m gptforge.kernels.aot`` compiles: one spec per configuration a launcher may use.

A spec is a dict with ``name``, ``fn`` (the ``@triton.jit`` function), ``signature`` (arg name ->
triton type such as ``"*bf16"``, ``"i32"``, ``"fp32"``, for every non-constexpr argument),
``constexprs``, ``num_warps``, ``num_stages``, and optionally ``divisible_by_16`` and ``default``
(see gptforge/kernels/aot.py). The configurations themselves live in gptforge/kernels/triton/configs.py, beside
the launchers that read them; this module only enumerates them.
"""

from __future__ import annotations

import itertools

import torch

from gptforge.kernels.triton import attention_backward, attention_forward
from gptforge.kernels.triton import layer_norm_backward as bwd
from gptforge.kernels.triton import layer_norm_forward as fwd
from gptforge.kernels.triton import linear_cross_entropy_kernels as lce
from gptforge.kernels.triton.configs import (
    COLUMN_SUMS_BLOCK_M,
    COLUMN_SUMS_BLOCK_N,
    COLUMN_SUMS_NUM_WARPS,
    HEAD_DIMS,
    LONG_ROW_CHUNK,
    LONG_ROW_NUM_WARPS,
    MAX_BLOCK_N,
    PARAM_GRADS_IN_ROW_KERNEL_MAX,
    PREPROCESS_BLOCK_M,
    attention_configs,
    layer_norm_config,
    variant_switches,
)


def all_specs() -> list[dict]:
    """Every spec, attention first."""
    return attention_specs() + layer_norm_specs() + linear_cross_entropy_specs()


# --------------------------------------------------------------------------------------------
# Attention: every config the autotuner may pick
# --------------------------------------------------------------------------------------------

# kind (as in configs.py) -> the kernel and the constexprs that select that kind's code
_ATTENTION_KERNELS = {
    "fwd": (attention_forward._attn_fwd_kernel, {}),
    "bwd_dkdv": (attention_backward._attn_bwd_kernel, {"KEY_BLOCKS": True}),
    "bwd_dq": (attention_backward._attn_bwd_kernel, {"KEY_BLOCKS": False}),
}


def _signature(fn, pointer_types: dict[str, str], floats: tuple[str, ...], constexprs: dict) -> dict[str, str]:
    """Triton types of ``fn``'s non-constexpr arguments: pointers as given, named floats fp32, the rest i32."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        sig[name] = pointer_types.get(name) or ("fp32" if name in floats else "i32")
    return sig


def _in_ci_set(
    head_dim: int, dtype: str, dropout: bool, first_of_variant: bool, variant: str, documents: bool = False
) -> bool:
    """The configurations the default AOT run (and CI) compiles: the first config of every
    variant in every bf16 list at GPT-2's head dims (64, 128; today's kernel at every head dim),
    plus dropout at 64; packed documents likewise, but at 64 and 128 only;
    ``python -m gptforge.kernels.aot --all`` compiles the rest."""
    if dtype != "bf16" or not first_of_variant:
        return False
    if dropout:
        return head_dim == 64
    return head_dim >= 64 or (variant == "today" and not documents)


# The GPU generation whose candidate lists each compiled architecture takes (configs.generation).
GENERATIONS = {80: "sm80", 90: "sm90"}


def attention_specs() -> list[dict]:
    """One spec per configuration the autotuner may launch: every (generation, kernel, head dim,
    element size, dropout, config and its variant), compiled for that generation's arch only,
    causal (the training path; the non-causal one is a subset of its code). Innermost strides
    are pinned to 1 and row strides marked multiples of 16, as the JIT specialises contiguous
    inputs. ``default`` marks the ones CI compiles (``_in_ci_set``)."""
    specs: dict[str, dict] = {}
    floats = ("qk_scale", "sm_scale", "dropout_p", "dropout_scale")
    tensors = ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV")
    for (arch, gen), head_dim in itertools.product(GENERATIONS.items(), HEAD_DIMS):
        for dtype in ("bf16", "fp32"):
            pointers = {n: f"*{dtype}" for n in tensors} | {"LSE": "*fp32", "DELTA": "*fp32"}
            for (kind, (fn, selector)), dropout, documents in itertools.product(
                _ATTENTION_KERNELS.items(), (False, True), (False, True)
            ):
                unit_strides = {n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")}
                # packed documents: int32 (B, T) document starts (and ends, backward); else None,
                # as the launchers pass them, so plain calls compile as they did before documents
                doc_tensors = [n for n in ("STARTS", "ENDS") if n in fn.arg_names]
                doc_args = {} if documents else dict.fromkeys(doc_tensors)
                pointers_here = pointers | ({n: "*i32" for n in doc_tensors} if documents else {})
                seen_variants = set()
                for block_m, block_n, warps, stages, name in attention_configs(
                    gen, kind, head_dim, dtype == "fp32", dropout
                ):
                    constexprs = dict(
                        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=True, DROPOUT=dropout,
                        UPCAST=False, PHILOX_32=True, **selector, **variant_switches(kind, name), **unit_strides,
                        DOCUMENTS=documents, **doc_args,
                    )  # fmt: skip
                    tag = f"D{head_dim},{dtype},M{block_m},N{block_n},w{warps},s{stages}{',dropout' * dropout}"
                    tag += ",documents" * documents
                    spec_name = f"attn_{kind}[{tag}{'' if name == 'today' else ',' + name}]"
                    default = _in_ci_set(head_dim, dtype, dropout, name not in seen_variants, name, documents)
                    seen_variants.add(name)
                    wide_name = f"{spec_name[:-1]},philox64]"  # --all: the 64-bit dropout counters too
                    if spec_name in specs:  # the same config in both generations' lists
                        specs[spec_name]["archs"].append(arch)
                        specs[spec_name]["default"] |= default
                        if wide_name in specs:
                            specs[wide_name]["archs"].append(arch)
                        continue
                    strides_16 = [n for n in fn.arg_names if n.startswith("stride_") and n not in unit_strides]
                    specs[spec_name] = dict(
                        name=spec_name, fn=fn, archs=[arch], variant=name,
                        signature=_signature(fn, pointers_here, floats, constexprs), constexprs=constexprs,
                        num_warps=warps, num_stages=stages, default=default, divisible_by_16=strides_16,
                    )  # fmt: skip
                    if dropout:  # counters past 2^31 (B * H * T^2 with dropout) take 64-bit arithmetic
                        specs[wide_name] = dict(specs[spec_name], name=wide_name, archs=[arch], default=False,
                                                constexprs={**constexprs, "PHILOX_32": False})  # fmt: skip
    result = list(specs.values())
    for head_dim in HEAD_DIMS:
        fn = attention_backward._attn_bwd_preprocess_kernel
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=PREPROCESS_BLOCK_M, stride_od=1, stride_dod=1)
        result.append(dict(
            name=f"attn_bwd_preprocess[D{head_dim},bf16]", fn=fn,
            signature=_signature(fn, {"Out": "*bf16", "DO": "*bf16", "DELTA": "*fp32"}, floats, constexprs),
            constexprs=constexprs, num_warps=4, num_stages=1, default=head_dim >= 64,
            divisible_by_16=["stride_ob", "stride_oh", "stride_ot", "stride_dob", "stride_doh", "stride_dot"],
        ))  # fmt: skip
    return result


# --------------------------------------------------------------------------------------------
# LayerNorm: every configuration the launch rule may produce
# --------------------------------------------------------------------------------------------

_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


_DEFAULT_AOT_BLOCK_N = (1, 128, 1024, 2048, 4096, 8192)
# (x or dy, residual, weight) dtypes: fp32 training, and bf16 autocast (fp32 parameters, the
# residual stream in bf16 or fp32)
_DEFAULT_AOT_DTYPES = (
    ("fp32", "fp32", "fp32"), ("bf16", "bf16", "fp32"), ("bf16", "fp32", "fp32"),  # forward
    ("fp32", "", "fp32"), ("bf16", "", "fp32"),  # backward
    ("fp32", "", ""), ("bf16", "", ""),  # column sums
)  # fmt: skip


def layer_norm_specs(all_flag_combinations: bool = False) -> list[dict]:
    """Specs for gptforge/kernels/aot.py: the row kernels for every BLOCK_N from 1 to MAX_BLOCK_N, the
    long-row and column-sum kernels; every input dtype, parameters in the input's dtype or in
    fp32 (autocast), and half activations added to an fp32 residual stream.

    By default each configuration is listed once, with every optional input present (residual,
    weight, bias, incoming dh, parameter gradients): a flag only removes loads and arithmetic
    from the same tile, so these are the heaviest variants. ``all_flag_combinations=True`` lists
    every combination of flags too (about ten times as many). Specs marked ``default`` (a few
    block sizes, fp32 and bf16-with-fp32-parameters) are the ones a quick check compiles.
    """
    bools = (True, False) if all_flag_combinations else (True,)
    specs = []

    def add(name: str, fn, signature: dict, constexprs: dict, flags: dict, num_warps: int) -> None:
        suffix = "".join(f"_{k.lower()}" for k, v in flags.items() if v) if all_flag_combinations else ""
        # (x or dy, residual, weight) dtypes, "" where the kernel has no such argument
        dtypes = tuple(
            signature.get(arg, "").removeprefix("*") for arg in ("DY" if "DY" in signature else "X", "RES", "W")
        )
        row_kernel = fn in (fwd._layer_norm_fwd_kernel, bwd._layer_norm_bwd_kernel)
        default = (
            not all_flag_combinations
            and dtypes in _DEFAULT_AOT_DTYPES
            and (not row_kernel or constexprs["BLOCK_N"] in _DEFAULT_AOT_BLOCK_N)
        )
        specs.append(
            dict(name=name + suffix, fn=fn, signature=signature, constexprs={**constexprs, **flags},
                 num_warps=num_warps, num_stages=1, default=default)
        )  # fmt: skip

    row_kernel_shapes = [layer_norm_config(2**i) for i in range(MAX_BLOCK_N.bit_length())]
    long_rows = dict(CHUNK=LONG_ROW_CHUNK)
    for x_ty, res_ty, p_ty in _dtype_combinations():
        out_ty = res_ty if res_ty == "fp32" else x_ty  # the promoted dtype of x + residual
        tag = f"{x_ty}" + (f"_residual_{res_ty}" if res_ty != x_ty else "") + f"_params_{p_ty}"
        fwd_signature = {
            "X": f"*{x_ty}", "RES": f"*{res_ty}", "H": f"*{out_ty}", "Y": f"*{out_ty}", "W": f"*{p_ty}",
            "B": f"*{p_ty}", "MEAN": "*fp32", "RSTD": "*fp32", "stride_x": "i32", "stride_res": "i32",
            "n_rows": "i32", "n_cols": "i32", "eps": "fp32",
        }  # fmt: skip
        for residual, weight, bias in itertools.product(bools, repeat=3):
            flags = dict(HAS_RESIDUAL=residual, HAS_WEIGHT=weight, HAS_BIAS=bias)
            for block_m, block_n, num_warps in row_kernel_shapes:
                shape = dict(BLOCK_M=block_m, BLOCK_N=block_n)
                add(f"layer_norm_fwd_block_n{block_n}_{tag}", fwd._layer_norm_fwd_kernel, fwd_signature, shape, flags,
                    num_warps)  # fmt: skip
            add(f"layer_norm_fwd_long_rows_{tag}", fwd._layer_norm_fwd_long_rows_kernel, fwd_signature, long_rows,
                flags, LONG_ROW_NUM_WARPS)  # fmt: skip
        if res_ty != x_ty:
            continue  # the backward sees only h, y and their gradients, all in out_ty
        bwd_signature = {
            "DY": f"*{x_ty}", "H": f"*{x_ty}", "W": f"*{p_ty}", "MEAN": "*fp32", "RSTD": "*fp32",
            "DH_IN": f"*{x_ty}", "DH": f"*{x_ty}", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32",
            "stride_dy": "i32", "stride_h": "i32", "stride_dh_in": "i32", "n_rows": "i32", "n_cols": "i32",
        }  # fmt: skip
        for weight, dh_in in itertools.product(bools, repeat=2):
            flags = dict(HAS_WEIGHT=weight, HAS_DH_IN=dh_in)
            for block_m, block_n, num_warps in row_kernel_shapes:
                # past PARAM_GRADS_IN_ROW_KERNEL_MAX the column-sum kernel forms the sums
                sums = bools if block_n <= PARAM_GRADS_IN_ROW_KERNEL_MAX else (False,)
                for sum_dw, sum_db in itertools.product(sums, repeat=2):
                    add(f"layer_norm_bwd_block_n{block_n}_{tag}", bwd._layer_norm_bwd_kernel, bwd_signature,
                        dict(BLOCK_M=block_m, BLOCK_N=block_n), {**flags, "SUM_DW": sum_dw, "SUM_DB": sum_db},
                        num_warps)  # fmt: skip
            long_signature = {k: v for k, v in bwd_signature.items() if k not in ("DW_PARTIAL", "DB_PARTIAL")}
            add(f"layer_norm_bwd_long_rows_{tag}", bwd._layer_norm_bwd_long_rows_kernel, long_signature, long_rows,
                flags, LONG_ROW_NUM_WARPS)  # fmt: skip
    for x_ty in _TRITON_DTYPES.values():
        signature = {
            "DY": f"*{x_ty}", "H": f"*{x_ty}", "MEAN": "*fp32", "RSTD": "*fp32", "DW_PARTIAL": "*fp32",
            "DB_PARTIAL": "*fp32", "stride_dy": "i32", "stride_h": "i32", "n_rows": "i32", "n_cols": "i32",
            "rows_per_group": "i32",
        }  # fmt: skip
        for sum_dw, sum_db in itertools.product(bools, repeat=2):
            add(f"layer_norm_column_sums_{x_ty}", bwd._layer_norm_column_sums_kernel, signature,
                dict(BLOCK_M=COLUMN_SUMS_BLOCK_M, BLOCK_N=COLUMN_SUMS_BLOCK_N), dict(SUM_DW=sum_dw, SUM_DB=sum_db),
                COLUMN_SUMS_NUM_WARPS)  # fmt: skip
    return specs


def _dtype_combinations() -> list[tuple[str, str, str]]:
    """(x, residual, parameter) triton dtypes: same-dtype runs with parameters in that dtype or in
    fp32, and half activations beside an fp32 residual stream (either way round) with fp32 params."""
    combos = []
    for ty in _TRITON_DTYPES.values():
        combos += [(ty, ty, ty)] if ty == "fp32" else [(ty, ty, ty), (ty, ty, "fp32")]
    for half in ("fp16", "bf16"):
        combos += [(half, "fp32", "fp32"), ("fp32", half, "fp32")]
    return combos


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy: the row kernel at every tile the launch rule may pick
# --------------------------------------------------------------------------------------------


def linear_cross_entropy_specs() -> list[dict]:
    """The cross-entropy row kernel for each logits dtype, with and without the gradient pass, at
    every BLOCK_V ``lce.block_v`` may return (128 up to MAX_BLOCK_V); the largest is the default."""
    specs = []
    fn = lce._cross_entropy_rows_kernel
    tiles = [2**i for i in range(7, lce.MAX_BLOCK_V.bit_length())]
    for ty, tile, need_grad in itertools.product(_TRITON_DTYPES.values(), tiles, (True, False)):
        signature = {
            "LOGITS": f"*{ty}", "TARGETS": "*i64", "LOSS": "*fp32", "SCALE": "*fp32", "stride_row": "i32",
            "vocab": "i32", "ignore_index": "i32",
        }  # fmt: skip
        specs.append(dict(
            name=f"linear_cross_entropy_rows_block_v{tile}_{ty}{'' if need_grad else '_loss_only'}", fn=fn,
            signature=signature, constexprs=dict(BLOCK_V=tile, NEED_GRAD=need_grad), num_warps=lce.NUM_WARPS,
            num_stages=1, default=tile == lce.MAX_BLOCK_V, divisible_by_16=["stride_row"],
        ))  # fmt: skip
    return specs
