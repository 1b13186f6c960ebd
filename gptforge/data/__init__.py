"""Datasets and corpora: download, prepare, shards, manifests, verify.

Training reads prepared data through what this module exports:

    folder = ensure_prepared("shakespeare_char", "data")  # prepares it first if it is not there
    meta = load_meta(folder)                              # vocabulary, token counts, tokenizer
    tokenizer = load_tokenizer(folder)                    # rebuilt, and checked against the metadata
    train = load_tokens(folder, "train")                  # a memmap, or a sharded corpus as one stream
    train = check_token_ids(folder, "train", train, meta["vocab_size"])  # cheap now; then every batch's ids

One concept per file:

    datasets.py   one text -> train.bin / val.bin / meta.json; loading any prepared dataset
    download.py   Tiny Shakespeare, fetched once and checked against its sha256
    corpus.py     many files of documents -> token shards (parallel, resumable)
    workers.py    the tokenizing processes of a corpus prepare
    inputs.py     a corpus's input files (.txt, .jsonl[.gz|.bz2|.zst], .parquet) and their documents
    shards.py     the shard format and the manifest: written, read as one stream, verified
    checks.py     what a dataset claims, checked: cheaply at start, every batch's ids, fully by verify
    atomic.py     files written all at once or not at all; one prepare per dataset folder (a lock)
    errors.py     DataError, CorpusError, BadDocumentError
    cli.py        python -m gptforge.data prepare|tokenizer|verify
"""

from gptforge.data.checks import check_token_ids
from gptforge.data.datasets import (
    BUILTIN_DATASETS,
    ensure_prepared,
    load_meta,
    load_tokenizer,
    load_tokens,
    prepare,
    valid_dataset_name,
)
from gptforge.data.errors import DataError

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "check_token_ids",
    "ensure_prepared",
    "load_meta",
    "load_tokenizer",
    "load_tokens",
    "prepare",
    "valid_dataset_name",
]
