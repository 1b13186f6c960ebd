"""Tokenizers trained on the user's corpus (SentencePiece BPE and unigram, byte-level BPE):
exact round trips, a separator that text cannot forge, metas that rebuild them, determinism,
clear errors, and the export that transformers' AutoTokenizer loads. Small generated corpora,
no network."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.hf_export import export_hf
from gptforge.gpt.model import GPT
from gptforge.gpt.pretrained import load_pretrained
from gptforge.gpt.tokenizer import CharTokenizer, describe_tokenizer, same_tokenizer, start_tokens, tokenizer_from_meta
from gptforge.gpt.tokenizer_base import EOT_TEXT
from gptforge.gpt.tokenizer_training import META_FILE, SPM_MIN_VOCAB, load_tokenizer_dir, train_tokenizer
from gptforge.gpt.trained_tokenizers import BPETokenizer, SentencePieceTokenizer

REPO = Path(__file__).resolve().parents[1]
pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
pytest.importorskip("tokenizers", reason="tokenizers is not installed")

# (kind, model_type): byte-level BPE, SentencePiece BPE, SentencePiece unigram
KINDS = {"bpe": ("bpe", "bpe"), "spm_bpe": ("sentencepiece", "bpe"), "spm_unigram": ("sentencepiece", "unigram")}
VOCAB_SIZE = 500
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "café", "naïve", "façade", "über", "straße",
         "東京", "日本語", "テスト", "中文", "😀", "🎉", "👩‍💻", "x = 1;", "(a, b)", "don't", "<p>"]
# characters no training document has: byte fallback must carry them; control characters, a BOM,
# a zero-width space, CRLF line ends, a line separator, astral-plane letters
UNSEEN = "Ωμέγα 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ☃ 한국어 ⅷ \x00\x07\x7f \u200b\ufeff\r\n\r\nend\u2028next\t\t\t  \n\n\n\n   "


def make_corpus(n_docs: int = 150, seed: int = 0) -> list[str]:
    """Documents of a few lines: words in several scripts, emoji, indentation by tabs or spaces,
    runs of spaces, trailing spaces, blank lines."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        lines = []
        for _ in range(rng.randint(1, 6)):
            indent = rng.choice(["", "", "\t", "    ", "\t\t"])
            sep = rng.choice([" ", " ", "  ", "\t"])
            words = sep.join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))
            lines.append(indent + words + rng.choice(["", "", "   ", "."]))
        docs.append("\n".join(lines) + rng.choice(["\n", "\n\n", ""]))
    return docs


CORPUS = make_corpus()


@pytest.fixture(scope="module", params=list(KINDS))
def trained(request, tmp_path_factory) -> tuple[str, SentencePieceTokenizer | BPETokenizer, Path]:
    kind, model_type = KINDS[request.param]
    out_dir = tmp_path_factory.mktemp(request.param) / "tokenizer"
    # a generator: the trainers read the corpus as a stream
    tok = train_tokenizer((doc for doc in CORPUS), kind, VOCAB_SIZE, out_dir, model_type)
    return request.param, tok, out_dir


