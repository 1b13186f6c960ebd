"""No orphans (issue 28): whatever ends ``prepare --workers 2`` (SIGTERM, SIGKILL, an error in
the preparing process), its tokenizing workers and multiprocessing's resource tracker are gone
within seconds, and so are the /dev/shm semaphores they shared.

The prepare runs in a session of its own. To act at a known moment, the harness below runs the
real command line with one change in the preparing process only: after each input file is
read, it waits for a line on stdin before it reads on, with the workers standing idle, as
they do between batches.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc (Linux)")

HARNESS = """
import select, sys
from gptforge.data import corpus
from gptforge.data.cli import main

real = corpus.iter_raw_documents

def pausing(path, text_field):
    yield from real(path, text_field)
    print("read", flush=True)
    # wait in short steps, as the real prepare waits for its batches: a signal that lands on
    # another thread is acted on when the main thread next runs Python
    while not select.select([sys.stdin], [], [], 0.05)[0]:
        pass
    sys.stdin.readline()

corpus.iter_raw_documents = pausing
sys.exit(main(sys.argv[1:]))
"""
GONE_WITHIN = 10.0  # seconds; the workers die at once, the tracker once they have


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited (a container's init may never reap it)


def semaphores(pid: int) -> set[str]:
    """The POSIX named semaphores ``pid`` has open (each is a mapped /dev/shm/sem.* file)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if "/dev/shm/sem." in line}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("orphans")
    (root / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(300)))
    return root / "a.jsonl"


def start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED_DATA / "tiktoken_cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", HARNESS, *args], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def wait_for_workers(proc: subprocess.Popen, count: int = 3, timeout: float = 120) -> list[int]:
    """The prepare's child processes (2 workers and the resource tracker) once all have started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = children(proc.pid)
        if len(found) >= count:
            return found
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"the workers never started: {children(proc.pid)}")


def assert_nothing_left(proc: subprocess.Popen, pids: list[int], sems: set[str]) -> None:
    try:
        deadline = time.monotonic() + GONE_WITHIN
        while time.monotonic() < deadline and (any(alive(p) for p in pids) or any(map(os.path.exists, sems))):
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], "processes outlived the prepare"
        assert not [s for s in sems if os.path.exists(s)], "semaphores were left in /dev/shm"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the orphans of a failed test, if any: never left running
        except ProcessLookupError:
            pass
        proc.wait()


def prepare_args(source: Path, data: Path) -> list[str]:
    return ["prepare", "--input", str(source), "--dataset", "c", "--data_dir", str(data), "--workers", "2",
            "--val_fraction", "0.05"]


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_killing_a_prepare_leaves_no_worker_and_no_semaphore(corpus_file, tmp_path, kill):
    proc = start(prepare_args(corpus_file, tmp_path))
    pids = wait_for_workers(proc)
    assert proc.stdout.readline() == "read\n"  # mid-prepare: the input read, the workers waiting for more
    sems = set().union(*map(semaphores, [proc.pid, *pids]))
    assert sems, "no semaphore found to watch"
    os.kill(proc.pid, kill)
    assert proc.wait(timeout=GONE_WITHIN) in ((130,) if kill == signal.SIGTERM else (-signal.SIGKILL,))
    assert_nothing_left(proc, pids, sems)


def test_an_error_in_the_prepare_stops_its_workers(corpus_file, tmp_path):
    """A file cut short after good ones: the preparing process stops with exit 2 and one line."""
    import gzip

    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jsonl").write_bytes(corpus_file.read_bytes())
    packed = gzip.compress(corpus_file.read_bytes())
    (root / "b.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    proc = start(prepare_args(root / "*", tmp_path / "data"))
    pids = wait_for_workers(proc)
    assert proc.stdout.readline() == "read\n"  # a.jsonl is read; the workers are up
    sems = set().union(*map(semaphores, [proc.pid, *pids]))
    _, err = proc.communicate("\n", timeout=120)  # read on: b.jsonl.gz ends too soon
    assert proc.returncode == 2 and err.count("\n") == 1 and "b.jsonl.gz cannot be read" in err, err
    assert_nothing_left(proc, pids, sems)
    assert not (tmp_path / "data").exists()  # nothing written before its first shard is left behind
