"""Token shards and their manifest: the on-disk form of a prepared corpus, written and read.

    data_dir/owt/
        manifest.json                      written last: the dataset is complete when it exists
        train_000000.bin  train_000001.bin ...  val_000000.bin ...

Each shard is a 64-byte header (magic, version, bytes per token, token count) followed by the
tokens, uint16 when the vocabulary fits and uint32 otherwise. The manifest holds the
tokenizer, the token counts and the largest token id (checked once, when the corpus is
prepared, so that a training start reads only the manifest and the shard headers), every
shard's sha256 and largest id, and the input files with their sizes. Training reads a split's
shards as one stream (ShardedTokens), its ids checked as they are read (checks.py);
``python -m gptforge.data verify`` reads every byte (verify_corpus).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from gptforge.data.errors import CorpusError

MANIFEST = "manifest.json"
FORMAT = "gpt-token-shards"
FORMAT_VERSION = 1
MAGIC = b"GPTSHARD"
HEADER_BYTES = 64  # magic (8), version (4), bytes per token (4), token count (8), zeros


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


def read_last_token(path: Path, dtype: np.dtype, count: int) -> int | None:
    """A shard's last token, read with one small read (no memory map); None for an empty shard."""
    if count == 0:
        return None
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES + (count - 1) * dtype.itemsize)
        return int(np.frombuffer(f.read(dtype.itemsize), dtype=dtype)[0])


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
    """Whether ``folder`` holds a complete corpus (its manifest is written last)."""
    return (Path(folder) / MANIFEST).is_file()


def load_manifest(folder: str | Path) -> dict[str, Any]:
    """The corpus's manifest, checked to be one this code reads."""
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
    _check_fields(path, manifest)
    return manifest


def _field(path: Path, record: object, key: str, kind: type, where: str = "") -> Any:
    """``record[key]``, a ``kind``; else a CorpusError naming the manifest and the field."""
    damaged = "the manifest is damaged; prepare the dataset again"
    if not isinstance(record, dict):
        raise CorpusError(f"{path}: {where.rstrip('.')} is {type(record).__name__}, not an object; {damaged}")
    if key not in record:
        raise CorpusError(f"{path} lacks the field {where}{key}; {damaged}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CorpusError(f"{path}: the field {where}{key} is {type(value).__name__}, not {kind.__name__}; {damaged}")
    return value


def _check_fields(path: Path, manifest: dict) -> None:
    """Every field a start or ``verify`` reads, present and of its type (a few dozen shards: microseconds)."""
    for key, kind in (("dtype", str), ("vocab_size", int), ("max_token_id", int), ("tokenizer", dict),
                      ("inputs", list), ("splits", dict)):
        _field(path, manifest, key, kind)
    if manifest["dtype"] not in ("uint16", "uint32"):
        raise CorpusError(f"{path}: the field dtype is {manifest['dtype']!r}, not uint16 or uint32; the manifest is "
                          "damaged; prepare the dataset again")
    for split in ("train", "val"):
        entry = _field(path, manifest["splits"], split, dict, "splits.")
        _field(path, entry, "tokens", int, f"splits.{split}.")
        for i, shard in enumerate(_field(path, entry, "shards", list, f"splits.{split}.")):
            where = f"splits.{split}.shards[{i}]."
            for key, kind in (("file", str), ("tokens", int)):  # verify reports a sha256 that is missing
                _field(path, shard, key, kind, where)
            if "max_token_id" in shard:  # recorded since the first version; a start compares it
                _field(path, shard, "max_token_id", int, where)
            if Path(shard["file"]).name != shard["file"] or shard["file"] in ("", ".", ".."):
                raise CorpusError(f"{path}: the field {where}file is {shard['file']!r}, not a file name in its "
                                  "folder; the manifest is damaged; prepare the dataset again")


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
    that disagrees with the manifest, a sha256 that does not match, a token id past the
    vocabulary or the shard's recorded largest, a split that does not end with the end-of-text
    token. Empty when it is sound."""
    folder, problems = Path(folder), []
    manifest = load_manifest(folder)
    vocab_size, eot = manifest["vocab_size"], manifest.get("eot_id")
    for split, entry in manifest["splits"].items():
        last = None
        for shard in entry["shards"]:
            path = folder / shard["file"]
            try:
                dtype, count = read_header(path)
            except CorpusError as err:
                problems.append(str(err))
                last = None
                continue
            if count != shard["tokens"]:
                problems.append(f"{path} holds {count:,} tokens, the manifest says {shard['tokens']:,}")
            digest, largest = hashlib.sha256(), -1
            with open(path, "rb") as f:
                digest.update(f.read(HEADER_BYTES))
                while chunk := f.read(1 << 24):  # a multiple of 4: whole tokens of either dtype
                    digest.update(chunk)
                    tokens = np.frombuffer(chunk, dtype=dtype)
                    if len(tokens):
                        largest, last = max(largest, int(tokens.max())), int(tokens[-1])
            if digest.hexdigest() != shard.get("sha256"):
                problems.append(f"{path} does not match its sha256 in the manifest ({split} split): damaged")
            if largest >= vocab_size or largest > shard.get("max_token_id", largest):
                problems.append(f"{path} holds token id {largest}, but the vocabulary has {vocab_size} tokens (the "
                                f"manifest says its largest is {shard.get('max_token_id')})")
        if eot is not None and last is not None and last != eot:
            problems.append(f"the {split} split ends with token {last}, not the end-of-text token {eot}: its last "
                            "shard is damaged or of another tokenizer")
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
        """Write what is left as the split's last (shorter) shard."""
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
