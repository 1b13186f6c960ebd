"""Real corpora: many files of documents -> fixed-size token shards and a manifest.

    python -m gptforge.data prepare --input 'corpus/*.jsonl.gz' --tokenizer gpt2 --dataset owt --workers 8

Inputs are ``.txt`` files (one document each), JSON lines (``.jsonl``, ``.jsonl.gz``,
``.jsonl.zst``: one document per line, its text in ``--text_field``) and Parquet files (a text
column). Every document is tokenized (in ``--workers`` processes) and followed by the
tokenizer's end-of-text token, and the token stream of each split is cut into shards of
``--shard_tokens`` tokens (the last one shorter):

    data_dir/owt/
        manifest.json                      written last: the dataset is complete when it exists
        train_000000.bin  train_000001.bin ...  val_000000.bin ...
        .progress/                         while preparing: the completed shards' resume points

Each shard is a 64-byte header (magic, version, bytes per token, token count) followed by the
tokens, uint16 when the vocabulary fits and uint32 otherwise. The manifest holds the
tokenizer, the token counts and the largest token id (checked here, once, so that a training
start reads only the manifest and the shard headers), every shard's sha256, and the input
files with their sizes.

The validation split is by documents: ``--val_fraction F`` puts each document in val with
probability F (a hash of its index: the same documents on every run), ``--val_input GLOB``
takes val from other files. No document is in both.

Order and results do not depend on the number of workers: documents are numbered in input
order (files sorted by path) and written in that order. A killed prepare resumes from the last
completed shard when run again (shards are written to a temporary name and renamed); an input
that changed meanwhile is refused. A bad document (invalid UTF-8, a line that is not JSON, a
missing or non-text field) is reported with its file and line and skipped (``--on_bad=skip``),
or stops the prepare (``--on_bad=stop``).
"""

from __future__ import annotations

import collections
import contextlib
import glob as globlib
import gzip
import hashlib
import json
import multiprocessing
import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
PROGRESS_DIR = ".progress"
FORMAT = "gpt-token-shards"
FORMAT_VERSION = 1
MAGIC = b"GPTSHARD"
HEADER_BYTES = 64  # magic (8), version (4), bytes per token (4), token count (8), zeros
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's shard size
BATCH_BYTES = 1 << 20  # raw text per task sent to a worker
MAX_REPORTED = 20  # bad documents listed (all are counted)
INPUT_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.zst": "jsonl", ".parquet": "parquet"}


class CorpusError(RuntimeError):
    """A corpus cannot be prepared or read as asked; the message says why and what to do."""


class BadDocumentError(CorpusError):
    """A bad document under --on_bad=stop (the command line exits with status 2)."""


# ----------------------------------------------------------------------------- shards


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write one shard atomically (temporary name, fsync, rename); returns its sha256."""
    header = MAGIC + struct.pack("<IIQ", FORMAT_VERSION, tokens.dtype.itemsize, len(tokens))
    header += bytes(HEADER_BYTES - len(header))
    data = memoryview(np.ascontiguousarray(tokens)).cast("B")  # the tokens' bytes, not a copy of them
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    digest = hashlib.sha256(header)
    digest.update(data)
    return digest.hexdigest()


def read_header(path: Path) -> tuple[np.dtype, int]:
    """A shard's token dtype and count, from its header (and its size checked against them)."""
    try:
        with open(path, "rb") as f:
            header = f.read(HEADER_BYTES)
        size = path.stat().st_size
    except OSError as err:
        raise CorpusError(f"cannot read shard {path}: {err.strerror or err}; prepare the dataset again") from None
    if len(header) < HEADER_BYTES or header[:8] != MAGIC:
        raise CorpusError(f"{path} is not a token shard (no {MAGIC.decode()} header); prepare the dataset again")
    version, itemsize, count = struct.unpack("<IIQ", header[8:24])
    if version != FORMAT_VERSION or itemsize not in (2, 4):
        raise CorpusError(f"{path}: shard format {version} with {itemsize}-byte tokens; this code reads format "
                          f"{FORMAT_VERSION} with 2 or 4: prepare the dataset again")
    if size != HEADER_BYTES + count * itemsize:
        raise CorpusError(f"{path} holds {size} bytes, but its header says {count:,} tokens of {itemsize} bytes: "
                          "damaged or cut short; prepare the dataset again")
    return np.dtype(np.uint16 if itemsize == 2 else np.uint32), count


