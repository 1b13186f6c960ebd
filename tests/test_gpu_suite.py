"""The GPU suite (benchmarks/gpu_suite.py) proven on the CPU, where CI runs.

- Its rehearsal drives every stage at toy sizes, with Triton through its interpreter and one
  stage planted to overrun its share and one to crash, inside a simulated GPU image (deepspeed,
  flash_attn, transformers and matplotlib cannot be imported): the deadline holds, the killed
  stage leaves no process behind, every figure measured before a kill or a crash is kept, the
  stages after them run, and ``--report`` rebuilds the table from results.jsonl alone.
- ``kill -9`` of the suite mid-run: its stage dies with it, and what was measured is reported.
- The pieces: results.jsonl survives a line cut short, the budget passes on what a stage leaves,
  autotune winners are saved and reused, and each candidate config can be run alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_suite
from benchmarks.suite import results

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "benchmarks" / "gpu_suite.py"
REHEARSAL_BUDGET_S = 200
# What the GPU machine's image lacks (it has torch, triton, pytest and pytest-benchmark).
MISSING_ON_GPU_IMAGE = ("deepspeed", "flash_attn", "transformers", "matplotlib")
SIMULATED_IMAGE = f"""
# Test scaffolding: make the packages the GPU image lacks impossible to import.
import importlib.abc
import sys

class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING_ON_GPU_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU image)", name=name)
        return None

