"""Data preparation: text -> token ids -> ``train.bin`` / ``val.bin`` (uint16) + ``meta.json``.

    python -m gptforge.data prepare --dataset shakespeare_char     # Tiny Shakespeare, one token per character
    python -m gptforge.data prepare --dataset shakespeare          # Tiny Shakespeare, GPT-2 BPE
    python -m gptforge.data prepare --input my.txt --tokenizer char  # any local UTF-8 text, into data/my/
    python -m gptforge.data prepare --input 'corpus/*.jsonl.gz' --dataset owt --tokenizer gpt2 --workers 8 \
        --val_fraction 0.005                                      # a real corpus: token shards (gptforge/data/corpus.py)
    python -m gptforge.data tokenizer --input 'corpus/*.jsonl' --kind bpe --vocab_size 32768 --out tok/
    python -m gptforge.data verify --dataset owt                      # every shard against its sha256

As in nanoGPT, the first 90% of the text is the training split and the last 10% the validation
split; each part is encoded on its own (for Tiny Shakespeare with GPT-2 BPE that gives nanoGPT's
301,966 / 36,059 tokens). Tiny Shakespeare is downloaded once into ``<data_dir>/downloads/``,
checked against its sha256, and reused while the cached copy still matches.

Every file is written to a temporary name and renamed into place, meta.json last, so an
interrupted run never leaves a half file, and a folder with meta.json is complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import secrets
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from gptforge.data import corpus
from gptforge.gpt.tokenizer import CharTokenizer, GPT2Tokenizer, TokenizerUnavailableError, tokenizer_from_meta

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16  # 2 bytes per token: ids 0..65535
MAX_VOCAB_SIZE = int(np.iinfo(TOKEN_DTYPE).max) + 1
SPLITS = ("train", "val")

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CACHE_NAME = "tinyshakespeare.txt"
SHAKESPEARE_NAME = "tinyshakespeare"  # the source name in meta.json
DATA_URL_ENV = "GPT_DATA_URL"  # replaces SHAKESPEARE_URL: an http(s) mirror or a file:// path
DOWNLOAD_TIMEOUT_S = 30.0
DOWNLOADS_DIR = "downloads"  # under data_dir, beside the dataset folders

# datasets that need no --input, and the tokenizer each uses unless told otherwise
BUILTIN_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}
TOKENIZERS = ("char", "gpt2")


class DataError(RuntimeError):
    """Preparing or loading data failed for a reason the user can fix; the message says how."""


# ----------------------------------------------------------------------------- public API


def prepare(
    dataset: str,
    data_dir: str | Path = "data",
    input_path: str | Path | None = None,
    tokenizer: str | None = None,
) -> Path:
    """Tokenize a corpus into ``<data_dir>/<dataset>/{train.bin,val.bin,meta.json}``; return that folder.

    The corpus is ``input_path`` if given, else Tiny Shakespeare (``dataset`` must then be one of
    BUILTIN_DATASETS). ``tokenizer`` is "char" or "gpt2"; by default "gpt2" for the dataset
    "shakespeare" and "char" otherwise. Same input, same files, byte for byte.
    """
    _check_dataset_name(dataset)
    if input_path is not None and dataset in BUILTIN_DATASETS:
        raise DataError(_builtin_name_taken(dataset, input_path))
    if input_path is None and dataset not in BUILTIN_DATASETS:
        known = ", ".join(BUILTIN_DATASETS)
        raise DataError(
            f"unknown dataset {dataset!r}: the built-in ones are {known}; for your own text pass --input path.txt"
        )
    tokenizer_name = tokenizer or BUILTIN_DATASETS.get(dataset, "char")
    if tokenizer_name not in TOKENIZERS:
        raise DataError(f"unknown tokenizer {tokenizer_name!r}: choose one of {', '.join(TOKENIZERS)}")
    data_dir = Path(data_dir)

    if input_path is None:
        raw = fetch_shakespeare(data_dir)
        source: dict[str, Any] = {"name": SHAKESPEARE_NAME, "url": SHAKESPEARE_URL,
                                  "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}  # fmt: skip
    else:
        raw = _read_input(Path(input_path))
        source = _input_source(input_path, raw)
    text = _decode_utf8(raw, source.get("path") or source["name"])

    tok = CharTokenizer.from_text(text) if tokenizer_name == "char" else GPT2Tokenizer()
    if tok.vocab_size > MAX_VOCAB_SIZE:
        raise DataError(
            f"the {tok.name} tokenizer of this text has {tok.vocab_size:,} tokens, but token files are uint16 "
            f"(ids up to {MAX_VOCAB_SIZE - 1}); use a text with fewer distinct characters, or --tokenizer gpt2"
        )

    # nanoGPT's split: cut the text at 90% of its characters, then encode each part on its own
    train_chars = len(text) * 9 // 10  # integer math: the same cut as int(n * 0.9), without float rounding
    splits = {"train": tok.encode(text[:train_chars]), "val": tok.encode(text[train_chars:])}
    for split, ids in splits.items():
        if not ids:
            raise DataError(f"the text is too short: its {split} split is empty ({len(text)} characters in all)")

    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "vocab_size": tok.vocab_size,
        "train_tokens": len(splits["train"]),
        "val_tokens": len(splits["val"]),
        "split": {"method": "first 90% of characters for train, rest for val", "train_chars": train_chars},
        "tokenizer": tok.to_meta(),
        "source": source,
    }

    folder = data_dir / dataset
    held = _source_in(folder)
    if held is not None and not same_source(held, source):
        raise DataError(
            f"{folder} holds the tokens of {describe_source(held)}; a dataset is never replaced by another text "
            f"({describe_source(source)}): choose another dataset name, or delete {folder} first"
        )
    folder.mkdir(parents=True, exist_ok=True)
    # meta.json marks a complete folder: drop the old one first, write the new one last
    (folder / "meta.json").unlink(missing_ok=True)
    for split, ids in splits.items():
        _write_atomic(folder / f"{split}.bin", np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
    _write_atomic(folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())
    log.info(
        "%s: %s tokenizer, vocab %s; train %s tokens, val %s tokens -> %s",
        dataset,
        tok.name,
        f"{tok.vocab_size:,}",
        f"{meta['train_tokens']:,}",
        f"{meta['val_tokens']:,}",
        folder,
    )
    return folder


def ensure_prepared(dataset: str, data_dir: str | Path = "data", input_path: str | Path | None = None,
                    tokenizer: str | None = None) -> Path:
    """Return ``<data_dir>/<dataset>``, preparing it first if train.bin, val.bin or meta.json is missing.

    An existing folder is checked against the request: a different tokenizer or a changed input
    file is an error (prepare again, or pick another dataset name), never stale tokens.
    In multi-process training call this on one rank, then wait at a barrier.
    """
    folder = Path(data_dir) / dataset
    if input_path is not None and dataset in BUILTIN_DATASETS:
        raise DataError(_builtin_name_taken(dataset, input_path))
    if corpus.is_sharded(folder):  # a corpus prepared with python -m gptforge.data prepare --input GLOB
        if input_path is not None:
            raise DataError(f"{folder} holds a sharded corpus; train on it with --dataset {dataset} alone, without "
                            "--input")
        prepared_with = load_meta(folder)["tokenizer"].get("name")
        if tokenizer is not None and tokenizer != prepared_with:
            raise DataError(f"{folder} was prepared with the {prepared_with} tokenizer, not {tokenizer}; prepare "
                            "the corpus again with that tokenizer under another dataset name")
        return folder
    if (folder / corpus.PROGRESS_DIR).is_dir():
        raise DataError(f"{folder} holds a corpus whose prepare did not finish; run the same python -m gptforge.data "
                        "prepare command again (it resumes where it stopped)")
    missing = [name for name in ("train.bin", "val.bin", "meta.json") if not (folder / name).is_file()]
    if missing:
        if (folder / "meta.json").is_file() and input_path is None and dataset not in BUILTIN_DATASETS:
            raise DataError(f"{folder / missing[0]} is missing and there is no text to make it from; pass the "
                            f"text it was prepared from (--input path.txt) or another --dataset")
        return prepare(dataset, data_dir, input_path=input_path, tokenizer=tokenizer)
    meta = load_meta(folder)
    if input_path is None and dataset in BUILTIN_DATASETS and meta["source"].get("name") != SHAKESPEARE_NAME:
        raise DataError(
            f"{folder} should hold Tiny Shakespeare but holds the tokens of {describe_source(meta['source'])}: "
            f"delete {folder} (Tiny Shakespeare is prepared again), and train on that text under a dataset name of "
            "its own (--input path.txt names it after the file)"
        )
    prepared_with = meta["tokenizer"].get("name")
    if tokenizer is not None and tokenizer != prepared_with:
        raise DataError(
            f"{folder} was prepared with the {prepared_with} tokenizer, not {tokenizer}; "
            f"prepare it again (python -m gptforge.data prepare ... --tokenizer {tokenizer}) or use another dataset name"
        )
    if input_path is not None:
        requested = _input_source(input_path, _read_input(Path(input_path)))
        if not same_source(meta["source"], requested):
            raise DataError(
                f"{folder} holds the tokens of {describe_source(meta['source'])}, not of {input_path}: a dataset "
                "is never replaced by another text; choose another --dataset for it"
            )
        if requested["sha256"] != meta["source"].get("sha256"):
            raise DataError(
                f"{input_path} changed since {folder} was prepared from it; prepare it again: "
                f"python -m gptforge.data prepare --dataset {dataset} --input {input_path} --data_dir {data_dir}"
            )
    return folder


def load_meta(folder: str | Path) -> dict[str, Any]:
    """The dataset's meta.json, checked for the fields the training code needs (for a sharded
    corpus, the same fields from its manifest, with ``sharded`` set)."""
    if corpus.is_sharded(folder):
        try:
            manifest = corpus.load_manifest(folder)
        except corpus.CorpusError as err:
            raise DataError(str(err)) from None
        splits = manifest["splits"]
        return {"format_version": FORMAT_VERSION, "dataset": Path(folder).name, "dtype": manifest["dtype"],
                "vocab_size": manifest["vocab_size"], "train_tokens": splits["train"]["tokens"],
                "val_tokens": splits["val"]["tokens"], "tokenizer": manifest["tokenizer"],
                "source": {"name": Path(folder).name, "inputs": len(manifest["inputs"])}, "sharded": True}
    path = Path(folder) / "meta.json"
    hint = f"prepare the data first (python -m gptforge.data prepare --dataset {Path(folder).name} ...)"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no meta.json in {folder}: {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is corrupt ({err}); delete {folder} and {hint}") from None
    required = ("format_version", "vocab_size", "train_tokens", "val_tokens", "tokenizer", "source")
    missing = [key for key in required if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; delete {folder} and {hint}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path} has format version {meta['format_version']}, this code reads {FORMAT_VERSION}; {hint}")
    return meta


def load_tokens(folder: str | Path, split: str) -> np.memmap | corpus.ShardedTokens:
    """The ``split`` ("train" or "val") token ids as a read-only uint16 memmap, length checked
    against meta; for a sharded corpus, its shards as one stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if corpus.is_sharded(folder):  # its shards as one stream, memory-mapped as they are read
        try:
            return corpus.open_split(folder, split)
        except corpus.CorpusError as err:
            raise DataError(str(err)) from None
    meta = load_meta(folder)
    path = Path(folder) / f"{split}.bin"
    expected = meta[f"{split}_tokens"]
    itemsize = np.dtype(TOKEN_DTYPE).itemsize
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(f"{path} is missing; prepare the data again (python -m gptforge.data prepare ...)") from None
    if size != expected * itemsize:
        raise DataError(
            f"{path} holds {size} bytes, but meta.json says {expected:,} tokens ({expected * itemsize} bytes); "
            "the folder is damaged or half-written: prepare the data again"
        )
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


