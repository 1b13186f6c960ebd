"""Real corpora: many files of documents -> fixed-size token shards and a manifest.

    python -m gptforge.data prepare --input 'corpus/*.jsonl.gz' --tokenizer gpt2 --dataset owt --workers 8

The input files (inputs.py: .txt, .jsonl[.gz|.zst], .parquet) are read in order, every
document is tokenized (in ``--workers`` processes, workers.py) and followed by the
tokenizer's end-of-text token, and the token stream of each split is cut into shards of
``--shard_tokens`` tokens (the last one shorter; shards.py: their format and the manifest):

    data_dir/owt/
        manifest.json                      written last: the dataset is complete when it exists
        train_000000.bin  train_000001.bin ...  val_000000.bin ...
        .progress/                         while preparing: the completed shards' resume points

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

import contextlib
import json
import os
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.data.atomic import dataset_lock
from gptforge.data.errors import BadDocumentError, CorpusError
from gptforge.data.inputs import describe_inputs, expand_inputs, input_kind, iter_raw_documents
from gptforge.data.shards import ShardWriter, is_sharded, load_manifest, read_header, token_dtype, write_manifest
from gptforge.data.workers import eot_of, init_worker, ordered_map, tokenize_batch, worker_pool

PROGRESS_DIR = ".progress"
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's shard size
BATCH_BYTES = 1 << 20  # raw text per task sent to a worker
MAX_REPORTED = 20  # bad documents listed (all are counted)


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
    log: Callable[[str], None] = print,
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
    # one prepare per folder (a lock beside it); the workers start next: they load the
    # tokenizer while this process checks it
    with dataset_lock(folder, log), worker_pool(workers, tokenizer_meta) as pool:
        existed, fresh = folder.exists(), not (folder / PROGRESS_DIR).exists()
        try:
            return _prepare(folder, inputs, tokenizer_meta, val_inputs, val_fraction, text_field, shard_tokens,
                            on_bad, log, pool, workers)
        except BaseException:
            if fresh:
                _undo_fresh_start(folder, existed)
            raise


def ensure_corpus(folder: Path, pattern: str, tokenizer: str | None, log: Callable[[str], None] = print) -> Path:
    """Training's ``--input`` of a corpus (a glob, a folder, a .jsonl or .parquet file): the shards
    ``python -m gptforge.data prepare --input PATTERN --dataset NAME`` writes, with its defaults.
    A folder prepared already from the same files is used as it is, whatever its other settings."""
    from gptforge.gpt.tokenizer import GPT2_TOKENIZER_META

    command = f"python -m gptforge.data prepare --input '{pattern}' --dataset {folder.name} --data_dir {folder.parent}"
    if tokenizer not in (None, "gpt2"):
        raise CorpusError(f"--input {pattern} is a corpus of documents, which needs a tokenizer with an end-of-text "
                          f"token, and {tokenizer} has none: train with --tokenizer=gpt2, or prepare it with a "
                          f"tokenizer of your own ({command} --tokenizer DIR) and train with --dataset {folder.name}")
    inputs = expand_inputs(pattern)
    if is_sharded(folder):
        manifest = load_manifest(folder)
        splits = manifest.get("input_splits") or ["train"] * len(manifest["inputs"])
        if [i for i, s in zip(manifest["inputs"], splits, strict=False) if s == "train"] == describe_inputs(inputs):
            return folder
        raise CorpusError(f"{folder} holds a corpus prepared from other files than --input {pattern}, or they changed "
                          f"since; choose another --dataset, or prepare it again: rm -r {folder}; {command}")
    log(f"--input {pattern} is a corpus: preparing it as {command} does, with one worker (run that command with "
        "--workers N first to go faster)")
    prepare_corpus(folder, inputs, dict(GPT2_TOKENIZER_META), val_fraction=0.01, log=log)
    return folder


def _undo_fresh_start(folder: Path, existed: bool) -> None:
    """A prepare that failed (or was interrupted) before its first shard leaves nothing behind:
    no .progress that would block the folder, no empty folder."""
    progress = folder / PROGRESS_DIR
    if progress.is_dir() and not (progress / "state.json").exists():
        for leftover in progress.iterdir():
            leftover.unlink()
        progress.rmdir()
        for leftover in folder.glob(".*.tmp"):  # a first shard being written
            leftover.unlink()
        if not existed:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if nothing else is in it


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
    if (folder / "meta.json").is_file():
        raise CorpusError(f"{folder} holds a dataset prepared from a text file; a dataset is never replaced: "
                          f"choose another --dataset name, or delete it first (rm -r {folder})")
    if (folder / "train.bin").is_file() or (folder / "val.bin").is_file():
        raise CorpusError(f"{folder} holds a text file's prepare that did not finish (train.bin, no meta.json); "
                          f"finish it (python -m gptforge.data prepare --input TEXT --dataset {folder.name}) or "
                          f"remove it (rm -r {folder}), or choose another --dataset name")
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
                    size += len(raw) if isinstance(raw, (bytes, str)) else 0  # a null, a number: bad documents
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
        results = ordered_map(pool, tokenize_batch, tasks(), ahead=2 * workers)
    else:
        init_worker(tokenizer_meta)
        results = map(tokenize_batch, tasks())
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
        bad_documents=dict(count=bad, first=[where for _, where in examples]), eot_id=eot_of(tokenizer)))
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
