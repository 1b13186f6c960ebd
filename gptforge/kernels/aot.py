"""Ahead-of-time compile every Triton kernel configuration for sm_80 and sm_90, without a GPU.

    python -m gptforge.kernels.aot                 # table: kernel, arch, registers, spills, shared memory, wgmma, TMA
    python -m gptforge.kernels.aot --all           # every autotune configuration, not only the defaults
    python -m gptforge.kernels.aot --arch 90 -j 4  # one architecture, four compiler processes

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the whole compiler
down to a cubin with the ``ptxas`` shipped in the triton wheel, so resource problems (register
spills, shared memory beyond the chip, no tensor-core ``wgmma`` on Hopper, no bulk tensor copy
``cp.async.bulk.tensor`` where a kernel was meant to use TMA) show up on a laptop. Registers
and spills come from ``cuobjdump -res-usage`` on the cubin (also in the wheel); dynamic shared
memory from ``compiled.metadata.shared``; ``wgmma`` and the bulk tensor copy from the PTX. A
kernel at the 255-register cap is marked in the table.

``gptforge/kernels/aot_specs.py`` lists what to compile, one dict per configuration a launcher may
use, with keys ``name`` (str), ``fn`` (the ``@triton.jit`` function), ``signature`` (arg name ->
triton type such as ``"*bf16"``, ``"i32"``, ``"fp32"`` for every non-constexpr argument),
``constexprs`` (name -> value; may also pin an ordinary argument, e.g. a unit stride, as the JIT
does at run time), ``num_warps`` and ``num_stages``; optionally ``divisible_by_16`` (integer
argument names the JIT would see as multiples of 16, such as the row strides of contiguous
tensors; pointers are always taken as 16-byte aligned), ``default`` (False for
configurations that only ``--all`` compiles; absent means True), ``archs`` (the architectures
it is compiled for; absent means all) and ``variant`` (a name the table shows).

Under ``TRITON_INTERPRET=1`` (the test suite on a machine without a GPU) ``@triton.jit``
returns interpreter objects that cannot be compiled, so :func:`report` always compiles in
child processes started without that variable; they also let the compiles run in parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# A thread's register ceiling: a kernel compiled at it has no room left, and ptxas has likely
# traded instructions (rematerialisation) to stay there.
REGISTER_CAP = 255


@dataclasses.dataclass
class Result:
    name: str
    arch: int
    num_warps: int = 0
    num_stages: int = 0
    registers: int = -1
    spill_bytes: int = -1  # STACK + LOCAL bytes per thread from cuobjdump
    shared: int = -1  # dynamic shared memory in bytes
    wgmma: bool = False
    tma: bool = False  # the PTX moves tiles with cp.async.bulk.tensor (tensor descriptors)
    variant: str = ""
    error: str | None = None

    @property
    def at_cap(self) -> bool:
        return self.registers >= REGISTER_CAP

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_bytes == 0 and self.shared <= SHARED_LIMIT[self.arch]


def toolchain_missing() -> str | None:
    """None when the AOT toolchain (triton's CUDA backend, ptxas, cuobjdump) is present, else why not."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        return f"triton's compiler is not importable: {err}"
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for tool in ("ptxas", "cuobjdump"):
        if not (bin_dir / tool).is_file():
            return f"{tool} not found in {bin_dir} (it ships with the triton wheel for x86-64 Linux)"
    return None


def collect_specs() -> list[dict]:
    """Every spec of every kernel, in a stable order."""
    from gptforge.kernels.aot_specs import all_specs  # imports triton: only after toolchain_missing() said yes

    return all_specs()


def _jit_function(fn):
    """The compilable JITFunction behind ``fn``, even if this process runs the interpreter."""
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else JITFunction(fn.fn)


def _ast_source(spec: dict):
    from triton.compiler import ASTSource

    fn = _jit_function(spec["fn"])
    constexprs = dict(spec["constexprs"])
    signature = {}
    for name in fn.arg_names:  # the full signature in argument order; constexprs typed as such
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in spec["signature"]:
            signature[name] = spec["signature"][name]
        else:
            raise ValueError(f"{spec['name']}: argument {name!r} is in neither signature nor constexprs")
    # What the JIT tells the compiler at launch: torch allocations are 16-byte aligned, and which
    # integers (strides, usually) are multiples of 16. Without it, loads would not be vectorised.
    aligned = set(spec.get("divisible_by_16", ()))
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if signature[n].startswith("*") or (n in aligned and signature[n] != "constexpr")
    }
    try:
        return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    except (TypeError, AttributeError):  # an older attrs format: compile without alignment hints
        return ASTSource(fn, signature, constexprs=constexprs)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes) of the kernel in ``cubin``, read with cuobjdump."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    return int(fields.get("REG", -1)), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))


