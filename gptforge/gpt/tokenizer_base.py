"""What every tokenizer shares: the ``Tokenizer`` interface, the error for a missing tokenizer
library, the end-of-text text, and the check of the ids handed to ``decode``.

The tokenizers themselves: gptforge/gpt/tokenizer.py (character level, GPT-2, and
``tokenizer_from_meta``) and gptforge/gpt/trained_tokenizers.py (trained on the user's corpus).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, Protocol

EOT_TEXT = "<|endoftext|>"  # the separator token of trained tokenizers, named as GPT-2 names its own
SHOW_AT_MOST = 10  # how many offending characters an error message lists


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


def as_id_list(ids: Any, vocab_size: int) -> list[int]:
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
        shown = ", ".join(str(i) for i in bad[:SHOW_AT_MOST])
        raise ValueError(
            f"token ids out of range [0, {vocab_size}): {shown}" + (" ..." if len(bad) > SHOW_AT_MOST else "")
        )
    return id_list
