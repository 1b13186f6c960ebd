"""A dataset from one text: text -> token ids -> ``train.bin`` / ``val.bin`` (uint16) + ``meta.json``,
and the loading of any prepared dataset (these, or a sharded corpus) for training.

    python -m gptforge.data prepare --dataset shakespeare_char     # Tiny Shakespeare, one token per character
    python -m gptforge.data prepare --dataset shakespeare          # Tiny Shakespeare, GPT-2 BPE
    python -m gptforge.data prepare --input my.txt --tokenizer char  # any local UTF-8 text, into data/my/

As in nanoGPT, the first 90% of the text is the training split and the last 10% the validation
split; each part is encoded on its own (for Tiny Shakespeare with GPT-2 BPE that gives nanoGPT's
301,966 / 36,059 tokens). Tiny Shakespeare is downloaded once (download.py).

Every file is written to a temporary name and renamed into place, meta.json last, so an
interrupted run never leaves a half file, and a folder with meta.json is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from gptforge.data.atomic import dataset_lock, write_atomic
from gptforge.data.checks import check_claims
from gptforge.data.corpus import PROGRESS_DIR, ensure_corpus
from gptforge.data.download import DOWNLOADS_DIR, SHAKESPEARE_NAME, SHAKESPEARE_URL, fetch_shakespeare
from gptforge.data.errors import CorpusError, DataError
from gptforge.data.inputs import is_corpus_input
from gptforge.data.shards import ShardedTokens, is_sharded, load_manifest, open_split
from gptforge.gpt.folders import busy_holder
from gptforge.gpt.tokenizer import AnyTokenizer, CharTokenizer, GPT2Tokenizer, tokenizer_from_meta

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16  # 2 bytes per token: ids 0..65535
MAX_VOCAB_SIZE = int(np.iinfo(TOKEN_DTYPE).max) + 1
SPLITS = ("train", "val")

# datasets that need no --input, and the tokenizer each uses unless told otherwise
BUILTIN_DATASETS = {"shakespeare_char": "char", "shakespeare": "gpt2"}
TOKENIZERS = ("char", "gpt2")


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
    check_dataset_name(dataset)
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
    with dataset_lock(folder, log.info):
        _write_dataset(folder, source, splits, meta)
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


def _write_dataset(folder: Path, source: dict, splits: dict[str, list[int]], meta: dict) -> None:
    """Write the tokens and meta.json into ``folder`` (its lock held): never over another text's."""
    if is_sharded(folder):
        raise DataError(f"{folder} holds a corpus; a text file is not prepared beside it: choose another dataset "
                        f"name, or remove the corpus first (rm -r {folder})")
    if (folder / PROGRESS_DIR).is_dir():
        raise DataError(f"{folder} holds a corpus prepare that did not finish ({PROGRESS_DIR}); a text file is not "
                        "prepared beside it: finish it (run its python -m gptforge.data prepare command again), "
                        f"remove it (rm -r {folder}), or choose another dataset name")
    held = _source_in(folder)
    if held is not None and not same_source(held, source):
        raise DataError(
            f"{folder} holds the tokens of {describe_source(held)}; a dataset is never replaced by another text "
            f"({describe_source(source)}): choose another dataset name, or delete {folder} first"
        )
    folder.mkdir(parents=True, exist_ok=True)
    # meta.json marks a complete folder: drop the old one first, write the new one last
    (folder / "meta.json").unlink(missing_ok=True)
    meta["sha256"] = {}  # of each token file: verify reads them against it
    for split, ids in splits.items():
        data = np.asarray(ids, dtype=TOKEN_DTYPE).tobytes()
        meta["sha256"][split] = hashlib.sha256(data).hexdigest()
        write_atomic(folder / f"{split}.bin", data)
    write_atomic(folder / "meta.json", (json.dumps(meta, indent=2) + "\n").encode())


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
    holder = busy_holder(folder)
    if holder is not None:
        raise DataError(f"{folder} is being prepared now by {holder}; wait for it to finish")
    if input_path is not None and is_corpus_input(str(input_path)):  # as python -m gptforge.data prepare takes it
        return ensure_corpus(folder, str(input_path), tokenizer, log.info)
    if is_sharded(folder):  # a corpus prepared with python -m gptforge.data prepare --input GLOB
        if input_path is not None:
            raise DataError(f"{folder} holds a sharded corpus; train on it with --dataset {dataset} alone, without "
                            "--input")
        prepared_with = load_meta(folder)["tokenizer"].get("name")
        if tokenizer is not None and tokenizer != prepared_with:
            raise DataError(f"{folder} was prepared with the {prepared_with} tokenizer, not {tokenizer}; prepare "
                            "the corpus again with that tokenizer under another dataset name")
        return folder
    if (folder / PROGRESS_DIR).is_dir():
        raise DataError(f"{folder} holds a corpus whose prepare did not finish; run the same python -m gptforge.data "
                        f"prepare command again (it resumes where it stopped), or remove it (rm -r {folder})")
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
            f"{folder} was prepared with the {prepared_with} tokenizer, not {tokenizer}; prepare it again "
            f"(python -m gptforge.data prepare ... --tokenizer {tokenizer}) or use another dataset name"
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
    if is_sharded(folder):
        try:
            manifest = load_manifest(folder)
        except CorpusError as err:
            raise DataError(str(err)) from None
        check_claims(Path(folder) / "manifest.json", manifest, "prepare the corpus again")
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
    for key in required:  # bool is an int to Python, never to a meta.json
        kind = dict if key in ("tokenizer", "source") else int
        if not isinstance(meta[key], kind) or (kind is int and isinstance(meta[key], bool)):
            raise DataError(f"{path}: the field {key} is {type(meta[key]).__name__}, not {kind.__name__}; delete "
                            f"{folder} and {hint}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(f"{path} has format version {meta['format_version']}, this code reads {FORMAT_VERSION}; {hint}")
    check_claims(path, meta, f"delete {folder} and {hint}")
    return meta


def load_tokens(folder: str | Path, split: str) -> np.memmap | ShardedTokens:
    """The ``split`` ("train" or "val") token ids as a read-only uint16 memmap, length checked
    against meta; for a sharded corpus, its shards as one stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if is_sharded(folder):  # its shards as one stream, memory-mapped as they are read
        try:
            return open_split(folder, split)
        except CorpusError as err:
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


def load_tokenizer(folder: str | Path) -> AnyTokenizer:
    """The tokenizer the dataset in ``folder`` was prepared with, rebuilt from the embedded meta
    and checked against it (a trained one's model against its sha256 and end-of-text id): a
    DataError naming the file if they disagree."""
    meta = load_meta(folder)
    try:
        return tokenizer_from_meta(meta["tokenizer"])
    except ValueError as err:
        name = "manifest.json" if meta.get("sharded") else "meta.json"
        raise DataError(f"{Path(folder) / name}: its tokenizer cannot be rebuilt ({err}); the file was edited or "
                        "damaged; prepare the dataset again") from None


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
    """A source as an error message names it: Tiny Shakespeare, or the input file's path."""
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


def check_dataset_name(dataset: str) -> None:
    """Refuse a name that valid_dataset_name rejects, saying what a name may be."""
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
