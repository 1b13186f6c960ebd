"""TensorBoard and Weights & Biases (gptforge/train/tracking.py): every row Metrics.record takes
reaches them (a training run's rows, and rows a fine-tuning stage invents), read back from
TensorBoard's event files and W&B's offline run file. W&B runs offline (WANDB_MODE=offline, or
no API key): these tests never touch the network."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from gptforge.train.config import ConfigError, load_config, parse_args
from gptforge.train.metrics import Metrics
from gptforge.train.tracking import TensorBoard, WandB, open_trackers, scalars_of, wandb_mode
from tests.helpers import config, read_metrics

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_tb = pytest.mark.skipif(not HAS_TB, reason='tensorboard not installed (pip install -e ".[tensorboard]")')
needs_wandb = pytest.mark.skipif(not HAS_WANDB, reason='wandb not installed (pip install -e ".[wandb]")')


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline, its settings and caches in tmp_path: nothing leaves the machine."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def tb_events(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[str]]]:
    """(scalars by tag: [(step, value)], texts by tag) as TensorBoard itself reads the folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = {tag: [t.tensor_proto.string_val[0].decode() for t in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}
    return scalars, texts


def wandb_records(out_dir: Path) -> tuple[list[dict], dict]:
    """(history rows, config) of the one offline run under ``out_dir/wandb``, parsed from its
    .wandb file (W&B's LevelDB-style log: 32 KiB blocks of CRC, length, type, protobuf)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = out_dir.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            records.append(pending)
            pending = b""
        elif kind == 0 and length == 0:
            break
    history, cfg = [], {}
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif record.WhichOneof("record_type") in ("run", "config"):  # the config comes with the run record
            updates = record.run.config.update if record.HasField("run") else record.config.update
            cfg.update({item.key: json.loads(item.value_json) for item in updates})
    return history, cfg


def test_scalars_of_flattens_numbers_and_drops_the_rest():
    row = dict(step=3, loss=1.5, lr=1e-3, skipped="non-finite", mfu=None, flag=True,
               memory_per_rank=[{"parameters": 10, "gradients": None}])
    assert scalars_of(row) == {"step": 3.0, "loss": 1.5, "lr": 1e-3, "memory_per_rank/0/parameters": 10.0}


def test_tracker_flags_parse_and_a_missing_package_is_one_line(monkeypatch, tmp_path):
    cfg = load_config(*parse_args(["--tensorboard_log", "--wandb_log", "--wandb_project=p", "--wandb_run_name=r"]))
    assert (cfg.tensorboard_log, cfg.wandb_log, cfg.wandb_project, cfg.wandb_run_name) == (True, True, "p", "r")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--wandb_log=true needs the wandb package: pip install -e \"\.\[wandb\]\""):
        open_trackers(cfg, tmp_path, print)


def test_missing_package_exits_2_with_the_pip_command(monkeypatch, tmp_path, data_dir, capsys):
    from gptforge.train.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    args = [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", "--device=cpu", "--n_layer=1", "--n_head=1",
            "--n_embd=8", "--block_size=8", "--max_iters=1", "--tensorboard_log", "--progress=false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['error: --tensorboard_log=true needs the tensorboard package: pip install -e ".[tensorboard]" '
                   "(or pip install tensorboard)"]


@needs_tb
def test_any_recorded_row_reaches_tensorboard_and_a_resume_replaces_later_steps(tmp_path):
    """A stage's own fields (reward, accuracy, kl) arrive without any code for them; a resumed
    run's rows replace the steps after its checkpoint, as in metrics.jsonl."""
    folder = tmp_path / "tb"
    metrics = Metrics(tmp_path, write=True, log=print, trackers=[TensorBoard(folder, {"lr": 0.1}, own_folder=True)])
    metrics.start(resumed_at=None)
    for step in range(1, 6):
        metrics.record(dict(step=step, reward=step / 10, accuracy=0.5, kl=0.01 * step))
    metrics.close()
    resumed = Metrics(tmp_path, write=True, log=print, trackers=[TensorBoard(folder, {"lr": 0.1}, own_folder=True)])
    resumed.start(resumed_at=3)
    for step in (4, 5):
        resumed.record(dict(step=step, reward=1.0 + step))
    resumed.text("samples", "to be or not")
    resumed.close()
    scalars, texts = tb_events(folder)
    assert [s for s, _ in scalars["accuracy"]] == [1, 2, 3]  # steps 4, 5 purged with the old run's rows
    assert scalars["reward"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3)),
                                 (4, 5.0), (5, 6.0)]
    assert "to be or not" in texts["samples/text_summary"][0]


