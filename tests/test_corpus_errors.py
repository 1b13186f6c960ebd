"""Corpus preparation refusing what it cannot do right, in one line: bad command-line values and
counts past their limits, inputs cut short, splits that overlap, and training's --input pointed
at a folder that holds another dataset. (Split from tests/test_corpus.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import DataError, corpus
from gptforge.data.errors import CorpusError
from gptforge.data.inputs import expand_inputs, iter_raw_documents
from gptforge.gpt.tokenizer import CharTokenizer, GPT2Tokenizer
from tests import helpers
from tests.conftest import SHARED_DATA
from tests.test_corpus import make_corpus, write_tokens


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_cli_errors_are_one_line(tmp_path, corpus_dir):
    env = {"TIKTOKEN_CACHE_DIR": str(SHARED_DATA / "tiktoken_cache")}
    cases = [
        (["--input", str(tmp_path / "none*.jsonl"), "--dataset", "x"], "matches no file"),
        (["--input", str(corpus_dir / "*"), "--dataset", "x", "--val_fraction", "0.1", "--val_input",
          str(corpus_dir / "a.jsonl")], "either as --val_fraction"),
        (["--input", str(corpus_dir / "*")], "name the corpus's dataset with --dataset NAME"),
        (["--input", str(corpus_dir / "*"), "--dataset", "x", "--tokenizer", "char"], "end-of-text token"),
        (["--input", str(corpus_dir / "*"), "--dataset", "x", "--shard_tokens", "lots"], "expected a count"),
    ]
    for args, message in cases:
        proc = helpers.run([sys.executable, "-m", "gptforge.data", "prepare", "--data_dir", str(tmp_path), *args],
                           env=env)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    from gptforge.data import ensure_prepared

    prepared = tmp_path / "p"
    write_tokens(prepared, {"train": np.arange(100), "val": np.arange(10)}, CharTokenizer("a" * 0 + "".join(
        chr(65 + i) for i in range(100))).to_meta(), 100, 50)
    (tmp_path / "plain.txt").write_text("some text " * 50)
    with pytest.raises(DataError, match="holds a sharded corpus; train on it with --dataset"):
        ensure_prepared("p", tmp_path, input_path=str(tmp_path / "plain.txt"))
    # training's --input of a corpus is compared with the files the corpus was prepared from
    with pytest.raises(DataError, match="holds a corpus prepared from other files than --input"):
        ensure_prepared("p", tmp_path, input_path=str(corpus_dir / "a.jsonl"))


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--shard_tokens", "inf", "expected a finite count like 100M, 2G or 50000, got 'inf'"),
    ("--shard_tokens", "nan", "expected a finite count like 100M, 2G or 50000, got 'nan'"),
    ("--shard_tokens", "infG", "expected a finite count like 100M, 2G or 50000, got 'infG'"),
    ("--shard_tokens", "1e30", "expected a count of at most 9,223,372,036,854,775,807 (an int64), got '1e30'"),
    ("--shard_tokens", "9223372036854775808", "expected a count of at most 9,223,372,036,854,775,807"),
    ("--shard_tokens", "2.5", "expected a positive whole count, got '2.5'"),
    ("--workers", "0", "expected 1 to 1024 processes, got '0'"),
    ("--workers", "99999999999999999999", "expected 1 to 1024 processes, got '99999999999999999999'"),
    ("--workers", "inf", "expected a whole number of processes, got 'inf'"),
])  # fmt: skip
def test_counts_at_their_limits_are_one_line(tmp_path, corpus_dir, capsys, flag, value, message):
    from gptforge.data.cli import main as data_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        data_main(["prepare", "--input", str(corpus_dir / "*"), "--dataset", "x", "--data_dir", str(tmp_path / "d"),
                   flag, value])  # fmt: skip
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"{flag}: {message}" in err, err
    assert not (tmp_path / "d").exists()


def test_vocab_size_counts_at_their_limits_are_one_line(tmp_path, corpus_dir, capsys):
    from gptforge.data.cli import main as data_main

    for value in ("inf", "nan", "1e30"):
        with pytest.raises(SystemExit) as exit_:
            data_main(["tokenizer", "--input", str(corpus_dir / "*.jsonl"), "--kind", "bpe", "--vocab_size", value,
                       "--out", str(tmp_path / "tok")])  # fmt: skip
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and "--vocab_size: expected a" in err, err
    assert not (tmp_path / "tok").exists()


def test_unreadable_inputs_and_overlapping_splits_are_refused(tmp_path, corpus_dir):
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes((corpus_dir / "b.jsonl.gz").read_bytes()[:2000])  # a download cut short
    with pytest.raises(CorpusError, match=r"cut.jsonl.gz cannot be read after document \d+ \(EOFError"):
        list(iter_raw_documents(cut, "text"))
    import zstandard

    whole = zstandard.ZstdCompressor().compress((corpus_dir / "a.jsonl").read_bytes())
    for end in (len(whole) - 1, len(whole) // 2, 10):  # cut in the last block, in the middle, in the header
        zst = tmp_path / "zst" / "cut.jsonl.zst"
        zst.parent.mkdir(exist_ok=True)
        zst.write_bytes(whole[:end])
        with pytest.raises(CorpusError, match=r"cut.jsonl.zst cannot be read after document \d+ \(EOFError: the file "
                                              r"ends inside a zstd frame: it was cut short\)"):
            list(iter_raw_documents(zst, "text"))
    from gptforge.data.cli import main as data_main

    before = sorted(tmp_path.rglob("*"))
    assert data_main(["tokenizer", "--input", str(tmp_path / "zst" / "*"), "--kind", "bpe", "--vocab_size", "300",
                      "--out", str(tmp_path / "tok")]) == 2  # fmt: skip
    assert sorted(tmp_path.rglob("*")) == before  # the tokenizer is not trained on what came before the cut
    inputs = expand_inputs(str(corpus_dir / "*.jsonl"))
    with pytest.raises(CorpusError, match="is in both --input and --val_input"):
        corpus.prepare_corpus(tmp_path / "x", inputs, GPT2Tokenizer().to_meta(), val_inputs=inputs)
