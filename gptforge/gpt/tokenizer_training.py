"""Tokenizers fitted to the user's corpus: SentencePiece (BPE or unigram) or byte-level BPE.

    tok = train_tokenizer(documents, kind="bpe", vocab_size=8192, out_dir="data/mine/tokenizer")
    tok = load_tokenizer_dir("data/mine/tokenizer")     # later, or in another process
    ids = tok.encode_batch(texts)                       # and tok.eot_id between documents

``documents`` is any iterable of strings, one per document, read once; a generator that reads
files is fine, the corpus is never held in memory whole: the BPE trainer counts words as they
stream past, SentencePiece keeps a uniform sample of at most ``sample_size`` chunks of it.
Both kinds reserve ``<|endoftext|>`` as the document separator (``eot_id``), which no text
encodes to.

The directory holds the library's own file, which other tools read too (``tokenizer.model``
for SentencePiece, ``tokenizer.json`` for BPE), and ``tokenizer_meta.json``: our ``to_meta()``
without the embedded model (the file beside it is the model) plus the file's name; the file's
sha256 is checked against it on load. The meta stored in datasets and checkpoints is the full
``to_meta()``, model included, so a checkpoint needs no side file. The directory is written
whole, under a lock, and replaces an earlier tokenizer only when asked (``overwrite``; see
gptforge/gpt/folders.py): never two writers, never the other kind's file left behind.

Which library for byte-level BPE: Hugging Face ``tokenizers``. rustbpe (0.1.0 on PyPI, one
release) trains fast but has no encoder or file format of its own (its merges go to tiktoken)
and no way into transformers. ``tokenizers`` is mature, already installed as transformers'
dependency, trains from an iterator, encodes batches on Rust threads, saves the whole
tokenizer as one JSON string (which the meta embeds), and transformers loads that JSON as it is.

Determinism: training twice on the same documents gives the same model bytes, hence the same
sha256 (the tests check it). tokenizers' BPE trainer counts words and breaks ties between
equally frequent pairs in a fixed order; SentencePiece trains on a sample that we draw with a
fixed seed (``sample_size``); its own sampler draws a different sample in every process, seed or
not, so it is left off.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gptforge.gpt.folders import FolderLock, check_replaceable, staged_folder
from gptforge.gpt.tokenizer import tokenizer_from_meta
from gptforge.gpt.tokenizer_base import EOT_TEXT
from gptforge.gpt.trained_tokenizers import SPM_NEWLINE_SYMBOLS, BPETokenizer, SentencePieceTokenizer, import_library

KINDS = ("sentencepiece", "bpe")
SPM_MODEL_TYPES = ("bpe", "unigram")
META_FILE = "tokenizer_meta.json"
MODEL_FILES = {"sentencepiece": "tokenizer.model", "bpe": "tokenizer.json"}
TOKENIZER_DIR_FILES = (META_FILE, *MODEL_FILES.values())  # all a tokenizer folder may hold

# the smallest vocabularies: byte-level BPE needs every byte and <|endoftext|>; SentencePiece
# reserves the 256 byte pieces, <unk>, <|endoftext|> and the newline runs, and needs at least one
# character (it says how many the corpus needs when that is more)
BPE_MIN_VOCAB = 256 + 1
SPM_MIN_VOCAB = 256 + 2 + len(SPM_NEWLINE_SYMBOLS) + 1
MAX_VOCAB = {"bpe": 2**32 - 1, "sentencepiece": 2**31 - 1}  # SentencePiece's vocab_size is an int32

# SentencePiece trains on "sentences" and skips those longer than max_sentence_length: documents
# are cut into chunks of at most this many characters, at a line end where there is one (no piece
# crosses a newline anyway), and it trains on a uniform sample of SPM_SAMPLE_CHUNKS of them.
SPM_CHUNK_CHARS = 2048
SPM_SAMPLE_CHUNKS = 100_000  # at most ~200M characters: SentencePiece holds its sample in memory, several times over
SPM_SEED = 1337  # of our sampling: the same corpus gives the same sample, the same model
SPM_CHARACTER_COVERAGE = 0.9995  # rarer characters are not pieces of their own: they fall back to bytes


def train_tokenizer(
    texts: Iterable[str],
    kind: str,
    vocab_size: int,
    out_dir: str | Path,
    model_type: str = "bpe",
    *,
    sample_size: int = SPM_SAMPLE_CHUNKS,
    overwrite: bool = False,
) -> SentencePieceTokenizer | BPETokenizer:
    """Train a ``kind`` tokenizer ("sentencepiece" or "bpe") of at most ``vocab_size`` tokens on
    the documents ``texts``, save it into ``out_dir`` (see the module's doc) and return it.

    ``vocab_size`` is an upper bound: a small corpus may run out of pieces to learn first, and
    ``tokenizer.vocab_size`` says how many there are. ``model_type`` ("bpe" or "unigram") is for
    SentencePiece only. ``sample_size`` (SentencePiece only) is how many chunks of at most 2,048
    characters it trains on, drawn uniformly from the whole corpus with a fixed seed; the BPE
    trainer counts the whole stream. A ValueError names any bad argument, an empty corpus,
    or a vocabulary too small for the corpus.

    ``out_dir`` is locked for the whole training (a second writer gets FolderBusyError at once).
    A folder that holds a tokenizer already is replaced whole only with ``overwrite``; one that
    holds other files never is (both checked before training, so nothing is lost or wasted).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}: expected one of {', '.join(map(repr, KINDS))}")
    if kind == "sentencepiece" and model_type not in SPM_MODEL_TYPES:
        raise ValueError(f"unknown sentencepiece model_type {model_type!r}: expected 'bpe' or 'unigram'")
    if kind == "bpe" and model_type != "bpe":
        raise ValueError(f"model_type {model_type!r} is for kind='sentencepiece' only; a 'bpe' tokenizer is BPE")
    low, high = (BPE_MIN_VOCAB if kind == "bpe" else SPM_MIN_VOCAB), MAX_VOCAB[kind]
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not low <= vocab_size <= high:
        raise ValueError(f"vocab_size for a {kind} tokenizer must be an integer in [{low}, {high}], got {vocab_size!r}")
    if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
        raise ValueError(f"sample_size must be a positive integer, got {sample_size!r}")
    with FolderLock(out_dir, "tokenizer training"):
        check_replaceable(out_dir, overwrite, TOKENIZER_DIR_FILES, "a tokenizer")
        tokenizer = _train(texts, kind, vocab_size, model_type, sample_size)
        save_tokenizer_dir(tokenizer, out_dir, overwrite=overwrite, locked=True)
    return tokenizer