class ShardedTokens:
    """The shards of one split as one read-only token stream: ``len`` and slicing like a 1-D
    array (a slice may span shards). Each shard is memory-mapped on first use, so opening
    costs one header read per shard whatever the corpus size."""

    def __init__(self, paths: list[Path], counts: list[int], dtype: np.dtype):
        self.paths, self.counts, self.dtype = paths, counts, dtype
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r", offset=HEADER_BYTES,
                                      shape=(self.counts[i],))
        return self._maps[i]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedTokens supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        parts, position = [], start
        while position < stop:
            i = int(np.searchsorted(self.starts, position, side="right")) - 1
            offset = position - self.starts[i]
            take = min(stop - position, self.counts[i] - offset)
            parts.append(self._shard(i)[offset : offset + take])
            position += take
        if not parts:
            return np.empty(0, dtype=self.dtype)
        return np.concatenate(parts) if len(parts) != 1 else np.asarray(parts[0])


def is_sharded(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def load_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CorpusError(f"cannot read {path} ({err}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{path} is not a token-shard manifest; prepare the dataset again")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorpusError(f"{path} has format version {manifest.get('format_version')}, this code reads "
                          f"{FORMAT_VERSION}; prepare the dataset again")
    return manifest


def open_split(folder: str | Path, split: str) -> ShardedTokens:
    """The ``split``'s shards as one stream, each shard's header checked against the manifest."""
    folder, manifest = Path(folder), load_manifest(folder)
    shards = manifest["splits"][split]["shards"]
    paths, counts, dtype = [], [], np.dtype(manifest["dtype"])
    for shard in shards:
        path = folder / shard["file"]
        got_dtype, count = read_header(path)
        if count != shard["tokens"] or got_dtype != dtype:
            raise CorpusError(f"{path} holds {count:,} {got_dtype} tokens, the manifest says {shard['tokens']:,} "
                              f"{dtype}: the dataset is damaged; prepare it again")
        paths.append(path)
        counts.append(count)
    return ShardedTokens(paths, counts, dtype)


def verify_corpus(folder: str | Path) -> list[str]:
    """Every problem of a prepared corpus, reading every shard: a missing or short file, a header
    that disagrees with the manifest, a sha256 that does not match. Empty when it is sound."""
    folder, problems = Path(folder), []
    manifest = load_manifest(folder)
    for split, entry in manifest["splits"].items():
        for shard in entry["shards"]:
            path = folder / shard["file"]
            try:
                _, count = read_header(path)
            except CorpusError as err:
                problems.append(str(err))
                continue
            if count != shard["tokens"]:
                problems.append(f"{path} holds {count:,} tokens, the manifest says {shard['tokens']:,}")
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
            if digest.hexdigest() != shard.get("sha256"):
                problems.append(f"{path} does not match its sha256 in the manifest ({split} split): damaged")
    return problems


class ShardWriter:
    """Appends tokens to one split and writes a shard each time ``shard_tokens`` have gathered."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype, done: list[dict] | None = None):
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        self.shards: list[dict] = list(done or [])  # {"file", "tokens", "max_token_id", "sha256"} written
        self.written = sum(shard["tokens"] for shard in self.shards)  # tokens in them, kept as a running sum
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0

    def append(self, tokens: np.ndarray) -> list[dict]:
        """Add tokens; returns the shards this completed (each already on disk)."""
        self.pending.append(tokens.astype(self.dtype, copy=False))
        self.pending_tokens += len(tokens)
        written = []
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            written.append(self._write(stream[: self.shard_tokens]))
            rest = stream[self.shard_tokens :]
            self.pending, self.pending_tokens = [rest], len(rest)
        return written

    def finish(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
            self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> dict:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        # the largest id, taken while the tokens are in memory: prepare's token-id check reads no shard back
        shard = dict(file=name, tokens=len(tokens), max_token_id=int(tokens.max()) if len(tokens) else 0,
                     sha256=write_shard(self.folder / name, tokens))
        self.shards.append(shard)
        self.written += len(tokens)
        return shard

    @property
    def tokens(self) -> int:
        return self.written + self.pending_tokens


def write_manifest(folder: Path, writers: dict[str, ShardWriter], tokenizer_meta: dict, vocab_size: int,
                   max_token_id: int, extra: dict) -> dict:
    """The manifest, last, atomically: its presence marks the dataset complete."""
    manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, dtype=next(iter(writers.values())).dtype.name,
                    vocab_size=vocab_size, max_token_id=max_token_id, tokenizer=tokenizer_meta,
                    splits={s: dict(tokens=w.tokens, shards=w.shards) for s, w in writers.items()}, **extra)
    tmp = folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return manifest


# ----------------------------------------------------------------------------- inputs


def input_kind(path: str | Path) -> str | None:
    name = str(path).lower()
    return next((kind for suffix, kind in sorted(INPUT_KINDS.items(), key=lambda kv: -len(kv[0]))
                 if name.endswith(suffix)), None)  # fmt: skip


def expand_inputs(pattern: str) -> list[Path]:
    """The files a glob (or a directory, or one path) names, sorted, each of a kind we read."""
    path = Path(pattern)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and input_kind(p))
    else:
        found = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
    if not found:
        raise CorpusError(f"--input {pattern!r} matches no file")
    unknown = [p for p in found if input_kind(p) is None]
    if unknown:
        raise CorpusError(f"{unknown[0]} is not an input this reads: use {', '.join(INPUT_KINDS)} files")
    return found


def describe_inputs(paths: list[Path]) -> list[dict]:
    """The input files as the manifest lists them; a resumed prepare compares them."""
    return [dict(path=str(p.resolve()), bytes=p.stat().st_size, mtime_ns=p.stat().st_mtime_ns) for p in paths]


def _open_lines(path: Path) -> Iterable[bytes]:
    name = str(path).lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        import io

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def iter_raw_documents(path: Path, text_field: str) -> Iterator[tuple[int, bytes | str]]:
    """(line or row number, raw document) of one input file: a .txt file is one document; JSON
    lines are parsed by the workers (bytes here); Parquet yields its column's strings (a null is
    passed on as None: a bad document). A file that cannot be read to its end (cut short,
    damaged) is a CorpusError naming it and where it broke."""
    number = 0
    try:
        for number, raw in _raw_documents(path, text_field):
            yield number, raw
    except CorpusError:
        raise
    except Exception as err:  # noqa: BLE001 -- gzip, zstandard and pyarrow each raise their own kinds
        raise CorpusError(f"{path} cannot be read after document {number} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'no detail'}): replace the file, or "
                          "leave it out of --input") from None


def _raw_documents(path: Path, text_field: str) -> Iterator[tuple[int, bytes | str]]:
    kind = input_kind(path)
    if kind == "txt":
        yield 1, path.read_bytes()
    elif kind == "jsonl":
        with _open_lines(path) as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield number, line
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorpusError(f"{path}: reading Parquet needs the pyarrow package (pip install pyarrow)") from None
        parquet = pq.ParquetFile(path)
        if text_field not in parquet.schema_arrow.names:
            raise CorpusError(f"{path} has no column {text_field!r} (its columns: "
                              f"{', '.join(parquet.schema_arrow.names)}); name the text column with --text_field")
        row = 0
        for group in range(parquet.num_row_groups):
            for value in parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist():
                row += 1
                yield row, value


def parse_document(kind: str, raw: bytes | str | None, text_field: str) -> str:
    """The text of one raw document; a ValueError says why it is not one."""
    if kind == "txt":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"invalid UTF-8 at byte {err.start}") from None
    if kind == "jsonl":
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as err:
            raise ValueError(f"invalid UTF-8 at byte {err.start}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"no {text_field!r} field")
        raw = record[text_field]
    if not isinstance(raw, str):
        raise ValueError(f"the {text_field!r} field is {type(raw).__name__}, not text")
    try:
        raw.encode("utf-8")  # a lone surrogate ("\\ud800" in JSON) is no Unicode text
    except UnicodeEncodeError as err:
        raise ValueError(f"not Unicode text (a lone surrogate at character {err.start})") from None
    return raw


# ----------------------------------------------------------------------------- workers

_worker_tokenizer = None


def _init_worker(tokenizer_meta: dict) -> None:
    global _worker_tokenizer
    from gptforge.gpt.tokenizer import tokenizer_from_meta

    _worker_tokenizer = tokenizer_from_meta(tokenizer_meta)


def eot_of(tokenizer) -> int:
    eot = getattr(tokenizer, "eot_id", None)
    eot = getattr(tokenizer, "eot_token", None) if eot is None else eot
    if eot is None:
        raise CorpusError(f"the {tokenizer.name} tokenizer has no end-of-text token to separate documents: use "
                          "--tokenizer gpt2 or one trained with python -m gptforge.data tokenizer")
    return int(eot)


def _tokenize(task: tuple) -> tuple[list[tuple], Path, str]:
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


def ordered_map(pool, fn, tasks: Iterable, ahead: int) -> Iterator:
    """``fn`` over ``tasks`` in the executor, results in task order, with at most ``ahead`` tasks
    in flight: the corpus is read as fast as it is tokenized, never into memory ahead of it
    (``Pool.imap`` would queue every task at once). A worker that dies (killed for memory)
    raises BrokenProcessPool here, where ``multiprocessing.Pool`` would wait forever."""
    window: collections.deque = collections.deque()
    for task in tasks:
        window.append(pool.submit(fn, task))
        if len(window) >= ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


# ----------------------------------------------------------------------------- prepare


def is_val(index: int, fraction: float) -> bool:
    """Whether document ``index`` belongs to the validation split: a fixed hash of the index,
    so the choice is the same on every run and for any number of workers."""
    return fraction > 0 and zlib.crc32(index.to_bytes(8, "little")) < fraction * 2**32


@dataclass
class SplitState:
    """Where one split's written shards end: the next shard starts ``skip`` tokens into document
    ``index``; and what the documents before that point were (counted, the bad ones listed)."""

    index: int = 0
    skip: int = 0
    documents: int = 0
    bad: int = 0
    examples: list = field(default_factory=list)  # [doc index, "file:line: why"], the first MAX_REPORTED

    def fold(self, events: list[tuple[int, str | None]]) -> None:
        """Count documents (doc index, None if good else where and why it is bad) of this split."""
        self.documents += sum(bad is None for _, bad in events)
        self.bad += sum(bad is not None for _, bad in events)
        self.examples += [[i, bad] for i, bad in events if bad is not None][: MAX_REPORTED - len(self.examples)]


def prepare_corpus(
    folder: str | Path,
    inputs: list[Path],
    tokenizer_meta: dict,
    *,
    val_inputs: list[Path] | None = None,
    val_fraction: float = 0.0,
    text_field: str = "text",
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    on_bad: str = "skip",
    log=print,
) -> dict:
    """Tokenize ``inputs`` (and ``val_inputs``) into shards in ``folder``; returns the manifest.
    A prepare of the same inputs and settings that was killed continues from its last shards."""

    folder = Path(folder)
    if on_bad not in ("skip", "stop"):
        raise CorpusError(f"--on_bad must be skip or stop, got {on_bad!r}")
    if shard_tokens < 1:
        raise CorpusError(f"--shard_tokens must be >= 1, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if bool(val_inputs) == (val_fraction > 0):
        raise CorpusError("give the validation split either as --val_fraction F (a share of the documents) or as "
                          "--val_input GLOB (other files), one of the two")
    if workers < 1:
        raise CorpusError(f"--workers must be >= 1, got {workers}")
    # the workers start first: they load the tokenizer while this process checks it
    with _worker_pool(workers, tokenizer_meta) as pool:
        return _prepare(folder, inputs, tokenizer_meta, val_inputs, val_fraction, text_field, shard_tokens, on_bad,
                        log, pool, workers)


@contextlib.contextmanager
def _worker_pool(workers: int, tokenizer_meta: dict) -> Iterator[ProcessPoolExecutor | None]:
    """``workers`` tokenizing processes (spawned: no fork of a process whose tokenizer may hold
    threads), or None for one worker: this process tokenizes."""
    if workers == 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(tokenizer_meta,))
    try:
        for _ in range(workers):
            pool.submit(int)  # the processes start now, not at the first batch
        yield pool
    except BrokenProcessPool:
        raise CorpusError("a tokenizing worker process died (killed for memory?); run the same command again "
                          "(it resumes), with fewer --workers if memory is short") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _prepare(folder: Path, inputs: list[Path], tokenizer_meta: dict, val_inputs: list[Path] | None,
             val_fraction: float, text_field: str, shard_tokens: int, on_bad: str, log,
             pool: ProcessPoolExecutor | None, workers: int) -> dict:
    from gptforge.gpt.tokenizer import tokenizer_from_meta

    tokenizer = tokenizer_from_meta(tokenizer_meta)
    eot_of(tokenizer)
    vocab_size, dtype = tokenizer.vocab_size, token_dtype(tokenizer.vocab_size)
    overlap = {p.resolve() for p in inputs} & {p.resolve() for p in val_inputs or []}
    if overlap:
        raise CorpusError(f"{sorted(overlap)[0]} is in both --input and --val_input: a document may be in one "
                          "split only")
    if (folder / "meta.json").is_file() or (folder / "train.bin").is_file():
        raise CorpusError(f"{folder} holds a dataset prepared from a text file; a dataset is never replaced: "
                          "choose another --dataset name, or delete the folder first")
    files = [(p, "train") for p in inputs] + [(p, "val") for p in (val_inputs or [])]
    settings = dict(tokenizer=tokenizer_meta, inputs=describe_inputs([p for p, _ in files]),
                    input_splits=[s for _, s in files], val_fraction=val_fraction, text_field=text_field,
                    shard_tokens=shard_tokens)  # what decides the shards (--on_bad only whether to go on)
    if is_sharded(folder):
        done = load_manifest(folder)
        if all(done.get(k) == v for k, v in settings.items()):
            log(f"{folder} is prepared already from these inputs ({done['splits']['train']['tokens']:,} train tokens)")
            return done
        raise CorpusError(f"{folder} holds a dataset prepared from other inputs or settings; a dataset is never "
                          "replaced: choose another --dataset name, or delete the folder first")
    progress_dir = folder / PROGRESS_DIR
    progress_dir.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".*.tmp"):  # a shard being written when a prepare was killed
        leftover.unlink()
    shards, saved = _load_progress(progress_dir, settings)
    writers = {s: ShardWriter(folder, s, shard_tokens, dtype, shards[s]) for s in ("train", "val")}
    resume = {s: (saved[s].index, saved[s].skip) for s in writers}  # fixed: what this run skips
    pending: dict[str, list] = {"train": [], "val": []}  # (doc index, bad "file:line: why" or None) since saved
    if shards["train"] or shards["val"]:
        log(f"resuming: {len(shards['train'])} train and {len(shards['val'])} val shards were written already")

    def split_of(index: int, file_split: str) -> str:
        return "val" if file_split == "val" or is_val(index, val_fraction) else "train"

    def tasks() -> Iterator[tuple]:
        """Batches of about BATCH_BYTES of raw documents, in input order, without the documents
        whose tokens are in shards written already (read, but neither parsed nor tokenized)."""
        index = 0
        for path, file_split in files:
            kind, batch, size = input_kind(path), [], 0
            for line, raw in iter_raw_documents(path, text_field):
                if index >= resume[split_of(index, file_split)][0]:
                    batch.append((index, line, raw))
                    size += len(raw) if raw is not None else 0
                    if size >= BATCH_BYTES:
                        yield kind, text_field, dtype, path, file_split, batch
                        batch, size = [], 0
                index += 1
            if batch:
                yield kind, text_field, dtype, path, file_split, batch

    def commit(split: str, index: int, skip: int) -> None:
        """A shard of ``split`` was written: record where the next one starts, and fold the
        documents before that point into the split's saved counts."""
        saved[split].fold([e for e in pending[split] if e[0] < index])
        pending[split] = [e for e in pending[split] if e[0] >= index]
        saved[split].index, saved[split].skip = index, skip
        _save_progress(progress_dir, settings, writers, saved)

    if pool is not None:
        results = ordered_map(pool, _tokenize, tasks(), ahead=2 * workers)
    else:
        _init_worker(tokenizer_meta)
        results = map(_tokenize, tasks())
    for docs, path, file_split in results:
        for index, line, tokens, error in docs:
            split = split_of(index, file_split)
            where = None if error is None else f"{path}:{line}: {error}"
            pending[split].append((index, where))
            if error is not None:
                if on_bad == "stop":
                    raise BadDocumentError(f"bad document at {where} (--on_bad=stop; --on_bad=skip counts "
                                           "and skips them)")
                continue
            skipped = resume[split][1] if index == resume[split][0] else 0  # written before a restart
            writer, whole = writers[split], len(tokens)
            before = writer.tokens - skipped  # the stream position where this document starts
            if writer.append(tokens[skipped:]):  # one or more shards written
                into = writer.written - before  # its tokens in written shards
                commit(split, *((index, into) if into < whole else (index + 1, 0)))
    for writer in writers.values():
        writer.finish()
    for split in writers:
        saved[split].fold(pending[split])  # the documents after the last shard's start
        if writers[split].tokens == 0:
            raise CorpusError(f"the {split} split is empty: give more documents (or a larger --val_fraction)")
    max_id = max(shard["max_token_id"] for w in writers.values() for shard in w.shards)
    if max_id >= vocab_size:
        raise CorpusError(f"token id {max_id} is outside the tokenizer's vocabulary of {vocab_size}: the tokenizer "
                          "is broken; delete the folder and prepare again with another")
    examples = sorted(e for s in saved.values() for e in s.examples)[:MAX_REPORTED]
    bad = sum(s.bad for s in saved.values())
    manifest = write_manifest(folder, writers, tokenizer_meta, vocab_size, max_id, dict(
        **{k: v for k, v in settings.items() if k != "tokenizer"}, documents={s: saved[s].documents for s in writers},
        bad_documents=dict(count=bad, first=[where for _, where in examples])))
    for leftover in progress_dir.iterdir():
        leftover.unlink()
    progress_dir.rmdir()
    log(f"{folder}: {writers['train'].tokens:,} train and {writers['val'].tokens:,} val tokens in "
        f"{len(writers['train'].shards)} + {len(writers['val'].shards)} shards ({dtype.name}); "
        f"{saved['train'].documents:,} + {saved['val'].documents:,} documents"
        + (f"; {bad:,} bad documents skipped, the first at {examples[0][1]}" if bad else ""))
    return manifest


