"""The chat template: conversations <-> token ids, with special tokens no text can produce.

    <|user|>reverse: stone<|end|><|assistant|>enots<|end|>

Every message is its role's token, the content's tokens, then ``<|end|>``. The special tokens
are reserved in every tokenizer alike, at the top of its vocabulary: ``ChatTokenizer(base)``
gives them the ids ``base.vocab_size``, ``+1``, ... Text is encoded by the base tokenizer,
whose ids all lie below that, so no text, whatever it spells, can produce a special token
("<|end|>" typed by a user is seven ordinary characters). A model grows its embedding by the
four rows when fine-tuning starts (``GPT.grow_vocab``), unless its vocabulary is padded past
its tokenizer's already (nanoGPT pads GPT-2's 50,257 tokens to 50,304).

For supervised fine-tuning, ``encode_conversation`` also says which tokens are trained:
the assistant's content and its ``<|end|>``, so the model learns to answer and to stop, and
never to write the user's part. Generation starts from ``prompt_ids`` (the conversation so
far, then ``<|assistant|>``) and stops at ``<|end|>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from gptforge.gpt.tokenizer_base import Tokenizer, as_id_list

ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # their order is their ids' order
END = "<|end|>"


class ChatTokenizer:
    """A base tokenizer with the chat template's special tokens after its vocabulary."""

    name = "chat"

    def __init__(self, base: Tokenizer):
        if isinstance(base, ChatTokenizer):
            raise ValueError("the tokenizer already has the chat tokens")
        self.base = base
        self.special = {token: base.vocab_size + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.special_text = {i: token for token, i in self.special.items()}
        self.end_id = self.special[END]

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size + len(SPECIAL_TOKENS)

    @property
    def eot_id(self) -> int | None:
        return self.base.eot_id

    def role_id(self, role: str) -> int:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        return self.special[f"<|{role}|>"]

    def encode(self, text: str) -> list[int]:
        """Text only: never a special token, whatever the text spells."""
        return self.base.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.base.encode_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text with each special token written out (``<|end|>``)."""
        pieces, run = [], []
        for i in as_id_list(ids, self.vocab_size):
            if i in self.special_text:
                pieces += [self.base.decode(run), self.special_text[i]]
                run = []
            else:
                run.append(i)
        return "".join(pieces) + self.base.decode(run)

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "special_tokens": list(SPECIAL_TOKENS),
                "base": self.base.to_meta()}

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.base!r} + {len(SPECIAL_TOKENS)} special tokens)"

    # --- the template ---

    def encode_conversation(self, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """The ids of a whole conversation, and for each id whether SFT trains the model to
        produce it (an assistant message's content and its end token)."""
        ids: list[int] = []
        trained: list[bool] = []
        for message in messages:
            role, content = message["role"], message["content"]
            body = self.encode(content) + [self.end_id]
            ids += [self.role_id(role), *body]
            trained += [False] + [role == "assistant"] * len(body)
        return ids, trained

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """The conversation so far, then the assistant's role token: where a response starts."""
        return self.encode_conversation(messages)[0] + [self.special["<|assistant|>"]]

    def response_text(self, ids: Iterable[int]) -> str:
        """A generated response: its text up to (not including) the first ``<|end|>``, or all
        of it when it never ended. Other special tokens in it are dropped."""
        kept = []
        for i in ids:
            if i == self.end_id:
                break
            if i not in self.special_text:
                kept.append(i)
        return self.base.decode(kept)

    def parse_conversation(self, ids: Sequence[int]) -> list[dict]:
        """The messages of ``encode_conversation``'s ids (its inverse); a ValueError where the ids
        do not follow the template."""
        messages, i = [], 0
        roles = {self.role_id(role): role for role in ROLES}
        while i < len(ids):
            if ids[i] not in roles:
                raise ValueError(f"expected a role token at position {i}, got id {ids[i]}")
            try:
                end = ids.index(self.end_id, i + 1)
            except ValueError:
                raise ValueError(f"the message at position {i} has no {END}") from None
            messages.append(dict(role=roles[ids[i]], content=self.base.decode(ids[i + 1 : end])))
            i = end + 1
        return messages
