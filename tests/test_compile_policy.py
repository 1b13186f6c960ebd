"""--compile=auto|true|false (gptforge/train/compile_policy.py): short runs stay eager, long ones
compile, from the measured cost model; the decision is tested, nothing is compiled here. Old
checkpoints saved compile as a boolean and still resume; bare flags keep working."""

from __future__ import annotations

import json

import pytest

from gptforge.gpt.io import MANIFEST, sha256_of
from gptforge.train.compile_policy import COST_MODELS, decide, steps_to_run
from gptforge.train.config import ConfigError, TrainConfig, load_config, parse_args
from gptforge.train.resume import normalised
from tests.helpers import config, read_metrics

# the shakespeare_char_cpu recipe: 4 layers, 4x128, B 32 x T 128 = 4,096 tokens a step, 2.28e10 FLOP a step
RECIPE_FLOPS, CPU_CEILING = 2.28e10, 2.0e11  # 200 GFLOP/s: 2 AMD EPYC cores, fp32, measured


@pytest.fixture(autouse=True)
def a_cpp_compiler(monkeypatch):
    """The decision as on a machine with g++ (inductor's CPU backend needs one), wherever the tests run."""
    import gptforge.train.compile_policy as policy

    monkeypatch.setattr(policy, "cpp_compiler", lambda: "/usr/bin/g++")


def test_short_runs_stay_eager_and_long_ones_compile():
    short = decide("auto", 50, RECIPE_FLOPS, CPU_CEILING, n_layer=4, device_type="cpu")
    long = decide("auto", 5000, RECIPE_FLOPS, CPU_CEILING, n_layer=4, device_type="cpu")
    assert not short.compile and short.reason.startswith("eager: 50 steps of about")
    assert long.compile and long.reason.startswith("compiling: 5000 steps of about")
    # the break-even the reason names is where the choice flips
    breakeven = int(short.reason.split("it pays from about ")[1].split(" steps")[0].replace(",", ""))
    assert not decide("auto", breakeven - 2, RECIPE_FLOPS, CPU_CEILING, 4, "cpu").compile
    assert decide("auto", breakeven + 1, RECIPE_FLOPS, CPU_CEILING, 4, "cpu").compile
    # a deeper model costs more to compile: it pays later
    deeper = decide("auto", breakeven + 1, RECIPE_FLOPS, CPU_CEILING, 48, "cpu")
    assert not deeper.compile


def test_a_faster_machine_needs_a_longer_run():
    steps = 2000
    assert decide("auto", steps, RECIPE_FLOPS, CPU_CEILING, 4, "cpu").compile
    assert not decide("auto", steps, RECIPE_FLOPS, CPU_CEILING * 100, 4, "cpu").compile  # steps 100x shorter


def test_explicit_choices_and_unknown_devices():
    assert decide("true", 1, RECIPE_FLOPS, CPU_CEILING, 4, "cpu").compile
    assert not decide("false", 10**9, RECIPE_FLOPS, CPU_CEILING, 4, "cpu").compile
    assert decide("false", 1, 1.0, None, 4, "cpu").reason == "eager (--compile=false)"
    assert not decide("auto", 10**6, RECIPE_FLOPS, CPU_CEILING, 4, "mps").compile
    assert not decide("auto", 10**6, RECIPE_FLOPS, None, 4, "cpu").compile
    assert set(COST_MODELS) == {"cpu", "cuda"}


@pytest.mark.parametrize("argv, expected", [([], "auto"), (["--compile"], "true"), (["--compile=false"], "false"),
                                            (["--compile=true"], "true"), (["--compile=auto"], "auto")])
def test_compile_flag(argv, expected):
    assert load_config(*parse_args(argv)).compile == expected


def test_compile_from_toml_python_and_old_checkpoints(tmp_path):
    (tmp_path / "c.toml").write_text("compile = true\n")
    assert load_config(tmp_path / "c.toml").compile == "true"
    assert TrainConfig(compile=False).compile == "false"
    old = {**TrainConfig().to_dict(), "compile": False, "progress": True}
    assert normalised(old, tmp_path)["compile"] == "false"
    assert normalised(old, tmp_path)["progress"] == "auto"  # the old default, not a choice about files
    with pytest.raises(ConfigError, match="compile must be one of auto, true, false"):
        TrainConfig(compile="sometimes")


def test_a_checkpoint_that_saved_compile_as_a_boolean_resumes(data_dir, tmp_path):
    from gptforge.train.loop import train

    out = tmp_path / "run"
    train(config(data_dir, out, max_iters=2, eval_interval=2), log=lambda *_: None)
    (checkpoint,) = (out / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer.json").read_text())
    assert state["config"]["compile"] == "auto"  # a run saves auto: a resumed one decides for what is left
    state["config"].update(compile=False, progress=False)  # as the previous version wrote them
    (checkpoint / "trainer.json").write_text(json.dumps(state))
    manifest = json.loads((checkpoint / MANIFEST).read_text())  # the checkpoint stays valid: its hash follows
    manifest["files"]["trainer.json"] = sha256_of(checkpoint / "trainer.json")
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    lines = []
    cfg = config(data_dir, out, max_iters=4, eval_interval=2, resume="true")
    assert steps_to_run(cfg) == 2
    train(cfg, log=lines.append)
    assert any("compile: eager (--compile=false)" in line for line in lines)
    assert [r["step"] for r in read_metrics(out) if "val_loss" in r] == [0, 2, 4]


def test_min_lr_follows_a_lower_learning_rate():
    cfg = TrainConfig(learning_rate=3e-5)  # the README's fine-tuning example
    assert cfg.final_lr() == pytest.approx(3e-6) and cfg.lr_at(10**6) == pytest.approx(3e-6)
    assert TrainConfig().final_lr() == pytest.approx(2e-4)  # the default learning rate's tenth, as before
    with pytest.raises(ConfigError, match=r"min_lr \(0.001\) must not exceed learning_rate \(3e-05\)"):
        TrainConfig(learning_rate=3e-5, min_lr=1e-3)


def test_bare_activation_checkpointing_means_full():
    assert load_config(*parse_args(["--activation_checkpointing"])).activation_checkpointing == "full"
    assert load_config(*parse_args(["--activation_checkpointing=selective"])).activation_checkpointing == "selective"


def test_no_cpp_compiler_stays_eager(monkeypatch):
    import gptforge.train.compile_policy as policy

    monkeypatch.setattr(policy, "cpp_compiler", lambda: None)
    choice = decide("auto", 10**6, RECIPE_FLOPS, CPU_CEILING, 4, "cpu")
    assert not choice.compile and "C++ compiler" in choice.reason


def test_make_train_compiles_and_the_speedrun_stays_eager():
    """The presets as the cost model sees them (800 and 140 steps of the 4x128 model)."""
    assert decide("auto", 800, RECIPE_FLOPS, CPU_CEILING, 4, "cpu").compile
    assert not decide("auto", 140, 2.12e10, CPU_CEILING, 4, "cpu").compile