def _load_progress(progress_dir: Path, settings: dict) -> tuple[dict[str, list], dict[str, SplitState]]:
    """The shards a stopped prepare wrote, and where each split goes on; nothing when fresh."""
    path = progress_dir / "state.json"
    if not path.is_file():
        return {"train": [], "val": []}, {"train": SplitState(), "val": SplitState()}
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise CorpusError(f"{path} is damaged; delete {progress_dir.parent} to start afresh") from None
    if state.get("settings") != settings:
        changed = [k for k in settings if state.get("settings", {}).get(k) != settings[k]]
        raise CorpusError(f"{progress_dir.parent} holds a prepare that was stopped with other "
                          f"{', '.join(changed)} (did an input change?); run it with what it had, or delete "
                          f"{progress_dir.parent} to start afresh")
    for shard in state["shards"]["train"] + state["shards"]["val"]:
        shard_path = progress_dir.parent / shard["file"]
        if not shard_path.is_file() or read_header(shard_path)[1] != shard["tokens"]:
            raise CorpusError(f"{shard_path} is missing or damaged; delete {progress_dir.parent} to start afresh")
    return state["shards"], {s: SplitState(**v) for s, v in state["splits"].items()}


def _save_progress(progress_dir: Path, settings: dict, writers: dict[str, ShardWriter],
                   saved: dict[str, SplitState]) -> None:
    state = dict(settings=settings, shards={s: w.shards for s, w in writers.items()},
                 splits={s: vars(v) for s, v in saved.items()})
    tmp = progress_dir / f"state.json.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(state))
        f.flush()
        os.fsync(f.fileno())  # it names shards already on disk: a power cut must not lose it half-written
    os.replace(tmp, progress_dir / "state.json")
