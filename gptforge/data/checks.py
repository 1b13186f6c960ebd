"""What a prepared dataset claims, checked against itself: cheaply at every start, on every
batch as it is read, and in full by ``python -m gptforge.data verify``.

At start (microseconds to a few milliseconds, whatever the corpus's size; no token is read
but the last of each split):
    meta.json / manifest.json     every field present and of its type (datasets.py, shards.py)
    vocabulary                    the file's vocab_size, end-of-text id and token dtype against
                                  its embedded tokenizer (``check_claims``: dict compares), and the
                                  tokenizer rebuilt against its own meta (``load_tokenizer``)
    shards                        each header against the manifest (shards.py), each shard's
                                  largest id (recorded when it was written) below the vocabulary,
                                  and each split ending with the end-of-text token
Every batch: ``GuardedTokens`` checks the ids of each window it hands out (about 1 µs per
1,024-token window), so an id outside the vocabulary (a file overwritten in place after it was
prepared) stops training with one line before it reaches the embedding.
``verify``: every byte against its sha256, every token id, and the tokenizer rebuilt.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gptforge.data.errors import DataError
from gptforge.data.shards import ShardedTokens, load_manifest, read_last_token
from gptforge.gpt.tokenizer import GPT2_EOT_TOKEN, GPT2_VOCAB_SIZE, describe_tokenizer

TOKENIZER_NAMES = ("char", "gpt2", "sentencepiece", "bpe")
CHUNK_TOKENS = 1 << 24  # verify reads token files in pieces of this many tokens


def check_claims(path: Path, record: dict[str, Any], hint: str) -> None:
    """``record`` (a meta.json or manifest.json, its fields' types checked already) against its
    embedded tokenizer: its vocab_size, eot_id (where recorded) and dtype must be the tokenizer's.
    Dict compares only; the tokenizer itself is rebuilt and checked by load_tokenizer."""
    tok, vocab = record["tokenizer"], record["vocab_size"]
    damaged = f"the file was edited or damaged; {hint}"
    name = tok.get("name")
    if name not in TOKENIZER_NAMES:
        raise DataError(f"{path}: the field tokenizer.name is {name!r}, not one of {', '.join(TOKENIZER_NAMES)}; "
                        f"{damaged}")
    if name == "char":
        if not isinstance(tok.get("chars"), str):
            raise DataError(f"{path}: the field tokenizer.chars is missing or not text; {damaged}")
        has, eot = len(tok["chars"]), None
    elif name == "gpt2":
        has, eot = GPT2_VOCAB_SIZE, GPT2_EOT_TOKEN
    else:
        has, eot = tok.get("vocab_size"), tok.get("eot_id")
        if not isinstance(has, int) or not isinstance(eot, int):
            raise DataError(f"{path}: the field tokenizer.vocab_size or tokenizer.eot_id is missing; {damaged}")
    if tok.get("vocab_size", has) != has:
        raise DataError(f"{path}: the field tokenizer.vocab_size is {tok.get('vocab_size')!r}, but that {name} "
                        f"tokenizer has {has} tokens; {damaged}")
    if vocab != has:
        raise DataError(f"{path}: the field vocab_size is {vocab}, but its tokenizer, {describe_tokenizer(tok)}, "
                        f"has {has} tokens; {damaged}")
    if "eot_id" in record and record["eot_id"] != eot:
        raise DataError(f"{path}: the field eot_id is {record['eot_id']!r}, but its tokenizer's end-of-text id is "
                        f"{eot!r}; {damaged}")
    dtype = record.get("dtype", "uint16")
    if dtype in ("uint16", "uint32") and np.iinfo(dtype).max < vocab - 1:
        raise DataError(f"{path}: the field dtype is {dtype}, too small for {vocab} tokens; {damaged}")


class GuardedTokens:
    """A token stream (a memmap, or a corpus's shards) whose every slice is checked against the
    vocabulary as it is read: ``len`` and contiguous slices, as the batch sampler uses them."""

    def __init__(self, tokens: np.ndarray | ShardedTokens, vocab_size: int, where: Callable[[int], str], hint: str):
        self.tokens, self.vocab_size, self.where, self.hint = tokens, vocab_size, where, hint
        self.dtype = tokens.dtype

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("GuardedTokens supports slices only")
        window = self.tokens[index]
        if len(window) and int(window.max()) >= self.vocab_size:
            start = index.indices(len(self.tokens))[0]
            at = start + int(np.argmax(window >= self.vocab_size))
            raise DataError(f"{self.where(at)} holds token id {int(self.tokens[at : at + 1][0])}, but the vocabulary "
                            f"has {self.vocab_size} tokens: it changed after the dataset was prepared; {self.hint}")
        return window


def check_token_ids(folder: str | Path, split: str, tokens: np.ndarray | ShardedTokens,
                    vocab_size: int) -> GuardedTokens:
    """The cheap start-up check of ``split``'s token ids, and the stream that checks every batch
    (``GuardedTokens``). A corpus: every shard's largest id, recorded when it was written, below
    ``vocab_size``, and the stream ending with the end-of-text token (one token read)."""
    folder = Path(folder)
    hint = f"python -m gptforge.data verify --dataset {folder.name} --data_dir {folder.parent} finds all the damage"
    if not isinstance(tokens, ShardedTokens):
        path = folder / f"{split}.bin"
        return GuardedTokens(tokens, vocab_size, lambda at: f"{path} (token {at:,})", f"prepare it again ({hint})")
    manifest_path, manifest = folder / "manifest.json", load_manifest(folder)
    shards = manifest["splits"][split]["shards"]
    largest = max([manifest["max_token_id"], *(s.get("max_token_id", 0) for s in shards)])
    if not isinstance(largest, int) or largest >= vocab_size:
        raise DataError(f"{manifest_path} says its largest token id is {largest}, but the vocabulary has {vocab_size} "
                        "tokens: prepare the corpus again")
    tokenizer = manifest["tokenizer"]
    eot = manifest.get("eot_id", GPT2_EOT_TOKEN if tokenizer.get("name") == "gpt2" else tokenizer.get("eot_id"))
    last = eot if eot is None or not len(tokens) else read_last_token(tokens.paths[-1], tokens.dtype,
                                                                      tokens.counts[-1])
    if last != eot:  # every document ends with it: another id there means another tokenizer wrote the shards
        raise DataError(f"{folder / shards[-1]['file']} ends with token {last}, not the end-of-text token {eot} of "
                        f"the tokenizer in {manifest_path}: shards and manifest disagree; prepare the corpus again")

    def where(at: int) -> str:
        i = int(np.searchsorted(tokens.starts, at, side="right")) - 1
        return f"{tokens.paths[i]} (token {at - int(tokens.starts[i]):,})"

    return GuardedTokens(tokens, vocab_size, where, f"prepare the corpus again ({hint})")


def verify_text_dataset(folder: Path, meta: dict[str, Any], tokens: dict[str, np.ndarray]) -> list[str]:
    """Every problem of a dataset prepared from one text (train.bin / val.bin / meta.json), reading
    every token: ids outside the vocabulary, a sha256 that does not match (where recorded)."""
    problems = []
    for split, stream in tokens.items():
        path, digest, largest = folder / f"{split}.bin", hashlib.sha256(), -1
        for start in range(0, len(stream), CHUNK_TOKENS):
            chunk = np.asarray(stream[start : start + CHUNK_TOKENS])
            digest.update(memoryview(chunk).cast("B"))
            largest = max(largest, int(chunk.max()))
        if largest >= meta["vocab_size"]:
            problems.append(f"{path} holds token id {largest}, but the vocabulary has {meta['vocab_size']} tokens")
        recorded = meta.get("sha256", {}).get(split) if isinstance(meta.get("sha256"), dict) else None
        if recorded is not None and digest.hexdigest() != recorded:
            problems.append(f"{path} does not match its sha256 in meta.json: damaged")
    return problems

