"""Corpus preparation throughput, and a training start on a large prepared corpus.

Preparation: a corpus of varied text generated here (``GPT_BENCH_CORPUS_MB``, default 200 MB of
JSON lines: Zipf-distributed words from a made-up vocabulary, with numbers, punctuation,
accented and CJK words and line breaks; no download) is tokenized with the GPT-2 tokenizer
into shards by ``python -m gptforge.data prepare`` with 1 and with 2 workers, in interleaved
rounds (the order alternates). Figures: MB/s of input text and tokens/s, medians with spread.

Start: what a training start costs on the corpus (open the manifest and shard headers, check
the token ids, draw a batch), against Tiny Shakespeare's classic files, and the same for a
corpus of 1G tokens (sparse shards: their tokens take no disk and are never read).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import Result, by_mode, record
from gptforge.data.shards import FORMAT, FORMAT_VERSION, HEADER_BYTES, MANIFEST, load_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]
# make bench: 50 MB (about 20 s in all here); make bench-full: 200 MB, where start-up costs are negligible
CORPUS_MB = float(os.environ.get("GPT_BENCH_CORPUS_MB", str(by_mode(50, 200))))
ROUNDS = int(os.environ.get("GPT_BENCH_PREP_ROUNDS", "2"))
FILES = 8


def generate_corpus(root: Path, megabytes: float, seed: int = 0) -> int:
    """JSON-lines files of made-up documents, ``megabytes`` of text in all; returns the text bytes."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(1, 11)))) for _ in range(30_000)]
    words += ["caf\u00e9", "na\u00efve", "\u00fcber", "\u4e2d\u6587", "\u65e5\u672c\u8a9e",
              "\u0645\u0631\u062d\u0628\u0627"]
    words = np.array(words)
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    root.mkdir(parents=True, exist_ok=True)
    target, total = int(megabytes * 1e6), 0
    for f in range(FILES):
        with open(root / f"part{f:02d}.jsonl", "w", encoding="utf-8") as out:
            while total < target * (f + 1) / FILES:
                picked = words[rng.choice(len(words), size=int(rng.integers(50, 800)), p=zipf)]
                text = " ".join(picked)
                # sentences, numbers and paragraphs, so the text is not one run of words
                text = text.replace(" e ", ". ").replace(" a ", f", {int(rng.integers(0, 10**6))} ")
                text = text.replace(" i ", ".\n\n")
                out.write(json.dumps({"text": text, "id": total}) + "\n")
                total += len(text.encode())
    return total


def prepare(inputs: Path, data_dir: Path, name: str, workers: int) -> float:
    cmd = [sys.executable, "-m", "gptforge.data", "prepare", "--input", str(inputs / "*.jsonl"), "--dataset", name,
           "--data_dir", str(data_dir), "--workers", str(workers), "--val_fraction", "0.01"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return time.perf_counter() - started


def test_prepare_throughput(benchmark, tmp_path):
    if importlib_missing("tiktoken"):
        pytest.skip("tiktoken is not installed")
    text_bytes = generate_corpus(tmp_path / "in", CORPUS_MB)
    times: dict[int, list[float]] = {1: [], 2: []}
    tokens = 0

    def rounds() -> None:
        nonlocal tokens
        for r in range(ROUNDS):
            for workers in (1, 2) if r % 2 == 0 else (2, 1):
                out = tmp_path / f"data{r}"
                times[workers].append(prepare(tmp_path / "in", out, f"w{workers}", workers))
                manifest = load_manifest(out / f"w{workers}")
                tokens = manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
            for workers in (1, 2):
                for shard in (tmp_path / f"data{r}" / f"w{workers}").glob("*.bin"):
                    shard.unlink()  # keep the disk free: the figures are taken

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    group = f"corpus preparation: {text_bytes / 1e6:.0f} MB of JSON lines, GPT-2 tokenizer"
    one = statistics.median(times[1])
    for workers, seconds in times.items():
        median = statistics.median(seconds)
        note = (f"{tokens / median:,.0f} tokens/s; {median:.1f} s (min {min(seconds):.1f}, max {max(seconds):.1f}) "
                f"over {len(seconds)} interleaved runs; {one / median:.2f}x one worker")
        record(benchmark, Result(group, f"{workers} worker(s)", text_bytes / 1e6 / median, "MB/s",
                                 baseline="1 worker(s)", note=note))


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def start_cost(folder: Path) -> float:
    """Seconds to open a dataset as a training start does: meta, token streams, id check, a batch."""
    from gptforge.data import check_token_ids, load_meta, load_tokens
    from gptforge.train.sampler import make_samplers

    started = time.perf_counter()
    meta = load_meta(folder)
    streams = {s: load_tokens(folder, s) for s in ("train", "val")}
    for split, tokens in streams.items():
        check_token_ids(folder, split, tokens, meta["vocab_size"])
    train, _ = make_samplers(streams["train"], streams["val"], 12, 64, 1, seed=1)
    train.batch(0)
    return time.perf_counter() - started


def sparse_corpus(folder: Path, shards: int = 10, shard_tokens: int = 100_000_000) -> None:
    """1G tokens of zeros in sparse shards (no disk, nothing read) with a valid manifest."""
    from gptforge.gpt.tokenizer import CharTokenizer

    folder.mkdir(parents=True)
    entries = []
    for i in range(shards):
        path = folder / f"train_{i:06d}.bin"
        write_shard(path, np.zeros(0, dtype=np.uint16))
        with open(path, "r+b") as f:
            f.seek(16)
            f.write(shard_tokens.to_bytes(8, "little"))
            f.truncate(HEADER_BYTES + 2 * shard_tokens)
        entries.append(dict(file=path.name, tokens=shard_tokens))
    write_shard(folder / "val_000000.bin", np.zeros(10_000, dtype=np.uint16))
    manifest = dict(format=FORMAT, format_version=FORMAT_VERSION, dtype="uint16", vocab_size=65,
                    max_token_id=0, tokenizer=CharTokenizer("".join(chr(32 + i) for i in range(65))).to_meta(),
                    inputs=[], splits=dict(train=dict(tokens=shards * shard_tokens, shards=entries),
                                           val=dict(tokens=10_000, shards=[dict(file="val_000000.bin",
                                                                                tokens=10_000)])))
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.full
def test_training_start_on_a_large_corpus(benchmark, tmp_path):
    shakespeare = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not shakespeare.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {shakespeare}")
    from gptforge.data import prepare as prepare_text

    os.environ.setdefault("GPT_DATA_URL", shakespeare.as_uri())
    small = prepare_text("shakespeare_char", tmp_path)
    big = tmp_path / "big"
    sparse_corpus(big)
    times: dict[str, list[float]] = {"Tiny Shakespeare (1M tokens, classic files)": [],
                                     "sharded corpus of 1G tokens": []}

    def rounds() -> None:
        for r in range(5):
            pair = list(times) if r % 2 == 0 else list(reversed(times))
            for name in pair:
                times[name].append(start_cost(small if name.startswith("Tiny") else big))

    benchmark.pedantic(rounds, rounds=1, iterations=1)
    for name, seconds in times.items():
        median = statistics.median(seconds)
        record(benchmark, Result("training start: open the data, check token ids, draw a batch", name,
                                 1 / median, "starts/s", note=f"{median * 1e3:.1f} ms (min {min(seconds) * 1e3:.1f}, "
                                 f"max {max(seconds) * 1e3:.1f}) over 5 interleaved runs"))
