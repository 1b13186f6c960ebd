"""Training that survives faults and bad input, on the CPU (gloo, 2 ranks under torchrun):

- SIGTERM/SIGINT: every rank finishes its step, a checkpoint is written, exit 75; --resume continues
- a rank SIGKILLed under ``torchrun --max-restarts=1``: the group restarts from the newest
  checkpoint and ends with the same weights as an uninterrupted run
- damaged checkpoints are reported and skipped; none left is a clear error
- one run per out_dir (lock file), stale locks of dead runs are taken over
- NaN/inf loss: --nan_policy=skip drops the step, --nan_policy=stop checkpoints and exits 3
- bad input: see tests/test_bad_input.py
- --init_from: fine-tuning from a saved model directory, its shape and tokenizer checked

Faults are injected through test-only environment variables read by gptforge/train/faults.py:
GPT_FAULT_KILL_AT_STEP=k (SIGKILL as step k starts, first launch only), GPT_FAULT_NAN_AT_STEP=k
(the loss of step k becomes NaN) and GPT_FAULT_RANK=r (only rank r; default every rank).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gptforge.data import load_meta
from gptforge.gpt.io import save_model
from gptforge.gpt.model import build_model
from gptforge.train import checkpoint
from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.faults import EXIT_NONFINITE, EXIT_PREEMPTED, LOCK_FILE, RunLock
from gptforge.train.loop import Trainer, train
from tests.helpers import REPO, TINY, config, end_session, flags, read_metrics, read_until, run, start, torchrun_cmd

pytestmark = pytest.mark.usefixtures("one_thread")


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(checkpoint.list_checkpoints(out_dir)[-1] / "model.safetensors")


def child_with_rank(parent: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (its children carry RANK in their environment)."""
    for task in Path(f"/proc/{parent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(pid)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


# --- preemption ---


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_and_resume_continues(data_dir, tmp_path, signum):
    cmd = [sys.executable, "-m", "gptforge.train", *flags(data_dir, tmp_path, max_iters=10_000, eval_interval=10_000)]
    proc = start(cmd)
    try:
        read_until(proc, "step 3:")
        proc.send_signal(signum)
        output = proc.communicate(timeout=60)[0]
    finally:
        end_session(proc)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    stop_line = output.strip().splitlines()[-1]
    assert stop_line.startswith(f"received {signum.name} at step ") and stop_line.endswith("resume with --resume")
    step = int(stop_line.split(" at step ")[1].split(":")[0])
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [f"step_{step:07d}"]
    assert checkpoint.verify(checkpoint.list_checkpoints(tmp_path)[0]) is None
    assert not (tmp_path / LOCK_FILE).exists()  # released on the way out
    resumed = run([sys.executable, "-m", "gptforge.train", *flags(data_dir, tmp_path, max_iters=step + 2,
                                                            eval_interval=10_000), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{step:07d}'} at step {step}" in resumed.stdout
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == list(range(1, step + 3))  # no step twice, none missing


@pytest.mark.distributed
def test_ddp_ranks_agree_to_stop_when_one_rank_gets_sigterm(data_dir, tmp_path):
    proc = start([*torchrun_cmd(), *flags(data_dir, tmp_path, max_iters=10_000, eval_interval=10_000)])
    try:
        read_until(proc, "step 3:")
        os.kill(child_with_rank(proc.pid, 1), signal.SIGTERM)  # rank 1 only: rank 0 learns it from the flag
        output = proc.communicate(timeout=90)[0]
    finally:
        end_session(proc)
    assert "received SIGTERM at step " in output, output[-3000:]
    assert output.count("exitcode  : 75") == 2 or "exitcode: 75" in output  # torchrun's report of both ranks
    ckpts = checkpoint.list_checkpoints(tmp_path)
    assert len(ckpts) == 1 and checkpoint.verify(ckpts[0]) is None
    assert not (tmp_path / LOCK_FILE).exists()


# --- elastic restart ---


@pytest.mark.distributed
def test_elastic_restart_after_a_rank_is_killed_matches_an_uninterrupted_run(data_dir, tmp_path):
    common = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, dropout=0.1)
    full, crashed = tmp_path / "full", tmp_path / "crashed"
    reference = run([*torchrun_cmd(), *flags(data_dir, full, **common)], timeout=180)
    assert reference.returncode == 0, reference.stderr[-3000:]
    # the same command, restarted by torchrun after rank 1 dies as step 6 begins: resumes at 4
    proc = run([*torchrun_cmd("--max-restarts=1"), *flags(data_dir, crashed, **common)], timeout=240,
               env=dict(GPT_FAULT_KILL_AT_STEP="6", GPT_FAULT_RANK="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torchelastic restart 1" in proc.stdout and "at step 4" in proc.stdout
    a, b = final_weights(full), final_weights(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, fp32 on the CPU
    assert [r["step"] for r in read_metrics(crashed) if "loss" in r] == list(range(1, 9))


# --- checkpoints ---


def test_damaged_checkpoints_are_reported_and_skipped(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=4, eval_interval=2, keep_last=3), log=lambda *_: None)
    step2, step4 = checkpoint.list_checkpoints(tmp_path)
    weights = step4 / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    proc = run([sys.executable, "-m", "gptforge.train", *flags(data_dir, tmp_path, max_iters=5, eval_interval=2),
                "--resume", "--keep_last=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_0000004 is unusable (model.safetensors does not match its sha256" in proc.stdout
    assert f"falling back to {step2}" in proc.stdout and "at step 2" in proc.stdout
    # with every checkpoint damaged, resuming stops with one clear line
    for ckpt in checkpoint.list_checkpoints(tmp_path):
        state = ckpt / "state.pt"
        state.write_bytes(b"\0" * state.stat().st_size)  # corrupted, same size
    proc = run([sys.executable, "-m", "gptforge.train", *flags(data_dir, tmp_path, max_iters=5), "--resume"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "no usable checkpoint" in proc.stderr and "state.pt does not match its sha256" in proc.stderr


def test_every_torch_load_is_weights_only():
    sources = list((REPO / "gptforge").rglob("*.py"))
    calls = [(p, line) for p in sources for line in p.read_text().splitlines() if "torch.load(" in line]
    assert calls and all("weights_only=True" in line for _, line in calls), calls


# --- one run per out_dir ---


def test_the_lock_refuses_a_live_run_and_takes_over_a_dead_one(tmp_path):
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps(dict(pid=os.getppid(), host=socket.gethostname())))  # alive
    with pytest.raises(ConfigError, match=f"in use by another training run \\(pid {os.getppid()}"):
        RunLock(tmp_path).acquire()
    lock.write_text(json.dumps(dict(pid=os.getppid(), host="elsewhere")))  # cannot tell: refused
    with pytest.raises(ConfigError, match="on elsewhere"):
        RunLock(tmp_path).acquire()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(json.dumps(dict(pid=dead.pid, host=socket.gethostname())))
    messages = []
    held = RunLock(tmp_path)
    held.acquire(log=messages.append)
    assert "stale lock" in messages[0] and json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


# --- non-finite losses ---


def test_nan_policy_skip_leaves_the_weights_alone(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_FAULT_NAN_AT_STEP", "3")
    trainer = Trainer(config(data_dir, tmp_path, nan_policy="skip", max_iters=5, eval_interval=5),
                      log=lambda *_: None)
    trainer.train_step(), trainer.train_step()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam_steps = [s["step"].item() for s in trainer.optimizer.state.values()]
    trainer.train_step()  # step 3: NaN loss
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert [s["step"].item() for s in trainer.optimizer.state.values()] == adam_steps
    assert trainer.step == 3 and trainer.skipped_steps == 1
    assert trainer.history[-1] == {"step": 3, "skipped": "non-finite loss or gradient norm", "skipped_steps": 1}
    trainer.close()
    # the same through run(): the skip is in metrics.jsonl, and the count in every later log row
    train(config(data_dir, tmp_path, nan_policy="skip", max_iters=5, eval_interval=5, overwrite=True),
          log=lambda *_: None)
    rows = read_metrics(tmp_path)
    assert {"step": 3, "skipped": "non-finite loss or gradient norm", "skipped_steps": 1} in rows
    assert [r.get("skipped_steps") for r in rows if "loss" in r] == [None, None, 1, 1, 1]  # step 3 counts itself
    assert torch.isfinite(torch.tensor(rows[-1]["val_loss"]))


def test_nan_policy_stop_checkpoints_the_last_good_step(data_dir, tmp_path):
    proc = run([sys.executable, "-m", "gptforge.train", *flags(data_dir, tmp_path, max_iters=10, eval_interval=10)],
               env=dict(GPT_FAULT_NAN_AT_STEP="3"))
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-3000:]
    assert proc.stderr.startswith("stopped: non-finite loss or gradient norm at step 3")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    (ckpt,) = checkpoint.list_checkpoints(tmp_path)
    assert ckpt.name == "step_0000002" and f"(step 2, finite weights) is checkpointed in {ckpt}" in proc.stderr
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path).values())
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.distributed
def test_ddp_ranks_agree_to_skip_a_nan_on_one_rank(data_dir, tmp_path):
    proc = run([*torchrun_cmd(), *flags(data_dir, tmp_path, max_iters=5, eval_interval=5, nan_policy="skip")],
               env=dict(GPT_FAULT_NAN_AT_STEP="3", GPT_FAULT_RANK="1"), timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "skipped" in r] == [3]
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path).values())


# --- fine-tuning from saved weights ---


def test_init_from_a_model_directory_fine_tunes_it(data_dir, tmp_path):
    tokenizer = load_meta(data_dir / "shakespeare_char")["tokenizer"]
    pretrained = build_model(TrainConfig(n_layer=1, n_head=2, n_embd=16, block_size=64).model_config(65))
    save_model(pretrained, tmp_path / "model", tokenizer)
    logs: list[str] = []
    # lr 0: the weights stay those loaded, so the checkpoint shows what was loaded
    train(config(data_dir, tmp_path / "run", init_from=str(tmp_path / "model"), learning_rate=0.0, min_lr=0.0,
                 max_iters=2, eval_interval=2), log=logs.append)
    assert any("the weights' shape overrides the config: n_layer 2 -> 1, n_embd 32 -> 16" in m for m in logs)
    saved = checkpoint.load_checkpoint(checkpoint.list_checkpoints(tmp_path / "run")[-1]).model.state_dict()
    for key, value in pretrained.state_dict().items():
        want = value[: TINY["block_size"]] if key == "transformer.wpe.weight" else value  # cropped context
        assert torch.equal(saved[key], want), key
