"""Training on data that is not what it claims (issue 28), through ``python -m gptforge.train``'s
``main``: each row exits 2 with one line naming the file and the problem, and changes nothing
under the data folder. Damage a start cannot see (ids overwritten in place) is stopped at the
first batch that reads it, before the embedding.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gptforge.data import prepare
from gptforge.data.shards import HEADER_BYTES, ShardWriter, write_manifest
from gptforge.train.__main__ import main as train_main
from gptforge.train.loop import train
from tests.helpers import config, flags

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the quick brown fox jumps over the lazy dog. " * 40  # 28 distinct characters


@pytest.fixture(scope="module")
def bad_data(data_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_data")
    meta = json.loads((data_dir / "shakespeare_char" / "meta.json").read_text())
    # a corpus of the character tokenizer, its shards sound when written
    chars = meta["tokenizer"]
    for name in ("wide", "overwritten"):
        folder = data_dir / name
        folder.mkdir()
        rng = np.random.default_rng(0)
        writers = {s: ShardWriter(folder, s, 2000, np.dtype(np.uint16)) for s in ("train", "val")}
        for split, n in (("train", 5000), ("val", 500)):
            writers[split].append(rng.integers(0, 65, n).astype(np.uint16))
            writers[split].finish()
        write_manifest(folder, writers, chars, 65, 64, dict(inputs=[]))
    manifest = json.loads((data_dir / "wide" / "manifest.json").read_text())
    (data_dir / "wide" / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 100_000}))
    for shard in sorted((data_dir / "overwritten").glob("train_*.bin")):  # in place: size and header kept
        with open(shard, "r+b") as f:
            f.seek(HEADER_BYTES)
            f.write(np.full((shard.stat().st_size - HEADER_BYTES) // 2, 70, np.uint16).tobytes())
    # a run, then its dataset prepared again from another text of the same vocabulary size
    (root / "lower.txt").write_text(TEXT)
    (root / "upper.txt").write_text(TEXT.upper())
    prepare("retok", data_dir, input_path=root / "lower.txt")
    train(config(data_dir, root / "retok_run", dataset="retok", max_iters=2, eval_interval=2), log=lambda *_: None)
    shutil.rmtree(data_dir / "retok")
    prepare("retok", data_dir, input_path=root / "upper.txt")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": f"{i}: {TEXT[:90]}"}) + "\n" for i in range(400)))
    return dict(root=root, data=data_dir)


ROWS = [  # (name, flags, what stderr must say); {root} and {data} are filled in
    ("manifest vocab past its tokenizer's", ["--dataset=wide"],
     "{data}/wide/manifest.json: the field vocab_size is 100000, but its tokenizer, char (65 tokens), has 65 tokens"),
    ("ids overwritten in place", ["--dataset=overwritten"],
     "holds token id 70, but the vocabulary has 65 tokens: it changed after the dataset was prepared"),
    ("resume on another tokenizer's tokens", ["--out_dir={root}/retok_run", "--resume"],
     "was trained on the tokens of the char (28 tokens) tokenizer, but dataset 'retok' now holds those of the char "
     "(28 tokens) one (prepared again?)"),
    ("a corpus input with the char tokenizer", ["--input={root}/docs.jsonl", "--tokenizer=char"],
     "--input {root}/docs.jsonl is a corpus of documents, which needs a tokenizer with an end-of-text token"),
]


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*")
            if p.is_file() and "out" not in p.relative_to(root).parts[:1]}


@pytest.mark.parametrize("name", [row[0] for row in ROWS])
def test_data_that_is_not_what_it_claims_is_one_line(bad_data, name, capsys):
    _, args, message = next(row for row in ROWS if row[0] == name)
    fill = {k: str(v) for k, v in bad_data.items()}
    args, message = [a.format(**fill) for a in args], message.format(**fill)
    defaults = flags(bad_data["data"], bad_data["root"] / "out" / name.replace(" ", "_"), max_iters=2)
    keys = {a.split("=")[0] for a in args}
    before = snapshot(bad_data["data"], bad_data["root"])
    capsys.readouterr()
    code = train_main([*[f for f in defaults if f.split("=")[0] not in keys], *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err[-2000:]
    assert message in err, err
    assert snapshot(bad_data["data"], bad_data["root"]) == before


def test_training_input_of_json_lines_trains_on_its_documents(bad_data, tmp_path):
    """--input=docs.jsonl is the corpus prepare makes of it (GPT-2 tokens of the text field), never
    a character dataset of the raw JSON."""
    from gptforge.data import load_meta

    train(config(tmp_path, tmp_path / "run", input=str(bad_data["root"] / "docs.jsonl"), tokenizer="gpt2",
                 max_iters=1, eval_interval=1, n_embd=16), log=lambda *_: None)
    meta = load_meta(tmp_path / "docs")
    assert meta.get("sharded") and meta["tokenizer"]["name"] == "gpt2"