def test_round_trip_with_unicode_whitespace_and_unseen_characters(trained):
    _, tok, _ = trained
    assert 257 <= tok.vocab_size <= VOCAB_SIZE
    for text in [*CORPUS, UNSEEN, "".join(CORPUS[:20]), "", " ", "\n", "\t", "a  \t \n  b"]:
        ids = tok.encode(text)
        assert isinstance(ids, list) and all(type(i) is int and 0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode_batch([*CORPUS[:10], UNSEEN, ""]) == [tok.encode(t) for t in [*CORPUS[:10], UNSEEN, ""]]
    assert tok.encode_batch([]) == []
    # the tokenizer learned something: the corpus takes fewer tokens than it has UTF-8 bytes
    text = "".join(CORPUS)
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_sentencepiece_space_symbol_is_its_one_loss(trained):
    # SentencePiece writes spaces as "▁" (U+2581) inside its pieces: a "▁" in the text comes back
    # as a space. Byte-level BPE keeps it.
    name, tok, _ = trained
    expected = "a b" if name.startswith("spm") else "a▁b"
    assert tok.decode(tok.encode("a▁b")) == expected


def test_end_of_text_is_reserved_and_cannot_be_written_in_text(trained):
    _, tok, _ = trained
    assert tok.decode([tok.eot_id]) == EOT_TEXT  # the id of the <|endoftext|> token
    assert start_tokens(tok) == [tok.eot_id]
    # a document that contains the separator's text gets plain-text tokens, never the separator
    text = f"before{EOT_TEXT}after {EOT_TEXT}\n"
    ids = tok.encode(text)
    assert tok.eot_id not in ids and tok.decode(ids) == text
    assert all(tok.eot_id not in ids for ids in tok.encode_batch(CORPUS + [UNSEEN, EOT_TEXT]))
    # documents joined by the separator decode with it written out
    a, b = CORPUS[0], CORPUS[1]
    assert tok.decode([*tok.encode(a), tok.eot_id, *tok.encode(b)]) == a + EOT_TEXT + b


def test_meta_rebuilds_the_same_tokenizer(trained):
    name, tok, _ = trained
    meta = tok.to_meta()
    expected_keys = {"name", "vocab_size", "eot_id", "sha256", "model"} | ({"model_type"} if name != "bpe" else set())
    assert set(meta) == expected_keys
    assert meta["name"] == KINDS[name][0] and meta["vocab_size"] == tok.vocab_size and meta["eot_id"] == tok.eot_id
    meta = json.loads(json.dumps(meta))  # as it is stored in meta.json and model.json
    rebuilt = tokenizer_from_meta(meta)
    assert type(rebuilt) is type(tok) and rebuilt.sha256 == tok.sha256 and rebuilt.eot_id == tok.eot_id
    assert rebuilt.encode_batch(CORPUS + [UNSEEN]) == tok.encode_batch(CORPUS + [UNSEEN])
    # pickled into a worker process: the same tokenizer, with the separator still protected
    unpickled = pickle.loads(pickle.dumps(tok))
    assert unpickled.encode_batch(CORPUS + [EOT_TEXT]) == tok.encode_batch(CORPUS + [EOT_TEXT])
    assert same_tokenizer(meta, tok.to_meta())
    assert not same_tokenizer(meta, {**meta, "sha256": "0" * 64})
    assert not same_tokenizer(meta, CharTokenizer("ab").to_meta())
    described = describe_tokenizer(meta)
    assert described.startswith(KINDS[name][0]) and f"{tok.vocab_size} tokens" in described
    assert tok.sha256[:12] in described
    for bad, message in [({**meta, "sha256": "0" * 64}, "does not match its sha256"),
                         ({k: v for k, v in meta.items() if k != "model"}, "no 'model'"),
                         ({**meta, "vocab_size": tok.vocab_size + 1}, "vocab_size"),
                         ({**meta, "eot_id": tok.eot_id + 1}, "eot_id")]:
        with pytest.raises(ValueError, match=message):
            tokenizer_from_meta(bad)


def test_tokenizer_directory(trained, tmp_path):
    name, tok, out_dir = trained
    native = "tokenizer.json" if name == "bpe" else "tokenizer.model"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([native, META_FILE])
    meta = json.loads((out_dir / META_FILE).read_text())
    assert "model" not in meta and meta["file"] == native and meta["sha256"] == tok.sha256
    loaded = load_tokenizer_dir(out_dir)
    assert loaded.sha256 == tok.sha256 and loaded.encode(UNSEEN) == tok.encode(UNSEEN)
    # the native file is the library's own: its library reads it as it is
    if name == "bpe":
        import tokenizers

        assert tokenizers.Tokenizer.from_file(str(out_dir / native)).get_vocab_size() == tok.vocab_size
    else:
        import sentencepiece

        assert sentencepiece.SentencePieceProcessor(model_file=str(out_dir / native)).encode(CORPUS[0]) == \
            tok.encode(CORPUS[0])


def test_training_is_deterministic(trained, tmp_path):
    name, tok, _ = trained
    kind, model_type = KINDS[name]
    again = train_tokenizer(list(CORPUS), kind, VOCAB_SIZE, tmp_path / "again", model_type)
    assert again.sha256 == tok.sha256
    if kind == "sentencepiece":  # a sample smaller than the corpus: drawn with a fixed seed
        first = train_tokenizer(CORPUS, kind, VOCAB_SIZE, tmp_path / "s1", model_type, sample_size=100)
        second = train_tokenizer(CORPUS, kind, VOCAB_SIZE, tmp_path / "s2", model_type, sample_size=100)
        assert first.sha256 == second.sha256 != tok.sha256
        assert first.decode(first.encode(UNSEEN)) == UNSEEN.replace("\u2581", " ")


TRAIN_SCRIPT = """
import json, sys
from gptforge.gpt.tokenizer_training import train_tokenizer
corpus = json.loads(open(sys.argv[1], encoding="utf-8").read())
for kind, model_type in json.loads(sys.argv[2]):
    print(train_tokenizer(corpus, kind, 500, sys.argv[3] + kind + model_type, model_type, sample_size=100).sha256)
"""


def test_training_gives_the_same_tokenizer_in_every_process(tmp_path):
    # processes differ in their random seeds (Python's hash, Rust's hash maps, SentencePiece's
    # generator); the trained model must not. SentencePiece's own sampler failed this.
    (tmp_path / "corpus.json").write_text(json.dumps(CORPUS), encoding="utf-8")
    outputs = []
    for seed in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "-c", TRAIN_SCRIPT, str(tmp_path / "corpus.json"), json.dumps(list(KINDS.values())),
             str(tmp_path / f"run{seed}_")],
            cwd=REPO, env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout.split())
    assert len(outputs[0]) == len(KINDS) and outputs[0] == outputs[1]
    here = [train_tokenizer(CORPUS, kind, 500, tmp_path / f"here_{kind}_{model_type}", model_type,
                            sample_size=100).sha256 for kind, model_type in KINDS.values()]
    assert here == outputs[0]


