"""Training end to end on the CPU: the loss falls, resume is exact, outputs are written,
checkpoints are atomic and verified, and configuration layers (bad configuration: test_bad_input.py)."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from gptforge.train import checkpoint
from gptforge.train.config import ConfigError, TrainConfig, load_config, parse_args
from gptforge.train.loop import Trainer, train
from gptforge.train.sampler import BatchSampler
from tests import helpers
from tests.helpers import REPO, TINY, read_metrics

# the helpers' TINY with one micro-batch of 8, a longer warmup and the default log interval
TRAIN_TINY = {**{k: v for k, v in TINY.items() if k not in ("gradient_accumulation_steps", "log_interval")},
              "batch_size": 8, "warmup_iters": 5}
config = functools.partial(helpers.config, base=TRAIN_TINY)


def test_short_run_lowers_the_loss_and_writes_its_outputs(data_dir, tmp_path):
    out = tmp_path / "run"
    result = train(config(data_dir, out, max_iters=60, eval_interval=30, log_interval=10, num_samples=2,
                          sample_tokens=40), log=lambda *_: None)
    rows = read_metrics(out)
    evals = [r for r in rows if "val_loss" in r]
    logs = [r for r in rows if "loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.8  # from ~4.2 (uniform over 65) to ~3
    assert [r["step"] for r in logs] == [10, 20, 30, 40, 50, 60]
    assert set(logs[0]) == {"step", "loss", "lr", "tokens_per_s", "mfu", "peak_memory_mib"}
    assert logs[0]["tokens_per_s"] > 0 and logs[0]["peak_memory_mib"] > 10  # the process holds torch itself
    assert (out / "loss.png").stat().st_size > 1000
    samples = (out / "samples.txt").read_text()
    assert len(result["samples"]) == 2 and result["samples"][0].strip("\n")[:20] in samples
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step_0000030", "step_0000060"]


def test_resume_continues_exactly_like_an_uninterrupted_run(data_dir, tmp_path):
    common = dict(max_iters=16, lr_decay_iters=16, eval_interval=8, log_interval=1, dropout=0.1)
    full, part = tmp_path / "full", tmp_path / "part"
    train(config(data_dir, full, **common), log=lambda *_: None)
    train(config(data_dir, part, **{**common, "max_iters": 8}), log=lambda *_: None)
    train(config(data_dir, part, **common, resume=True), log=lambda *_: None)
    losses_full = [r["loss"] for r in read_metrics(full) if "loss" in r]
    losses_part = [r["loss"] for r in read_metrics(part) if "loss" in r]
    assert len(losses_full) == 16 and losses_part == losses_full  # bit for bit, dropout included
    a = checkpoint.load_checkpoint(checkpoint.list_checkpoints(full)[-1]).model.state_dict()
    b = checkpoint.load_checkpoint(checkpoint.list_checkpoints(part)[-1]).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_matches_a_bigger_batch(data_dir, tmp_path):
    """Two micro-batches of 4 are the same windows and the same update as one batch of 8."""
    big = Trainer(config(data_dir, tmp_path / "a", batch_size=8, max_iters=3), log=lambda *_: None)
    acc = Trainer(config(data_dir, tmp_path / "b", batch_size=4, gradient_accumulation_steps=2, max_iters=3),
                  log=lambda *_: None)
    assert sorted(big.sampler.step_offsets(0).ravel()) == sorted(acc.sampler.step_offsets(0).ravel())
    acc.model.load_state_dict(big.model.state_dict())
    # batch 8 draws windows in the same order, so micro-step m of acc is rows 4m..4m+3 of big
    for _ in range(3):
        loss_big, loss_acc = big.train_step(), acc.train_step()
        torch.testing.assert_close(loss_big, loss_acc, rtol=1e-5, atol=1e-6)
    for p, q in zip(big.model.parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains_on_the_cpu(data_dir, tmp_path, dtype):
    trainer = Trainer(config(data_dir, tmp_path, dtype=dtype, max_iters=20, eval_interval=20, log_interval=20),
                      log=lambda *_: None)
    assert trainer.scaler.is_enabled() == (dtype == "fp16")
    result = trainer.run()
    assert result["val_loss"] < 3.6 and torch.isfinite(torch.tensor(result["val_loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert cfg.lr_at(0) == pytest.approx(1 / 11)
    assert cfg.lr_at(10) == pytest.approx(1.0)
    assert cfg.lr_at(60) == pytest.approx(0.55)
    assert cfg.lr_at(110) == pytest.approx(0.1) and cfg.lr_at(500) == pytest.approx(0.1)
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 120))


def test_a_fresh_run_will_not_silently_replace_checkpoints(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=2, eval_interval=2), log=lambda *_: None)
    with pytest.raises(ConfigError, match="--resume to continue"):
        Trainer(config(data_dir, tmp_path, max_iters=2))
    train(config(data_dir, tmp_path, max_iters=4, eval_interval=4, overwrite=True), log=lambda *_: None)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000004"]


def test_resume_without_checkpoint_is_refused(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="no usable checkpoint"):
        Trainer(config(data_dir, tmp_path, resume=True))


def test_resume_with_another_model_shape_is_refused(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=2, eval_interval=2), log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"keeps its data and model, but this command changes n_embd 32 -> 64"):
        Trainer(config(data_dir, tmp_path, n_embd=64, resume=True))


def test_checkpoints_are_verified_and_damaged_ones_skipped(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=4, eval_interval=2, keep_last=3), log=lambda *_: None)
    ckpts = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["step_0000002", "step_0000004"]
    assert all(checkpoint.verify(p) is None for p in ckpts)
    weights = ckpts[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    warnings = []
    assert checkpoint.latest_valid(tmp_path, warn=warnings.append) == ckpts[0]
    assert "model.safetensors does not match its sha256" in warnings[0]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # no temporary directories left behind


def test_sampler_windows_are_distinct_and_split_across_ranks():
    tokens = torch.arange(1000).numpy()
    samplers = [BatchSampler(tokens, 16, 4, accum_steps=2, seed=3, rank=r, world_size=2) for r in range(2)]
    single = BatchSampler(tokens, 16, 4, accum_steps=4, seed=3)
    for step in range(5):
        per_rank = [set(s.offsets(step, m).tolist()) for s in samplers for m in range(2)]
        union = set().union(*per_rank)
        assert len(union) == 16  # no window twice within a step, across ranks and micro-steps
        assert union == set(single.step_offsets(step).ravel().tolist())  # same global batch as 1 process
    x, y = samplers[0].batch(0, 0)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.int64
    with pytest.raises(ValueError, match="too few for block_size"):
        BatchSampler(tokens[:10], 16, 1)
    with pytest.raises(ValueError, match="distinct windows"):
        BatchSampler(tokens[:40], 16, 32)


def test_config_layers_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('n_layer = 3\nlearning_rate = 1\ndataset = "x"\n')
    path, overrides = parse_args(["--config", str(toml), "--n_layer=5", "--compile", "--dropout", "0.1"])
    cfg = load_config(path, overrides)
    assert (cfg.n_layer, cfg.learning_rate, cfg.dataset, cfg.compile, cfg.dropout) == (5, 1.0, "x", "true", 0.1)


def test_a_preset_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repo: the presets come with the package
    by_path = load_config(REPO / "gptforge" / "train" / "configs" / "speedrun_cpu.toml")
    assert load_config("speedrun_cpu") == by_path == load_config("speedrun_cpu.toml")
    (tmp_path / "speedrun_cpu.toml").write_text("max_iters = 3\n")  # a file of that name wins
    assert load_config("speedrun_cpu.toml").max_iters == 3
    with pytest.raises(ConfigError, match="no_such_preset not found, nor a preset of that name .*speedrun_cpu"):
        load_config("no_such_preset")
    with pytest.raises(ConfigError, match="config file sub/speedrun_cpu.toml not found$"):
        load_config("sub/speedrun_cpu.toml")  # a path is a path: no preset in its place


def test_cli_help_lists_every_key():
    proc = subprocess.run([sys.executable, "-m", "gptforge.train", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--gradient_accumulation_steps" in proc.stdout and "--attn_backend" in proc.stdout


def test_sample_cli_is_reproducible(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=2, eval_interval=2), log=lambda *_: None)
    cmd = [sys.executable, "-m", "gptforge.gpt.sample", "--out_dir", str(tmp_path), "--num_samples=2",
           "--max_new_tokens=30", "--prompt=ROMEO:", "--seed=5"]
    first, second = (subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120) for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("ROMEO:")
    bad = subprocess.run([*cmd[:-2], "--prompt=ü"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not know" in bad.stderr and "Traceback" not in bad.stderr
