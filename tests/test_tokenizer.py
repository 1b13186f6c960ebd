"""Tokenizers: round trips, errors that name the problem, and rebuilding from meta."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gptforge.gpt.tokenizer import CharTokenizer, GPT2Tokenizer, TokenizerUnavailableError, tokenizer_from_meta

# tiktoken's cache names files by the sha1 of their URL; these two are the gpt2 encoding's BPE files
GPT2_CACHE_FILES = ("6d1cbeee0f20b3d9449abfede4726ed8212e3aee", "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6")


@pytest.fixture
def gpt2() -> GPT2Tokenizer:
    # only with the files already cached: without them tiktoken would go to the network
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    if not cache or not all((Path(cache) / name).is_file() for name in GPT2_CACHE_FILES):
        pytest.skip("no tiktoken cache with the gpt2 files (set TIKTOKEN_CACHE_DIR); tests never use the network")
    return GPT2Tokenizer()


# ----------------------------------------------------------------------------- char


def test_char_round_trip_on_tiny_shakespeare(shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.name == "char"
    assert tok.vocab_size == 65
    assert tok.chars == "".join(sorted(set(text)))
    ids = tok.encode(text)
    assert len(ids) == len(text) == 1_115_394
    assert min(ids) == 0
    assert max(ids) == 64
    assert tok.decode(ids) == text


def test_char_ids_are_positions_in_sorted_vocabulary():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.encode("") == []
    assert tok.decode([]) == ""


@pytest.mark.parametrize(
    "ids",
    [
        [3, 2, 4, 4, 5],
        (3, 2, 4, 4, 5),
        np.array([3, 2, 4, 4, 5], dtype=np.uint16),
        torch.tensor([3, 2, 4, 4, 5]),
        [np.int64(3), np.int64(2), 4, 4, 5],
        iter([3, 2, 4, 4, 5]),
    ],
    ids=["list", "tuple", "numpy", "tensor", "numpy-scalars", "iterator"],
)
def test_decode_accepts_any_1d_sequence_of_ints(ids):
    assert CharTokenizer.from_text("hello world").decode(ids) == "hello"


def test_unknown_characters_are_rejected_by_name():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(ValueError, match="training corpus") as err:
        tok.encode("a cab\tdé")
    message = str(err.value)
    for char in ("'\\t'", "'d'", "'é'"):  # repr'd, so invisible characters are visible
        assert char in message
    assert "'a'" not in message


def test_unknown_characters_list_is_capped():
    tok = CharTokenizer("a")
    with pytest.raises(ValueError, match="and 16 more"):
        tok.encode("a" + "".join(chr(0x4E00 + i) for i in range(26)))


@pytest.mark.parametrize("bad", [[65], [-1], [0, 1, 1000]])
def test_char_decode_rejects_out_of_range_ids(shakespeare_path, bad):
    tok = CharTokenizer.from_text(shakespeare_path.read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match=r"out of range \[0, 65\)"):
        tok.decode(bad)


def test_decode_rejects_non_integers_and_2d_arrays():
    tok = CharTokenizer("ab")
    with pytest.raises(ValueError, match="integers"):
        tok.decode([0, 1.0])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 2, dtype=torch.long))


def test_char_tokenizer_rejects_duplicate_or_empty_vocabulary():
    with pytest.raises(ValueError, match="unique"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="at least one"):
        CharTokenizer("")


def test_char_meta_round_trip_is_json():
    tok = CharTokenizer.from_text("To be, or not to be: that is the question.\n")
    meta = json.loads(json.dumps(tok.to_meta()))
    assert meta["name"] == "char"
    assert meta["vocab_size"] == tok.vocab_size
    rebuilt = tokenizer_from_meta(meta)
    assert isinstance(rebuilt, CharTokenizer)
    assert rebuilt.chars == tok.chars
    assert rebuilt.encode("not to be") == tok.encode("not to be")


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"name": "wordpiece"}, "unknown tokenizer"),
        ({"name": "sentencepiece"}, "no 'model'"),  # a trained tokenizer's meta carries its model
        ({"name": "bpe", "model": "{}"}, "not a Hugging Face tokenizer JSON"),
        ({"name": "sentencepiece", "model": "aGVsbG8="}, "not a SentencePiece model"),  # base64 of "hello"
        ({"chars": "abc"}, "'name'"),
        ({"name": "char"}, "chars"),
        ({"name": "char", "chars": "abc", "vocab_size": 4}, "vocab_size 4"),
    ],
)
def test_bad_meta_is_rejected(meta, match):
    with pytest.raises(ValueError, match=match):
        tokenizer_from_meta(meta)


# ----------------------------------------------------------------------------- gpt2


def test_gpt2_known_ids(gpt2):
    assert gpt2.name == "gpt2"
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_token == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.decode([15496, 995]) == "Hello world"
    # the special token's text is ordinary text, never id 50256
    assert 50256 not in gpt2.encode("<|endoftext|>")
    assert gpt2.decode([50256]) == "<|endoftext|>"


def test_gpt2_end_of_text_batches_and_pickling(gpt2):
    assert gpt2.eot_id == 50256
    texts = ["Hello world", "", "<|endoftext|> is text here", "naïve café"]
    assert gpt2.encode_batch(texts) == [gpt2.encode(t) for t in texts]
    assert pickle.loads(pickle.dumps(gpt2)).encode("Hello world") == [15496, 995]  # for worker processes


def test_gpt2_round_trip_on_tiny_shakespeare(gpt2, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert len(ids) == 338_025
    assert gpt2.decode(torch.tensor(ids)) == text


def test_gpt2_round_trip_unicode(gpt2):
    text = "naïve café — 日本語 🙂\ttabs\r\n"
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_decode_rejects_out_of_range_ids(gpt2):
    with pytest.raises(ValueError, match=r"out of range \[0, 50257\)"):
        gpt2.decode([15496, 50257])


def test_gpt2_meta_round_trip(gpt2):
    meta = json.loads(json.dumps(gpt2.to_meta()))
    assert meta == {"name": "gpt2", "vocab_size": 50257, "encoding": "gpt2"}
    rebuilt = tokenizer_from_meta(meta)
    assert isinstance(rebuilt, GPT2Tokenizer)
    assert rebuilt.encode("Hello world") == [15496, 995]


def test_missing_tiktoken_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` raise ImportError
    with pytest.raises(TokenizerUnavailableError, match="pip install tiktoken"):
        GPT2Tokenizer()


def test_unavailable_bpe_files_say_how_to_fix(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):  # what tiktoken does with no cache and no network, without touching the network
        raise ConnectionError(f"Failed to resolve 'openaipublic.blob.core.windows.net' for {name}")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(TokenizerUnavailableError, match="TIKTOKEN_CACHE_DIR") as err:
        GPT2Tokenizer()
    assert "network" in str(err.value)
    assert "ConnectionError" in str(err.value)
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__
