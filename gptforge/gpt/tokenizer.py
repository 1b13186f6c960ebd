"""Tokenizers: text <-> token ids, behind one small interface.

Two kinds as in nanoGPT, and two trained on the user's corpus (gptforge/gpt/tokenizer_training.py):

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

import base64
import binascii
import hashlib
import importlib
import operator
from collections.abc import Iterable
from typing import Any, Protocol

GPT2_VOCAB_SIZE = 50257
GPT2_EOT_TOKEN = 50256  # "<|endoftext|>"
EOT_TEXT = "<|endoftext|>"  # the separator token of trained tokenizers, named as GPT-2 names its own
# Runs of newlines that a SentencePiece model keeps as tokens of their own (user-defined symbols):
# SentencePiece treats only the space as whitespace, so without them its pieces would run across
# line ends ("word\n\tnext").
SPM_NEWLINE_SYMBOLS = ("\n", "\n\n")

_SHOW_AT_MOST = 10  # how many offending characters an error message lists


class Tokenizer(Protocol):
    """What the rest of the code may rely on, whichever tokenizer it holds."""

    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_meta(self) -> dict[str, Any]: ...


class TokenizerUnavailableError(RuntimeError):
    """A tokenizer's library is missing here (tiktoken, sentencepiece, tokenizers), or the GPT-2
    BPE files cannot be downloaded."""


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
        shown = ", ".join(repr(c) for c in unknown[:_SHOW_AT_MOST])
        more = f" and {len(unknown) - _SHOW_AT_MOST} more" if len(unknown) > _SHOW_AT_MOST else ""
        raise ValueError(
            f"text has {len(unknown)} character(s) that this character-level tokenizer does not know: "
            f"{shown}{more}. Its {self.vocab_size}-character vocabulary was built from the training corpus; "
            "use only characters that occur there, or prepare the data from a corpus that contains them."
        )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

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

    @property
    def eot_id(self) -> int:
        return self.eot_token

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" in the text is plain text, never the special token
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts)  # tiktoken's thread pool

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(_as_id_list(ids, self.vocab_size))

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


def _import_library(module: str, tokenizer: str) -> Any:
    """Import a tokenizer library on first use, or one clear error that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TokenizerUnavailableError(
            f"the {tokenizer} tokenizer needs the {module} package: pip install {module}"
        ) from None


