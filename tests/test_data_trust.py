"""Issue 28: nothing on disk is trusted. One writer per folder (prepare, tokenizer training,
export), folders replaced whole or not at all, inputs read to their verified end, and what a
dataset claims checked against itself (cheaply at start, each batch, fully by verify).

Every refusal is checked the same way: exit 2, one line on stderr naming the problem, and
nothing on disk changed (``snapshot``). The corpora are a few hundred small documents: every
test here takes a second or less.
"""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import DataError, ensure_prepared, load_meta, load_tokenizer, load_tokens
from gptforge.data.checks import check_token_ids
from gptforge.data.cli import main as data_main
from gptforge.data.shards import HEADER_BYTES, is_sharded
from gptforge.gpt.folders import FolderLock, lock_path
from gptforge.gpt.tokenizer_training import load_tokenizer_dir

DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog, {i * 7} times.\n" * 3 for i in range(400)]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` (hidden ones too): what a refused command must not change."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.is_dir(), None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns))
            for p in root.rglob("*")}


def refused(capsys, args: list[str], message: str, root: Path) -> str:
    """Run the data CLI with ``args``: it must exit 2 with one line saying ``message``, and leave
    ``root`` as it was."""
    before = snapshot(root)
    capsys.readouterr()
    code = data_main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert snapshot(root) == before, "a refused command changed the disk"
    return err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs")
    lines = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    (root / "a.jsonl").write_bytes(lines)
    (root / "b.jsonl.bz2").write_bytes(bz2.compress(lines))
    packed = bz2.compress(lines)
    (root / "cut.jsonl.bz2").write_bytes(packed[: len(packed) // 2])
    packed = gzip.compress(lines)
    (root / "cut.jsonl.gz").write_bytes(packed[: len(packed) - 40])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": DOCS}), root / "c.parquet")
    whole = (root / "c.parquet").read_bytes()
    (root / "cut.parquet").write_bytes(whole[: len(whole) - 30])  # the footer is gone
    (root / "same").mkdir()
    shutil.copy(root / "a.jsonl", root / "same" / "a.jsonl")
    (root / "same" / "again.jsonl").symlink_to("a.jsonl")  # one file by two names
    typed = [{"text": 5}, {"text": ["a", "list"]}, {"text": {"a": 1}}, {"text": True}, {"text": None}]
    (root / "typed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*typed, *({"text": d} for d in DOCS)]))
    (root / "notes.txt").write_text("".join(DOCS))
    return root


def prepare_args(data: Path, source: Path | str, dataset: str, *extra: str) -> list[str]:
    return ["prepare", "--input", str(source), "--dataset", dataset, "--data_dir", str(data), "--val_fraction",
            "0.05", "--shard_tokens", "20000", *extra]


@pytest.fixture(scope="module")
def corpus(inputs, tmp_path_factory) -> Path:
    """A prepared corpus (gpt2 tokens); tests that damage it work on a copy."""
    data = tmp_path_factory.mktemp("data")
    assert data_main(prepare_args(data, inputs / "a.jsonl", "good")) == 0
    return data / "good"


def copy_of(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / folder.name)
    return tmp_path / folder.name


# --- inputs read to their verified end -----------------------------------------------------------


@pytest.mark.parametrize("name", ["cut.jsonl.bz2", "cut.jsonl.gz", "cut.parquet"])
def test_an_input_cut_short_is_an_error_naming_it(inputs, tmp_path, capsys, name):
    refused(capsys, prepare_args(tmp_path / "data", inputs / name, "cut"), f"{inputs / name} cannot be read", tmp_path)
    refused(capsys, ["tokenizer", "--input", str(inputs / name), "--kind", "bpe", "--vocab_size", "300", "--out",
                     str(tmp_path / "tok")], f"{inputs / name} cannot be read", tmp_path)


def test_bz2_inputs_and_one_file_reached_twice(inputs, tmp_path):
    data = tmp_path / "data"
    assert data_main(prepare_args(data, inputs / "b.jsonl.bz2", "bz")) == 0
    assert data_main(prepare_args(data, inputs / "same" / "*.jsonl", "twice")) == 0
    bz, twice = json.loads((data / "bz" / "manifest.json").read_text()), load_meta(data / "twice")
    assert sum(bz["documents"].values()) == len(DOCS)
    assert len(json.loads((data / "twice" / "manifest.json").read_text())["inputs"]) == 1
    assert twice["train_tokens"] == bz["splits"]["train"]["tokens"]  # the symlink's documents are not read again


def test_text_fields_of_the_wrong_type_are_bad_documents(inputs, tmp_path):
    data = tmp_path / "data"
    assert data_main(prepare_args(data, inputs / "typed.jsonl", "typed")) == 0
    bad = json.loads((data / "typed" / "manifest.json").read_text())["bad_documents"]
    assert bad["count"] == 5
    assert [b.split(": ", 1)[1] for b in bad["first"]] == [
        f"the 'text' field is {kind}, not text" for kind in ("int", "list", "dict", "bool", "NoneType")]


# --- one writer per folder --------------------------------------------------------------------


def test_a_second_prepare_is_refused_and_a_dead_ones_lock_taken_over(inputs, tmp_path, capsys, caplog):
    data = tmp_path / "data"
    with FolderLock(data / "busy", "prepare"):  # a live holder (this process, by another open file)
        refused(capsys, prepare_args(data, inputs / "a.jsonl", "busy"), f"{data / 'busy'} is being written by pid "
                f"{os.getpid()}", tmp_path)
        refused(capsys, ["prepare", "--input", str(inputs / "notes.txt"), "--dataset", "busy", "--data_dir",
                         str(data)], "is being written by", tmp_path)
        with pytest.raises(DataError, match="is being prepared now by pid"):
            ensure_prepared("busy", data)
    # a lock file whose holder died (nothing holds the flock): taken over, said so
    data.mkdir()
    lock_path(data / "busy").write_text(json.dumps(dict(pid=999999, host="h", command="prepare: killed")) + "\n")
    with caplog.at_level(logging.INFO):
        assert data_main(prepare_args(data, inputs / "a.jsonl", "busy")) == 0
    assert "taking over the lock of pid 999999 on h (prepare: killed), which is no longer running" in caplog.text
    assert not lock_path(data / "busy").exists() and is_sharded(data / "busy")


def test_half_finished_prepares_of_the_other_kind_are_named_with_their_cure(inputs, tmp_path, capsys):
    data = tmp_path / "data"
    # a failed first corpus prepare leaves nothing behind (no .progress to block the folder)
    refused(capsys, prepare_args(data, inputs / "cut.jsonl.gz", "mixed"), "cannot be read", tmp_path)
    (data / "mixed" / ".progress").mkdir(parents=True)  # a corpus prepare that was killed
    refused(capsys, ["prepare", "--input", str(inputs / "notes.txt"), "--dataset", "mixed", "--data_dir", str(data)],
            f"holds a corpus prepare that did not finish (.progress); a text file is not prepared beside it: finish "
            f"it (run its python -m gptforge.data prepare command again), remove it (rm -r {data / 'mixed'})", tmp_path)
    with pytest.raises(DataError, match=f"or remove it \\(rm -r {data / 'mixed'}\\)"):
        ensure_prepared("mixed", data)
    (data / "text").mkdir()
    (data / "text" / "train.bin").write_bytes(b"\0\0")  # a text prepare killed before its meta.json
    refused(capsys, prepare_args(data, inputs / "a.jsonl", "text"), "holds a text file's prepare that did not "
            "finish (train.bin, no meta.json); finish it (python -m gptforge.data prepare --input TEXT --dataset "
            f"text) or remove it (rm -r {data / 'text'})", tmp_path)


def test_tokenizer_folders_are_replaced_whole_only_with_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "tok"
    common = ["tokenizer", "--input", str(inputs / "a.jsonl"), "--vocab_size", "400", "--out", str(out)]
    assert data_main([*common, "--kind", "sentencepiece"]) == 0
    refused(capsys, [*common, "--kind", "bpe"], f"{out} already holds a tokenizer (tokenizer.model, "
            "tokenizer_meta.json); pass --overwrite to replace it whole", tmp_path)
    with FolderLock(out, "tokenizer training"):
        refused(capsys, [*common, "--kind", "bpe", "--overwrite"], f"{out} is being written by pid", tmp_path)
    assert data_main([*common, "--kind", "bpe", "--overwrite"]) == 0
    # the other kind's model is gone, not left for AutoTokenizer to find
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_meta.json"]
    assert load_tokenizer_dir(out).name == "bpe" and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    (out / "notes.md").write_text("mine")
    refused(capsys, [*common, "--kind", "bpe", "--overwrite"], f"{out} holds notes.md, which a tokenizer does not "
            "write; it would be replaced whole", tmp_path)


def test_an_export_is_replaced_whole(tmp_path, capsys):
    from gptforge.gpt.io import save_model
    from gptforge.gpt.model import build_model
    from gptforge.gpt.pretrained import main as export_main
    from gptforge.train.config import TrainConfig

    model = build_model(TrainConfig(n_layer=1, n_head=1, n_embd=8).model_config(27))
    save_model(model, tmp_path / "model", {"name": "char", "vocab_size": 27, "chars": " abcdefghijklmnopqrstuvwxyz"})
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "tokenizer.json").write_text("{}")  # an earlier export's trained tokenizer
    (hf / "config.json").write_text("{}")
    args = ["export", "--out_dir", str(tmp_path / "model"), "--to", str(hf)]
    before = snapshot(tmp_path)
    assert export_main(args) == 2 and "pass --overwrite to replace it whole" in capsys.readouterr().err
    with FolderLock(hf, "export"):
        assert export_main([*args, "--overwrite"]) == 2 and "is being written by" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    assert export_main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors"]  # no stale tokenizer.json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model"]  # no staging folder left


# --- what a dataset claims, checked ----------------------------------------------------------------


def edit_json(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(vocab_size=100_000), "manifest.json: the field vocab_size is 100000, but its tokenizer, gpt2 "
     "(50257 tokens), has 50257 tokens"),
    (lambda m: m["tokenizer"].update(vocab_size=2000), "the field tokenizer.vocab_size is 2000, but that gpt2 "
     "tokenizer has 50257 tokens"),
    (lambda m: m.update(eot_id=7), "the field eot_id is 7, but its tokenizer's end-of-text id is 50256"),
    (lambda m: m.update(tokenizer={"name": "char", "vocab_size": 50257, "chars": "ab"}),
     "the field tokenizer.vocab_size is 50257, but that char tokenizer has 2 tokens"),
    (lambda m: m.update(tokenizer={"name": "rot13"}), "the field tokenizer.name is 'rot13', not one of"),
])
def test_a_manifest_that_disagrees_with_its_tokenizer_is_refused(corpus, tmp_path, change, message):
    folder = copy_of(corpus, tmp_path)
    edit_json(folder / "manifest.json", change)
    with pytest.raises(DataError) as caught:
        load_meta(folder)
    assert message in str(caught.value) and str(folder / "manifest.json") in str(caught.value)


