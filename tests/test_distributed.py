"""Distributed training on the CPU (gloo, 2 ranks under torchrun): DDP and DeepSpeed ZeRO 1-3
train on the same global batch as one process and give the same losses, resume exactly,
ranks read disjoint windows, a two-node launch works, and mixed precision behaves.

Each run is a real ``torchrun ... -m gptforge.train`` subprocess with a tiny model. DeepSpeed's first
start on a machine compiles a small CPU op (about a minute, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.data import load_tokens
from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.deepspeed_config import deepspeed_config
from gptforge.train.distributed import free_port, per_rank_accum
from gptforge.train.loop import Trainer, train
from gptforge.train.sampler import BatchSampler
from tests import helpers
from tests.helpers import REPO, TINY, logs_and_evals, torchrun_cmd


@functools.cache
def _deepspeed_import_error() -> str | None:
    """Why deepspeed cannot be imported here (checked in a subprocess, so that importing it
    leaves this process alone), or None."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    proc = subprocess.run([sys.executable, "-c", "import deepspeed"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})  # these tests train on the CPU
    last_line = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return None if proc.returncode == 0 else f"deepspeed does not import: {last_line}"


def require_deepspeed() -> None:
    if (error := _deepspeed_import_error()) is not None:
        pytest.skip(error)


# the helpers' TINY (batch_size: one rank's micro-batch) over 8 steps, evaluated and sampled
DIST_TINY = {**TINY, "max_iters": 8, "lr_decay_iters": 8, "eval_interval": 4, "eval_iters": 3, "num_samples": 1,
             "sample_tokens": 8}