def test_only_rank_0_keeps_trackers(tmp_path):
    class Fails:
        name = "never"

        def start(self, resumed_at):
            raise AssertionError("a rank other than 0 started a tracker")

    metrics = Metrics(tmp_path, write=False, log=print, trackers=[Fails()])
    metrics.start(resumed_at=None)
    metrics.record(dict(step=1, loss=1.0))
    assert metrics.trackers == []


def test_a_failing_tracker_is_dropped_and_the_run_goes_on(tmp_path):
    class Broken:
        name = "broken"

        def start(self, resumed_at):
            pass

        def scalars(self, step, values):
            raise OSError("disk full")

    lines = []
    metrics = Metrics(tmp_path, write=True, log=lines.append, trackers=[Broken()])
    metrics.start(resumed_at=None)
    metrics.record(dict(step=1, loss=1.0))
    metrics.record(dict(step=2, loss=0.5))
    assert metrics.trackers == [] and len(lines) == 1 and "broken failed (OSError: disk full)" in lines[0]
    assert len(read_metrics(tmp_path)) == 2


def test_wandb_goes_offline_without_a_key_and_says_why(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == ("offline", "no API key (run `wandb login` or set WANDB_API_KEY)")
    # a key, but the server does not answer (a closed local port: no traffic leaves the machine)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1")
    mode, why = wandb_mode()
    assert mode == "offline" and why.startswith("127.0.0.1 cannot be reached")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == ("disabled", "WANDB_MODE=disabled")


@needs_tb
@needs_wandb
def test_a_run_logs_metrics_config_and_samples_to_both(tmp_path, data_dir, offline):
    from gptforge.train.loop import train

    out = tmp_path / "run"
    lines = []
    train(config(data_dir, out, max_iters=6, eval_interval=3, log_interval=2, num_samples=1, sample_tokens=8,
                 tensorboard_log=True, wandb_log=True, wandb_project="tests"), log=lines.append)
    rows = read_metrics(out)
    logged = [r for r in rows if "loss" in r]
    assert logged and all(r["mfu"] > 0 for r in logged)  # MFU against the measured CPU ceiling
    scalars, texts = tb_events(out / "tensorboard")
    for key in ("loss", "lr", "tokens_per_s", "mfu", "peak_memory_mib"):
        assert scalars[key] == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in logged], key
    evals = [r for r in rows if "val_loss" in r]
    assert scalars["val_loss"] == [(r["step"], pytest.approx(r["val_loss"], rel=1e-6)) for r in evals]
    assert "memory_per_rank/0/parameters" in scalars
    assert "learning_rate" in texts["config/text_summary"][0]
    assert texts["samples/text_summary"] and texts["samples/text_summary"][0].strip("`\n")

    assert any(" wandb: WANDB_MODE=offline: logging offline to " in line for line in lines)  # lines start with the time
    history, cfg = wandb_records(out)
    assert cfg.get("learning_rate") == 3e-3 and cfg.get("wandb_project") == "tests", cfg
    by_step = {}
    for row in history:
        by_step.setdefault(row.get("step"), {}).update(row)
    for r in logged:
        assert by_step[r["step"]]["loss"] == pytest.approx(r["loss"]) and "mfu" in by_step[r["step"]]
    assert any(row.get("samples/_type") == "table-file" for row in history)


@needs_wandb
def test_a_resumed_run_continues_its_wandb_run(tmp_path, offline):
    out = tmp_path / "run"
    out.mkdir()
    ids = []
    for resumed_at in (None, 2):
        tracker = WandB(out, "tests", "r", {"a": 1}, print)
        tracker.start(resumed_at)
        ids.append(tracker.run.id)
        tracker.scalars(3, {"reward": 1.0})
        tracker.close()
    assert ids[0] == ids[1] == (out / "wandb_run_id").read_text().strip()