def test_vocab_size_is_an_upper_bound(tmp_path):
    # a tiny corpus runs out of things to learn before 5000 tokens
    for kind, model_type in KINDS.values():
        tok = train_tokenizer(["hello world, hello there\n"] * 3, kind, 5000, tmp_path / f"{kind}_{model_type}",
                              model_type)
        assert tok.vocab_size < 5000 and tok.decode(tok.encode(UNSEEN)) == UNSEEN.replace("\u2581", " ")


def value_error(func, *args, **kwargs) -> str:
    """The message of the ValueError that ``func(*args, **kwargs)`` raises, checked to be one line."""
    with pytest.raises(ValueError) as info:
        func(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_bad_training_inputs_are_clear_errors(tmp_path):
    out = tmp_path / "tok"
    message = value_error(train_tokenizer, CORPUS, "wordpiece", 500, out)
    assert "unknown tokenizer kind 'wordpiece'" in message and "'sentencepiece', 'bpe'" in message
    assert "'bpe' or 'unigram'" in value_error(train_tokenizer, CORPUS, "sentencepiece", 500, out, "char")
    assert "sentencepiece' only" in value_error(train_tokenizer, CORPUS, "bpe", 500, out, "unigram")
    for vocab_size in (256, 2**32, 500.0, True):
        assert "an integer in [257, 4294967295], got" in value_error(train_tokenizer, CORPUS, "bpe", vocab_size, out)
    assert f"[{SPM_MIN_VOCAB}, " in value_error(train_tokenizer, CORPUS, "sentencepiece", 100, out)
    # above the static minimum but below what this corpus's characters need
    message = value_error(train_tokenizer, CORPUS, "sentencepiece", SPM_MIN_VOCAB, out, "unigram")
    assert "too small for this corpus" in message and "needs at least" in message
    for kind in ("bpe", "sentencepiece"):
        assert "corpus is empty" in value_error(train_tokenizer, [], kind, 500, out)
        assert "corpus is empty" in value_error(train_tokenizer, iter(["", ""]), kind, 500, out)
        assert "wrap it in a list" in value_error(train_tokenizer, "just one string", kind, 500, out)
        assert "got a bytes" in value_error(train_tokenizer, ["ok", b"bytes"], kind, 500, out)
    assert "sample_size" in value_error(train_tokenizer, CORPUS, "sentencepiece", 500, out, sample_size=0)
    assert not out.exists()  # nothing written by a refused call


def test_an_error_of_the_corpus_reader_comes_through_as_it_is(tmp_path):
    def failing_reader():
        yield from CORPUS[:5]
        raise OSError("disk read failed")

    for kind in ("bpe", "sentencepiece"):
        with pytest.raises(OSError, match="disk read failed"):
            train_tokenizer(failing_reader(), kind, 500, tmp_path / kind)


def test_load_tokenizer_dir_refuses_what_is_not_one(trained, tmp_path):
    name, tok, out_dir = trained
    message = value_error(load_tokenizer_dir, tmp_path / "missing")
    assert "not a tokenizer directory" in message and "does not exist" in message
    (tmp_path / "file").write_text("x")
    assert "not a folder" in value_error(load_tokenizer_dir, tmp_path / "file")
    (tmp_path / "empty").mkdir()
    message = value_error(load_tokenizer_dir, tmp_path / "empty")
    assert f"it has no {META_FILE}" in message and "tokenizer.model or tokenizer.json" in message
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / META_FILE).write_text("{not json")
    assert "not valid JSON" in value_error(load_tokenizer_dir, broken)
    (broken / META_FILE).write_text(json.dumps({"name": "char"}))
    assert "'sentencepiece' or 'bpe'" in value_error(load_tokenizer_dir, broken)
    native = "tokenizer.json" if name == "bpe" else "tokenizer.model"
    (broken / META_FILE).write_text((out_dir / META_FILE).read_text())
    assert f"{native} is missing" in value_error(load_tokenizer_dir, broken)
    (broken / native).write_bytes((out_dir / native).read_bytes()[:-1])
    assert "does not match the sha256" in value_error(load_tokenizer_dir, broken)


