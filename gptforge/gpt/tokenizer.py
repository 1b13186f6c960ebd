"""Tokenizers: text <-> token ids, behind one small interface (gptforge/gpt/tokenizer_base.py).

Two kinds as in nanoGPT, here, and two trained on the user's corpus
(gptforge/gpt/trained_tokenizers.py, trained by gptforge/gpt/tokenizer_training.py):

- ``CharTokenizer``: one token per character of the training corpus (65 for Tiny Shakespeare).
- ``GPT2Tokenizer``: OpenAI's GPT-2 byte-level BPE through tiktoken (50,257 tokens).
- ``SentencePieceTokenizer``: a SentencePiece model (BPE or unigram) with byte fallback.
- ``BPETokenizer``: a byte-level BPE of the Hugging Face ``tokenizers`` package.

All have ``name``, ``vocab_size``, ``eot_id`` (the end-of-text token that separates documents;
None for characters), ``encode``, ``encode_batch``, ``decode`` and ``to_meta``;
``tokenizer_from_meta`` rebuilds any of them from the dict that ``to_meta`` returned (it is
stored in the dataset's meta.json and in checkpoints, so a sample decodes with the tokenizer the
model was trained on). A trained tokenizer's meta embeds its whole model (a few MB at most), so
no side file has to travel with a checkpoint.

sentencepiece and tokenizers are imported only when such a tokenizer is built: the char and
GPT-2 paths work without them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from gptforge.gpt.chat import SPECIAL_TOKENS, ChatTokenizer
from gptforge.gpt.tokenizer_base import SHOW_AT_MOST, TokenizerUnavailableError, as_id_list
from gptforge.gpt.trained_tokenizers import TRAINED_TOKENIZERS, BPETokenizer, SentencePieceTokenizer, trained_from_meta

GPT2_VOCAB_SIZE = 50257
GPT2_EOT_TOKEN = 50256  # "<|endoftext|>"
# the GPT-2 BPE, as GPT2Tokenizer().to_meta() describes it (written out: loading weights needs no tiktoken)
GPT2_TOKENIZER_META = {"name": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "encoding": "gpt2"}


class CharTokenizer:
    """Character-level tokenizer: token id = position of the character in ``chars``."""

    name = "char"
    eot_id: int | None = None  # no separator token: documents are simply concatenated

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
        shown = ", ".join(repr(c) for c in unknown[:SHOW_AT_MOST])
        more = f" and {len(unknown) - SHOW_AT_MOST} more" if len(unknown) > SHOW_AT_MOST else ""
        raise ValueError(
            f"text has {len(unknown)} character(s) that this character-level tokenizer does not know: "
            f"{shown}{more}. Its {self.vocab_size}-character vocabulary was built from the training corpus; "
            "use only characters that occur there, or prepare the data from a corpus that contains them."
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.chars[i] for i in as_id_list(ids, self.vocab_size))

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

    @property
    def eot_id(self) -> int:
        return self.eot_token

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" in the text is plain text, never the special token
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)  # tiktoken's thread pool

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(as_id_list(ids, self.vocab_size))

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "encoding": "gpt2"}

    def __reduce__(self):
        return (GPT2Tokenizer, ())  # rebuilt in the worker process: tiktoken caches the encoding

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


AnyTokenizer = CharTokenizer | GPT2Tokenizer | SentencePieceTokenizer | BPETokenizer | ChatTokenizer


def tokenizer_from_meta(meta: dict[str, Any]) -> AnyTokenizer:
    """Rebuild the tokenizer described by ``to_meta()``'s dict; check its vocabulary size (and,
    for trained tokenizers, the model's sha256 and end-of-text id)."""
    if not isinstance(meta, dict) or "name" not in meta:
        raise ValueError(f"tokenizer meta must be a dict with a 'name' key, got {meta!r:.200}")
    name = meta["name"]
    tokenizer: AnyTokenizer
    if name == "char":
        chars = meta.get("chars")
        if not isinstance(chars, str):
            raise ValueError("char tokenizer meta has no 'chars' string")
        tokenizer = CharTokenizer(chars)
    elif name == "gpt2":
        tokenizer = GPT2Tokenizer()
    elif name in TRAINED_TOKENIZERS:
        tokenizer = trained_from_meta(meta)
    elif name == "chat":  # a fine-tuned model's: its base tokenizer plus the chat template's tokens
        if meta.get("special_tokens") != list(SPECIAL_TOKENS) or not isinstance(meta.get("base"), dict):
            raise ValueError(f"chat tokenizer meta must hold its 'base' tokenizer and the special tokens "
                             f"{list(SPECIAL_TOKENS)}, got {meta!r:.200}")
        tokenizer = ChatTokenizer(tokenizer_from_meta(meta["base"]))
    else:
        raise ValueError(f"unknown tokenizer {name!r} in meta (known: 'char', 'gpt2', 'sentencepiece', 'bpe', "
                         "'chat')")
    expected = meta.get("vocab_size", tokenizer.vocab_size)
    if expected != tokenizer.vocab_size:
        raise ValueError(
            f"tokenizer meta says vocab_size {expected}, but the rebuilt tokenizer has {tokenizer.vocab_size}"
        )
    return tokenizer


def start_tokens(tokenizer: AnyTokenizer) -> list[int]:
    """A neutral first token to sample from when there is no prompt: the end-of-text token where
    the tokenizer has one (GPT-2, trained ones), a newline where a character vocabulary has one
    (the start of a line), else the vocabulary's first character (a corpus without a newline has
    no newline to start from)."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    if isinstance(tokenizer, ChatTokenizer):  # a chat model starts where a user message does
        return [tokenizer.role_id("user")]
    assert isinstance(tokenizer, CharTokenizer)
    return [tokenizer.stoi["\n"] if "\n" in tokenizer.stoi else 0]


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenizer metas (``to_meta()``) encode text alike."""
    if a.get("name") != b.get("name"):
        return False
    if a.get("name") == "chat":
        return a.get("special_tokens") == b.get("special_tokens") and same_tokenizer(a["base"], b["base"])
    if a.get("name") == "char":
        return a.get("chars") == b.get("chars")
    if a.get("name") in TRAINED_TOKENIZERS:  # the same model bytes
        return a.get("sha256") is not None and a.get("sha256") == b.get("sha256")
    return a.get("encoding", a.get("name")) == b.get("encoding", b.get("name"))


def describe_tokenizer(meta: dict[str, Any]) -> str:
    """A short name for messages: "char (65 tokens)", "bpe (8000 tokens, sha256 1a2b3c4d5e6f)"."""
    name = meta.get("name")
    if name == "chat" and isinstance(meta.get("base"), dict):
        return f"{describe_tokenizer(meta['base'])} + chat tokens"
    if name == "sentencepiece":
        name = f"sentencepiece {meta.get('model_type', 'bpe')}"
    sha = f", sha256 {meta['sha256'][:12]}" if isinstance(meta.get("sha256"), str) else ""
    return f"{name} ({meta.get('vocab_size')} tokens{sha})"
