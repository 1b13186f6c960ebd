"""Runs that meet a fault and must end well: a resume takes the saved config and writes where
the command says, non-finite weights are never checkpointed, a full disk while checkpointing keeps
the earlier checkpoint, an unsafe or unloadable checkpoint is damaged (ranks fall back
together), and a torn metrics line does not stop a resume. (Split from tests/test_bad_input.py,
whose table covers bad command lines and data.)"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from gptforge import kernels
from gptforge.train import checkpoint
from gptforge.train.__main__ import main as train_main
from gptforge.train.faults import EXIT_NONFINITE, MAX_SKIPPED_IN_A_ROW
from tests.helpers import flags, read_metrics, run, torchrun_cmd

pytestmark = pytest.mark.usefixtures("one_thread")


def test_resume_takes_the_saved_config_and_says_what_changes(data_dir, tmp_path, capsys):
    """Resuming without the original flags continues the saved run as it was; a key that may
    change is applied and printed, one line per key."""
    run = tmp_path / "run"
    first = flags(data_dir, run, max_iters=2, eval_interval=2, learning_rate=0.004, min_lr=0.0004)
    assert train_main(first) == 0
    capsys.readouterr()
    # only the essentials: no learning rate, batch or model flags, and two changes
    assert train_main([f"--data_dir={data_dir}", f"--out_dir={run}", "--resume", "--max_iters=4",
                       "--learning_rate=0.002", "--progress=false", "--num_samples=0"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "resume: max_iters 2 -> 4" in out and "resume: learning_rate 0.004 -> 0.002" in out
    assert "min_lr" not in out and "batch_size" not in out  # taken from the run, unchanged
    saved = json.loads((checkpoint.list_checkpoints(run)[-1] / "trainer.json").read_text())["config"]
    assert (saved["batch_size"], saved["n_embd"], saved["min_lr"], saved["learning_rate"]) == (4, 32, 0.0004, 0.002)


def test_resume_writes_where_this_command_says(data_dir, tmp_path, capsys):
    """A run folder copied elsewhere is continued in the copy, not in the folder it was saved from;
    the same --input written another way is the same input."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Now is the winter of our discontent made glorious summer. " * 30)
    original, copy = tmp_path / "original", tmp_path / "copy"
    assert train_main(flags(data_dir, original, input=str(corpus), max_iters=2, eval_interval=2)) == 0
    shutil.copytree(original, copy)
    capsys.readouterr()
    relative = os.path.relpath(corpus)  # another spelling of the same file
    assert train_main([f"--data_dir={data_dir}", f"--out_dir={copy}", f"--input={relative}", "--resume",
                       "--max_iters=3", "--eval_interval=3", "--progress=false"]) == 0  # fmt: skip
    assert [p.name for p in checkpoint.list_checkpoints(copy)][-1] == "step_0000003"
    assert [p.name for p in checkpoint.list_checkpoints(original)] == ["step_0000002"]


def test_a_run_resumed_at_its_end_still_ends_with_an_evaluation(data_dir, tmp_path):
    """Stopped during its final evaluation (the checkpoint of the last step written, no val loss
    recorded for it), a resumed run evaluates before it ends."""
    assert train_main(flags(data_dir, tmp_path, max_iters=2, eval_interval=2)) == 0
    metrics = tmp_path / "metrics.jsonl"
    rows = read_metrics(tmp_path)
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if not ("val_loss" in r and r["step"] == 2)))
    assert train_main([*flags(data_dir, tmp_path, max_iters=2, eval_interval=2), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path) if "val_loss" in r] == [0, 2]


