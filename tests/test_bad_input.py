"""Bad input and ordinary faults: a clear line and exit 2 (or the right behaviour), never a
traceback, never wrong training, and no data changed.

- The table: each row is a command line for ``python -m gptforge.train``, run in-process (its
  ``main``), the one line stderr must say, and a check that nothing under the data folder or
  the earlier runs changed.
- Then the cases that need more than a command line: datasets that must never be replaced, a
  corpus without a newline, GPT_KERNELS, a stop signal during a long evaluation, ``--help``, and
  the sampling and export commands. Runs that meet a fault (resume, non-finite weights, a full
  disk, damaged checkpoints) are in tests/test_faulty_runs.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge import kernels
from gptforge.data import DataError, ensure_prepared, prepare
from gptforge.gpt.sample import main as sample_main
from gptforge.train import checkpoint
from gptforge.train.__main__ import main as train_main
from gptforge.train.config import TrainConfig
from gptforge.train.faults import EXIT_PREEMPTED, LOCK_FILE
from gptforge.train.loop import train
from tests.helpers import REPO, config, end_session, flags, read_until, start

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(*_: object) -> None:
    pass


@pytest.fixture(scope="module")
def bad_inputs(data_dir, tmp_path_factory) -> dict[str, Path]:
    """Folders for the table below: damaged data sets, a finished run, a model of another tokenizer."""
    root = tmp_path_factory.mktemp("bad")
    good = data_dir / "shakespeare_char"
    for name in ("badvocab", "nobin"):
        shutil.copytree(good, data_dir / name)
    meta = json.loads((good / "meta.json").read_text())
    (data_dir / "badvocab" / "meta.json").write_text(json.dumps({**meta, "vocab_size": 10}))
    (data_dir / "nobin" / "train.bin").unlink()
    for name, change in (("notrain", lambda m: m.pop("train_tokens")),
                         ("textvocab", lambda m: m.update(vocab_size="65"))):
        changed = dict(meta)
        change(changed)
        shutil.copytree(good, data_dir / name)
        (data_dir / name / "meta.json").write_text(json.dumps(changed))
    shard = dict(file="train_000000.bin", tokens=100, max_token_id=64, sha256="0" * 64)
    manifest = dict(format="gpt-token-shards", format_version=1, dtype="uint16", vocab_size=65, max_token_id=64,
                    tokenizer=meta["tokenizer"], inputs=[], splits=dict(train=dict(tokens=100, shards=[shard]),
                                                                        val=dict(tokens=100, shards=[shard])))
    for name, change in (("novocab", lambda m: m.pop("vocab_size")),
                         ("nocount", lambda m: m["splits"]["val"]["shards"][0].pop("tokens")),
                         ("outside", lambda m: m["splits"]["train"]["shards"][0].update(file="../x.bin"))):
        changed = json.loads(json.dumps(manifest))
        change(changed)
        (data_dir / name).mkdir()
        (data_dir / name / "manifest.json").write_text(json.dumps(changed))
    tiny = root / "tiny.txt"
    tiny.write_text("To be, or not to be, that is the question. " * 6)  # val split: 26 characters
    prepare("tiny", data_dir, input_path=tiny)
    (root / "other.txt").write_text("Some other text, never prepared before. " * 40)
    (root / "my corpus.txt").write_text("a file name that is no dataset name " * 40)
    (root / "shakespeare_char.txt").write_text("a file named like a built-in dataset " * 40)
    # a built-in dataset's folder that holds a user's text (as an older version could leave it)
    prepare("mine", root / "hijacked", input_path=tiny)
    (root / "hijacked" / "mine").rename(root / "hijacked" / "shakespeare_char")
    train(config(data_dir, root / "finished", max_iters=2, eval_interval=2), log=quiet)
    from gptforge.gpt.io import save_model
    from gptforge.gpt.model import build_model

    other = build_model(TrainConfig(n_layer=1, n_head=1, n_embd=8).model_config(27))
    save_model(other, root / "lowercase_model", {"name": "char", "vocab_size": 27,
                                                  "chars": " abcdefghijklmnopqrstuvwxyz"})
    (root / "empty").mkdir()
    (root / "locked").mkdir()
    (root / "locked" / LOCK_FILE).write_text(json.dumps(dict(pid=os.getpid(), host=socket.gethostname())))
    (root / "a_file").write_text("not a folder")
    (root / "wrong_type.toml").write_text("n_layer = 'four'\n")
    (root / "typo.toml").write_text("lerning_rate = 1e-3\n")
    (root / "invalid.toml").write_text("n_layer = \n")
    return dict(root=root, data=data_dir)


def _sys_is_writable() -> bool:
    if not Path("/sys").is_dir():
        return True  # no sysfs: nothing to test with (and nothing to create there)
    try:
        Path("/sys/gpt_probe").mkdir()
    except OSError:
        return False
    Path("/sys/gpt_probe").rmdir()
    return True


BAD_INPUT = [  # (name, flags, what stderr must say); {root} and {data} are filled in
    ("unknown key", ["--n_layers=2"], "unknown config key 'n_layers' in the command line; did you mean 'n_layer'?"),
    ("mistyped value", ["--batch_size=big"], "--batch_size expects int, got 'big'"),
    ("mistyped bool", ["--bias=maybe"], "--bias expects bool, got 'maybe'"),
    ("not a choice", ["--compile=maybe"], "compile must be one of auto, true, false; got 'maybe'"),
    ("stray argument", ["stray"], "unexpected argument 'stray'; expected --key=value (see --help)"),
    # config files
    ("missing config file", ["--config", "{root}/missing.toml"], "config file {root}/missing.toml not found"),
    ("config file not TOML", ["--config", "{root}/invalid.toml"], "config file {root}/invalid.toml is not valid TOML"),
    ("mistyped value in a config file", ["--config", "{root}/wrong_type.toml"],
     "n_layer expects int, got 'four' (str)"),
    ("unknown key in a config file", ["--config", "{root}/typo.toml"],
     "unknown config key 'lerning_rate' in {root}/typo.toml; did you mean 'learning_rate'?"),
    ("zero size", ["--n_embd=0"], "n_embd must be >= 1"),
    ("zero batch", ["--batch_size=0"], "batch_size must be >= 1, got 0"),
    ("negative size", ["--max_iters=-5"], "max_iters must be >= 0"),
    ("heads do not divide", ["--n_embd=100", "--n_head=3"], "n_embd (100) must be divisible by n_head (3)"),
    ("block larger than data", ["--dataset=tiny", "--block_size=64"], "too few for block_size 64"),
    ("batch larger than data", ["--dataset=tiny", "--block_size=8", "--batch_size=200"], "distinct windows"),
    ("vocab edited in meta.json", ["--dataset=badvocab"],
     "{data}/badvocab/meta.json: the field vocab_size is 10, but its tokenizer, char (65 tokens), has 65 tokens"),
    ("other model shape", ["--out_dir={root}/finished", "--resume", "--n_embd=64"],
     "this command changes n_embd 32 -> 64 (the model's shape)"),
    ("other tokenizer", ["--tokenizer=gpt2"], "was prepared with the char tokenizer, not gpt2"),
    ("missing data file", ["--dataset=nobin"], "nobin/train.bin is missing"),
    # a malformed meta.json or manifest: the file and the field
    ("meta.json without a field", ["--dataset=notrain"], "{data}/notrain/meta.json lacks train_tokens"),
    ("meta.json field of another type", ["--dataset=textvocab"],
     "{data}/textvocab/meta.json: the field vocab_size is str, not int"),
    ("manifest without a field", ["--dataset=novocab"],
     "{data}/novocab/manifest.json lacks the field vocab_size; the manifest is damaged; prepare the dataset again"),
    ("manifest shard without a field", ["--dataset=nocount"],
     "{data}/nocount/manifest.json lacks the field splits.val.shards[0].tokens"),
    ("manifest shard outside its folder", ["--dataset=outside"],
     "{data}/outside/manifest.json: the field splits.train.shards[0].file is '../x.bin', not a file name"),
    ("missing input file", ["--dataset=mine", "--input={root}/none.txt"], "input file not found"),
    ("unreadable deepspeed config", ["--strategy=deepspeed", "--deepspeed_config={root}/none.json"],
     "--deepspeed_config {root}/none.json: cannot read it"),
    ("unsupported dtype", ["--dtype=fp8"], "dtype must be one of auto, bf16, fp16, fp32; got 'fp8'"),
    ("unknown backend", ["--attn_backend=fast"], "attn_backend must be one of auto, torch, sdpa, flash_attn, triton"),
    ("no cuda here", ["--device=cuda"], "this machine has no CUDA device"),
    ("a second cpu", ["--device=cpu:1"], "device 'cpu:1' does not exist: the CPU is one device; use cpu"),
    ("a cuda index that is no number", ["--device=cuda:abc"],
     "device must be auto, cpu, cuda or cuda:N; got 'cuda:abc'"),
    ("an unknown device", ["--device=tpu"], "device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
    ("kernel backend unavailable", ["--attn_backend=flash_attn"], "attention backend 'flash_attn' cannot run on cpu"),
    ("nothing to resume", ["--out_dir={root}/empty", "--resume"], "no usable checkpoint"),
    ("bad resume mode", ["--resume=sometimes"], "resume must be one of false, true, auto; got 'sometimes'"),
    ("bad nan policy", ["--nan_policy=ignore"], "nan_policy must be one of stop, skip; got 'ignore'"),
    ("unknown optimizer", ["--optimizer=sgd"], "optimizer must be one of adamw, muon; got 'sgd'"),
    ("muon without blocks", ["--model=bigram", "--optimizer=muon"], "optimizer muon needs a model with Transformer"),
    ("muon under deepspeed", ["--strategy=deepspeed", "--optimizer=muon"],
     "--optimizer=muon is not available with --strategy=deepspeed"),
    ("unknown activation", ["--activation=swish"], "activation must be one of gelu_tanh, gelu, relu2; got 'swish'"),
    ("rope with an odd head size", ["--rope=true", "--n_embd=30", "--n_head=2"], "rope needs an even head size"),
    ("out_dir in use", ["--out_dir={root}/locked"], f"in use by another training run (pid {os.getpid()}"),
    ("init_from missing", ["--init_from={root}/nowhere"], "is neither a file or folder"),
    ("init_from other tokenizer", ["--init_from={root}/lowercase_model"],
     "the weights were trained with the char (27 tokens) tokenizer but the dataset 'shakespeare_char'"),
    # a dataset is never replaced by another text, and --input names its own
    ("another text under a prepared name", ["--dataset=tiny", "--input={root}/other.txt"],
     "holds the tokens of {root}/tiny.txt, not of {root}/other.txt"),
    ("a built-in name holding a user's text", ["--data_dir={root}/hijacked"],
     "should hold Tiny Shakespeare but holds the tokens of {root}/tiny.txt"),
    ("an input whose name is no dataset name", ["--input={root}/my corpus.txt"],
     "its file name 'my corpus' cannot name its dataset"),
    ("an input named like a built-in dataset", ["--input={root}/shakespeare_char.txt"],
     "its file name 'shakespeare_char' cannot name its dataset (not a folder name, or a built-in dataset's); "
     "name it with --dataset=NAME"),
    # a resumed run keeps its data order and model
    ("resume with another batch size", ["--out_dir={root}/finished", "--resume", "--batch_size=8"],
     "changes batch_size 4 -> 8 (the batches and their order)"),
    ("resume with another seed", ["--out_dir={root}/finished", "--resume", "--seed=7"],
     "changes seed 1337 -> 7 (the order of the batches)"),
    ("resume with another dataset", ["--out_dir={root}/finished", "--resume", "--dataset=tiny"],
     "changes dataset 'shakespeare_char' -> 'tiny' (the training data)"),
    # numbers that compare as nothing, or mean nothing
    *[(f"NaN {key}", [f"--{key}=nan"], f"{key} must be a finite number, got nan")
      for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "dropout")],
    ("infinite learning_rate", ["--learning_rate=inf"], "learning_rate must be a finite number, got inf"),
    ("infinite count", ["--max_iters=inf"], "--max_iters expects int, got 'inf'"),
    ("NaN count", ["--eval_iters=nan"], "--eval_iters expects int, got 'nan'"),
    ("count in floating point", ["--batch_size=1e30"], "--batch_size expects int, got '1e30'"),
    ("count past an int64", ["--max_iters=99999999999999999999"],
     "max_iters must be at most 9,223,372,036,854,775,807 in size, got 99999999999999999999"),
    ("size past an int64", ["--n_embd=-99999999999999999999"],
     "n_embd must be at most 9,223,372,036,854,775,807 in size, got -99999999999999999999"),
    ("negative seed", ["--seed=-1"], "seed must be from 0 to 4294967295, got -1"),
    ("seed too large", ["--seed=4294967296"], "seed must be from 0 to 4294967295, got 4294967296"),
    # out_dir that cannot be written
    ("out_dir is a file", ["--out_dir={root}/a_file"], "out_dir {root}/a_file exists and is not a folder"),
    ("out_dir under a file", ["--out_dir={root}/a_file/run"], "cannot create out_dir {root}/a_file/run"),
    ("out_dir not permitted", ["--out_dir=/sys/gpt_out"], "cannot create out_dir /sys/gpt_out"),
    ("out_dir read-only", ["--out_dir=/sys"], "cannot write into out_dir /sys"),
]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``roots`` but the table's own out folders."""
    files = {}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and "out" not in path.relative_to(root).parts[:1]:
                stat = path.stat()
                files[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return files


def bad_command(bad_inputs: dict[str, Path], name: str) -> tuple[list[str], str]:
    """The command line of the table's row ``name`` (the tiny run's flags, those the row sets
    replaced, in a fresh out folder) and what stderr must say."""
    _, args, message = next(row for row in BAD_INPUT if row[0] == name)
    fill = dict(root=bad_inputs["root"], data=bad_inputs["data"])
    args = [a.format(**fill) for a in args]
    defaults = flags(bad_inputs["data"], bad_inputs["root"] / "out" / name.replace(" ", "_"), max_iters=2)
    keys = {a.split("=")[0] for a in args}
    return [*[f for f in defaults if f.split("=")[0] not in keys], *args], message.format(**fill)


@pytest.mark.parametrize("name", [row[0] for row in BAD_INPUT])
def test_bad_input_is_one_clear_line_and_changes_nothing(bad_inputs, name, capsys):
    if name == "no cuda here" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args, message = bad_command(bad_inputs, name)
    if any("/sys" in a for a in args) and _sys_is_writable():
        pytest.skip("/sys is writable here: no unwritable folder to test with")
    before = snapshot(bad_inputs["data"], bad_inputs["root"])
    capsys.readouterr()
    code = train_main(args)
    _, err = capsys.readouterr()
    assert code == 2, err[-2000:]
    assert err.startswith("error: ") and err.count("\n") == 1, err[-2000:]
    assert message in err
    assert snapshot(bad_inputs["data"], bad_inputs["root"]) == before, "the failed run changed data or a run"


# a few rows through a real ``python -m gptforge.train`` process (an unknown flag, a missing file, a bad
# value): exit 2, their whole message as the one line on stderr, so no traceback
@pytest.mark.parametrize("name", ["unknown key", "missing config file", "NaN learning_rate"])
def test_the_command_line_itself_says_one_line(bad_inputs, name):
    args, message = bad_command(bad_inputs, name)
    done = subprocess.run([sys.executable, "-m", "gptforge.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and done.stderr == f"error: {message}\n", done.stderr[-3000:]


# --- datasets ---------------------------------------------------------------------------------


def test_input_names_its_own_dataset(data_dir, tmp_path):
    """--input without --dataset (the README's example, with a preset's dataset too) trains on a
    dataset named after the file, and Tiny Shakespeare's folder stays as it was."""
    corpus = tmp_path / "my_corpus.txt"
    corpus.write_text("All the world's a stage, and all the men and women merely players. " * 30)
    shakespeare_meta = (data_dir / "shakespeare_char" / "meta.json").read_bytes()
    cfg = config(data_dir, tmp_path / "run", input=str(corpus), dataset="shakespeare_char", max_iters=1,
                 eval_interval=1)
    assert cfg.dataset == "my_corpus"
    logs: list[str] = []
    train(cfg, log=logs.append)
    assert any(f"--input {corpus}: dataset 'my_corpus'" in m for m in logs)
    assert json.loads((data_dir / "my_corpus" / "meta.json").read_text())["source"]["path"] == str(corpus)
    assert (data_dir / "shakespeare_char" / "meta.json").read_bytes() == shakespeare_meta


def test_a_dataset_is_never_replaced_by_another_text(tmp_path):
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("the first text, " * 50)
    second.write_text("and another one. " * 50)
    folder = prepare("corpus", tmp_path / "data", input_path=first)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(DataError, match=f"holds the tokens of {first}; a dataset is never replaced"):
        prepare("corpus", tmp_path / "data", input_path=second)
    with pytest.raises(DataError, match=f"holds the tokens of {first}, not of {second}"):
        ensure_prepared("corpus", tmp_path / "data", input_path=second)
    with pytest.raises(DataError, match="'shakespeare_char' is the built-in Tiny Shakespeare dataset"):
        prepare("shakespeare_char", tmp_path / "data", input_path=second)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    first.write_text("the first text, changed. " * 50)  # the same file, edited: prepared again on request
    prepare("corpus", tmp_path / "data", input_path=first)
    from gptforge.data.cli import main as data_main

    assert data_main(["prepare", "--dataset", "shakespeare", "--input", str(second),
                      "--data_dir", str(tmp_path / "data")]) == 2  # fmt: skip
    assert not (tmp_path / "data" / "shakespeare").exists()


# --- resume continues the saved run ----------------------------------------------------------


def test_a_corpus_without_a_newline_trains_and_samples(tmp_path, capsys):
    corpus = tmp_path / "oneline.txt"
    corpus.write_text("abcde fghij klmno pqrst uvwxy z " * 40)  # no newline anywhere
    args = flags(tmp_path / "data", tmp_path / "run", input=str(corpus), max_iters=2, eval_interval=2,
                 num_samples=1, sample_tokens=10, block_size=16)
    assert train_main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "samples.txt").read_text().startswith(" ")  # the vocabulary's first character
    assert sample_main(["--out_dir", str(tmp_path / "run"), "--num_samples=1", "--max_new_tokens=5"]) == 0


# --- the kernel backends, and a stop during evaluation --------------------------------------------


def test_training_and_sampling_follow_gpt_kernels_alike(data_dir, tmp_path, monkeypatch):
    """One rule: a backend the config names wins; "auto" leaves the choice to GPT_KERNELS."""
    from gptforge.kernels import reference

    calls = []
    real = reference.attention
    monkeypatch.setattr(reference, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("GPT_KERNELS", "attention=torch")
    kernels.dispatch.reload_env()
    try:
        train(config(data_dir, tmp_path / "auto", max_iters=1, eval_interval=1), log=quiet)
        assert calls, "training with attn_backend=auto ignored GPT_KERNELS=attention=torch"
        calls.clear()
        train(config(data_dir, tmp_path / "named", max_iters=1, eval_interval=1, attn_backend="sdpa"), log=quiet)
        assert not calls, "a backend named in the config must win over GPT_KERNELS"
        assert sample_main(["--out_dir", str(tmp_path / "auto"), "--max_new_tokens=2", "--num_samples=1"]) == 0
        assert calls, "sampling ignored GPT_KERNELS=attention=torch"
    finally:
        monkeypatch.delenv("GPT_KERNELS")
        kernels.dispatch.reload_env()


def test_a_stop_signal_during_a_long_evaluation_is_acted_on_between_batches(data_dir, tmp_path):
    proc = start([sys.executable, "-m", "gptforge.train", *flags(data_dir, tmp_path, max_iters=100, eval_iters=100_000,
                                                            eval_interval=100)])  # fmt: skip
    try:
        read_until(proc, "global batch:")  # the first evaluation starts now: 200,000 batches
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=60)[0]
    finally:
        end_session(proc)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert "received SIGTERM at step 0" in output
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_0000000"]


# --- help, sampling, export --------------------------------------------------------------------------


def test_help_describes_every_key_with_its_choices(capsys):
    import dataclasses

    assert train_main(["--help"]) == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"--{f.name}="))
        assert len(line.split(None, 2)) == 3 and f.metadata["help"] in line, line
    assert "[stop|skip]" in text and "[false|true|auto]" in text and "[auto|single|ddp|fsdp|deepspeed]" in text


def test_sample_refuses_bad_arguments_and_damaged_checkpoints(bad_inputs, capsys):
    run = bad_inputs["root"] / "finished"
    for args, message in ((["--temperature=nan"], "--temperature must be a finite number >= 0, got nan"),
                          (["--top_p=nan"], "--top_p must be in (0, 1], got nan"),
                          (["--device=cuda"], "this machine has no CUDA device"),
                          (["--device=tpu"], "device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
                          (["--device=cpu:1"], "device 'cpu:1' does not exist"),
                          (["--num_samples=99999999999999999999"],
                           "--num_samples must be at most 9,223,372,036,854,775,807 (an int64)"),
                          (["--seed=99999999999999999999"],
                           "--seed must be from 0 to 18446744073709551615, got 99999999999999999999"),
                          (["--prompt=Z~"], "does not know: '~'")):  # fmt: skip
        if "cuda" in args[0] and torch.cuda.is_available():
            continue
        assert sample_main(["--out_dir", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    damaged = shutil.copytree(run, bad_inputs["root"] / "damaged_run")
    (ckpt,) = checkpoint.list_checkpoints(damaged)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert sample_main(["--out_dir", str(damaged), "--max_new_tokens=3"]) == 2
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "model.safetensors does not match its sha256" in err