def _split_at(ids: list[int], separator: int) -> list[list[int]]:
    """``ids`` cut at every ``separator``, which is dropped: [1, 9, 2] cut at 9 is [[1], [2]]."""
    parts, start = [], 0
    for i, token in enumerate(ids):
        if token == separator:
            parts.append(ids[start:i])
            start = i + 1
    parts.append(ids[start:])
    return parts


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram) as ``gptforge.gpt.tokenizer_training`` trains it: byte
    fallback (a character the model lacks becomes its UTF-8 bytes, so any text encodes), text
    taken as it is (no normalization, no dummy prefix, runs of spaces kept), newlines as tokens
    of their own, ``<|endoftext|>`` a control symbol (``eot_id``).

    One loss SentencePiece cannot avoid: it writes spaces as "▁" (U+2581) inside its pieces, so
    a "▁" in the text comes back from decode as a space.
    """

    name = "sentencepiece"

    def __init__(self, model_proto: bytes, model_type: str = "bpe"):
        spm = _import_library("sentencepiece", self.name)
        self.model_proto = bytes(model_proto)
        self.model_type = model_type  # "bpe" or "unigram"; the processor does not say (it is in the proto)
        self.sha256 = hashlib.sha256(self.model_proto).hexdigest()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except RuntimeError:  # its message names only the C++ check that failed
            raise ValueError("not a SentencePiece model: the bytes do not parse as one") from None
        eot = self._sp.piece_to_id(EOT_TEXT)  # the unknown piece's id when there is no such piece
        if self._sp.id_to_piece(eot) != EOT_TEXT or not self._sp.is_control(eot):
            raise ValueError(
                f"this SentencePiece model has no {EOT_TEXT} control symbol to separate documents; "
                "train one with gpt.tokenizer_training.train_tokenizer"
            )
        self.eot_id: int = eot

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        # a control symbol never comes out of text: "<|endoftext|>" in a document stays plain text
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)  # spread over threads in C++

    def decode(self, ids: Iterable[int]) -> str:
        id_list = _as_id_list(ids, self.vocab_size)
        # SentencePiece decodes a control symbol to nothing; written out, as GPT-2 writes its own,
        # a sample shows where one document ended and the next began
        return EOT_TEXT.join(self._sp.decode(part) for part in _split_at(id_list, self.eot_id))

    def to_meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "model_type": self.model_type,
            "sha256": self.sha256,  # of the model bytes: same sha256, same tokenizer
            "model": base64.b64encode(self.model_proto).decode("ascii"),
        }

    def to_hf_tokenizer(self) -> Any:
        """The same tokenizer as a Hugging Face ``tokenizers.Tokenizer`` (to export it for
        transformers): the same pieces and ids, so text encodes to the same ids, except that
        ``<|endoftext|>`` written in the text becomes the special token there, as usual in transformers."""
        tk = _import_library("tokenizers", "Hugging Face")
        sp = self._sp
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        ids = {p: i for i, p in enumerate(pieces)}
        learned = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or p in SPM_NEWLINE_SYMBOLS)
                   for i, p in enumerate(pieces)]
        if self.model_type == "unigram":
            # SentencePiece never matches its special pieces against text ("<0x41>" in the text is
            # not the byte 0x41); a score far below every learned piece keeps transformers from it
            floor = min(sp.get_score(i) for i in range(len(pieces)) if learned[i]) - 1e6
            vocab = [(p, sp.get_score(i) if learned[i] else floor) for i, p in enumerate(pieces)]
            model = tk.models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True)
        else:
            # SentencePiece's BPE merges, step by step, the adjacent pair whose union is the
            # best-scored piece. As a merge list: every split of a learned piece into two learned
            # pieces, ranked by the piece's score
            normal = {p for i, p in enumerate(pieces) if learned[i]}
            merges = []
            for piece in sorted(normal, key=lambda p: (-sp.get_score(ids[p]), ids[p])):
                merges += [(piece[:k], piece[k:]) for k in range(1, len(piece))
                           if piece[:k] in normal and piece[k:] in normal]
            model = tk.models.BPE(vocab=ids, merges=merges, unk_token=pieces[sp.unk_id()], byte_fallback=True)
        tok = tk.Tokenizer(model)
        tok.normalizer = tk.normalizers.Replace(" ", "\u2581")  # as SentencePiece writes spaces
        tok.decoder = tk.decoders.Sequence(
            [tk.decoders.Replace("\u2581", " "), tk.decoders.ByteFallback(), tk.decoders.Fuse()]
        )
        # the newline runs are cut out before the model sees the text, as SentencePiece's user symbols are
        tok.add_tokens([tk.AddedToken(s, normalized=False) for s in SPM_NEWLINE_SYMBOLS if s in ids])
        tok.add_special_tokens([tk.AddedToken(EOT_TEXT, special=True, normalized=False)])
        return tok

    def __reduce__(self):
        return (SentencePieceTokenizer, (self.model_proto, self.model_type))

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_type}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


class BPETokenizer:
    """Byte-level BPE with the Hugging Face ``tokenizers`` package, built as GPT-2's: text is cut
    by GPT-2's pattern, and each piece's UTF-8 bytes merged by the trained rules (all 256 bytes
    are tokens, so any text encodes and decodes back exactly). ``<|endoftext|>`` (``eot_id``) is
    an added special token that text never produces."""

    name = "bpe"

    def __init__(self, tokenizer_json: str):
        tk = _import_library("tokenizers", self.name)
        self.tokenizer_json = tokenizer_json
        self.sha256 = hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()
        try:
            self._tok = tk.Tokenizer.from_str(tokenizer_json)
        except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception for bad JSON
            raise ValueError(f"not a Hugging Face tokenizer JSON ({str(err).splitlines()[0][:200]})") from None
        # "<|endoftext|>" written in a document is plain text, never the separator: a document
        # cannot forge a document boundary (as tiktoken's encode_ordinary for GPT-2). This flag is
        # not saved in the JSON, so it is set on every load
        self._tok.encode_special_tokens = True
        eot = self._tok.token_to_id(EOT_TEXT)
        if eot is None:
            raise ValueError(
                f"this BPE tokenizer has no {EOT_TEXT} token to separate documents; "
                "train one with gpt.tokenizer_training.train_tokenizer"
            )
        self.eot_id: int = eot

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # the fast batch path skips the offsets that encode() computes: about a third faster
        return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]  # Rust threads

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_as_id_list(ids, self.vocab_size), skip_special_tokens=False)

    def to_meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "sha256": self.sha256,  # of the JSON's UTF-8 bytes: same sha256, same tokenizer
            "model": self.tokenizer_json,
        }

    def to_hf_tokenizer(self) -> Any:
        """A fresh ``tokenizers.Tokenizer`` of the same JSON, for transformers (where, as usual
        there, ``<|endoftext|>`` written in the text is the special token)."""
        return _import_library("tokenizers", self.name).Tokenizer.from_str(self.tokenizer_json)

    def __reduce__(self):
        return (BPETokenizer, (self.tokenizer_json,))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


AnyTokenizer = CharTokenizer | GPT2Tokenizer | SentencePieceTokenizer | BPETokenizer
TRAINED_TOKENIZERS = ("sentencepiece", "bpe")  # the names of the tokenizers that embed their model in the meta


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
        tokenizer = _trained_from_meta(meta)
    else:
        raise ValueError(f"unknown tokenizer {name!r} in meta (known: 'char', 'gpt2', 'sentencepiece', 'bpe')")
    expected = meta.get("vocab_size", tokenizer.vocab_size)
    if expected != tokenizer.vocab_size:
        raise ValueError(
            f"tokenizer meta says vocab_size {expected}, but the rebuilt tokenizer has {tokenizer.vocab_size}"
        )
    return tokenizer


def _trained_from_meta(meta: dict[str, Any]) -> SentencePieceTokenizer | BPETokenizer:
    name, model = meta["name"], meta.get("model")
    if not isinstance(model, str):
        raise ValueError(
            f"{name} tokenizer meta has no 'model' string (the serialized model); "
            "a tokenizer directory is read with gpt.tokenizer_training.load_tokenizer_dir"
        )
    if name == "sentencepiece":
        try:
            data = base64.b64decode(model, validate=True)
        except binascii.Error:
            raise ValueError("sentencepiece tokenizer meta: 'model' is not base64 text") from None
    else:
        data = model.encode("utf-8")
    if "sha256" in meta and hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise ValueError(f"the model in the {name} tokenizer meta does not match its sha256 (damaged or edited?)")
    if name == "sentencepiece":
        model_type = meta.get("model_type", "bpe")
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"sentencepiece tokenizer meta: model_type must be 'bpe' or 'unigram', got {model_type!r}")
        tokenizer: SentencePieceTokenizer | BPETokenizer = SentencePieceTokenizer(data, model_type)
    else:
        tokenizer = BPETokenizer(model)
    if meta.get("eot_id", tokenizer.eot_id) != tokenizer.eot_id:
        raise ValueError(
            f"tokenizer meta says eot_id {meta['eot_id']}, but the model's {EOT_TEXT} is {tokenizer.eot_id}"
        )
    return tokenizer


def start_tokens(tokenizer: AnyTokenizer) -> list[int]:
    """A neutral first token to sample from when there is no prompt: the end-of-text token where
    the tokenizer has one (GPT-2, trained ones), a newline where a character vocabulary has one
    (the start of a line), else the vocabulary's first character (a corpus without a newline has
    no newline to start from)."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    assert isinstance(tokenizer, CharTokenizer)
    return [tokenizer.stoi["\n"] if "\n" in tokenizer.stoi else 0]


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenizer metas (``to_meta()``) encode text alike."""
    if a.get("name") != b.get("name"):
        return False
    if a.get("name") == "char":
        return a.get("chars") == b.get("chars")
    if a.get("name") in TRAINED_TOKENIZERS:  # the same model bytes
        return a.get("sha256") is not None and a.get("sha256") == b.get("sha256")
    return a.get("encoding", a.get("name")) == b.get("encoding", b.get("name"))


def describe_tokenizer(meta: dict[str, Any]) -> str:
    """A short name for messages: "char (65 tokens)", "bpe (8000 tokens, sha256 1a2b3c4d5e6f)"."""
    name = meta.get("name")
    if name == "sentencepiece":
        name = f"sentencepiece {meta.get('model_type', 'bpe')}"
    sha = f", sha256 {meta['sha256'][:12]}" if isinstance(meta.get("sha256"), str) else ""
    return f"{name} ({meta.get('vocab_size')} tokens{sha})"
