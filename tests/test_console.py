"""What a run prints (gptforge/train/console.py): a progress bar at a terminal, plain lines
with the time and the ETA in a file; --progress=auto|true|false, a bare --progress meaning true."""

from __future__ import annotations

import io
import re
import subprocess
import sys

import pytest

from gptforge.train.config import TrainConfig, load_config, parse_args
from gptforge.train.console import eta_seconds, timestamped, wants_progress_bar
from gptforge.train.metrics import duration
from tests.helpers import REPO, flags

TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d "


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_shows_a_bar_only_where_both_streams_are_terminals():
    assert wants_progress_bar("auto", (Terminal(), Terminal()))
    assert not wants_progress_bar("auto", (io.StringIO(), Terminal()))  # stdout to a file
    assert not wants_progress_bar("auto", (Terminal(), io.StringIO()))  # stderr (the bar's stream) to a file
    assert wants_progress_bar("true", (io.StringIO(), io.StringIO()))
    assert not wants_progress_bar("false", (Terminal(), Terminal()))


@pytest.mark.parametrize("argv, expected", [([], "auto"), (["--progress"], "true"), (["--progress=false"], "false"),
                                            (["--progress", "true"], "true"), (["--progress=auto"], "auto")])
def test_progress_flag(argv, expected):
    assert load_config(*parse_args(argv)).progress == expected


def test_progress_from_python_and_toml(tmp_path):
    assert TrainConfig(progress=False).progress == "false" and TrainConfig(progress=True).progress == "true"
    (tmp_path / "c.toml").write_text("progress = false\n")
    assert load_config(tmp_path / "c.toml").progress == "false"


def test_timestamps_and_eta():
    lines = []
    log = timestamped(lines.append)
    assert timestamped(log) is log  # wrapping twice does not stamp twice
    log("hello")
    assert re.fullmatch(TIME + "hello", lines[0])
    assert eta_seconds(0.0, 10, 10, 100) is None  # nothing done yet: no pace to go by
    assert [duration(s) for s in (0.4, 12, 185, 3725)] == ["0s", "12s", "3m05s", "1h02m"]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptforge.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_a_run_into_a_file_has_no_bar_and_time_stamped_lines_with_eta(data_dir, tmp_path):
    """stdout and stderr are pipes here, as with ``> run.log``."""
    base = flags(data_dir, tmp_path / "a", max_iters=4, eval_interval=4, log_interval=2)
    auto = run_cli([a for a in base if not a.startswith("--progress")])
    assert auto.returncode == 0, auto.stderr
    assert "0/4 [" not in auto.stdout + auto.stderr  # no bar's frames
    steps = [line for line in auto.stdout.splitlines() if re.match(TIME + r"step \d+: loss", line)]
    assert len(steps) == 2 and all(re.search(r", ETA \d+(s|m\d\ds)$", line) for line in steps), auto.stdout
    forced = run_cli([*flags(data_dir, tmp_path / "b", max_iters=4, eval_interval=4, log_interval=2), "--progress"])
    assert forced.returncode == 0, forced.stderr
    assert "0/4 [" in forced.stderr and "4/4 [" in forced.stderr  # tqdm's bar, forced on
    assert re.search(r"^step 4: loss", forced.stdout, re.M)  # with a bar the lines carry no time stamp
