"""Sampling from a language model: temperature, top-k and top-p (nucleus) filtering, a KV cache,
stop sequences, and text streaming.

Three levels, each built on the one before:

- ``generate_tokens`` yields the next token of every row, one step at a time (the loop);
- ``generate`` returns the prompt and the new tokens as one (B, T + new) tensor;
- ``generate_text`` works on text: encodes the prompt, streams the new text of the first
  sample as it comes, stops at a stop string and trims what follows it.

With ``kv_cache`` (the default) the prompt is encoded once (prefill) and each new token then
costs one position's forward pass against the cached keys and values. The model's position
embedding covers ``block_size`` tokens, so a cache cannot grow past that: when it is full,
it is refilled from the latest ``window_keep`` tokens (default ``block_size // 2``) and
decoding continues from there. Until the sequence first reaches ``block_size`` tokens the
cached path sees exactly the contexts the uncached one sees, so greedy decoding gives the
same tokens. Past that point the uncached path always looks back a full ``block_size``
window, while the cached one looks back between ``window_keep`` and ``block_size`` tokens:
each token is still the model's exact prediction for its (shorter) window, positions counted
from the window's start, as the model was trained. ``window_keep=block_size`` reproduces
the uncached path everywhere, at the uncached cost once the window is full.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn as nn

from gptforge.gpt.model import GPT, KVCache, unwrap
from gptforge.gpt.tokenizer_base import Tokenizer

# a temperature below this is greedy decoding: float32 logits cannot be divided by it (it is
# float32's smallest normal number, rounded down; much below, it rounds to 0 and gives NaN)
GREEDY_BELOW = 1e-38
COUNT_LIMIT = 2**63 - 1  # an int64: the most a tensor's size or a count can hold


def check_sampling(
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_new_tokens: int = 0,
    num_samples: int = 1,
    flag: str = "",
) -> None:
    """Refuse settings that would sample nonsense, with a ValueError naming the setting after
    ``flag`` (``"--"`` in ``python -m gptforge.gpt.sample``, which checks before it loads anything)."""
    if not (math.isfinite(temperature) and temperature >= 0):  # NaN would pass a plain comparison
        raise ValueError(f"{flag}temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"{flag}top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also refuses NaN
        raise ValueError(f"{flag}top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"{flag}max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise ValueError(f"{flag}num_samples must be >= 1, got {num_samples}")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_samples", num_samples)):
        if value > COUNT_LIMIT:
            raise ValueError(f"{flag}{name} must be at most {COUNT_LIMIT:,} (an int64), got {value}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the smallest set whose
    probability mass reaches top_p. ``logits`` is (B, vocab); returns a new tensor."""
    check_sampling(top_k=top_k, top_p=top_p)
    if top_k is not None and top_k < logits.size(-1):  # a top_k of the whole vocabulary keeps every token
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token id (B, 1) for each row of ``logits`` (B, vocab). Temperature 0 (or below
    GREEDY_BELOW) or top_k 1 is greedy (argmax), and draws nothing from ``generator``."""
    logits = logits.float()
    top = logits.amax(-1, keepdim=True)
    _check_finite(top)  # a NaN anywhere in a row makes the row's max NaN
    if temperature < GREEDY_BELOW or top_k == 1:
        return logits.argmax(-1, keepdim=True)
    # the row's largest logit becomes 0 before scaling, so no temperature can overflow it
    probs = filter_logits((logits - top) / temperature, top_k, top_p).softmax(-1)
    # an exponential race: argmax p_i / E_i with E_i ~ Exp(1) draws token i with probability
    # p_i, as torch.multinomial(probs, 1) does internally, without its checks of probs (host
    # syncs on CUDA, and half its time on the CPU); ours is _check_finite, above
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(-1, keepdim=True)


def _check_finite(row_max: torch.Tensor) -> None:
    """Refuse NaN or +inf logits (a diverged model, an fp16 overflow): argmax would pick an
    arbitrary token. Checked on each row's max, which any NaN or +inf in the row reaches."""
    message = "sampling needs finite logits; got NaN or inf (a diverged model, or an fp16 overflow?)"
    if row_max.device.type == "cuda":
        torch._assert_async(row_max.isfinite().all(), message)  # no host sync
    elif not math.isfinite(row_max.sum().item()):  # one number to read: cheaper than .all()
        raise ValueError(message)


def _check_prompt(idx: torch.Tensor, window_keep: int | None, block_size: int) -> None:
    if idx.dim() != 2 or idx.size(1) < 1:
        raise ValueError(
            f"idx must be (batch, seq_len) with seq_len >= 1, got shape {tuple(idx.shape)}; "
            "prompts of one batch must have the same length"
        )
    if window_keep is not None and not 1 <= window_keep <= block_size:
        raise ValueError(f"window_keep must be in [1, block_size={block_size}], got {window_keep}")


