"""A corpus's input files: which ones a --input names, and the documents in each.

Inputs are ``.txt`` files (one document each), JSON lines (``.jsonl``, ``.jsonl.gz``,
``.jsonl.bz2``, ``.jsonl.zst``: one document per line, its text in ``--text_field``) and Parquet
files (a text column). Every file is read to its verified end: a compressed file cut short
(gzip, bz2 and zstd each check their own end) or a Parquet file without its footer is an error
naming the file, never a corpus quietly shorter. A file reached twice (a symlink, a glob
that matches it by two paths) is read once.

Files are read here as raw documents; parse_document turns one into text (in the tokenizing
workers, so that parsing runs in parallel), or says why it is a bad document.
"""

from __future__ import annotations

import bz2
import glob as globlib
import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from gptforge.data.errors import CorpusError

INPUT_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".jsonl.bz2": "jsonl", ".jsonl.zst": "jsonl",
               ".parquet": "parquet"}


def input_kind(path: str | Path) -> str | None:
    """"txt", "jsonl" or "parquet" by the file's name (the longest matching suffix); None for others."""
    name = str(path).lower()
    return next((kind for suffix, kind in sorted(INPUT_KINDS.items(), key=lambda kv: -len(kv[0]))
                 if name.endswith(suffix)), None)  # fmt: skip


def is_corpus_input(pattern: str) -> bool:
    """Whether ``--input`` names a corpus (token shards) rather than one plain text: a glob, a
    folder, or a JSON-lines or Parquet file. The data CLI and training decide alike."""
    if any(c in pattern for c in "*?["):
        return True
    return Path(pattern).is_dir() or input_kind(pattern) not in ("txt", None)


def expand_inputs(pattern: str) -> list[Path]:
    """The files a glob (or a directory, or one path) names, sorted, each of a kind we read, each
    once: of the paths that lead to one file (symlinks), the first in sorted order stays."""
    path = Path(pattern)
    if path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file() and input_kind(p))
    else:
        candidates = sorted(Path(p) for p in globlib.glob(pattern, recursive=True) if Path(p).is_file())
    found, seen = [], set()
    for candidate in candidates:
        real = candidate.resolve()
        if real not in seen:
            seen.add(real)
            found.append(candidate)
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
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise CorpusError(f"{path}: reading .zst needs the zstandard package (pip install zstandard)") from None
        return io.BufferedReader(_ZstdReader(path, zstandard.ZstdDecompressor()), buffer_size=1 << 20)
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """A .zst file's bytes, every frame of it, read to its verified end: an EOFError where the
    file ends inside a frame (zstandard's stream_reader ends there quietly, and after its first
    frame unless told otherwise)."""

    def __init__(self, path: Path, dctx) -> None:
        self._file, self._dctx = open(path, "rb"), dctx
        self._frame, self._in_frame = dctx.decompressobj(), False  # in_frame: fed a frame whose end is unseen
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._pos == len(self._out):
            data = self._file.read(1 << 20)
            if not data:
                if self._in_frame:
                    raise EOFError("the file ends inside a zstd frame: it was cut short")
                return 0
            pieces = []
            while data:
                pieces.append(self._frame.decompress(data))
                self._in_frame, data = True, b""
                if self._frame.eof:  # the frame is complete: what follows is the next frame
                    data, self._frame, self._in_frame = self._frame.unused_data, self._dctx.decompressobj(), False
            self._out, self._pos = b"".join(pieces), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


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
