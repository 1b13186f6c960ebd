"""The command line: ``python -m gptforge.data prepare|tokenizer|verify ...`` (also ``gptforge-data``).

    python -m gptforge.data prepare --dataset shakespeare_char     # Tiny Shakespeare, one token per character
    python -m gptforge.data prepare --dataset shakespeare          # Tiny Shakespeare, GPT-2 BPE
    python -m gptforge.data prepare --input my.txt --tokenizer char  # any local UTF-8 text, into data/my/
    python -m gptforge.data prepare --input 'corpus/*.jsonl.gz' --dataset owt --tokenizer gpt2 --workers 8 \\
        --val_fraction 0.005                                      # a real corpus: token shards (corpus.py)
    python -m gptforge.data tokenizer --input 'corpus/*.jsonl' --kind bpe --vocab_size 32768 --out tok/
    python -m gptforge.data verify --dataset owt                      # every byte, every token id, the tokenizer

One plain text file becomes train.bin / val.bin / meta.json (datasets.py); a glob, a folder, a
JSON-lines or Parquet file, or any corpus flag, becomes token shards (corpus.py). Every error is
one line on stderr and exit status 2 (a bad input, a bad document under --on_bad=stop, a
dataset another prepare is writing); ``verify`` exits with 1 when it finds damage.
"""

from __future__ import annotations

import argparse
import contextlib
import decimal
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from gptforge.data.checks import verify_text_dataset
from gptforge.data.corpus import DEFAULT_SHARD_TOKENS, prepare_corpus
from gptforge.data.datasets import (
    BUILTIN_DATASETS,
    SPLITS,
    TOKENIZERS,
    check_dataset_name,
    load_meta,
    load_tokenizer,
    load_tokens,
    prepare,
)
from gptforge.data.errors import CorpusError, DataError
from gptforge.data.inputs import expand_inputs, input_kind, is_corpus_input, iter_raw_documents, parse_document
from gptforge.data.shards import MANIFEST, is_sharded, verify_corpus
from gptforge.gpt.folders import FolderBusyError
from gptforge.gpt.tokenizer import GPT2Tokenizer, TokenizerUnavailableError

log = logging.getLogger(__name__)


class _OneLineErrorParser(argparse.ArgumentParser):
    """A usage error as one line, like every other error here (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


# flags only a corpus takes: any of them asks for the sharded pipeline
CORPUS_FLAGS = ("val_fraction", "val_input", "workers", "shard_tokens", "text_field", "on_bad")


COUNT_LIMIT = 2**63 - 1  # an int64: what numpy and torch count and index with
MAX_WORKERS = 1024  # processes; far more than any machine has cores


def parse_count(text: str) -> int:
    """``100M``, ``2.5G``, ``50K`` or a plain integer, from 1 to COUNT_LIMIT (never inf or nan)."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        value = decimal.Decimal(text[:-1] if scale > 1 else text) * scale  # exact: no float rounding
    except (decimal.InvalidOperation, ValueError):
        raise argparse.ArgumentTypeError(f"expected a count like 100M, 2G or 50000, got {text!r}") from None
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"expected a finite count like 100M, 2G or 50000, got {text!r}")
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole count, got {text!r}")
    if value > COUNT_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a count of at most {COUNT_LIMIT:,} (an int64), got {text!r}")
    return int(value)


def parse_workers(text: str) -> int:
    """A number of tokenizing processes: 1 to MAX_WORKERS."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of processes, got {text!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_WORKERS} processes, got {text!r}")
    return value


def corpus_tokenizer(name: str | None) -> dict:
    """The tokenizer meta for a corpus: gpt2 (the default) or a trained tokenizer's directory."""
    if name in (None, "gpt2"):
        return GPT2Tokenizer().to_meta()
    if name == "char":
        raise DataError("a sharded corpus needs a tokenizer with an end-of-text token: --tokenizer gpt2, or one "
                        "trained on your corpus (python -m gptforge.data tokenizer ... --out DIR; then --tokenizer "
                        "DIR)")
    from gptforge.gpt.tokenizer_training import load_tokenizer_dir

    try:
        return load_tokenizer_dir(Path(name)).to_meta()
    except ValueError as err:
        raise DataError(f"--tokenizer {name}: {err}") from None


def is_corpus_request(args: argparse.Namespace) -> bool:
    """The sharded pipeline: for anything but one plain text file, or when a corpus flag is given."""
    if any(getattr(args, flag) is not None for flag in CORPUS_FLAGS):
        return True
    return args.input is not None and is_corpus_input(args.input)  # one .jsonl or .parquet file is a corpus too


