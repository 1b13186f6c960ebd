"""Tokenizers: text <-> token ids, behind one small interface.

Two kinds, as in nanoGPT:

- ``CharTokenizer``: one token per character of the training corpus (65 for Tiny Shakespeare).
- ``GPT2Tokenizer``: OpenAI's GPT-2 byte-level BPE through tiktoken (50,257 tokens).

Both have ``name``, ``vocab_size``, ``encode``, ``decode`` and ``to_meta``; ``tokenizer_from_meta``
rebuilds either from the dict that ``to_meta`` returned (it is stored in the dataset's
meta.json and in checkpoints, so a sample decodes with the tokenizer the model was trained on).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, Protocol

GPT2_VOCAB_SIZE = 50257
GPT2_EOT_TOKEN = 50256  # "<|endoftext|>"

_SHOW_AT_MOST = 10  # how many offending characters an error message lists


class Tokenizer(Protocol):
    """What the rest of the code may rely on, whichever tokenizer it holds."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_meta(self) -> dict[str, Any]: ...


class TokenizerUnavailableError(RuntimeError):
    """The GPT-2 BPE cannot be loaded here (tiktoken missing, or its files not downloadable)."""


def _as_id_list(ids: Any, vocab_size: int) -> list[int]:
    """Turn a list, tuple, 1-D numpy array or 1-D torch tensor of ids into a checked list of ints."""
    ndim = getattr(ids, "ndim", 1)
    if ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of token ids, got an array with {ndim} dimensions")
    # .tolist() turns numpy/torch integers into Python ints without importing either library here
    raw = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    try:
        # operator.index accepts ints and integer scalars (numpy, torch) but not floats or strings
        id_list = [operator.index(i) for i in raw]
    except TypeError:
        bad_item = next(i for i in raw if not hasattr(i, "__index__"))
        raise ValueError(f"token ids must be integers, got {bad_item!r} ({type(bad_item).__name__})") from None
    bad = [i for i in id_list if not 0 <= i < vocab_size]
    if bad:
        shown = ", ".join(str(i) for i in bad[:_SHOW_AT_MOST])
        raise ValueError(
            f"token ids out of range [0, {vocab_size}): {shown}" + (" ..." if len(bad) > _SHOW_AT_MOST else "")
        )
    return id_list


class CharTokenizer:
    """Character-level tokenizer: token id = position of the character in ``chars``."""

    name = "char"

    def __init__(self, chars: str):
        if not chars:
            raise ValueError("a character tokenizer needs at least one character")
        if len(set(chars)) != len(chars):
            raise ValueError("the characters of a character tokenizer must be unique")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The vocabulary of ``text``: its distinct characters, sorted (nanoGPT's order)."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            pass
        # slow path, only to build the error: the unknown characters in order of first appearance
        unknown = [c for c in dict.fromkeys(text) if c not in self.stoi]
        shown = ", ".join(repr(c) for c in unknown[:_SHOW_AT_MOST])
        more = f" and {len(unknown) - _SHOW_AT_MOST} more" if len(unknown) > _SHOW_AT_MOST else ""
        raise ValueError(
            f"text has {len(unknown)} character(s) that this character-level tokenizer does not know: "
            f"{shown}{more}. Its {self.vocab_size}-character vocabulary was built from the training corpus; "
            "use only characters that occur there, or prepare the data from a corpus that contains them."
        )

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in _as_id_list(ids, self.vocab_size))

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "chars": self.chars}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (tiktoken's "gpt2" encoding); any text encodes, nothing is unknown."""

    name = "gpt2"

    def __init__(self):
        self._enc = _load_gpt2_encoding()
        self.eot_token: int = self._enc.eot_token

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" in the text is plain text, never the special token
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(_as_id_list(ids, self.vocab_size))

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "encoding": "gpt2"}

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


def _load_gpt2_encoding() -> Any:
    """tiktoken's gpt2 encoding, or one clear error that says how to make it available."""
    try:
        import tiktoken
    except ImportError:
        raise TokenizerUnavailableError(
            "the GPT-2 tokenizer needs the tiktoken package: pip install tiktoken"
        ) from None
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as err:  # noqa: BLE001 -- network errors come from requests, hash errors as ValueError
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        raise TokenizerUnavailableError(
            "could not load the GPT-2 BPE files through tiktoken "
            f"({reason}). tiktoken downloads them once and caches them: either run once with network "
            "access, or set TIKTOKEN_CACHE_DIR to a folder that already holds the cached gpt2 files."
        ) from None
    if enc.n_vocab != GPT2_VOCAB_SIZE or enc.eot_token != GPT2_EOT_TOKEN:
        raise TokenizerUnavailableError(
            f"tiktoken's gpt2 encoding has {enc.n_vocab} tokens and <|endoftext|> = {enc.eot_token}; "
            f"expected {GPT2_VOCAB_SIZE} and {GPT2_EOT_TOKEN}"
        )
    return enc


def tokenizer_from_meta(meta: dict[str, Any]) -> CharTokenizer | GPT2Tokenizer:
    """Rebuild the tokenizer described by ``to_meta()``'s dict; check its vocabulary size."""
    if not isinstance(meta, dict) or "name" not in meta:
        raise ValueError(f"tokenizer meta must be a dict with a 'name' key, got {meta!r:.200}")
    name = meta["name"]
    tokenizer: CharTokenizer | GPT2Tokenizer
    if name == "char":
        chars = meta.get("chars")
        if not isinstance(chars, str):
            raise ValueError("char tokenizer meta has no 'chars' string")
        tokenizer = CharTokenizer(chars)
    elif name == "gpt2":
        tokenizer = GPT2Tokenizer()
    else:
        raise ValueError(f"unknown tokenizer {name!r} in meta (known: 'char', 'gpt2')")
    expected = meta.get("vocab_size", tokenizer.vocab_size)
    if expected != tokenizer.vocab_size:
        raise ValueError(
            f"tokenizer meta says vocab_size {expected}, but the rebuilt tokenizer has {tokenizer.vocab_size}"
        )
    return tokenizer


def start_tokens(tokenizer: CharTokenizer | GPT2Tokenizer) -> list[int]:
    """A neutral first token to sample from when there is no prompt: GPT-2's end-of-text token,
    a newline where a character vocabulary has one (the start of a line), else the
    vocabulary's first character (a corpus without a newline has no newline to start from)."""
    if isinstance(tokenizer, GPT2Tokenizer):
        return [tokenizer.eot_token]
    return [tokenizer.stoi["\n"] if "\n" in tokenizer.stoi else 0]


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenizer metas (``to_meta()``) encode text alike."""
    if a.get("name") != b.get("name"):
        return False
    if a.get("name") == "char":
        return a.get("chars") == b.get("chars")
    return a.get("encoding", a.get("name")) == b.get("encoding", b.get("name"))


def describe_tokenizer(meta: dict[str, Any]) -> str:
    return f"{meta.get('name')} ({meta.get('vocab_size')} tokens)"