def generate_tokens(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
    kv_cache: bool = True, window_keep: int | None = None, vocab_limit: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids (B, 1) of the prompts ``idx`` (B, T), ``max_new_tokens`` times.

    Stop iterating whenever you like. ``vocab_limit`` samples only among the first ids (a
    vocabulary padded past its tokenizer's, as nanoGPT pads GPT-2's 50257 to 50304). See the
    module docstring for ``kv_cache`` and ``window_keep``; models without attention (the
    bigram) ignore them. Arguments are checked here, before the first token is asked for.

    The steps run under ``torch.inference_mode`` (see ``_inference_mode_is_safe``), so the
    yielded tensors are inference tensors: read them, or ``.clone()`` one to update it in
    place or use it in autograd (``generate`` returns an ordinary tensor).
    """
    model = unwrap(model)  # a torch.compile'd model: run the module itself
    block_size = model.config.block_size
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    _check_prompt(idx, window_keep, block_size)
    window_keep = window_keep or max(1, block_size // 2)
    # as a decorator, the context switches gradients off only while a step runs, not between yields
    grad_off = torch.inference_mode() if _inference_mode_is_safe(model) else torch.no_grad()

    @grad_off
    def steps(idx: torch.Tensor) -> Iterator[torch.Tensor]:
        cache = KVCache(model.config) if kv_cache and isinstance(model, GPT) else None
        was_training = model.training
        model.eval()
        try:
            for _ in range(max_new_tokens):
                if cache is None:
                    logits, _ = model(idx[:, -block_size:], last_only=True)
                elif cache.length == 0:  # prefill: the whole prompt (its last block_size tokens) in one pass
                    logits, _ = model(idx[:, -block_size:], last_only=True, cache=cache)
                elif cache.length == block_size:  # full: slide, refilling from the latest window_keep tokens
                    cache.reset()
                    logits, _ = model(idx[:, -window_keep:], last_only=True, cache=cache)
                else:  # the common step: only the newest token, against the cache
                    logits, _ = model(idx[:, -1:], last_only=True, cache=cache)
                logits = logits[:, -1, :vocab_limit]
                next_id = pick_next(logits, temperature, top_k, top_p, generator)
                idx = torch.cat([idx, next_id], dim=1)
                yield next_id
        finally:
            model.train(was_training)

    return steps(idx)


def _inference_mode_is_safe(model: nn.Module) -> bool:
    """inference_mode saves ~10% per decoding step over no_grad, but the tensors it creates
    can never enter autograd. DeepSpeed ZeRO-3 gathers its partitioned parameters (marked
    ``ds_id``) into new tensors inside forward, and some stay gathered: made under
    inference_mode, they break training after sampling (snowflakedb/ArcticTraining#265)."""
    return not any(hasattr(p, "ds_id") for p in model.parameters())


def generate(
    model: nn.Module, idx: torch.Tensor, max_new_tokens: int,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
    *, kv_cache: bool = True, stop: Sequence[int] | None = None,
    window_keep: int | None = None, vocab_limit: int | None = None,
) -> torch.Tensor:
    """Extend the token ids ``idx`` (B, T) by up to ``max_new_tokens`` sampled tokens.

    ``temperature`` 0 (or below GREEDY_BELOW, or ``top_k`` 1) means greedy decoding. The
    context slides past the model's block_size, so any length of prompt and output works. Rows
    are prompts of the same length (pad or group prompts of different lengths yourself). With
    ``stop`` (token ids), generation ends early once every row has produced that sequence among
    its new tokens; rows are returned whole (use ``generate_text`` for trimmed text).
    """
    stop = list(stop) if stop else None
    new: list[torch.Tensor] = []
    done = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    steps = generate_tokens(
        model, idx, max_new_tokens, temperature, top_k, top_p, generator, kv_cache, window_keep, vocab_limit
    )
    for next_id in steps:
        new.append(next_id)
        if stop and len(new) >= len(stop):
            tail = torch.cat(new[-len(stop) :], dim=1)
            done |= (tail == torch.tensor(stop, device=tail.device)).all(dim=1)
            if done.all():
                break
    steps.close()  # puts the model back in training mode if it was
    return torch.cat([idx, *new], dim=1)


def _held_back(text: str, stop: str | None) -> int:
    """How many trailing characters of ``text`` are not final yet: an incomplete UTF-8
    character (decoded as U+FFFD) or a start of the stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    if stop:
        n = max(n, next((i for i in range(len(stop) - 1, 0, -1) if text.endswith(stop[:i])), 0))
    return n


def generate_text(
    model: nn.Module, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, num_samples: int = 1,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
    *, kv_cache: bool = True, stop: str | None = None, on_text: Callable[[str], None] | None = None,
    window_keep: int | None = None,
) -> list[str]:
    """``num_samples`` continuations of ``prompt``, each returned with the prompt in front.

    With ``stop``, a sample ends just after the first occurrence of ``stop`` in its new text,
    and generation ends once every sample has produced it. ``on_text`` receives the first
    sample's new text piece by piece as it is generated (for streaming to a terminal); a
    piece is passed on only once it is final (no half UTF-8 character, nothing past ``stop``).
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens, num_samples)  # before the prompt is encoded
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError("the prompt is empty after tokenization; give at least one character")
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids] * num_samples, device=device)
    new_ids: list[list[int]] = [[] for _ in range(num_samples)]
    texts = [""] * num_samples  # each sample's new text so far
    ends: list[int | None] = [None] * num_samples  # where each sample's text ends once it has met stop
    shown = 0  # characters of sample 0 already passed to on_text
    steps = generate_tokens(
        model, idx, max_new_tokens, temperature, top_k, top_p, generator, kv_cache, window_keep,
        vocab_limit=tokenizer.vocab_size,
    )
    for next_ids in steps:
        for i, token in enumerate(next_ids[:, 0].tolist()):
            if ends[i] is not None:
                continue  # this sample is finished; the batch runs on for the others
            new_ids[i].append(token)
            texts[i] = tokenizer.decode(new_ids[i])  # whole text: BPE tokens may split a character
            if stop:
                at = texts[i].find(stop)
                if at >= 0:
                    ends[i] = at + len(stop)
        if on_text is not None:
            final = ends[0] if ends[0] is not None else len(texts[0]) - _held_back(texts[0], stop)
            if final > shown:
                on_text(texts[0][shown:final])
                shown = final
        if stop and all(end is not None for end in ends):
            break
    steps.close()
    samples = [text[:end] for text, end in zip(texts, ends, strict=True)]
    if on_text is not None and len(samples[0]) > shown:
        on_text(samples[0][shown:])  # what was held back, now that generation has ended
    return [prompt + s for s in samples]
