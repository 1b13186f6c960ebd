"""Sharded corpora (gptforge/data/corpus.py): many files of documents -> token shards and a manifest,
the same for any number of workers and after a killed prepare resumes; bad documents reported by file
and line; training reads the shards as one stream and resumes exactly across a shard boundary;
uint32 shards past 65,535 tokens; a start opens headers only. Corpora come from Tiny Shakespeare."""

from __future__ import annotations

import functools
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import check_token_ids, corpus, load_meta, load_tokens
from gptforge.data.errors import BadDocumentError, CorpusError
from gptforge.data.inputs import describe_inputs, expand_inputs, iter_raw_documents, parse_document
from gptforge.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    HEADER_BYTES,
    ShardWriter,
    read_header,
    token_dtype,
    write_manifest,
    write_shard,
)
from gptforge.gpt.tokenizer import CharTokenizer, GPT2Tokenizer
from gptforge.train.loop import train
from tests import helpers
from tests.conftest import SHARED_DATA
from tests.helpers import REPO, TINY, logs_and_evals

quiet = functools.partial(train, log=lambda *_: None)


@functools.cache
def paragraphs() -> tuple[str, ...]:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {path}")
    return tuple(p for p in path.read_text().split("\n\n") if p.strip())


def make_corpus(root: Path, bad: bool = True, scale: int = 1) -> Path:
    """jsonl, jsonl.gz, parquet and txt files of Shakespeare's paragraphs (with two bad lines)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = list(paragraphs()) * scale
    quarter = len(docs) // 4
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "a.jsonl", "w") as f:
        for d in docs[:quarter]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        if bad:
            f.write("{not json\n")
            f.write(json.dumps({"title": "no text field"}) + "\n")
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        for d in docs[quarter : 2 * quarter]:
            f.write(json.dumps({"text": d}) + "\n")
    pq.write_table(pa.table({"text": docs[2 * quarter : 3 * quarter]}), root / "c.parquet", row_group_size=200)
    for i, d in enumerate(docs[3 * quarter : 3 * quarter + 50]):
        (root / f"d{i:03d}.txt").write_text(d + " \u00e9\u4e2d\U0001f600")
    return root


def prepare(root: Path, out: Path, **options) -> dict:
    options = dict(dict(val_fraction=0.1, shard_tokens=20_000, log=lambda *_: None), **options)
    return corpus.prepare_corpus(out, expand_inputs(str(root / "*")), GPT2Tokenizer().to_meta(), **options)


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "shakes"
    prepare(corpus_dir, out)
    return out


def test_a_corpus_becomes_shards_with_a_manifest(prepared, corpus_dir):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 50257
    assert {Path(i["path"]).name for i in manifest["inputs"]} >= {"a.jsonl", "b.jsonl.gz", "c.parquet", "d000.txt"}
    assert all(i["bytes"] > 0 for i in manifest["inputs"])
    # every shard but the last of a split is full, and its sha256 is the manifest's
    import hashlib

    for split in ("train", "val"):
        shards = manifest["splits"][split]["shards"]
        assert [s["tokens"] for s in shards[:-1]] == [20_000] * (len(shards) - 1)
        for s in shards:
            assert hashlib.sha256((prepared / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    # the two streams together are every good document's tokens followed by <|endoftext|>, in order,
    # each document in exactly one split
    tok = GPT2Tokenizer()
    docs = [json.loads(line)["text"] for line in (corpus_dir / "a.jsonl").read_text().splitlines()[:-2]]
    docs += [json.loads(line)["text"] for line in gzip.open(corpus_dir / "b.jsonl.gz", "rt")]
    import pyarrow.parquet as pq

    docs += pq.read_table(corpus_dir / "c.parquet").column("text").to_pylist()
    docs += [(corpus_dir / f"d{i:03d}.txt").read_text() for i in range(50)]
    streams = {s: np.asarray(load_tokens(prepared, s)[:]) for s in ("train", "val")}
    quarter = len(docs[:-50]) // 3
    indices = list(range(quarter)) + [i + 2 for i in range(quarter, len(docs))]  # a.jsonl's 2 bad lines numbered too
    positions = {"train": 0, "val": 0}
    for doc, index in zip(docs, indices, strict=True):
        ids = tok.encode(doc) + [tok.eot_token]
        split = "val" if corpus.is_val(index, 0.1) else "train"
        start = positions[split]
        assert streams[split][start : start + len(ids)].tolist() == ids, (index, split)
        positions[split] += len(ids)
    assert positions == {s: len(streams[s]) for s in streams}
    assert sum(manifest["documents"].values()) == len(docs) and 0 < manifest["documents"]["val"] < len(docs) / 5
    assert manifest["bad_documents"]["count"] == 2


def test_the_shards_are_the_same_for_any_number_of_workers(prepared, corpus_dir, tmp_path):
    out = tmp_path / "two"
    prepare(corpus_dir, out, workers=2)
    assert shard_bytes(out) == shard_bytes(prepared)
    assert json.loads((out / "manifest.json").read_text())["splits"] == json.loads(
        (prepared / "manifest.json").read_text())["splits"]


def test_bad_documents_are_reported_with_file_and_line(prepared, corpus_dir, tmp_path):
    bad = json.loads((prepared / "manifest.json").read_text())["bad_documents"]
    n = len((corpus_dir / "a.jsonl").read_text().splitlines())
    assert bad["first"] == [f"{corpus_dir / 'a.jsonl'}:{n - 1}: not JSON (Expecting property name enclosed in "
                            "double quotes at column 2)", f"{corpus_dir / 'a.jsonl'}:{n}: no 'text' field"]
    proc = helpers.run([sys.executable, "-m", "gptforge.data", "prepare", "--input", str(corpus_dir / "*"),
                        "--dataset", "stop", "--data_dir", str(tmp_path), "--on_bad", "stop"],
                       env={"TIKTOKEN_CACHE_DIR": str(SHARED_DATA / "tiktoken_cache")})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: bad document at {corpus_dir / 'a.jsonl'}:{n - 1}: not JSON "
                                                "(Expecting property name enclosed in double quotes at column 2) "
                                                "(--on_bad=stop; --on_bad=skip counts and skips them)"]
    assert not (tmp_path / "stop" / "manifest.json").exists()


def test_a_killed_prepare_resumes_to_the_same_shards(tmp_path):
    """SIGKILL once some shards are written; the same command again finishes the job."""
    root = make_corpus(tmp_path / "in", scale=4)
    reference = tmp_path / "data" / "ref"
    prepare(root, reference, shard_tokens=5_000)
    cmd = [sys.executable, "-m", "gptforge.data", "prepare", "--input", str(root / "*"), "--dataset", "killed",
           "--data_dir", str(tmp_path / "data"), "--val_fraction", "0.1", "--shard_tokens", "5000"]
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(SHARED_DATA / "tiktoken_cache")}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / "data" / "killed" / corpus.PROGRESS_DIR / "state.json"
    deadline = time.monotonic() + 60
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    folder = tmp_path / "data" / "killed"
    assert not (folder / "manifest.json").exists(), "the prepare ended before it could be killed"
    written = len(json.loads(state.read_text())["shards"]["train"])
    assert 0 < written < len(list(reference.glob("train_*.bin")))
    again = helpers.run(cmd, env={"TIKTOKEN_CACHE_DIR": env["TIKTOKEN_CACHE_DIR"]})
    assert again.returncode == 0, again.stderr
    assert "resuming:" in again.stderr
    assert shard_bytes(folder) == shard_bytes(reference)
    got, want = (json.loads((f / "manifest.json").read_text()) for f in (folder, reference))
    assert got["splits"] == want["splits"] and got["documents"] == want["documents"]
    assert got["bad_documents"] == want["bad_documents"]
    assert not (folder / corpus.PROGRESS_DIR).exists()


def test_a_changed_input_is_noticed_on_resume(corpus_dir, tmp_path):
    root = make_corpus(tmp_path / "in")
    folder = tmp_path / "data" / "c"
    (folder / corpus.PROGRESS_DIR).mkdir(parents=True)
    settings = dict(tokenizer=GPT2Tokenizer().to_meta(), inputs=describe_inputs(expand_inputs(
        str(root / "*"))), input_splits=["train"] * len(list(root.iterdir())), val_fraction=0.1, text_field="text",
        shard_tokens=20_000)  # fmt: skip
    state = dict(settings=settings, shards={"train": [], "val": []},
                 splits={s: vars(corpus.SplitState()) for s in ("train", "val")})
    (folder / corpus.PROGRESS_DIR / "state.json").write_text(json.dumps(state))
    with open(root / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more line"}) + "\n")
    with pytest.raises(CorpusError, match=r"stopped with other inputs \(did an input change\?\)"):
        prepare(root, folder)


def test_training_reads_shards_and_resumes_across_a_shard_boundary(prepared, tmp_path):
    """Windows of 32 tokens from 20,000-token shards: many batches span two shards."""
    flags = dict(TINY, dataset=prepared.name, data_dir=str(prepared.parent), max_iters=6, lr_decay_iters=6,
                 eval_interval=3, n_embd=16)
    full = tmp_path / "full"
    quiet(helpers.config(prepared.parent, full, base=flags))
    part = tmp_path / "part"
    quiet(helpers.config(prepared.parent, part, base=flags, max_iters=3))
    quiet(helpers.config(prepared.parent, part, base=flags, resume=True))
    (logs, evals), (want, want_evals) = logs_and_evals(part), logs_and_evals(full)
    assert [r["loss"] for r in logs] == [r["loss"] for r in want]
    assert [r["val_loss"] for r in evals if r["step"] in (0, 3, 6)][-1] == want_evals[-1]["val_loss"]
    # and a batch that crosses a shard boundary is the stream's tokens there
    tokens = load_tokens(prepared, "train")
    crossing = tokens[19_990:20_010]
    first = np.memmap(prepared / "train_000000.bin", dtype=np.uint16, mode="r", offset=HEADER_BYTES)
    second = np.memmap(prepared / "train_000001.bin", dtype=np.uint16, mode="r", offset=HEADER_BYTES)
    assert crossing.tolist() == first[-10:].tolist() + second[:10].tolist()


def write_tokens(folder: Path, tokens: dict[str, np.ndarray], tokenizer_meta: dict, vocab_size: int,
                 shard_tokens: int) -> None:
    """A dataset from given token streams, as prepare writes it (tests and benchmarks)."""
    folder.mkdir(parents=True)
    dtype = token_dtype(vocab_size)
    writers = {s: ShardWriter(folder, s, shard_tokens, dtype) for s in tokens}
    for split, stream in tokens.items():
        writers[split].append(stream)
        writers[split].finish()
    write_manifest(folder, writers, tokenizer_meta, vocab_size, int(max(t.max() for t in tokens.values())),
                          dict(inputs=[]))


def test_a_vocabulary_past_uint16_writes_uint32_shards_and_trains(tmp_path):
    vocab = 70_000
    chars = "".join(chr(0x4E00 + i) if i < 20_000 else chr(0x20000 + i) for i in range(vocab))
    tok = CharTokenizer(chars)
    rng = np.random.default_rng(0)
    streams = {"train": rng.integers(0, vocab, 30_000), "val": rng.integers(0, vocab, 3_000)}
    streams["train"][:5] = [69_999, 65_536, 65_535, 0, 1]
    folder = tmp_path / "wide"
    write_tokens(folder, streams, tok.to_meta(), vocab, shard_tokens=10_000)
    assert read_header(folder / "train_000000.bin") == (np.dtype(np.uint32), 10_000)
    assert load_tokens(folder, "train")[:5].tolist() == [69_999, 65_536, 65_535, 0, 1]
    quiet(helpers.config(tmp_path, tmp_path / "out", dataset="wide", max_iters=2, eval_iters=1, n_embd=16))
    logs, _ = logs_and_evals(tmp_path / "out")
    assert len(logs) == 2 and all(np.isfinite(r["loss"]) for r in logs)


def test_a_start_reads_the_manifest_and_headers_only(tmp_path, monkeypatch):
    """A corpus of 1G tokens (sparse shards: their tokens are never written, nor read): opening it
    and checking its token ids maps no shard and reads no token."""
    folder = tmp_path / "big"
    folder.mkdir()
    shard_tokens, shards = 100_000_000, 10
    entries = []
    for i in range(shards):
        path = folder / f"train_{i:06d}.bin"
        write_shard(path, np.zeros(0, dtype=np.uint16))  # a header, then made long by a hole
        with open(path, "r+b") as f:
            f.seek(8 + 4 + 4)
            f.write(shard_tokens.to_bytes(8, "little"))
            f.truncate(HEADER_BYTES + 2 * shard_tokens)
        entries.append(dict(file=path.name, tokens=shard_tokens, sha256="not checked at start"))
    write_shard(folder / "val_000000.bin", np.zeros(1000, dtype=np.uint16))
    manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, dtype="uint16", vocab_size=3,
                    max_token_id=0, tokenizer=CharTokenizer("abc").to_meta(), inputs=[],
                    splits=dict(train=dict(tokens=shard_tokens * shards, shards=entries),
                                val=dict(tokens=1000, shards=[dict(file="val_000000.bin", tokens=1000)])))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    mapped = []
    monkeypatch.setattr(np, "memmap", lambda *a, **k: mapped.append(a) or pytest.fail("a shard was mapped"))
    started = time.perf_counter()
    tokens = load_tokens(folder, "train")
    check_token_ids(folder, "train", tokens, 3)
    assert len(tokens) == 10**9 and load_meta(folder)["train_tokens"] == 10**9 and not mapped
    assert time.perf_counter() - started < 5  # generous: it is a handful of small reads


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_a_tokenizer_trained_on_the_corpus_prepares_trains_samples_and_exports(tmp_path, kind):
    """python -m gptforge.data tokenizer, then prepare with it, train, sample (gpt.sample) and export
    to transformers: the tokenizer travels inside the dataset's manifest and the checkpoint."""
    root = tmp_path / "in"
    root.mkdir()
    with open(root / "a.jsonl", "w") as f:
        for p in paragraphs()[:1500]:
            f.write(json.dumps({"text": p}) + "\n")
    tok_dir = tmp_path / "tok"
    made = helpers.run([sys.executable, "-m", "gptforge.data", "tokenizer", "--input", str(root / "*.jsonl"), "--kind",
                        kind, "--vocab_size", "400", "--out", str(tok_dir)])
    assert made.returncode == 0, made.stderr
    data = tmp_path / "data"
    made = helpers.run([sys.executable, "-m", "gptforge.data", "prepare", "--input", str(root / "*.jsonl"), "--dataset",
                        "mine", "--data_dir", str(data), "--tokenizer", str(tok_dir), "--val_fraction", "0.1"])
    assert made.returncode == 0, made.stderr
    from gptforge.gpt.tokenizer_training import load_tokenizer_dir

    tok = load_tokenizer_dir(tok_dir)
    assert load_meta(data / "mine")["tokenizer"]["sha256"] == tok.to_meta()["sha256"]
    first = next(i for i in range(100) if not corpus.is_val(i, 0.1))  # the first document in train
    ids = [*tok.encode(paragraphs()[first]), tok.eot_id]
    assert load_tokens(data / "mine", "train")[: len(ids)].tolist() == ids
    out = tmp_path / "out"
    quiet(helpers.config(data, out, dataset="mine", max_iters=3, n_embd=16, num_samples=1, sample_tokens=10))
    sample = helpers.run([sys.executable, "-m", "gptforge.gpt.sample", "--out_dir", str(out), "--prompt", "ROMEO:",
                          "--max_new_tokens", "5", "--device", "cpu"])
    assert sample.returncode == 0 and "ROMEO:" in sample.stdout, sample.stderr
    export = tmp_path / "hf"
    done = helpers.run([sys.executable, "-m", "gptforge.gpt.pretrained", "export", "--out_dir", str(out),
                        "--to", str(export)])
    assert done.returncode == 0, done.stderr
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(export)
    text = "ROMEO:\nWhat light through yonder window breaks?"
    assert hf(text)["input_ids"] == tok.encode(text)


