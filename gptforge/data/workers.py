"""The tokenizing processes of a corpus prepare: raw documents in, each document's tokens out.

Each worker loads the tokenizer once, then turns batches of raw documents into tokens (each
document followed by the end-of-text token), or into the reason it is a bad document. Results
come back in task order, so the shards do not depend on the number of workers. Workers never
outlive the prepare: they die with it, whatever kills it (die_with_parent), and an error in it
stops them at once.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from gptforge.data.errors import CorpusError
from gptforge.data.inputs import parse_document

_worker_tokenizer = None  # this process's tokenizer, loaded once by init_worker


def init_worker(tokenizer_meta: dict, parent: int | None = None) -> None:
    """Load the tokenizer that tokenize_batch uses in this process (a pool's initializer); in a
    pool (``parent``: the preparing process's pid), first arrange to die with the parent."""
    global _worker_tokenizer
    from gptforge.gpt.tokenizer import tokenizer_from_meta

    if parent is not None:
        die_with_parent(parent)
    _worker_tokenizer = tokenizer_from_meta(tokenizer_meta)


PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 1.0
WAKE_SECONDS = 0.2  # the preparing process's longest sleep while it waits for a batch


def die_with_parent(parent: int) -> None:
    """End this worker when ``parent`` ends, however it ends (SIGKILL included): a worker blocked
    on the task queue would otherwise wait forever, re-parented to PID 1, and keep the resource
    tracker and its /dev/shm semaphores alive with it. Linux: the kernel's parent-death signal;
    elsewhere, and as a backstop, a thread that watches the parent's pid."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def eot_of(tokenizer: Any) -> int:
    """The tokenizer's end-of-text id, which ends every document; a CorpusError if it has none."""
    eot = getattr(tokenizer, "eot_id", None)
    eot = getattr(tokenizer, "eot_token", None) if eot is None else eot
    if eot is None:
        raise CorpusError(f"the {tokenizer.name} tokenizer has no end-of-text token to separate documents: use "
                          "--tokenizer gpt2 or one trained with python -m gptforge.data tokenizer")
    return int(eot)


def tokenize_batch(task: tuple) -> tuple[list[tuple], Path, str]:
    """One batch of documents -> ([(doc index, line, tokens or None, error or None)], path, split)."""
    kind, text_field, dtype, path, file_split, docs = task
    tok = _worker_tokenizer
    eot = eot_of(tok)
    out = []
    for index, line, raw in docs:
        try:
            text = parse_document(kind, raw, text_field)
        except ValueError as err:
            out.append((index, line, None, str(err)))
            continue
        try:
            ids = tok.encode(text)
        except Exception as err:  # noqa: BLE001 -- a document the tokenizer refuses is a bad document
            out.append((index, line, None, f"the tokenizer refused it ({type(err).__name__}: {err})"))
            continue
        tokens = np.empty(len(ids) + 1, dtype=dtype)
        tokens[:-1], tokens[-1] = ids, eot
        out.append((index, line, tokens, None))
    return out, path, file_split


def ordered_map(pool: ProcessPoolExecutor, fn: Callable[[Any], Any], tasks: Iterable, ahead: int) -> Iterator:
    """``fn`` over ``tasks`` in the executor, results in task order, with at most ``ahead`` tasks
    in flight: the corpus is read as fast as it is tokenized, never into memory ahead of it
    (``Pool.imap`` would queue every task at once). A worker that dies (killed for memory)
    raises BrokenProcessPool here, where ``multiprocessing.Pool`` would wait forever."""
    window: collections.deque = collections.deque()
    for task in tasks:
        window.append(pool.submit(fn, task))
        if len(window) >= ahead:
            yield _result(window.popleft())
    while window:
        yield _result(window.popleft())


def _result(future: Future) -> Any:
    """``future.result()``, waking every WAKE_SECONDS: a SIGTERM that the kernel hands to one of
    the pool's threads runs its handler only when the main thread next runs Python."""
    while True:
        try:
            return future.result(timeout=WAKE_SECONDS)
        except FuturesTimeout:
            continue


@contextlib.contextmanager
def worker_pool(workers: int, tokenizer_meta: dict) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` tokenizing processes (spawned: no fork of a process whose tokenizer may hold
    threads), or None for one worker: this process tokenizes."""
    if workers == 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker,
                               initargs=(tokenizer_meta, os.getpid()))
    failed = True
    try:
        for _ in range(workers):
            pool.submit(int)  # the processes start now, not at the first batch
        yield pool
        failed = False
    except BrokenProcessPool:
        raise CorpusError("a tokenizing worker process died (killed for memory?); run the same command again "
                          "(it resumes), with fewer --workers if memory is short") from None
    finally:
        if failed:  # an error or Ctrl-C: the batches in flight are of no use, so the workers go now
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                with contextlib.suppress(Exception):
                    process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