sys.meta_path.insert(0, _Missing())
"""


@pytest.fixture
def gpu_image_env(tmp_path) -> dict:
    """An environment in which every Python process (the suite's stages too) lacks the packages
    the GPU image lacks: a sitecustomize on PYTHONPATH installs a finder that refuses them."""
    site = tmp_path / "simulated_gpu_image"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SIMULATED_IMAGE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    env.pop("TRITON_INTERPRET", None)  # the suite sets it for its stages itself
    return env


def _records(out: Path) -> list[dict]:
    records, problems = results.read(out / results.RESULTS_FILE)
    assert not problems, problems
    return records


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie is dead, only not yet reaped


def test_rehearsal_in_the_simulated_gpu_image(tmp_path, gpu_image_env):
    out = tmp_path / "out"
    start = time.monotonic()
    # 200 s: it needs about 75 s alone, and make test runs it beside another test worker on the
    # same cores; the stages end when done, so a larger budget costs time only where needed.
    done = subprocess.run([sys.executable, str(SUITE), "--rehearse", "--budget", str(REHEARSAL_BUDGET_S),
                           "--out", str(out)], env=gpu_image_env, capture_output=True, text=True,
                          timeout=REHEARSAL_BUDGET_S + 50)  # fmt: skip
    elapsed = time.monotonic() - start
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert elapsed < REHEARSAL_BUDGET_S + 10, f"the {REHEARSAL_BUDGET_S} s budget was overrun: {elapsed:.0f} s"

    records = _records(out)
    stages = {r["stage"]: r for r in records if r["kind"] == "stage"}
    planned = [p.name for p in gpu_suite.REHEARSAL_PLAN]
    assert list(stages) == planned
    for name in planned:  # at least one figure from every stage, the planted ones included
        assert any(r["kind"] in ("figure", "check") and r["stage"] == name for r in records), name
        assert stages[name]["seconds"] <= stages[name]["share"] + 3, stages[name]
    statuses = {name: s["status"] for name, s in stages.items()}
    assert statuses == {**dict.fromkeys(planned, "ok"), "overrun": "killed", "crash": "crashed"}

    # the overrun stage and the grandchild it started are gone
    overrun = next(r for r in records if r.get("name") == "before the overrun")
    assert overrun["pids"] and not any(_alive(pid) for pid in overrun["pids"]), overrun["pids"]
    assert "planted crash" in log

    # every figure is marked as a rehearsal, and the stages saw the simulated image
    figures = [r for r in records if r["kind"] in ("figure", "check", "note")]
    assert all(r["rehearsal"] for r in figures)
    assert all(r["versions"]["deepspeed"] == "not installed" for r in figures)
    assert any(r["kind"] == "note" and r["name"] == "flash_attn" and "not installed" in r["note"] for r in records)
    checks = [r for r in records if r["kind"] == "check"]
    assert checks and all(c["passed"] for c in checks)
    assert any(r["stage"] == "attention" and r["group"] == "autotune winners" for r in figures)
    # the variant race: every variant of the Hopper lists (the interpreter's) raced and checked
    from gptforge.kernels.triton import configs

    variants = configs.race_variants(configs.INTERPRETER_GENERATION)
    raced = {r["name"] for r in figures if r["stage"] == "attention" and r["name"].startswith("triton[")}
    assert raced == {f"triton[{v}]" for v in variants}
    assert {r["name"].split(": ")[1] for r in figures if r.get("group") == "attention winners"} == {
        "fastest triton variant", "fastest of all"}  # fmt: skip
    assert {c["note"] for c in checks if c["note"].startswith("variant ")} == {f"variant {v}" for v in variants}
    assert json.loads((out / "tuning.json").read_text())["kernels"]

    # the report, rebuilt from results.jsonl alone, has every stage and the kept figures
    (out / "suite.log").unlink()
    for report in out.glob("rehearsal-*"):
        report.unlink()
    rebuilt = subprocess.run([sys.executable, str(SUITE), "--report", str(out)], env=gpu_image_env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    for text in (*planned, "before the overrun", "before the crash", "killed", "crashed", "copy (read + write)"):
        assert text in rebuilt.stdout, text
    assert len(list(out.glob("rehearsal-*"))) == 2  # .json and .txt, and nothing in benchmarks/results
    assert len(list(out.iterdir())) <= 8


def test_kill_9_of_the_suite_keeps_what_was_measured(tmp_path, gpu_image_env):
    out = tmp_path / "out"
    suite, pids = _start_overrun(out, gpu_image_env)
    try:
        suite.send_signal(signal.SIGKILL)
        suite.wait(timeout=10)
        for _ in range(100):  # the stage's watchdog sees the suite gone and kills its group
            if not any(_alive(pid) for pid in pids):
                break
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in pids), "the stage outlived the suite"
    finally:
        if suite.poll() is None:
            os.killpg(suite.pid, signal.SIGKILL)
        suite.stdout.close()

    rebuilt = subprocess.run([sys.executable, str(SUITE), "--report", str(out)], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "copy (read + write)" in rebuilt.stdout and "before the overrun" in rebuilt.stdout
    assert "cut short" in rebuilt.stdout  # the overrun stage had started, and never ended


def _start_overrun(out: Path, env: dict) -> tuple[subprocess.Popen, list[int]]:
    """The rehearsal's card and overrun stages, started until the overrun stage is running;
    returns the suite's process and the pids the overrun stage recorded (itself, its child)."""
    suite = subprocess.Popen([sys.executable, str(SUITE), "--rehearse", "--only", "card,overrun", "--budget", "60",
                              "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)  # fmt: skip
    for _ in range(600):
        time.sleep(0.1)
        if (out / results.RESULTS_FILE).is_file():
            found = [r for r in _records(out) if r.get("name") == "before the overrun"]
            if found:
                return suite, found[0]["pids"]
    os.killpg(suite.pid, signal.SIGKILL)
    raise AssertionError("the overrun stage never started")


def test_sigterm_stops_the_stage_and_reports(tmp_path, gpu_image_env):
    out = tmp_path / "out"
    suite, pids = _start_overrun(out, gpu_image_env)
    try:
        suite.send_signal(signal.SIGTERM)
        output, _ = suite.communicate(timeout=30)
    finally:
        if suite.poll() is None:
            os.killpg(suite.pid, signal.SIGKILL)
    assert suite.returncode == 1, output[-3000:]
    assert not any(_alive(pid) for pid in pids)
    stages = {r["stage"]: r["status"] for r in _records(out) if r["kind"] == "stage"}
    assert stages == {"card": "ok", "overrun": "interrupted"}
    assert "before the overrun" in output and "copy (read + write)" in output  # the table, printed last


def test_modules_import_in_the_simulated_gpu_image(gpu_image_env):
    """Every module the suite and its stages import, where the GPU image's packages are missing."""
    code = f"""
import importlib, sys
for name in ("benchmarks.gpu_suite", "benchmarks.suite.stage", "benchmarks.suite.card", "benchmarks.suite.parity",
             "benchmarks.suite.kernel_bench", "benchmarks.suite.model", "benchmarks.suite.planted"):
    importlib.import_module(name)
from gptforge import kernels
assert "flash_attn" not in kernels.available_backends("attention", "cpu")
loaded = [m for m in {MISSING_ON_GPU_IMAGE!r} if m in sys.modules]
assert not loaded, loaded
try:
    import deepspeed
except ModuleNotFoundError:
    print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], env=gpu_image_env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


# --------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------


def test_results_survive_a_line_cut_short(tmp_path):
    path = tmp_path / results.RESULTS_FILE
    results.append(path, dict(kind="suite", budget=60, stages=["card"], rehearsal=True))
    results.append(path, dict(kind="figure", stage="card", group="g", name="copy", value=12.5, unit="GB/s",
                              device="d", versions={"torch": "x"}, rehearsal=True))  # fmt: skip
    with open(path, "a") as f:
        f.write('{"kind": "figure", "stage": "card", "va')  # a kill in the middle of a write
    records, problems = results.read(path)
    assert [r["kind"] for r in records] == ["suite", "figure"]
    assert len(problems) == 1 and "line 3" in problems[0]
    text, written, _ = results.write_report(tmp_path, into=[tmp_path / "elsewhere"])
    assert "copy" in text and "12.5" in text and "line 3" in text
    # a rehearsal's report goes beside its results only, never among real results
    assert {p.suffix for p in written} == {".json", ".txt"} and all(p.parent == tmp_path for p in written)
    assert not (tmp_path / "elsewhere").exists()


def test_report_of_a_read_only_copy(tmp_path):
    """--report of a run fetched from the GPU machine: a folder the report cannot be written
    into (read-only; /proc stands in for one, since root writes anywhere else) is noted, not
    fatal, and the report still goes where it can."""
    results.append(tmp_path / results.RESULTS_FILE, dict(kind="figure", stage="card", group="g", name="copy",
                                                         value=1.0, unit="GB/s", device="Test GPU", versions={},
                                                         rehearsal=False))  # fmt: skip
    text, written, _ = results.write_report(tmp_path, into=[Path("/proc/gpu_suite_report"), tmp_path / "kept"])
    assert [p.parent for p in written] == [tmp_path / "kept"] * 2 and written[0].name.startswith("test-gpu-")
    assert "was not written into /proc/gpu_suite_report" in text


def test_the_budget_passes_on_what_a_stage_leaves():
    plan = [gpu_suite.Plan("a", 1, 0), gpu_suite.Plan("b", 1, 0), gpu_suite.Plan("c", 2, 0)]
    assert gpu_suite.share_of(plan, 0, 100) == pytest.approx(25)
    # "a" used 5 of its 25 s: "b" gets a quarter... of 95 s over the weights left (1 + 2)
    assert gpu_suite.share_of(plan, 1, 95) == pytest.approx(95 / 3)
    assert gpu_suite.share_of(plan, 2, 40) == pytest.approx(40)  # the last stage takes all that is left
    assert gpu_suite.share_of(plan, 2, -3) == 0


def test_bad_arguments_are_clear_errors():
    for args, expected in ((["--only", "card,nope"], "unknown stage(s) nope"), (["--budget", "3"], "--budget")):
        done = subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and expected in done.stderr, done.stderr
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(SUITE), "--budget", "30"], capture_output=True, text=True,
                              timeout=60, env={k: v for k, v in os.environ.items() if k != "OUT"})  # fmt: skip
        assert done.returncode == 2 and "--rehearse" in done.stderr


@pytest.fixture
def tuning():
    """gptforge.kernels.triton.tuning with a limit of two candidates, restored to its defaults afterwards."""
    from gptforge.kernels.triton import tuning

    tuning.forget()
    tuning.limit_candidates(2)
    yield tuning
    tuning.limit_candidates(None)
    tuning.forget()


def _attention(D: int = 16, T: int = 24) -> torch.Tensor:
    """Our attention forward on fresh fp32 inputs, through the triton backend."""
    from gptforge import kernels

    q, k, v = (torch.randn(1, 2, T, D) for _ in range(3))
    return kernels.attention(q, k, v, causal=True, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's tuning path")
def test_autotune_winners_are_saved_and_reused(tmp_path, tuning):
    _attention()
    tuned = tuning.winners(tuned_here=True)
    assert [w["kernel"] for w in tuned] == ["attn_fwd[D16,fp32,sm90]"]
    assert len(tuned[0]["timings_ms"]) == 2  # two candidates timed, no more
    assert tuned[0]["key_names"] == ["BH_KEY", "T_Q_KEY", "T_K_KEY", "CAUSAL"]
    assert tuned[0]["key"][:4] == [2, 32, 32, True]
    path = tmp_path / "tuning.json"
    tuning.save(path, device="test device")

    tuning.forget()
    assert tuning.load(path, device="another device")[0] == 0  # another card's timings say nothing here
    count, message = tuning.load(path, device="test device")
    assert count == 1, message
    _attention()  # the same key: the saved winner runs, nothing is timed
    assert tuning.winners(tuned_here=True) == []
    assert [w["label"] for w in tuning.winners()] == [tuned[0]["label"]]
    _attention(T=100)  # a new key is tuned as usual
    assert len(tuning.winners(tuned_here=True)) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's tuning path")
def test_only_candidate_runs_that_config_alone(tuning):
    from gptforge import kernels
    from gptforge.kernels import reference
    from gptforge.kernels.triton.configs import attention_configs

    candidates = [f"M{m} N{n} w{w} s{s}" for m, n, w, s, _ in attention_configs("sm90", "fwd", 16, True, False)[:2]]
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    expected = reference.attention(q, k, v, True, 0.0, 0.25)
    for index in (0, 1, 7):  # past the end of the list: its last config
        with tuning.only_candidate(index):
            out = kernels.attention(q, k, v, causal=True, backend="triton")
            (fwd,) = [t for t in tuning._tuners.values() if t.name.startswith("attn_fwd")]
            assert [tuning.label(c) for c in fwd.tuner.configs] == [candidates[min(index, 1)]]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert tuning.winners() == []  # one config each: nothing was timed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter's tuning path")
def test_a_saved_winner_that_is_no_longer_a_candidate_is_tuned_again(tmp_path, tuning):
    _attention()
    (entry,) = tuning.winners()
    path = tmp_path / "tuning.json"
    tuning.save(path, device="test device")
    saved = json.loads(path.read_text())
    stale = dict(kwargs=dict(BLOCK_M=16, BLOCK_N=16), num_warps=1, num_stages=1)  # in no candidate list
    saved["kernels"][entry["kernel"]][0]["config"] = stale
    path.write_text(json.dumps(saved))

    tuning.forget()
    assert tuning.load(path, device="test device")[0] == 1
    _attention()
    (retuned,) = tuning.winners(tuned_here=True)
    assert retuned["key"] == entry["key"] and retuned["config"] != stale
    tuning.save(path, device="test device")
    assert stale not in [row["config"] for row in json.loads(path.read_text())["kernels"][entry["kernel"]]]
