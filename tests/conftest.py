"""Test set-up shared by every test file.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; it must be
switched on before ``triton`` is first imported, so it is set here, at collection time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
# Tiny Shakespeare and the GPT-2 BPE files, laid beside the checkout (never committed).
SHARED_DATA = Path(os.environ.get("GPT_SHARED_DATA", REPO.parent / "shared" / "data"))

# The measured matmul ceiling (gptforge/train/ceiling.py) is cached in a temporary folder, never the
# user's ~/.cache: measured once per machine, dtype and thread count, then read by every test run.
os.environ["GPTFORGE_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / f"gptforge-test-cache-{os.getuid()}")

if (SHARED_DATA / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One worker per core (make test): a second torch thread per worker would only wait for a core.
    torch.set_num_threads(1)


@pytest.fixture
def shakespeare_path() -> Path:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {path} (set GPT_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, request) -> Path:
    """Tiny Shakespeare prepared for the character model in a fresh folder, once per test module
    (from the local copy: tests never touch the network)."""
    from gptforge.data import prepare

    text = SHARED_DATA / "tinyshakespeare.txt"
    if not text.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {text} (set GPT_SHARED_DATA)")
    root = tmp_path_factory.mktemp("data")
    patch = pytest.MonkeyPatch()
    patch.setenv("GPT_DATA_URL", text.as_uri())
    request.addfinalizer(patch.undo)
    prepare("shakespeare_char", root)
    return root


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread in this process for a module's tests (``pytest.mark.usefixtures``): the
    models are tiny, and on a busy machine a second thread that spins waiting for a core makes a
    step ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
