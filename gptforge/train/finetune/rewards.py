"""RL rewards: a built-in task's exact checker, or the user's own function.

    --reward=task                  1.0 when the completion is the task's answer, else 0.0
    --reward=mymodule:my_reward    my_reward(prompt: str, completion: str, example: dict) -> float

``example`` is the prompt's JSONL object (``--finetune_data``), or for a task's problems
``{"prompt": ..., "answer": ...}``; the completion is the response's text, without the end
token. A function that cannot be imported, raises, or returns anything but a finite number
stops the run with one line that names it (RL checks it once before the first step too).
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable

from gptforge.train.config import ConfigError
from gptforge.train.finetune.tasks import Problem, Task

RewardFn = Callable[[str, str, dict], float]


class RewardError(ConfigError):
    """The reward function failed or returned something other than a finite number."""


def load_reward(spec: str, task: Task | None) -> RewardFn:
    """The function ``--reward`` names."""
    if spec == "task":
        if task is None:
            raise ConfigError("--reward=task scores with a built-in task's checker: set --task=NAME, or "
                              "--reward=module:function for your own")

        def task_reward(prompt: str, completion: str, example: dict) -> float:
            return float(task.check(Problem(prompt, str(example.get("answer", ""))), completion))

        return task_reward
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"--reward={spec}: expected task or module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- any failure to import is the user's module's to report
        raise ConfigError(f"--reward={spec}: cannot import module {module_name!r} "
                          f"({type(err).__name__}: {err}); is it on PYTHONPATH?") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--reward={spec}: module {module_name!r} has no function {name!r}")
    return fn


def score(fn: RewardFn, spec: str, prompt: str, completion: str, example: dict) -> float:
    """``fn``'s reward for one completion, checked: a finite number, or a RewardError."""
    try:
        value = fn(prompt, completion, example)
    except Exception as err:  # noqa: BLE001 -- the user's code: whatever it raises is reported in one line
        message = str(err).splitlines()[0][:200] if str(err) else ""
        raise RewardError(f"--reward={spec} raised {type(err).__name__}: {message} (prompt {prompt[:60]!r})") \
            from None
    if not isinstance(value, numbers.Real):  # a bool counts: True is 1.0
        raise RewardError(f"--reward={spec} returned {type(value).__name__} {value!r:.60}; expected a number "
                          f"(prompt {prompt[:60]!r})")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"--reward={spec} returned {value}; expected a finite number (prompt {prompt[:60]!r})")
    return value