def test_every_input_kind_reads_its_documents(tmp_path):
    import zstandard

    lines = [json.dumps({"text": t}) for t in ("first", "second\nline", "caf\u00e9 \u4e2d")]
    data = ("\n".join(lines) + "\n\n").encode()  # a blank line is no document
    (tmp_path / "a.jsonl").write_bytes(data)
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    cut = len(data) // 2  # two frames, as pzstd and concatenated files have: both are read
    (tmp_path / "b.jsonl.zst").write_bytes(b"".join(zstandard.ZstdCompressor().compress(p)
                                                    for p in (data[:cut], data[cut:])))
    with gzip.open(tmp_path / "a.jsonl.gz", "wb") as f:
        f.write(data)
    want = [(1, lines[0].encode() + b"\n"), (2, lines[1].encode() + b"\n"), (3, lines[2].encode() + b"\n")]
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.zst", "b.jsonl.zst"):
        got = list(iter_raw_documents(tmp_path / name, "text"))
        assert got == want, name
        assert [parse_document("jsonl", raw, "text") for _, raw in got] == ["first", "second\nline",
                                                                                  "caf\u00e9 \u4e2d"]


@pytest.mark.parametrize(("kind", "raw", "why"), [
    ("txt", b"ok \xff\xfe", "invalid UTF-8 at byte 3"),
    ("jsonl", b'{"text": "\xff"}', "invalid UTF-8 at byte"),
    ("jsonl", b"{text: 1}", "not JSON"),
    ("jsonl", b"[1, 2]", "no 'text' field"),
    ("jsonl", b'{"body": "x"}', "no 'text' field"),
    ("jsonl", b'{"text": 7}', "the 'text' field is int, not text"),
    ("parquet", None, "the 'text' field is NoneType, not text"),
    ("parquet", 7, "the 'text' field is int, not text"),
    ("parquet", b"bytes", "the 'text' field is bytes, not text"),
])  # fmt: skip
def test_bad_documents_say_why(kind, raw, why):
    with pytest.raises(ValueError, match=why):
        parse_document(kind, raw, "text")


