"""The README's commands, run as a new user would (issue 29): every command of its ```bash
blocks is either run here, shortened where it would take long (``SHORTER``), and must exit as
the README says (0 for all of them), or listed in ``NOT_RUN`` with the reason. A README command
in neither list fails the test: that is how the README stays true as the code moves.

The commands run in one fresh folder, in README order, as in one checkout: the ones that
continue another (a ``--resume``, sampling a trained model) find its out_dir there, and every
other run has an out_dir of its own (the README gives each one). ``python -m X`` is run as X's
``main(argv)`` in this process: the same entry point, without paying torch's import each time.
The data comes from the local copy (GPT_DATA_URL); W&B runs offline; nothing touches the network.
"""

from __future__ import annotations

import re
import shlex
import time

import pytest

from tests.conftest import SHARED_DATA
from tests.helpers import REPO

# a tiny model and a short run, appended to a training command (later flags win)
SHORT_TRAIN = ["--max_iters=4", "--eval_interval=2", "--eval_iters=1", "--log_interval=2", "--num_samples=0",
               "--batch_size=4", "--progress=false", "--compile=false"]  # the GPU presets compile: not in seconds
SHORT_SAMPLE = ["--max_new_tokens=16", "--num_samples=1"]

# README command -> the command run instead (the Makefile's own command for a make target), shortened
SHORTER = {
    "make train": "python -m gptforge.train --config gptforge/train/configs/shakespeare_char_cpu.toml "
                  "--out_dir=out/shakespeare_char_cpu --overwrite",
    "make sample": "python -m gptforge.gpt.sample --out_dir=out/shakespeare_char_cpu",
}
NOT_RUN = {  # README command (its start) -> why it is not run here
    "python -m gptforge.train [--config FILE]": "a usage line, not a command",
    "python -m gptforge.data prepare --input 'owt/": "needs an OpenWebText download (tens of GB)",
    "python -m gptforge.train --config gptforge/train/configs/gpt2.toml --dataset owt": "GPT-2 124M on OpenWebText: "
                                                                                         "a GPU node",
    "python -m gptforge.data tokenizer --input 'owt/": "needs an OpenWebText download",
    "torchrun --standalone --nproc_per_node=8": "8 GPUs",
    "torchrun --nnodes=2": "two nodes",
    "torchrun --standalone --nproc_per_node=4": "continues the 8-GPU FSDP run above",
    "python -m gptforge.train --out_dir=out --resume --strategy=single": "continues the 8-GPU FSDP run above",
    "torchrun --standalone --nproc_per_node=2": "2 ranks for 40 steps under torchrun: about a minute here "
                                                "(tests/test_fsdp.py covers resharding)",
    "python -m gptforge.train --out_dir=out-fsdp": "continues the torchrun FSDP run, not run here",
    "deepspeed ": "DeepSpeed's launcher on GPUs or several hosts",
    "sbatch ": "SLURM",
    "python -m gptforge.train --dataset=shakespeare --init_from=gpt2": "downloads GPT-2's weights; its configuration "
                                                                         "is checked in test_finetune_example_config",
    "hf download": "the network",
    "export GPT_MODELS_DIR": "a shell setting, not a program",
    "python -m gptforge.gpt.sample --init_from=gpt2": "GPT-2's weights (the network)",
    "python -m gptforge.gpt.sample --init_from=path/to/nanoGPT": "a path to the user's nanoGPT checkpoint",
    "python -m gptforge.gpt.pretrained export --out_dir out/run": "out/run is the user's run",
    "make finetune": "pre-training, SFT and RL: minutes (tests/test_finetune_runs.py runs the stages)",
    "make test": "the test suite itself (minutes)",
    "make lint": "the lint step of make's checks, not a user command to verify here",
    "make bench": "benchmarks (minutes)",
    "make gpu-suite": "a GPU",
    "python3 benchmarks/gpu_suite.py": "a GPU, or a rehearsal of minutes",
}


def readme_commands() -> list[str]:
    """Each command of README.md's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            command = re.split(r"\s+#", line.strip(), maxsplit=1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def why_not_run(command: str) -> str | None:
    return next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)


def entry_point(module: str):
    if module == "gptforge.train":
        from gptforge.train.__main__ import main
    elif module == "gptforge.data":
        from gptforge.data.cli import main
    elif module == "gptforge.gpt.sample":
        from gptforge.gpt.sample import main
    else:
        raise AssertionError(f"no entry point known for python -m {module}: add it to tests/test_readme_commands.py")
    return main


def shortened(module: str, argv: list[str]) -> list[str]:
    if module == "gptforge.train":
        return [*argv, *SHORT_TRAIN, "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=32"]
    if module == "gptforge.gpt.sample":
        return [*argv, *SHORT_SAMPLE]
    return argv


def test_every_readme_command_is_run_or_has_a_reason():
    unknown = [c for c in readme_commands() if why_not_run(c) is None and not c.startswith("python -m ")
               and c not in SHORTER]
    assert not unknown, f"README commands neither run nor listed in NOT_RUN: {unknown}"
    unused = [start for start in NOT_RUN if not any(c.startswith(start) for c in readme_commands())]
    assert not unused, f"NOT_RUN names commands the README no longer has: {unused}"


def test_finetune_example_config():
    """The fine-tuning example's flags are accepted (min_lr follows a learning rate below its default)."""
    from gptforge.train.config import load_config, parse_args

    command = next(c for c in readme_commands() if "--init_from=gpt2" in c and "gptforge.train" in c)
    cfg = load_config(*parse_args(shlex.split(command)[3:]))
    assert cfg.final_lr() <= cfg.learning_rate


def test_readme_commands_run(tmp_path, monkeypatch, capsys):
    text = SHARED_DATA / "tinyshakespeare.txt"
    if not text.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {text} (set GPT_SHARED_DATA)")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPT_DATA_URL", text.as_uri())
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-home"))
    (tmp_path / "gptforge").symlink_to(REPO / "gptforge")  # the presets' paths, as from the checkout's root
    lines = text.read_text().splitlines()
    (tmp_path / "my_corpus.txt").write_text("\n".join(lines[:3000]) + "\n")  # the README's "your text"
    (tmp_path / "notes.txt").write_text("\n".join(lines[3000:6000]) + "\n")
    ran, seconds = [], {}
    for command in readme_commands():
        if why_not_run(command):
            continue
        words = shlex.split(SHORTER.get(command, command))
        assert words[:2] == ["python", "-m"], f"cannot run {command!r} here: add it to SHORTER or NOT_RUN"
        module, argv = words[2], words[3:]
        if module == "gptforge.train" and "--tensorboard_log" in argv:
            pytest.importorskip("tensorboard")
            pytest.importorskip("wandb")
        started = time.perf_counter()
        code = entry_point(module)(shortened(module, argv))
        out = capsys.readouterr()
        seconds[command] = time.perf_counter() - started
        assert code == 0, f"{command!r} exited {code}: {out.err[-2000:]}"
        ran.append(command)
    assert len(ran) >= 12, ran
    with capsys.disabled():  # where the time goes, for whoever keeps this test under a minute
        print("\n" + "\n".join(f"{t:6.1f} s  {c}" for c, t in sorted(seconds.items(), key=lambda x: -x[1])[:5]))