def prepare_corpus_from_args(args: argparse.Namespace, dataset: str | None) -> None:
    """``prepare`` of a corpus: token shards in ``<data_dir>/<dataset>/``."""
    if dataset is None or dataset in BUILTIN_DATASETS:
        raise DataError("name the corpus's dataset with --dataset NAME (not a built-in one): it becomes "
                        f"{args.data_dir}/NAME/")
    check_dataset_name(dataset)
    prepare_corpus(
        Path(args.data_dir) / dataset, expand_inputs(args.input), corpus_tokenizer(args.tokenizer),
        val_inputs=expand_inputs(args.val_input) if args.val_input else None,
        val_fraction=args.val_fraction if args.val_fraction is not None else (0.0 if args.val_input else 0.01),
        text_field=args.text_field or "text", workers=1 if args.workers is None else args.workers,
        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, on_bad=args.on_bad or "skip",
        log=lambda message: log.info("%s", message))


def train_tokenizer_from_args(args: argparse.Namespace) -> None:
    """``tokenizer``: train one on the corpus's documents (bad ones skipped) and write it to --out."""
    from gptforge.gpt.tokenizer_training import train_tokenizer

    try:
        paths = expand_inputs(args.input)
    except CorpusError as err:
        raise DataError(str(err)) from None
    skipped = 0

    def texts() -> Iterator[str]:
        nonlocal skipped
        for path in paths:
            kind = input_kind(path)
            for _, raw in iter_raw_documents(path, args.text_field):
                try:
                    yield parse_document(kind, raw, args.text_field)
                except ValueError:
                    skipped += 1  # a bad document teaches the tokenizer nothing

    try:
        tokenizer = train_tokenizer(texts(), args.kind, args.vocab_size, Path(args.out), model_type=args.model_type,
                                    overwrite=args.overwrite)
    except (ValueError, CorpusError, FolderBusyError) as err:
        raise DataError(str(err)) from None
    log.info("%s tokenizer with %s tokens in %s%s; prepare a corpus with it: --tokenizer %s", args.kind,
             f"{tokenizer.vocab_size:,}", args.out, f" ({skipped} bad documents skipped)" if skipped else "", args.out)


def verify_from_args(args: argparse.Namespace) -> int:
    """Read everything a training start only samples (checks.py): every byte against its sha256,
    every token id, the tokenizer rebuilt against the metadata. 0 if sound, 1 if damaged."""
    folder = Path(args.data_dir) / args.dataset
    if not is_sharded(folder) and not (folder / "meta.json").is_file():
        raise DataError(f"{folder} holds no prepared dataset (no {MANIFEST} or meta.json)")
    try:
        load_tokenizer(folder)  # the metadata's claims, and the tokenizer rebuilt against them
        if is_sharded(folder):
            problems = verify_corpus(folder)
        else:
            problems = verify_text_dataset(folder, load_meta(folder), {s: load_tokens(folder, s) for s in SPLITS})
    except DataError as err:
        problems = [str(err)]
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        log.info("%s: sound (every file matches its sha256, every token id is in the vocabulary)", folder)
    return 1 if problems else 0


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status: 0; 2 for an error (one line on stderr), a bad
    document under --on_bad=stop included; 1 when verify finds damage; 130 when interrupted
    (a usage error exits with 2 from argparse)."""
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
    g.add_argument("--workers", type=parse_workers, help=f"tokenizing processes, 1 to {MAX_WORKERS} (default: 1)")
    g.add_argument("--shard_tokens", type=parse_count, help="tokens per shard, e.g. 100M (the default)")
    g.add_argument("--val_fraction", type=float, help="share of the documents in val (default: 0.01)")
    g.add_argument("--val_input", help="take val from these files instead (a glob)")
    g.add_argument("--on_bad", choices=("skip", "stop"), help="a bad document: skip and count it (default), or stop")
    v = commands.add_parser("verify", help="check a prepared dataset in full: sha256, token ids, tokenizer")
    v.add_argument("--dataset", required=True, help="the dataset's name")
    v.add_argument("--data_dir", default="data", help="where dataset folders go (default: data)")
    t = commands.add_parser("tokenizer", help="train a tokenizer on a corpus")
    t.add_argument("--input", required=True, help="a glob or folder of .txt, .jsonl[.gz|.zst] or .parquet files")
    t.add_argument("--kind", required=True, choices=("sentencepiece", "bpe"),
                   help="SentencePiece, or byte-level BPE (Hugging Face tokenizers)")
    t.add_argument("--vocab_size", required=True, type=parse_count, help="tokens in the vocabulary")
    t.add_argument("--out", required=True, help="the folder to write it to")
    t.add_argument("--model_type", default="bpe", choices=("bpe", "unigram"), help="SentencePiece's model")
    t.add_argument("--text_field", default="text", help="the JSON field or Parquet column with the text")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the tokenizer already in --out, whole (its other kind's files go too)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        previous = signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: workers stop, an unbegun prepare is undone
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
    except (DataError, TokenizerUnavailableError, ValueError) as err:  # BadDocumentError too
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full or read-only disk, a file that vanished
        print(f"error: {err.filename + ': ' if err.filename else ''}{err.strerror or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial files were left (a corpus prepare resumes when run again)", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