def check_token_ids(folder: str | Path, split: str, tokens: np.ndarray, vocab_size: int) -> None:
    """Refuse token ids >= ``vocab_size`` (they would index past the embedding); one pass over
    the data in chunks, so a memmap larger than memory is fine. A sharded corpus was checked
    when it was prepared: its manifest's largest id is compared, and nothing is read."""
    if isinstance(tokens, corpus.ShardedTokens):
        largest = corpus.load_manifest(folder)["max_token_id"]
        if largest >= vocab_size:
            raise DataError(f"{folder}'s manifest says its largest token id is {largest}, but the vocabulary has "
                            f"{vocab_size} tokens: prepare the corpus again")
        return
    chunk = 1 << 26
    for start in range(0, len(tokens), chunk):
        largest = int(tokens[start : start + chunk].max())
        if largest >= vocab_size:
            raise DataError(
                f"{Path(folder) / f'{split}.bin'} holds token id {largest}, but meta.json says the vocabulary has "
                f"{vocab_size} tokens: the file was written by another tokenizer or is damaged; prepare the data again"
            )


def load_tokenizer(folder: str | Path) -> CharTokenizer | GPT2Tokenizer:
    """The tokenizer the dataset in ``folder`` was prepared with."""
    return tokenizer_from_meta(load_meta(folder)["tokenizer"])


