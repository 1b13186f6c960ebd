"""The SFT and RL stages as runs: exact resume, a step without learning signal, rollouts under
DDP, and bad input (one line, exit 2, nothing lost). A tiny character GPT stands in for the
pre-trained model: fine-tuning needs weights and a tokenizer, not a good model."""

from __future__ import annotations

import json
import string

import pytest
import safetensors.torch
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.io import save_model
from gptforge.gpt.model import GPT
from gptforge.gpt.tokenizer import CharTokenizer
from gptforge.train.__main__ import main
from gptforge.train.checkpoint import list_checkpoints
from gptforge.train.config import TrainConfig
from gptforge.train.stages import train
from tests.helpers import REPO, read_metrics, torchrun_cmd
from tests.helpers import run as run_command

pytestmark = pytest.mark.usefixtures("one_thread")

FINETUNE = dict(batch_size=4, learning_rate=1e-3, min_lr=1e-4, warmup_iters=1, eval_interval=2, eval_iters=1,
                log_interval=1, eval_problems=6, max_new_tokens=10, num_samples=0, progress=False, device="cpu",
                dtype="fp32", optimizer="adamw", task="reverse")
RL = dict(rl_prompts=2, group_size=3, ppo_epochs=2, kl_coef=0.05, learning_rate=1e-3)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A character GPT whose vocabulary holds the tasks' letters (and digits, for add)."""
    directory = tmp_path_factory.mktemp("base")
    tokenizer = CharTokenizer(" +" + string.digits + string.ascii_lowercase)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=40,
                          bias=False))
    save_model(model, directory, tokenizer.to_meta())
    return directory


def cfg(out_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{**FINETUNE, "out_dir": str(out_dir), **overrides})


def weights(out_dir) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(list_checkpoints(out_dir)[-1] / "model.safetensors"))