flags = functools.partial(helpers.flags, base=DIST_TINY)
config = functools.partial(helpers.config, base=DIST_TINY)


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([*torchrun_cmd(), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def assert_same_losses(out_dir: Path, reference: Path, tol: float = 1e-5) -> None:
    (logs, evals), (ref_logs, ref_evals) = logs_and_evals(out_dir), logs_and_evals(reference)
    assert [r["step"] for r in logs] == [r["step"] for r in ref_logs] == list(range(1, DIST_TINY["max_iters"] + 1))
    assert [r["step"] for r in evals] == [r["step"] for r in ref_evals]
    for got, want in zip(logs, ref_logs, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=tol), (got, want)
        assert got["lr"] == pytest.approx(want["lr"])
    for got, want in zip(evals, ref_evals, strict=True):
        assert got["val_loss"] == pytest.approx(want["val_loss"], abs=tol), (got, want)
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=tol), (got, want)


@pytest.fixture(scope="module")
def single_run(data_dir, tmp_path_factory) -> Path:
    """The reference: one process, 2 accumulation steps of 4 sequences."""
    out = tmp_path_factory.mktemp("single")
    train(config(data_dir, out), log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ddp")
    return out, torchrun(flags(data_dir, out)).stdout


@pytest.fixture(scope="module")
def deepspeed_run(data_dir, tmp_path_factory):
    """``deepspeed_run(stage)``: an uninterrupted 2-rank ZeRO run, made on first use and shared."""
    runs: dict[int, Path] = {}

    def run(stage: int) -> Path:
        if stage not in runs:
            runs[stage] = tmp_path_factory.mktemp(f"zero{stage}")
            torchrun(flags(data_dir, runs[stage], strategy="deepspeed", zero_stage=stage))
        return runs[stage]

    return run


@pytest.mark.distributed
def test_ddp_gives_the_same_losses_as_one_process(single_run, ddp_run):
    out, stdout = ddp_run
    assert_same_losses(out, single_run)
    # the same global batch: 4 sequences x 1 micro-step x 2 ranks, printed once (rank 0 logs)
    assert stdout.count("global batch:") == 1
    assert "4 sequences x 1 micro-steps x 2 rank(s) x 32 tokens = 256 tokens per step" in stdout
    assert (out / "loss.png").is_file() and (out / "samples.txt").read_text().strip()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_gives_the_same_losses_as_one_process(deepspeed_run, single_run, stage):
    require_deepspeed()
    out = deepspeed_run(stage)
    assert_same_losses(out, single_run)
    # our checkpoint layout, with DeepSpeed's shards inside and a plain model for sampling
    ckpt = out / "checkpoints" / "step_0000008"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "manifest.json").is_file()
    if stage > 0:
        assert len(list((ckpt / "deepspeed").glob("*optim_states.pt"))) == 2  # one optimizer shard per rank


@pytest.mark.distributed
def test_ddp_resume_continues_like_an_uninterrupted_run(data_dir, tmp_path, ddp_run):
    """The resumed half recomputes every block in the backward: the same losses, bit for bit."""
    torchrun(flags(data_dir, tmp_path, max_iters=4))
    torchrun(flags(data_dir, tmp_path, resume=True, activation_checkpointing="full"))
    assert_same_losses(tmp_path, ddp_run[0], tol=0.0)


@pytest.mark.distributed
def test_deepspeed_resume_continues_like_an_uninterrupted_run(data_dir, tmp_path, deepspeed_run):
    require_deepspeed()
    full = deepspeed_run(3)
    ds = dict(strategy="deepspeed", zero_stage=3)
    torchrun(flags(data_dir, tmp_path, max_iters=4, **ds))
    # the resumed half recomputes every block in the backward (ZeRO-3 gathers the weights again)
    torchrun(flags(data_dir, tmp_path, resume=True, activation_checkpointing="full", **ds))
    assert_same_losses(tmp_path, full, tol=0.0)


@pytest.mark.distributed
def test_two_node_launch_on_one_machine(data_dir, tmp_path, single_run):
    """Two torchrun 'nodes' of one process each, meeting at 127.0.0.1: the multi-node command."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
             "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
             "-m", "gptforge.train", *flags(data_dir, tmp_path)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert "x 2 rank(s)" in outputs[0][0] and outputs[1][0] == ""  # only the first node's rank 0 logs
    assert_same_losses(tmp_path, single_run)


SAMPLER_PROBE = """
import json, sys
from gptforge.train.config import load_config, parse_args
from gptforge.train.loop import Trainer
from gptforge.train.strategies import make_strategy

cfg = load_config(*parse_args(sys.argv[2:]))
strategy = make_strategy(cfg)
sampler = Trainer(cfg, log=lambda *_: None, strategy=strategy).sampler
offsets = [[sampler.offsets(step, m).tolist() for m in range(sampler.accum_steps)] for step in range(6)]
with open(f"{sys.argv[1]}/rank{strategy.group.rank}.json", "w") as f:
    json.dump(dict(rank=sampler.rank, world_size=sampler.world_size, offsets=offsets), f)
strategy.teardown()
"""


@pytest.mark.distributed
def test_ranks_never_read_the_same_window_in_a_step(data_dir, tmp_path):
    """Asks each rank's Trainer (as the strategy set it up) which windows it would read."""
    probe = tmp_path / "probe.py"
    probe.write_text(SAMPLER_PROBE)
    args = flags(data_dir, tmp_path / "out", gradient_accumulation_steps=4)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
           str(tmp_path), *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    tokens = load_tokens(data_dir / "shakespeare_char", "train")
    one_process = BatchSampler(tokens, DIST_TINY["block_size"], DIST_TINY["batch_size"], accum_steps=4, seed=1337)
    for step in range(6):
        windows = [w for r in ranks for micro in r["offsets"][step] for w in micro]
        assert len(windows) == 2 * 2 * 4 and len(set(windows)) == len(windows)  # no window twice
        assert set(windows) == set(one_process.step_offsets(step).ravel().tolist())  # the same global batch


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_bf16_trains_on_the_cpu(data_dir, tmp_path, strategy):
    if strategy == "deepspeed":
        require_deepspeed()
    torchrun(flags(data_dir, tmp_path, dtype="bf16", strategy=strategy, zero_stage=2, num_samples=0))
    logs, evals = logs_and_evals(tmp_path)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2


def test_fp16_skips_a_step_with_inf_gradients(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, dtype="fp16")
    trainer = Trainer(cfg, log=lambda *_: None)
    scale = trainer.scaler.get_scale()
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    hook = trainer.model.lm_head.weight.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    trainer.train_step()
    hook.remove()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the step was skipped, weights intact
    assert trainer.scaler.get_scale() == scale / 2
    # fused AdamW skips inside its kernel: its state may exist, but as if no step had been taken
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() and not s["exp_avg_sq"].any()
               for s in trainer.optimizer.state.values())
    trainer.train_step()  # finite gradients again: this one updates
    assert not torch.equal(before["lm_head.weight"], trainer.model.state_dict()["lm_head.weight"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_uneven_accumulation_over_ranks_is_refused():
    assert per_rank_accum(8, 4) == 2
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps \(3\).*divide evenly by the 2 ranks"):
        per_rank_accum(3, 2)


def test_deepspeed_config_from_our_flags():
    cfg = TrainConfig(batch_size=4, gradient_accumulation_steps=8, grad_clip=0.5, zero_stage=2)
    ds = deepspeed_config(cfg, world_size=4, dtype=torch.bfloat16)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        32, 4, 2)
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert "optimizer" not in ds and "scheduler" not in ds  # ours, passed to deepspeed.initialize
    assert deepspeed_config(TrainConfig(), 1, torch.float32)["zero_optimization"]["stage"] == 1  # the default


def test_deepspeed_config_file_is_merged_and_checked():
    cfg = TrainConfig(strategy="deepspeed", deepspeed_config="ds.json", batch_size=4)
    user = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3, "overlap_comm": True}}
    ds = deepspeed_config(cfg, 1, torch.float32, user)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # the file's stage: no --zero_stage
    assert ds["train_micro_batch_size_per_gpu"] == 4
    clash = {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 8.*bf16.enabled") as err:
        deepspeed_config(TrainConfig(**{**cfg.to_dict(), "zero_stage": 1}), 1, torch.float32, clash)
    assert "zero_optimization.stage is 3 in the file but 1" in str(err.value)
    with pytest.raises(ConfigError, match="remove its 'optimizer' block"):
        deepspeed_config(cfg, 1, torch.float32, {"optimizer": {"type": "Adam"}})


def test_unreadable_or_invalid_deepspeed_config_is_refused_clearly(tmp_path):
    from gptforge.train.deepspeed_config import read_user_config

    with pytest.raises(ConfigError, match="cannot read it"):
        read_user_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{stage: 2")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_user_config(str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        read_user_config(str(bad))


def test_deepspeed_launcher_local_rank_flag_is_dropped():
    from gptforge.train.__main__ import drop_local_rank

    assert drop_local_rank(["--local_rank=1", "--n_layer=2", "--local_rank", "0", "--dtype=fp32"]) == [
        "--n_layer=2", "--dtype=fp32"]


@pytest.mark.distributed
def test_nothing_a_run_writes_names_a_module_path(data_dir, single_run, ddp_run, deepspeed_run):
    """Checkpoints, metrics and data hold plain data: no pickled class of ours, so moving a module
    (as the rename to gptforge did) never strands a checkpoint."""
    require_deepspeed()
    for folder in (data_dir, single_run, ddp_run[0], deepspeed_run(3)):
        assert any(folder.rglob("*")), folder
        assert helpers.files_naming_our_modules(folder) == []