def test_char_tokenizer_has_no_separator():
    tok = CharTokenizer.from_text("ab\n")
    assert tok.eot_id is None and start_tokens(tok) == [tok.stoi["\n"]]
    assert tok.encode_batch(["ab", "", "b\n"]) == [[1, 2], [], [2, 0]]


# ----------------------------------------------------------------------------------------------
# Export to Hugging Face: AutoTokenizer loads the tokenizer and encodes to the same ids
# ----------------------------------------------------------------------------------------------


def _export(tok, directory: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=32))
    return export_hf(model, directory, tok.to_meta(), **kwargs)


def _score(tok: SentencePieceTokenizer, ids: list[int]) -> float:
    return sum(tok._sp.get_score(i) for i in ids)


def test_export_to_hugging_face_autotokenizer(trained, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name, tok, _ = trained
    directory = _export(tok, tmp_path / "hf")
    assert (directory / "tokenizer.json").is_file() and (directory / "tokenizer_config.json").is_file()
    config = json.loads((directory / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == tok.eot_id
    assert load_pretrained(directory)[1] == tok.to_meta()  # our meta travels in config.json too
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    assert hf.eos_token == hf.bos_token == EOT_TEXT and hf.eos_token_id == tok.eot_id
    assert len(hf) == tok.vocab_size
    texts = [*CORPUS, UNSEEN.replace("\u2581", " ")]
    ties = 0
    for text in texts:
        ours, theirs = tok.encode(text), hf.encode(text)
        assert hf.decode(theirs) == text
        if ours != theirs:
            # only a unigram model may differ, and only between segmentations of equal score
            # (SentencePiece sums scores in float32, tokenizers in float64: ties round apart)
            assert name == "spm_unigram", (text, ours, theirs)
            assert _score(tok, ours) == pytest.approx(_score(tok, theirs), rel=1e-6, abs=1e-4)
            ties += 1
    assert ties <= len(texts) // 10
    assert hf(CORPUS[:3])["input_ids"] == tok.encode_batch(CORPUS[:3])  # no bos/eos added
    # transformers' usual way: "<|endoftext|>" written in the text is its special token there
    assert tok.eot_id in hf.encode(f"a{EOT_TEXT}b") and tok.eot_id not in tok.encode(f"a{EOT_TEXT}b")


def test_export_without_transformers_writes_the_weights_and_says_so(tmp_path, monkeypatch):
    tok = train_tokenizer(CORPUS[:40], "bpe", 300, tmp_path / "tok")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    notes: list[str] = []
    directory = _export(tok, tmp_path / "hf", warn=notes.append)
    assert (directory / "model.safetensors").is_file() and not (directory / "tokenizer.json").exists()
    assert len(notes) == 1 and "tokenizer was not exported" in notes[0] and "pip install transformers" in notes[0]
    assert "\n" not in notes[0]
    assert load_pretrained(directory)[1] == tok.to_meta()
