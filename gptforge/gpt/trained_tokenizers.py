"""The tokenizers trained on the user's corpus (by gptforge/gpt/tokenizer_training.py), as they
encode and decode:

- ``SentencePieceTokenizer``: a SentencePiece model (BPE or unigram) with byte fallback.
- ``BPETokenizer``: a byte-level BPE of the Hugging Face ``tokenizers`` package.

Both follow gptforge/gpt/tokenizer_base.py's ``Tokenizer`` interface, separate documents with
``<|endoftext|>`` (``eot_id``), and embed their whole model in ``to_meta()`` (a few MB at most),
so no side file has to travel with a checkpoint; ``trained_from_meta`` rebuilds them from it.
sentencepiece and tokenizers are imported only when such a tokenizer is built.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
from collections.abc import Iterable
from typing import Any

from gptforge.gpt.tokenizer_base import EOT_TEXT, TokenizerUnavailableError, as_id_list

# Runs of newlines that a SentencePiece model keeps as tokens of their own (user-defined symbols):
# SentencePiece treats only the space as whitespace, so without them its pieces would run across
# line ends ("word\n\tnext").
SPM_NEWLINE_SYMBOLS = ("\n", "\n\n")
TRAINED_TOKENIZERS = ("sentencepiece", "bpe")  # the names of the tokenizers that embed their model in the meta


def import_library(module: str, tokenizer: str) -> Any:
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


def _separator_id(eot: int | None, model: str, token: str) -> int:
    """The id of ``<|endoftext|>`` in a trained model, or the ValueError that says the model has
    none (``model`` and ``token`` name them as the model's library does)."""
    if eot is None:
        raise ValueError(
            f"this {model} has no {EOT_TEXT} {token} to separate documents; "
            "train one with gptforge.gpt.tokenizer_training.train_tokenizer"
        )
    return eot


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
        spm = import_library("sentencepiece", self.name)
        self.model_proto = bytes(model_proto)
        self.model_type = model_type  # "bpe" or "unigram"; the processor does not say (it is in the proto)
        self.sha256 = hashlib.sha256(self.model_proto).hexdigest()
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        except RuntimeError:  # its message names only the C++ check that failed
            raise ValueError("not a SentencePiece model: the bytes do not parse as one") from None
        eot = self._sp.piece_to_id(EOT_TEXT)  # the unknown piece's id when there is no such piece
        found = self._sp.id_to_piece(eot) == EOT_TEXT and self._sp.is_control(eot)
        self.eot_id: int = _separator_id(eot if found else None, "SentencePiece model", "control symbol")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        # a control symbol never comes out of text: "<|endoftext|>" in a document stays plain text
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts, out_type=int)  # spread over threads in C++

    def decode(self, ids: Iterable[int]) -> str:
        id_list = as_id_list(ids, self.vocab_size)
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
        tk = import_library("tokenizers", "Hugging Face")
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
        tk = import_library("tokenizers", self.name)
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
        self.eot_id: int = _separator_id(self._tok.token_to_id(EOT_TEXT), "BPE tokenizer", "token")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # the fast batch path skips the offsets that encode() computes: about a third faster
        return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]  # Rust threads

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(as_id_list(ids, self.vocab_size), skip_special_tokens=False)

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
        return import_library("tokenizers", self.name).Tokenizer.from_str(self.tokenizer_json)

    def __reduce__(self):
        return (BPETokenizer, (self.tokenizer_json,))

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]})"


def trained_from_meta(meta: dict[str, Any]) -> SentencePieceTokenizer | BPETokenizer:
    """Rebuild a trained tokenizer from its ``to_meta()`` dict; check the model's sha256 and end-of-text id."""
    name, model = meta["name"], meta.get("model")
    if not isinstance(model, str):
        raise ValueError(
            f"{name} tokenizer meta has no 'model' string (the serialized model); "
            "a tokenizer directory is read with gptforge.gpt.tokenizer_training.load_tokenizer_dir"
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