def test_meta_json_against_its_tokenizer(data_dir, tmp_path):
    folder = copy_of(data_dir / "shakespeare_char", tmp_path)
    edit_json(folder / "meta.json", lambda m: m.update(vocab_size=66))  # a model one row too wide
    with pytest.raises(DataError, match=f"{folder / 'meta.json'}: the field vocab_size is 66, but its tokenizer, "
                       "char \\(65 tokens\\), has 65 tokens; the file was edited or damaged"):
        load_tokenizer(folder)


def test_shards_of_another_tokenizer_are_refused_at_start(corpus, tmp_path):
    """Shards written by another tokenizer (a trained BPE ends documents with id 0) under this
    manifest: the stream's last token, read at start, is not the manifest's end-of-text id."""
    folder = copy_of(corpus, tmp_path)
    last = max(folder.glob("train_*.bin"))
    overwrite_token(last, (last.stat().st_size - HEADER_BYTES) // 2 - 1, 0)
    with pytest.raises(DataError, match=f"{last} ends with token 0, not the end-of-text token 50256 of the tokenizer"):
        check_token_ids(folder, "train", load_tokens(folder, "train"), 50257)


def overwrite_token(path: Path, index: int, value: int, itemsize: int = 2, offset: int = HEADER_BYTES) -> None:
    """Overwrite one token in place, keeping the file's size and header: what a start cannot see."""
    with open(path, "r+b") as f:
        f.seek(offset + index * itemsize)
        f.write(value.to_bytes(itemsize, "little"))


def test_ids_overwritten_in_place_never_reach_the_embedding(corpus, data_dir, tmp_path, capsys):
    folder = copy_of(corpus, tmp_path)
    overwrite_token(folder / "train_000000.bin", 1000, 60_000)  # past gpt2's 50,257
    tokens = check_token_ids(folder, "train", load_tokens(folder, "train"), 50257)  # a cheap start passes
    assert len(tokens[0:1000]) == 1000  # windows before it read as usual
    with pytest.raises(DataError, match=f"{folder / 'train_000000.bin'} \\(token 1,000\\) holds token id 60000, but "
                       "the vocabulary has 50257 tokens"):
        tokens[990:1100]
    capsys.readouterr()
    assert data_main(["verify", "--dataset", folder.name, "--data_dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "holds token id 60000" in err and "does not match its sha256" in err, err
    # the same for a dataset of one text, whose verify reads every token against meta.json's sha256
    text = copy_of(data_dir / "shakespeare_char", tmp_path)
    overwrite_token(text / "val.bin", 5, 65, offset=0)
    with pytest.raises(DataError, match="val.bin \\(token 5\\) holds token id 65"):
        check_token_ids(text, "val", load_tokens(text, "val"), 65)[0:64]
    assert data_main(["verify", "--dataset", "shakespeare_char", "--data_dir", str(tmp_path)]) == 1
    assert "val.bin holds token id 65, but the vocabulary has 65 tokens" in capsys.readouterr().err
    assert data_main(["verify", "--dataset", "good", "--data_dir", str(corpus.parent)]) == 0


def test_the_start_up_check_of_a_big_corpus_reads_almost_nothing(corpus, tmp_path):
    """10 shards of 100M tokens (sparse files: never written): load, check, and every batch's
    guard. The cost measured here is what the README quotes."""
    import time

    folder = copy_of(corpus, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    entries = []
    for i in range(10):
        path = folder / f"train_{i:06d}.bin"
        shutil.copy(corpus / "train_000000.bin", path)
        with open(path, "r+b") as f:
            f.seek(16)
            f.write((100_000_000).to_bytes(8, "little"))
            f.truncate(HEADER_BYTES + 2 * 100_000_000)
            f.seek(HEADER_BYTES + 2 * (100_000_000 - 1))
            f.write((50256).to_bytes(2, "little"))  # each ends a document
        entries.append(dict(file=path.name, tokens=100_000_000, max_token_id=50256, sha256="-"))
    manifest["splits"]["train"] = dict(tokens=10**9, shards=entries)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    started = time.perf_counter()
    tokens = check_token_ids(folder, "train", load_tokens(folder, "train"), load_meta(folder)["vocab_size"])
    assert len(tokens) == 10**9 and time.perf_counter() - started < 1  # about 2 ms (README); generous here
    starts = np.random.default_rng(0).integers(0, 10**9 - 1025, 64)
    started = time.perf_counter()
    for s in starts:
        tokens[int(s) : int(s) + 1025]
    assert (time.perf_counter() - started) / len(starts) < 0.01


# --- training's --input, as prepare takes it ---------------------------------------------------------


def test_training_input_of_a_corpus_is_prepared_as_prepare_does(inputs, tmp_path):
    data = tmp_path / "data"
    folder = ensure_prepared("a", data, input_path=str(inputs / "a.jsonl"))
    assert is_sharded(folder) and load_meta(folder)["tokenizer"]["name"] == "gpt2"  # documents, not raw JSON
    assert data_main(prepare_args(tmp_path / "cli", inputs / "a.jsonl", "a", "--val_fraction", "0.01",
                                  "--shard_tokens", "100M")) == 0
    cli = tmp_path / "cli" / "a"
    assert [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.bin"))] == [
        (p.name, p.read_bytes()) for p in sorted(cli.glob("*.bin"))]  # the same shards as the CLI's defaults
    assert ensure_prepared("a", data, input_path=str(inputs / "a.jsonl")) == folder  # used as it is
    with pytest.raises(DataError, match="a corpus of documents, which needs a tokenizer with an end-of-text token, "
                       "and char has none: .*--tokenizer DIR"):
        ensure_prepared("b", data, input_path=str(inputs / "a.jsonl"), tokenizer="char")
    with pytest.raises(DataError, match="holds a corpus prepared from other files than --input"):
        ensure_prepared("a", data, input_path=str(inputs / "c.parquet"))
    assert not (data / "b").exists()


def test_huge_counts_are_one_line_or_work(inputs, tmp_path, capsys):
    refused(capsys, ["tokenizer", "--input", str(inputs / "a.jsonl"), "--kind", "bpe", "--vocab_size",
                     str(2**63 - 1), "--out", str(tmp_path / "tok")], "vocab_size for a bpe tokenizer must be",
            tmp_path)
    assert data_main(prepare_args(tmp_path, inputs / "a.jsonl", "one", "--shard_tokens", str(2**63 - 1))) == 0
    assert len(list((tmp_path / "one").glob("train_*.bin"))) == 1