def test_a_parquet_column_of_numbers_is_bad_documents(tmp_path):
    """Not a TypeError: each row is a bad document, reported with its file and row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "in"
    root.mkdir()
    pq.write_table(pa.table({"text": ["some text"] * 3, "n": [1, 2, 3]}), root / "a.parquet")
    with pytest.raises(BadDocumentError, match=r"bad document at .*a.parquet:1: the 'n' field is int, not text"):
        prepare(root, tmp_path / "out", text_field="n", on_bad="stop")
    with pytest.raises(CorpusError, match="the train split is empty"):  # all three skipped
        prepare(root, tmp_path / "out2", text_field="n")


class Killed(Exception):
    pass


def test_a_prepare_stopped_at_any_shard_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    """Stopped right after the n-th recorded shard, or right after a shard was written but before
    it was recorded, for several n: tiny shards (documents span several), a large val share, bad
    lines early, and batches of a few documents; the resumed prepare writes the same bytes and
    the same manifest as one that ran through."""
    root = tmp_path / "in"
    root.mkdir()
    docs = list(paragraphs()[:120])
    with open(root / "a.jsonl", "w") as f:
        f.write("{broken\n")
        for i, d in enumerate(docs):
            f.write(json.dumps({"text": d}) + "\n")
            if i == 5:
                f.write(json.dumps({"text": None}) + "\n")
    monkeypatch.setattr(corpus, "BATCH_BYTES", 2048)
    options = dict(val_fraction=0.3, shard_tokens=64)
    reference = tmp_path / "ref"
    prepare(root, reference, **options)
    want_bytes, want = shard_bytes(reference), json.loads((reference / "manifest.json").read_text())
    assert len(want_bytes) > 40
    save, write = corpus._save_progress, write_shard
    for n in (1, 2, 7, 19):
        for where in ("after recording", "before recording"):
            folder = tmp_path / f"stopped{n}{where[0]}"
            calls = []

            def stop_after_save(*args, _n=n, _calls=calls):
                save(*args)
                _calls.append(1)
                if len(_calls) == _n:
                    raise Killed

            def stop_after_write(*args, _n=n, _calls=calls):
                digest = write(*args)
                _calls.append(1)
                if len(_calls) == _n + 1:
                    raise Killed  # the shard is on disk, its progress never saved
                return digest

            with monkeypatch.context() as patch:
                if where == "after recording":
                    patch.setattr(corpus, "_save_progress", stop_after_save)
                else:
                    patch.setattr("gptforge.data.shards.write_shard", stop_after_write)
                with pytest.raises(Killed):
                    prepare(root, folder, **options)
            assert not (folder / "manifest.json").exists()
            prepare(root, folder, **options)
            assert shard_bytes(folder) == want_bytes, (n, where)
            got = json.loads((folder / "manifest.json").read_text())
            assert got == want, (n, where)


def test_slices_of_the_stream(prepared):
    tokens = load_tokens(prepared, "train")
    n = len(tokens)
    whole = np.concatenate([np.memmap(p, dtype=np.uint16, mode="r", offset=HEADER_BYTES)
                            for p in sorted(prepared.glob("train_*.bin"))])
    for a, b in ((0, 0), (5, 5), (19_999, 20_001), (20_000, 40_000), (n - 3, n), (n, n), (-10, None), (7, 3)):
        assert tokens[a:b].tolist() == whole[a:b].tolist(), (a, b)


def test_verify_finds_a_damaged_shard(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    verify = [sys.executable, "-m", "gptforge.data", "verify", "--dataset", "copy", "--data_dir", str(tmp_path)]
    ok = helpers.run(verify)
    assert ok.returncode == 0 and "sound (every file matches its sha256, every token id" in ok.stderr, ok.stderr
    shard = copy / "train_000001.bin"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one token changed: the header and size still agree
    shard.write_bytes(bytes(data))
    bad = helpers.run(verify)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: {shard} does not match its sha256 in the manifest (train "
                                               "split): damaged"]