def _train(texts: Iterable[str], kind: str, vocab_size: int, model_type: str,
           sample_size: int) -> SentencePieceTokenizer | BPETokenizer:
    corpus = _Corpus(texts)
    try:
        if kind == "sentencepiece":
            tokenizer: SentencePieceTokenizer | BPETokenizer = _train_sentencepiece(
                corpus, vocab_size, model_type, sample_size)
        else:
            tokenizer = _train_bpe(corpus, vocab_size)
    except Exception:
        if corpus.error is not None:  # the reader's own error, not the library's rewording of it
            raise corpus.error from None
        raise
    return tokenizer


class _Corpus:
    """The documents, checked as they stream past, empty ones skipped. Made with the first
    non-empty document already read, so an empty corpus is refused before any training; an
    error of the caller's iterator is kept, for the libraries reword it."""

    def __init__(self, texts: Iterable[str]):
        if isinstance(texts, str | bytes):
            raise ValueError("texts must be an iterable of documents (strings), got a single string; wrap it in a list")
        self._texts = iter(texts)
        self.error: Exception | None = None
        self._first = next((text for text in map(_checked, self._texts) if text), None)
        if self._first is None:
            raise ValueError("the corpus is empty: texts gave no non-empty document to train the tokenizer on")

    def __iter__(self) -> Iterator[str]:
        if self._first is None:
            raise RuntimeError("the documents can be read only once")
        first, self._first = self._first, None
        try:
            yield first
            for text in self._texts:
                if _checked(text):
                    yield text
        except Exception as err:
            self.error = err
            raise


def _checked(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"texts must give strings (documents), got a {type(text).__name__}")
    return text


# ----------------------------------------------------------------------------------------------
# SentencePiece
# ----------------------------------------------------------------------------------------------


def _chunks(documents: Iterable[str], size: int = SPM_CHUNK_CHARS) -> Iterator[str]:
    """Each document in pieces of at most ``size`` characters, cut after a newline where the
    piece has one (only a line longer than ``size`` is cut inside)."""
    for doc in documents:
        start = 0
        while start < len(doc):
            end = min(start + size, len(doc))
            if end < len(doc):
                newline = doc.rfind("\n", start, end)
                end = newline + 1 if newline >= start else end
            yield doc[start:end]
            start = end


def _sample(items: Iterable[str], size: int, seed: int = SPM_SEED) -> list[str]:
    """``size`` of ``items`` drawn uniformly in one pass (reservoir sampling), all of them if fewer."""
    rng = random.Random(seed)
    sample: list[str] = []
    for seen, item in enumerate(items):
        if seen < size:
            sample.append(item)
        elif (slot := rng.randrange(seen + 1)) < size:  # each item so far is kept with chance size/(seen+1)
            sample[slot] = item
    return sample