def same_run(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    keep = ("step", "loss", "val_loss", "accuracy", "reward", "kl", "val_reward", "policy_loss")
    rows = [[{k: r[k] for k in keep if k in r} for r in read_metrics(d) if "memory_per_rank" not in r] for d in (a, b)]
    assert rows[0] == rows[1]


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_a_resumed_run_is_the_run_without_the_stop(base_model, tmp_path, stage):
    extra = dict(stage=stage, init_from=str(base_model), max_iters=4, **(RL if stage == "rl" else {}))
    whole = train(cfg(tmp_path / "whole", **extra))
    train(cfg(tmp_path / "parts", **{**extra, "max_iters": 2}))
    resumed = train(cfg(tmp_path / "parts", **{**extra, "max_iters": 4, "resume": "true"}))
    same_run(tmp_path / "whole", tmp_path / "parts")
    assert whole["accuracy"] == resumed["accuracy"]
    if stage == "rl":
        assert (tmp_path / "parts" / "reference" / "manifest.json").is_file()
        assert (tmp_path / "whole" / "rl.png").is_file()
        row = [r for r in read_metrics(tmp_path / "whole") if "reward" in r][-1]
        for key in ("reward", "sample_accuracy", "kl", "entropy", "clip_fraction", "rollout_tokens_per_s"):
            assert key in row, key


def test_sft_then_rl_from_its_checkpoint(base_model, tmp_path):
    train(cfg(tmp_path / "sft", stage="sft", init_from=str(base_model), max_iters=2))
    result = train(cfg(tmp_path / "rl", stage="rl", init_from=str(tmp_path / "sft"), max_iters=1, **RL))
    assert 0.0 <= result["accuracy"] <= 1.0 and "val_reward" in result
    info = json.loads((list_checkpoints(tmp_path / "rl")[-1] / "model.json").read_text())
    assert info["tokenizer"]["name"] == "chat" and info["config"]["vocab_size"] == 38 + 4


def write_module(tmp_path, monkeypatch, name: str, body: str) -> str:
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_step_whose_groups_all_agree_changes_nothing(base_model, tmp_path, monkeypatch):
    module = write_module(tmp_path, monkeypatch, "constant_reward", "def reward(prompt, completion, example):\n"
                          "    return 1.0\n")
    train(cfg(tmp_path / "rl", stage="rl", init_from=str(base_model), max_iters=1, reward=f"{module}:reward",
              **{**RL, "kl_coef": 0.0}))
    after = weights(tmp_path / "rl")
    before = safetensors.torch.load_file(str(tmp_path / "rl" / "reference" / "model.safetensors"))
    assert all(torch.equal(after[k], before[k]) for k in after)


def test_rl_rollouts_under_ddp(base_model, tmp_path):
    flags = [f"--{k}={v}" for k, v in {**FINETUNE, **RL, "stage": "rl", "init_from": base_model, "max_iters": 2,
                                       "rl_prompts": 4, "gradient_accumulation_steps": 2,
                                       "out_dir": tmp_path / "ddp"}.items()]
    proc = run_command([*torchrun_cmd(), *flags], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows if "reward" in r] == [1, 2]
    assert (tmp_path / "ddp" / "reference").is_dir() and REPO.is_dir()


# --- bad input: one line on stderr, exit 2, nothing on disk lost ---

def run_cli(capsys, args: dict) -> tuple[int, str]:
    rc = main([f"--{k}={v}" for k, v in args.items()])
    err = capsys.readouterr().err.strip()
    return rc, err


def jsonl(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = json.dumps({"prompt": "reverse ab", "response": "ba"})


@pytest.mark.parametrize("lines, message", [
    ([GOOD, '{"prompt": "reverse ab", "response": '], ":2: not a JSON object"),
    ([GOOD, json.dumps({"prompt": "reverse ab", "response": "  "})], ":2: empty response"),
    ([GOOD, json.dumps({"prompt": "reverse " + "ab" * 30, "response": "ba"})], ":2: the example is"),
    ([GOOD, json.dumps({"messages": [{"role": "user", "content": "x"}]})], ":2: no assistant message"),
    ([GOOD, json.dumps({"question": "x"})], ":2: expected {\"prompt\", \"response\"}"),
    ([GOOD, json.dumps({"prompt": "reverse AB", "response": "BA"})], ":2: text has 2 character(s)"),
])
def test_bad_sft_data(base_model, tmp_path, capsys, lines, message):
    out = tmp_path / "out"
    rc, err = run_cli(capsys, {**FINETUNE, "task": "", "stage": "sft", "init_from": base_model, "max_iters": 1,
                               "out_dir": out, "finetune_data": jsonl(tmp_path, lines)})
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not list_checkpoints(out)


REWARDS = {
    "raises": ("def reward(prompt, completion, example):\n    return 1 / 0\n", "raised ZeroDivisionError"),
    "nan": ("def reward(prompt, completion, example):\n    return float('nan')\n", "returned nan"),
    "text": ("def reward(prompt, completion, example):\n    return 'yes'\n", "returned str 'yes'"),
}


@pytest.mark.parametrize("case", [*REWARDS, "missing module", "missing function"])
def test_bad_reward_function(base_model, tmp_path, capsys, monkeypatch, case):
    if case in REWARDS:
        spec = write_module(tmp_path, monkeypatch, f"reward_{case}", REWARDS[case][0]) + ":reward"
        message = REWARDS[case][1]
    elif case == "missing module":
        spec, message = "no_such_reward_module:reward", "cannot import module 'no_such_reward_module'"
    else:
        spec = write_module(tmp_path, monkeypatch, "reward_other", "def other(p, c, e):\n    return 0.0\n") + ":reward"
        message = "has no function 'reward'"
    out = tmp_path / "out"
    rc, err = run_cli(capsys, {**FINETUNE, **RL, "stage": "rl", "init_from": base_model, "max_iters": 1,
                               "out_dir": out, "reward": spec})
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() or not list_checkpoints(out)


def test_a_reward_that_fails_mid_run_keeps_the_run(base_model, tmp_path, capsys, monkeypatch):
    """Fine before the first step, broken at the second: the first step's checkpoint survives and
    the message says how to go on."""
    module = write_module(tmp_path, monkeypatch, "flaky_reward", "calls = []\n"
                          "def reward(prompt, completion, example):\n"
                          "    calls.append(1)\n"
                          "    if len(calls) > 1 + 6 + 6 + 6:\n"  # the start check, two evaluations, one step
                          "        raise RuntimeError('scorer offline')\n"
                          "    return float(completion == example['answer'])\n")
    out = tmp_path / "out"
    rc, err = run_cli(capsys, {**FINETUNE, **RL, "stage": "rl", "init_from": base_model, "max_iters": 3,
                               "eval_interval": 1, "checkpoint_interval": 1, "out_dir": out,
                               "reward": f"{module}:reward"})
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "raised RuntimeError: scorer offline" in err and "continue with --resume" in err
    assert [c.name for c in list_checkpoints(out)][-1] == "step_0000001"
