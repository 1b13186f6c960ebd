"""One import name: our package is ``gptforge`` and nothing else, so it lives beside transformers
and Hugging Face's ``kernels`` in one process, from the repo root (where pytest and ``python -m``
put the working directory first on ``sys.path``) and from anywhere else."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERIC = ("kernels", "gpt", "train", "data", "tests", "benchmarks")
ROOT_FOLDERS = ("tests", "benchmarks")  # not installed, but importable from the repo root itself

# Imports transformers' GPT-2, Hugging Face's kernels (where installed) and our package in one
# process, runs our model and a kernel, and prints where each name came from.
PROBE = textwrap.dedent(f"""
    import importlib.util, json, sys
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    hf_kernels = importlib.util.find_spec("kernels")
    if hf_kernels is not None:
        import kernels
    from gptforge import kernels as our_kernels
    from gptforge.gpt.config import GPTConfig
    from gptforge.gpt.model import GPT

    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=1, n_head=2, n_embd=16))
    logits, loss = ours(torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 16)))
    theirs = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    q = torch.randn(1, 2, 8, 4)
    print(json.dumps(dict(
        gptforge=sys.modules["gptforge"].__file__,
        our_kernels=our_kernels.__name__,
        attention=callable(our_kernels.attention),
        hf_kernels=None if hf_kernels is None else sys.modules["kernels"].__file__,
        transformers_gpt2=type(theirs).__module__,
        loss=float(loss),
        attention_shape=list(our_kernels.attention(q, q, q, causal=True).shape),
        generic={{name: getattr(importlib.util.find_spec(name), "origin", None) for name in {GENERIC!r}}},
    )))
""")


def from_this_repo(origin: str | None) -> bool:
    """Whether a module file lies in this checkout's own folders (a virtual environment inside the
    checkout, such as make's .venv, holds other people's packages and does not count)."""
    if origin is None:
        return False
    try:
        inside = Path(origin).resolve().relative_to(REPO)
    except ValueError:
        return False
    return inside.parts[0] != ".venv"


def probe(cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(seen: dict, from_repo: bool) -> None:
    assert seen["our_kernels"] == "gptforge.kernels" and seen["attention"]
    assert seen["attention_shape"] == [1, 2, 8, 4]
    assert seen["transformers_gpt2"] == "transformers.models.gpt2.modeling_gpt2"
    assert 0 < seen["loss"] < 10
    if seen["hf_kernels"] is not None:  # Hugging Face's, from site-packages: never a folder of this repo
        assert not from_this_repo(seen["hf_kernels"]), seen["hf_kernels"]
    for name, origin in seen["generic"].items():  # no generic top-level name resolves into the repo
        if from_repo and name in ROOT_FOLDERS:
            continue
        assert not from_this_repo(origin), f"{name} -> {origin}"


def test_from_the_repo_root_transformers_hf_kernels_and_ours_share_a_process():
    seen = probe(REPO)  # ``python -c`` puts the working directory first, as pytest and ``python -m`` do
    assert Path(seen["gptforge"]).resolve().parent == REPO / "gptforge"
    check(seen, from_repo=True)


def test_our_model_runs_from_a_script_outside_the_repo(tmp_path):
    if importlib.util.find_spec("gptforge") is None or not _installed():
        pytest.fail("gptforge is not installed in this environment: run make install (pip install -e .)")
    check(probe(tmp_path), from_repo=False)  # gptforge as installed (make install: editable)


def test_this_process_has_each_name_where_it_belongs():
    """pytest's own process: the repo root is on sys.path, and still only gptforge comes from it."""
    from gptforge import kernels as our_kernels

    assert our_kernels.__name__ == "gptforge.kernels"
    for name in GENERIC:
        if name in ROOT_FOLDERS:
            continue
        spec = importlib.util.find_spec(name)
        assert spec is None or not from_this_repo(spec.origin), f"{name} -> {spec.origin}"


def test_the_distribution_installs_one_top_level_name():
    if not _installed():
        pytest.fail("gptforge is not installed in this environment: run make install (pip install -e .)")
    tops = {top for top, dists in importlib.metadata.packages_distributions().items() if "gptforge" in dists}
    assert tops == {"gptforge"}, tops


def _installed() -> bool:
    try:
        importlib.metadata.distribution("gptforge")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