def _train_sentencepiece(corpus: _Corpus, vocab_size: int, model_type: str, sample_size: int) -> SentencePieceTokenizer:
    spm = import_library("sentencepiece", "sentencepiece")
    sentences = _sample(_chunks(corpus), sample_size)  # SentencePiece holds its input in memory anyway
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            hard_vocab_limit=False,  # vocab_size is a maximum: a small corpus gives a smaller vocabulary
            byte_fallback=True,  # characters without a piece of their own become their UTF-8 bytes
            character_coverage=SPM_CHARACTER_COVERAGE,
            # the text as it is: no Unicode normalization, no "▁" put in front, runs of spaces kept
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,  # indentation ("▁▁▁▁") can be one token
            unk_id=0,
            bos_id=-1,  # no begin/end-of-sentence tokens: <|endoftext|> is the one separator
            eos_id=-1,
            pad_id=-1,
            control_symbols=[EOT_TEXT],  # never produced by encoding text: documents cannot forge it
            user_defined_symbols=list(SPM_NEWLINE_SYMBOLS),
            input_sentence_size=0,  # all of our sample
            max_sentence_length=4 * SPM_CHUNK_CHARS,  # bytes: no chunk of ours is skipped
            minloglevel=2,  # errors only; it logs every step otherwise
        )
    except RuntimeError as err:
        raise _spm_error(err, vocab_size) from None
    return SentencePieceTokenizer(model.getvalue(), model_type)


def _spm_error(err: RuntimeError, vocab_size: int) -> Exception:
    """SentencePiece's check failures are one-line RuntimeErrors naming its C++ source; say what to change."""
    message = str(err)
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return ValueError(
            f"vocab_size {vocab_size} is too small for this corpus: a sentencepiece tokenizer of it needs at least "
            f"{too_small.group(2)} (its reserved pieces and the characters that make up "
            f"{SPM_CHARACTER_COVERAGE:.2%} of the text)"
        )
    return ValueError(f"sentencepiece could not train on this corpus: {message.splitlines()[0][:300]}")


# ----------------------------------------------------------------------------------------------
# Byte-level BPE (Hugging Face tokenizers)
# ----------------------------------------------------------------------------------------------


def _train_bpe(corpus: _Corpus, vocab_size: int) -> BPETokenizer:
    tk = import_library("tokenizers", "bpe")
    tok = tk.Tokenizer(tk.models.BPE())
    # GPT-2's scheme: cut the text by its pattern (words, numbers, punctuation, spaces), then
    # merge bytes within each piece; no normalizer, so decode gives back the exact text
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],  # id 0
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return BPETokenizer(tok.to_str())


# ----------------------------------------------------------------------------------------------
# The tokenizer directory
# ----------------------------------------------------------------------------------------------


def save_tokenizer_dir(tokenizer: SentencePieceTokenizer | BPETokenizer, out_dir: str | Path,
                       overwrite: bool = False, locked: bool = False) -> Path:
    """Write the library's model file and ``tokenizer_meta.json`` into ``out_dir``, replacing
    the folder whole (an earlier tokenizer only with ``overwrite``: see gptforge/gpt/folders.py);
    return it. ``locked``: the caller holds the folder's lock already."""
    out_dir = Path(out_dir)
    with contextlib.nullcontext() if locked else FolderLock(out_dir, "saving a tokenizer"):
        check_replaceable(out_dir, overwrite, TOKENIZER_DIR_FILES, "a tokenizer")
        with staged_folder(out_dir) as staging:
            _write_tokenizer_files(tokenizer, staging)
    return out_dir


def _write_tokenizer_files(tokenizer: SentencePieceTokenizer | BPETokenizer, out_dir: Path) -> None:
    meta = tokenizer.to_meta()
    model = meta.pop("model")
    file = MODEL_FILES[tokenizer.name]
    if isinstance(tokenizer, SentencePieceTokenizer):
        (out_dir / file).write_bytes(tokenizer.model_proto)
    else:
        (out_dir / file).write_bytes(model.encode("utf-8"))  # bytes: the sha256 is of exactly these
    (out_dir / META_FILE).write_text(json.dumps({**meta, "file": file}, indent=2) + "\n", encoding="utf-8")


def load_tokenizer_dir(path: str | Path) -> SentencePieceTokenizer | BPETokenizer:
    """The tokenizer saved in ``path`` by ``train_tokenizer``; a one-line ValueError if ``path``
    is not such a directory or its model file does not match its meta."""
    path = Path(path)
    expected = f"a tokenizer directory ({META_FILE} with tokenizer.model or tokenizer.json, as train_tokenizer writes)"
    if not path.is_dir():
        raise ValueError(f"{path} is not {expected}: {'not a folder' if path.exists() else 'it does not exist'}")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{path} is not {expected}: it has no {META_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err})") from None
    name = meta.get("name") if isinstance(meta, dict) else None
    if name not in MODEL_FILES:
        raise ValueError(f"{meta_path}: expected 'name' to be 'sentencepiece' or 'bpe', got {name!r}")
    file = path / MODEL_FILES[name]
    if not file.is_file():
        raise ValueError(f"{path} is not {expected}: {META_FILE} is of a {name} tokenizer but {file.name} is missing")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ValueError(f"{file} does not match the sha256 in {META_FILE} (replaced or damaged?)")
    try:
        model = base64.b64encode(data).decode("ascii") if name == "sentencepiece" else data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{file} is not UTF-8 text") from None
    meta = {k: v for k, v in meta.items() if k != "file"}
    return tokenizer_from_meta({**meta, "model": model})  # type: ignore[return-value]
