"""Everything that needs a GPU, in one command of under ten minutes:

    python benchmarks/gpu_suite.py          # or: make gpu-suite

1. the kernel parity tests, run natively on the GPU;
2. the kernel benchmarks (every available backend, with the card's measured peaks);
3. a GPT-2 124M training-step benchmark with MFU, and generation tokens/s with and without
   the KV cache (char and GPT-2 124M shapes);
4. the ahead-of-time resource report of our Triton kernels.

It prints a table last and writes ``benchmarks/results/<gpu>-<date>.json`` (device, versions,
date, every figure). Runs on a bare GPU image (no deepspeed, no network): what is missing is
skipped with a note. Without CUDA it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
PARITY_TESTS = ["tests/test_kernels_interface.py", "tests/test_attention_triton.py",
                "tests/test_layer_norm_triton.py", "tests/test_model.py"]
BENCHMARKS = ["benchmarks/test_kernels.py", "benchmarks/test_train_step.py", "benchmarks/test_generation.py"]


def run(cmd: list[str], timeout: int, env: dict | None = None) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, combined output, seconds); output streams as it comes."""
    start = time.perf_counter()
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    lines: list[str] = []
    try:
        deadline = start + timeout
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
            if time.perf_counter() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
        code = proc.wait(timeout=max(1, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.kill()
        lines.append(f"\n[gpu_suite] timed out after {timeout} s\n")
        code = None
    return code, "".join(lines), time.perf_counter() - start


def pytest_counts(output: str) -> dict[str, int]:
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", tail)}


def versions() -> dict[str, str]:
    import torch

    found = dict(python=platform.python_version(), torch=torch.__version__, cuda=str(torch.version.cuda))
    for name in ("triton", "flash_attn", "deepspeed"):
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = "not installed"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-parity", action="store_true", help="only the benchmarks")
    parser.add_argument("--out", type=Path, default=None, help="results file (default: benchmarks/results/...)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_suite needs a CUDA GPU, and torch {torch.__version__} sees none here. "
              "On the CPU, run `make bench` (benchmarks) and `make test` (parity under Triton's interpreter).",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    report: dict = dict(device=gpu, date=date, versions=versions(), steps={})
    print(f"gpu_suite on {gpu}, {report['versions']}")
    env = {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)

    if not args.skip_parity:
        tests = [t for t in PARITY_TESTS if (REPO / t).is_file()]
        code, out, secs = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], 240, env)
        report["steps"]["parity"] = dict(exit_code=code, seconds=round(secs, 1), counts=pytest_counts(out),
                                         files=tests)

    with tempfile.TemporaryDirectory() as tmp:
        bench_json = Path(tmp) / "bench.json"
        code, out, secs = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *BENCHMARKS,
                               f"--benchmark-json={bench_json}"], 360, env)
        rows = []
        if bench_json.is_file():
            for b in json.loads(bench_json.read_text())["benchmarks"]:
                if "value" in b.get("extra_info", {}):
                    rows.append(b["extra_info"])
        report["steps"]["benchmarks"] = dict(exit_code=code, seconds=round(secs, 1), counts=pytest_counts(out))
        report["results"] = rows

    aot = REPO / "kernels" / "aot.py"
    if aot.is_file():
        code, out, secs = run([sys.executable, "-m", "kernels.aot"], 120, env)
        report["steps"]["aot"] = dict(exit_code=code, seconds=round(secs, 1), report=out.strip().splitlines()[-40:])

    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = args.out or RESULTS_DIR / f"{slug}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")

    sys.path.insert(0, str(REPO))
    from benchmarks.common import Result, summary_tables

    print("\n" + "=" * 100)
    for name, step in report["steps"].items():
        status = "timed out" if step["exit_code"] is None else f"exit {step['exit_code']}"
        print(f"{name:<11} {status:<10} {step['seconds']:>7.1f} s  {step.get('counts', '')}")
    results = [Result(r["group"], r["name"], r["value"], r["unit"], r.get("baseline")) for r in report["results"]]
    print(summary_tables(results) if results else "no benchmark results")
    print(f"\nwritten to {path}")
    failed = any(step["exit_code"] not in (0,) for step in report["steps"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