def fetch_shakespeare(data_dir: str | Path = "data", timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    """Tiny Shakespeare's bytes: from ``<data_dir>/downloads/`` if the cached copy's sha256 matches, else downloaded."""
    cached = Path(data_dir) / DOWNLOADS_DIR / SHAKESPEARE_CACHE_NAME
    if cached.is_file():
        raw = cached.read_bytes()
        if hashlib.sha256(raw).hexdigest() == SHAKESPEARE_SHA256:
            return raw
        log.warning("%s does not match its sha256 (damaged?); downloading it again", cached)
        cached.unlink()
    url = os.environ.get(DATA_URL_ENV) or SHAKESPEARE_URL
    download(url, cached, SHAKESPEARE_SHA256, timeout=timeout)
    return cached.read_bytes()


def download(url: str, dest: str | Path, sha256: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` (http, https, file:// or a plain path) to ``dest``, keeping it only if its sha256 matches."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if "://" not in url:  # a plain local path is accepted too
        url = Path(url).resolve().as_uri()
    hint = f"Set {DATA_URL_ENV} to a mirror (https://... or file:///path/to/input.txt), or pass --input path.txt"
    log.info("downloading %s", url)
    tmp = _temp_name(dest)
    hasher = hashlib.sha256()
    try:
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "xb") as out:
            while chunk := response.read(1 << 16):
                hasher.update(chunk)
                out.write(chunk)
                # the socket timeout bounds each read; this bounds a server that trickles bytes forever
                if time.monotonic() - started > 10 * timeout:
                    raise TimeoutError(f"download took longer than {10 * timeout:.0f} s")
        got = hasher.hexdigest()
        if got != sha256:
            raise DataError(
                f"the file downloaded from {url} has the wrong sha256: expected {sha256}, got {got}; "
                f"refusing it (nothing was kept). {hint}"
            )
        os.replace(tmp, dest)
    except (OSError, ValueError) as err:  # URLError, HTTPError and socket timeouts are OSErrors; ValueError: bad URL
        # HTTPError's str carries the status code; other URLErrors wrap the socket error in .reason
        reason = err if isinstance(err, urllib.error.HTTPError) else getattr(err, "reason", None) or err
        raise DataError(f"could not download {url}: {reason}. {hint}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- helpers


def same_source(held: dict, wanted: dict) -> bool:
    """Whether two meta.json sources are the same text: both Tiny Shakespeare, or the same input
    file (its path; a changed file is still the same source, and ensure_prepared says it
    changed), or the same bytes from elsewhere."""
    if "path" not in held and "path" not in wanted:  # built-in datasets
        return held.get("name") == wanted.get("name")
    if "path" not in held or "path" not in wanted:
        return False  # Tiny Shakespeare on one side, a user's text on the other
    return held.get("path") == wanted.get("path") or held.get("sha256") == wanted.get("sha256")


def _input_source(input_path: str | Path, raw: bytes) -> dict[str, Any]:
    """meta.json's source of a user's text: its name (the file stem), path, size and sha256."""
    path = Path(input_path)
    sha256 = hashlib.sha256(raw).hexdigest()
    return {"name": path.stem, "path": str(path.resolve()), "bytes": len(raw), "sha256": sha256}


def describe_source(source: dict) -> str:
    return "Tiny Shakespeare" if "path" not in source else str(source.get("path"))


def _source_in(folder: Path) -> dict | None:
    """The source of the dataset already prepared in ``folder``, or None if there is none."""
    try:
        return load_meta(folder)["source"]
    except DataError:
        return None


def _builtin_name_taken(dataset: str, input_path: str | Path) -> str:
    return (f"{dataset!r} is the built-in Tiny Shakespeare dataset; your text {input_path} needs a dataset of its own: "
            f"--dataset NAME, or leave --dataset out to name it after the file ({Path(input_path).stem!r})")


def valid_dataset_name(dataset: str) -> bool:
    """The name becomes a folder under data_dir: one plain path component."""
    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", dataset or "")) and dataset != DOWNLOADS_DIR


def _check_dataset_name(dataset: str) -> None:
    if not valid_dataset_name(dataset):
        raise DataError(
            f"bad dataset name {dataset!r}: use letters, digits, '_', '-' and '.' (not starting with '.' "
            f"or '-', and not {DOWNLOADS_DIR!r})"
        )


def _read_input(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"input file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"input is a directory, not a text file: {path}") from None
    except PermissionError:
        raise DataError(f"cannot read input file (permission denied): {path}") from None
    if not raw:
        raise DataError(f"input file is empty: {path}")
    return raw


def _decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{where} is not UTF-8 text (bad byte at offset {err.start}); convert it to UTF-8 first"
        ) from None


def _temp_name(path: Path) -> Path:
    # in the destination's folder, so os.replace is an atomic rename; unique, so parallel writers never clash
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once or not at all."""
    tmp = _temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- command line


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


CORPUS_FLAGS = ("val_fraction", "val_input", "workers", "shard_tokens", "text_field", "on_bad")


def parse_count(text: str) -> int:
    """``100M``, ``2.5G``, ``50K`` or a plain integer."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count like 100M, 2G or 50000, got {text!r}") from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole count, got {text!r}")
    return int(value)


def corpus_tokenizer(name: str | None) -> dict:
    """The tokenizer meta for a corpus: gpt2 (the default) or a trained tokenizer's directory."""
    if name in (None, "gpt2"):
        return GPT2Tokenizer().to_meta()
    if name == "char":
        raise DataError("a sharded corpus needs a tokenizer with an end-of-text token: --tokenizer gpt2, or one "
                        "trained on your corpus (python -m gptforge.data tokenizer ... --out DIR; then --tokenizer DIR)")
    from gptforge.gpt.tokenizer_training import load_tokenizer_dir

    try:
        return load_tokenizer_dir(Path(name)).to_meta()
    except ValueError as err:
        raise DataError(f"--tokenizer {name}: {err}") from None


def is_corpus_request(args: argparse.Namespace) -> bool:
    """The sharded pipeline: for anything but one plain text file, or when a corpus flag is given."""
    if any(getattr(args, flag) is not None for flag in CORPUS_FLAGS):
        return True
    if args.input is None:
        return False
    path = Path(args.input)
    if any(c in args.input for c in "*?[") or path.is_dir():
        return True
    return corpus.input_kind(path) not in ("txt", None)  # one .jsonl or .parquet file is a corpus too


def prepare_corpus_from_args(args: argparse.Namespace, dataset: str | None) -> None:
    if dataset is None or dataset in BUILTIN_DATASETS:
        raise DataError("name the corpus's dataset with --dataset NAME (not a built-in one): it becomes "
                        f"{args.data_dir}/NAME/")
    _check_dataset_name(dataset)
    try:
        corpus.prepare_corpus(
            Path(args.data_dir) / dataset, corpus.expand_inputs(args.input), corpus_tokenizer(args.tokenizer),
            val_inputs=corpus.expand_inputs(args.val_input) if args.val_input else None,
            val_fraction=args.val_fraction if args.val_fraction is not None else (0.0 if args.val_input else 0.01),
            text_field=args.text_field or "text", workers=1 if args.workers is None else args.workers,
            shard_tokens=args.shard_tokens or corpus.DEFAULT_SHARD_TOKENS, on_bad=args.on_bad or "skip",
            log=lambda message: log.info("%s", message))
    except corpus.BadDocumentError:
        raise
    except corpus.CorpusError as err:
        raise DataError(str(err)) from None


def train_tokenizer_from_args(args: argparse.Namespace) -> None:
    from gptforge.gpt.tokenizer_training import train_tokenizer

    try:
        paths = corpus.expand_inputs(args.input)
    except corpus.CorpusError as err:
        raise DataError(str(err)) from None
    skipped = 0

    def texts() -> Iterator[str]:
        nonlocal skipped
        for path in paths:
            kind = corpus.input_kind(path)
            for _, raw in corpus.iter_raw_documents(path, args.text_field):
                try:
                    yield corpus.parse_document(kind, raw, args.text_field)
                except ValueError:
                    skipped += 1  # a bad document teaches the tokenizer nothing

    try:
        tokenizer = train_tokenizer(texts(), args.kind, args.vocab_size, Path(args.out), model_type=args.model_type)
    except (ValueError, corpus.CorpusError) as err:
        raise DataError(str(err)) from None
    log.info("%s tokenizer with %s tokens in %s%s; prepare a corpus with it: --tokenizer %s", args.kind,
             f"{tokenizer.vocab_size:,}", args.out, f" ({skipped} bad documents skipped)" if skipped else "", args.out)


def verify_from_args(args: argparse.Namespace) -> int:
    """Read every shard (a training start reads only their headers); 0 if all match the manifest."""
    folder = Path(args.data_dir) / args.dataset
    if not corpus.is_sharded(folder):
        raise DataError(f"{folder} holds no prepared corpus (no {corpus.MANIFEST})")
    try:
        problems = corpus.verify_corpus(folder)
    except corpus.CorpusError as err:
        raise DataError(str(err)) from None
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        log.info("%s: every shard matches its sha256", folder)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineErrorParser(prog="python -m gptforge.data", description="Prepare token files for training.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineErrorParser)
    p = commands.add_parser("prepare", help="tokenize a text file or a corpus into <data_dir>/<dataset>/")
    p.add_argument("--dataset", help=f"{' or '.join(BUILTIN_DATASETS)}, or any name with --input (default: its stem)")
    p.add_argument("--input", help="a local UTF-8 text file, or a corpus: a glob or folder of .txt (one document "
                                    "each), .jsonl[.gz|.zst] or .parquet files (quote the glob)")
    p.add_argument("--tokenizer", help="char or gpt2 (default: gpt2 for 'shakespeare' and corpora, char "
                                       "otherwise), or a trained tokenizer's folder (corpora)")
    p.add_argument("--data_dir", default="data", help="where dataset folders go (default: data)")
    g = p.add_argument_group("corpora (token shards; see gptforge/data/corpus.py)")
    g.add_argument("--text_field", help="the JSON field or Parquet column with the text (default: text)")
    g.add_argument("--workers", type=int, help="tokenizing processes (default: 1)")
    g.add_argument("--shard_tokens", type=parse_count, help="tokens per shard, e.g. 100M (the default)")
    g.add_argument("--val_fraction", type=float, help="share of the documents in val (default: 0.01)")
    g.add_argument("--val_input", help="take val from these files instead (a glob)")
    g.add_argument("--on_bad", choices=("skip", "stop"), help="a bad document: skip and count it (default), or stop")
    v = commands.add_parser("verify", help="check a prepared corpus's shards against their sha256")
    v.add_argument("--dataset", required=True, help="the corpus's dataset name")
    v.add_argument("--data_dir", default="data", help="where dataset folders go (default: data)")
    t = commands.add_parser("tokenizer", help="train a tokenizer on a corpus")
    t.add_argument("--input", required=True, help="a glob or folder of .txt, .jsonl[.gz|.zst] or .parquet files")
    t.add_argument("--kind", required=True, choices=("sentencepiece", "bpe"),
                   help="SentencePiece, or byte-level BPE (Hugging Face tokenizers)")
    t.add_argument("--vocab_size", required=True, type=parse_count, help="tokens in the vocabulary")
    t.add_argument("--out", required=True, help="the folder to write it to")
    t.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece's model")
    t.add_argument("--text_field", default="text", help="the JSON field or Parquet column with the text")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "tokenizer":
            train_tokenizer_from_args(args)
            return 0
        if args.command == "verify":
            return verify_from_args(args)
        dataset = args.dataset or (Path(args.input).stem if args.input else None)
        if is_corpus_request(args):
            if args.input is None:
                parser.error("a corpus needs --input GLOB")
            prepare_corpus_from_args(args, args.dataset)
            return 0
        if args.tokenizer not in (None, *TOKENIZERS):
            parser.error(f"--tokenizer must be {' or '.join(TOKENIZERS)} here, got {args.tokenizer!r} (a trained "
                         "tokenizer's folder is for corpora: prepare --input GLOB --dataset NAME --tokenizer DIR)")
        if dataset is None:
            parser.error("give --dataset (shakespeare_char or shakespeare) or --input path.txt")
        prepare(dataset, args.data_dir, input_path=args.input, tokenizer=args.tokenizer)
    except corpus.BadDocumentError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DataError, TokenizerUnavailableError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no partial files were left (a corpus prepare resumes when run again)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
