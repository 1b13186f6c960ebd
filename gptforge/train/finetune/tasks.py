"""Built-in tasks: problems generated from a seed, each with one right answer and an exact checker.

    reverse   "reverse stone" -> "enots"      (lowercase words of 3 to 8 letters)
    sort      "sort stone"    -> "enost"      (the same words, letters in alphabetical order)
    add       "add 27+385"    -> "412"        (numbers below 1000; needs a tokenizer with digits)

``reverse`` and ``sort`` use only lowercase letters and spaces, so a character model
pre-trained on Tiny Shakespeare can learn them (its text has no digits but 3). Nothing is
downloaded. A problem is held out when a hash of its prompt says so (about one in ten): the
training problems skip those, the held-out ones keep only those, so the two sets never share
a problem, whatever the seeds.

    python -m gptforge.train.finetune.tasks reverse --split train --count 1000 > reverse.jsonl
writes problems as JSONL in the SFT format ({"prompt": ..., "response": ...}).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass

HELD_OUT_PER_256 = 26  # about 10% of all problems are held out


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "response": self.answer}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))


def _reverse(rng: random.Random) -> Problem:
    word = _word(rng)
    return Problem(f"reverse {word}", word[::-1])


def _sort(rng: random.Random) -> Problem:
    word = _word(rng)
    return Problem(f"sort {word}", "".join(sorted(word)))


def _add(rng: random.Random) -> Problem:
    a, b = rng.randrange(1000), rng.randrange(1000)
    return Problem(f"add {a}+{b}", str(a + b))


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[[random.Random], Problem]

    def held_out(self, problem: Problem) -> bool:
        """Whether ``problem`` belongs to the held-out set (a pure function of its prompt)."""
        return hashlib.sha256(f"{self.name}:{problem.prompt}".encode()).digest()[0] < HELD_OUT_PER_256

    def check(self, problem: Problem, completion: str) -> bool:
        """Exact: the completion, without surrounding whitespace, is the answer."""
        return completion.strip() == problem.answer

    def problems(self, split: str, count: int, seed: int = 0) -> list[Problem]:
        """``count`` problems of ``split``: "train" (drawn from ``seed``; they may repeat) or
        "held_out" (distinct, the same ones for every seed: runs compare on one test set)."""
        if split not in ("train", "held_out"):
            raise ValueError(f"split must be train or held_out, got {split!r}")
        held = split == "held_out"
        rng = random.Random(f"{self.name}:held_out" if held else f"{self.name}:{seed}")
        found: dict[str, Problem] = {}
        out: list[Problem] = []
        tries = 0
        while len(out) < count:
            tries += 1
            if tries > 1000 * count + 10_000:
                raise ValueError(f"task {self.name} has fewer than {count} distinct {split} problems")
            problem = self.make(rng)
            if self.held_out(problem) != held or held and problem.prompt in found:
                continue
            found[problem.prompt] = problem
            out.append(problem)
        return out


TASK_LIST = (Task("reverse", _reverse), Task("sort", _sort), Task("add", _add))
TASKS = tuple(t.name for t in TASK_LIST)


def get_task(name: str) -> Task:
    for task in TASK_LIST:
        if task.name == name:
            return task
    raise ValueError(f"unknown task {name!r}; built in: {', '.join(TASKS)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gptforge.train.finetune.tasks",
                                description="Write a built-in task's problems as SFT JSONL to stdout.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("--split", choices=("train", "held_out"), default="train")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.count <= 10_000_000:
        p.error(f"--count must be from 1 to 10,000,000, got {args.count}")
    for problem in get_task(args.task).problems(args.split, args.count, args.seed):
        sys.stdout.write(json.dumps(problem.to_json()) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