def test_a_bad_gpt_kernels_is_refused_before_anything_is_replaced(data_dir, tmp_path, monkeypatch, capsys):
    assert train_main(flags(data_dir, tmp_path, max_iters=2, eval_interval=2)) == 0
    before = checkpoint.list_checkpoints(tmp_path)
    monkeypatch.setenv("GPT_KERNELS", "attention=nope")
    kernels.dispatch.reload_env()
    try:
        capsys.readouterr()
        assert train_main([*flags(data_dir, tmp_path, max_iters=2, eval_interval=2), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "nope" in err and err.count("\n") == 1, err
        assert checkpoint.list_checkpoints(tmp_path) == before
    finally:
        monkeypatch.delenv("GPT_KERNELS")
        kernels.dispatch.reload_env()


# --- non-finite weights are never checkpointed -------------------------------------------------


def _weights_finite(directory: Path) -> bool:
    return all(torch.isfinite(t).all() for t in checkpoint.load_checkpoint(directory).model.state_dict().values())


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_weights_are_never_checkpointed(data_dir, tmp_path, monkeypatch, capsys, policy):
    """The update of step 3 makes a weight NaN though its loss was finite (a learning rate far too
    high does that): the run stops at the next step's NaN loss, with exit 3, and the newest
    checkpoint is still the good one of step 2."""
    monkeypatch.setenv("GPT_FAULT_NAN_WEIGHTS_AT_STEP", "3")
    code = train_main(flags(data_dir, tmp_path, max_iters=10, eval_interval=2, nan_policy=policy))
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE and err.count("\n") == 1, err
    assert "non-finite weights are never checkpointed" in err or "the weights are non-finite" in err
    if policy == "skip":
        assert "the weights themselves are non-finite" in err
    ckpts = checkpoint.list_checkpoints(tmp_path)
    assert ckpts[-1].name == "step_0000002" and all(_weights_finite(c) for c in ckpts)


def test_skipping_stops_after_too_many_non_finite_steps_in_a_row(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPT_FAULT_NAN_AT_STEP", "3+")  # every step from 3 on
    code = train_main(flags(data_dir, tmp_path, max_iters=50, eval_interval=50, nan_policy="skip"))
    err = capsys.readouterr().err
    assert code == EXIT_NONFINITE, err
    assert f"that is {MAX_SKIPPED_IN_A_ROW} non-finite steps in a row, so skipping is not helping" in err
    last = checkpoint.list_checkpoints(tmp_path)[-1]  # the weights are fine: the last good state is kept
    steps_done = 2 + MAX_SKIPPED_IN_A_ROW - 1  # two good steps, then the skipped ones before the last
    assert _weights_finite(last) and json.loads((last / "trainer.json").read_text())["step"] == steps_done


# --- faults while writing and reading ------------------------------------------------------------


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_earlier_checkpoint(data_dir, tmp_path,
                                                                                     monkeypatch, capsys):
    import safetensors.torch

    assert train_main(flags(data_dir, tmp_path, max_iters=2, eval_interval=2)) == 0
    (good,) = checkpoint.list_checkpoints(tmp_path)
    real = safetensors.torch.save_model

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    capsys.readouterr()
    code = train_main([*flags(data_dir, tmp_path, max_iters=4, eval_interval=2), "--resume"])
    err = capsys.readouterr().err
    monkeypatch.setattr(safetensors.torch, "save_model", real)
    assert code == 2 and err.count("\n") == 1, err
    assert "could not write the checkpoint of step 4" in err and "No space left on device" in err
    assert checkpoint.list_checkpoints(tmp_path) == [good] and checkpoint.verify(good) is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the half-written one is gone


def test_an_unsafe_state_file_is_a_damaged_checkpoint(data_dir, tmp_path, capsys):
    """A state.pt that weights-only loading refuses (a pickle that would run code) whose manifest
    was rewritten to match: resume falls back to the checkpoint before it, and with none
    left stops with one line that does not advise weights_only=False."""
    assert train_main(flags(data_dir, tmp_path, max_iters=4, eval_interval=2, keep_last=3)) == 0
    step2, step4 = checkpoint.list_checkpoints(tmp_path)

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    for ckpt in (step4,):
        (ckpt / "state.pt").write_bytes(pickle.dumps(Payload()))
        manifest = json.loads((ckpt / "manifest.json").read_text())
        manifest["files"]["state.pt"] = checkpoint._sha256(ckpt / "state.pt")
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert train_main([*flags(data_dir, tmp_path, max_iters=5, eval_interval=2), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "step_0000004 is unusable" in out and "cannot be read safely" in out and "at step 2" in out
    assert "weights_only=False" not in out and not marker.exists()  # refused, and nothing in it ran


@pytest.mark.distributed
def test_ddp_ranks_fall_back_together_from_an_unloadable_checkpoint(data_dir, tmp_path):
    """Two ranks: the newest checkpoint's state.pt passes its manifest but cannot be loaded; both
    ranks fall back to the previous checkpoint together (no rank left waiting in a collective)."""
    assert train_main(flags(data_dir, tmp_path, max_iters=4, eval_interval=2, keep_last=3)) == 0
    step4 = checkpoint.list_checkpoints(tmp_path)[-1]
    (step4 / "state.pt").write_bytes(b"not a torch file at all")
    manifest = json.loads((step4 / "manifest.json").read_text())
    manifest["files"]["state.pt"] = checkpoint._sha256(step4 / "state.pt")
    (step4 / "manifest.json").write_text(json.dumps(manifest))
    proc = run([*torchrun_cmd(), *flags(data_dir, tmp_path, max_iters=5, eval_interval=2), "--resume"], timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "step_0000004 is unusable" in proc.stdout and "at step 2" in proc.stdout


def test_a_torn_metrics_line_does_not_stop_a_resume(data_dir, tmp_path, capsys):
    assert train_main(flags(data_dir, tmp_path, max_iters=2, eval_interval=2)) == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 2.')  # a crash or a full disk in the middle of a line
    assert train_main([*flags(data_dir, tmp_path, max_iters=3, eval_interval=3), "--resume"]) == 0
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3]  # the torn line is gone