def compile_spec(spec: dict, arch: int) -> Result:
    """Compile one spec for ``sm_<arch>`` and measure it; compiler errors go into ``error``."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = Result(spec["name"], arch, spec["num_warps"], spec["num_stages"], variant=spec.get("variant", ""))
    try:
        options = dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"])
        compiled = triton.compile(_ast_source(spec), target=GPUTarget("cuda", arch, 32), options=options)
        result.registers, result.spill_bytes = _resource_usage(compiled.asm["cubin"])
        result.shared = int(compiled.metadata.shared)
        result.wgmma = "wgmma" in compiled.asm["ptx"]
        result.tma = "cp.async.bulk.tensor" in compiled.asm["ptx"]
    except Exception as err:  # noqa: BLE001 -- reported per configuration, not fatal to the table
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return result


def _selected(spec: dict, name_filter: str, everything: bool) -> bool:
    return name_filter in spec["name"] and (everything or spec.get("default", True))


def _compile_shard(shard: int, shards: int, archs: tuple[int, ...], name_filter: str, everything: bool) -> list[Result]:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton >= 3.9 warns when unset
    specs = [spec for spec in collect_specs() if _selected(spec, name_filter, everything)]
    jobs = [(spec, arch) for spec in specs for arch in archs if arch in spec.get("archs", archs)]
    return [compile_spec(spec, arch) for i, (spec, arch) in enumerate(jobs) if i % shards == shard]


def report(
    archs: tuple[int, ...] = ARCHS, jobs: int | None = None, name_filter: str = "", everything: bool = True
) -> list[Result]:
    """Compile the specs whose name contains ``name_filter`` (all of them, or with
    ``everything=False`` only the default ones) for every arch, in ``jobs`` child processes
    started without TRITON_INTERPRET."""
    jobs = jobs or max(1, min(8, os.cpu_count() or 1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "gptforge.kernels.aot", "--json", "--filter", name_filter, "--arch"]
    command += [str(a) for a in archs] + (["--all"] if everything else [])
    children = [
        subprocess.Popen(
            command + ["--shard", f"{i}/{jobs}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=root,
        )
        for i in range(jobs)
    ]
    results = []
    for child in children:
        out, err = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"AOT compile worker failed (exit {child.returncode}):\n{err[-4000:]}")
        results.extend(Result(**r) for r in json.loads(out))
    return sorted(results, key=lambda r: (r.name, r.arch))


def format_table(results: list[Result]) -> str:
    header = ("kernel", "arch", "warps", "stages", "regs", "spill B", "smem KB", "limit KB", "wgmma", "tma", "status")
    rows = []
    for r in results:
        status = "ok" if r.ok else (r.error or ("SPILLS" if r.spill_bytes else "SMEM > LIMIT"))
        status += " (at the register cap)" if r.ok and r.at_cap else ""
        rows.append((
            r.name, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages), str(r.registers), str(r.spill_bytes),
            f"{r.shared / 1024:.1f}", str(SHARED_LIMIT[r.arch] // 1024), "yes" if r.wgmma else "no",
            "yes" if r.tma else "no", status,
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptforge.kernels.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT))
    parser.add_argument("-j", "--jobs", type=int, default=None, help="compiler processes (default: CPUs, max 8)")
    parser.add_argument("--filter", default="", help="only specs whose name contains this string")
    parser.add_argument("--all", action="store_true", help="every configuration, not only the default ones")
    parser.add_argument("--json", action="store_true", help="compile in this process and print JSON (internal)")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th job starting at i (with --json)")
    args = parser.parse_args(argv)
    missing = toolchain_missing()
    if missing:
        print(f"AOT compile unavailable: {missing}", file=sys.stderr)
        return 2
    if args.json:
        shard, shards = (int(x) for x in args.shard.split("/"))
        results = _compile_shard(shard, shards, tuple(args.arch), args.filter, args.all)
        print(json.dumps([dataclasses.asdict(r) for r in results]))
        return 0
    results = report(tuple(args.arch), args.jobs, args.filter, args.all)
    print(format_table(results))
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(bad)}/{len(results)} configurations ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
