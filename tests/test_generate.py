"""Generation with a KV cache: the same tokens as without one, sliding past block_size, stop
sequences, seeds, batches, streaming text."""

from __future__ import annotations

import re

import pytest
import torch

from gptforge import kernels
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.generate import (
    GREEDY_BELOW,
    _held_back,
    check_sampling,
    generate,
    generate_text,
    generate_tokens,
    pick_next,
)
from gptforge.gpt.model import GPT, BigramLanguageModel, KVCache, unwrap
from gptforge.gpt.tokenizer import CharTokenizer

SMALL = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32)
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTU \n."  # 50 distinct characters
CPU_BACKENDS = kernels.available_backends("attention", "cpu")  # torch, sdpa; triton under the interpreter


def small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # larger weights than the init: sharper, more varied predictions
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def backend_params():
    for name in CPU_BACKENDS:
        marks = [pytest.mark.skipif(name == "triton", reason="slow under the interpreter: see the tiny triton test")]
        yield pytest.param(name, marks=marks)


@pytest.mark.parametrize("backend", list(backend_params()))
def test_cached_logits_match_a_full_forward(backend):
    """Prefill part of a sequence, then feed the rest one token at a time: every position's
    logits equal those of one uncached pass over the whole sequence."""
    model = small_gpt()
    idx = torch.randint(0, 50, (3, 32))
    with kernels.use_backend(attention=backend), torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(model.config)
        steps = [model(idx[:, :7], cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 32)]
    assert cache.length == 32
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", list(backend_params()))
@pytest.mark.parametrize("greedy", [dict(temperature=0.0), dict(top_k=1)], ids=["temperature0", "top_k1"])
def test_cached_greedy_gives_exactly_the_uncached_tokens(backend, greedy):
    model = small_gpt()
    prompt = torch.randint(0, 50, (3, 5))  # a batch of three prompts of the same length
    with kernels.use_backend(attention=backend):
        uncached = generate(model, prompt, 27, kv_cache=False, **greedy)
        cached = generate(model, prompt, 27, kv_cache=True, **greedy)
    assert cached.shape == (3, 32)  # up to block_size: the cache never slides
    assert torch.equal(cached, uncached)
    assert len(set(cached[:, 5:].flatten().tolist())) > 5  # a real test: varied tokens, not one repeated


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton is not available on this CPU (no interpreter)")
def test_cached_greedy_matches_uncached_with_the_triton_kernel():
    model = small_gpt(n_layer=1, n_head=2, block_size=16)  # head_dim 16: the kernel's smallest
    prompt = torch.randint(0, 50, (2, 4))
    with kernels.use_backend(attention="triton"):
        uncached = generate(model, prompt, 4, temperature=0.0, kv_cache=False)
        cached = generate(model, prompt, 4, temperature=0.0, kv_cache=True)
    assert torch.equal(cached, uncached)


def windowed_reference(model: GPT, idx: torch.Tensor, n: int, keep: int, generator: torch.Generator) -> torch.Tensor:
    """What the cached path must compute, without a cache: the window grows by one token a
    step until it holds block_size tokens, then restarts from the latest ``keep`` tokens."""
    block = model.config.block_size
    window = min(idx.size(1), block)
    for _ in range(n):
        logits, _ = model(idx[:, -window:])
        idx = torch.cat([idx, pick_next(logits[:, -1], 1.0, None, None, generator)], dim=1)
        window = window + 1 if window < block else keep
    return idx


def test_the_window_slides_past_block_size():
    model = small_gpt(block_size=8, n_layer=1)
    prompt = torch.randint(0, 50, (2, 10))  # longer than block_size: only its last 8 tokens count
    # keeping a full window after each slide is the uncached path exactly (at the uncached cost)
    exact = generate(model, prompt, 20, temperature=0.0, window_keep=8)
    assert torch.equal(exact, generate(model, prompt, 20, temperature=0.0, kv_cache=False))
    # the default keeps half a window: each token is the model's prediction for that window
    for keep in (None, 3, 7):
        cached = generate(model, prompt, 20, generator=torch.Generator().manual_seed(3), window_keep=keep)
        with torch.no_grad():
            expected = windowed_reference(model, prompt, 20, keep or 4, torch.Generator().manual_seed(3))
        assert torch.equal(cached, expected), keep
    with pytest.raises(ValueError, match="window_keep must be in"):
        generate(model, prompt, 1, window_keep=9)


def test_a_cache_never_grows_past_block_size():
    model = small_gpt(block_size=8)
    cache = KVCache(model.config)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match=r"sequence length 9 \(6 cached \+ 3 new\) exceeds block_size 8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_sampling_is_reproducible_and_the_same_with_or_without_the_cache():
    model = small_gpt()
    prompt = torch.randint(0, 50, (2, 3))
    runs = [generate(model, prompt, 25, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    uncached = generate(model, prompt, 25, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(7),
                        kv_cache=False)
    assert torch.equal(runs[0], uncached)
    other = generate(model, prompt, 25, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_batched_prompts_give_what_each_prompt_gives_alone():
    model = small_gpt()
    prompts = torch.randint(0, 50, (4, 6))
    batched = generate(model, prompts, 20, temperature=0.0)
    for row in range(4):
        assert torch.equal(batched[row : row + 1], generate(model, prompts[row : row + 1], 20, temperature=0.0))


def test_stop_token_sequence_ends_generation_once_every_row_has_it():
    model = small_gpt()
    prompt = torch.randint(0, 50, (1, 4))
    free = generate(model, prompt, 20, temperature=0.0)[0, 4:].tolist()
    stop = free[6:8]
    first = next(i for i in range(len(free) - 1) if free[i : i + 2] == stop)
    out = generate(model, prompt, 20, temperature=0.0, stop=stop)
    assert out[0, 4:].tolist() == free[: first + 2]  # ends right after the stop sequence
    # a batch: the row that never produces the stop sequence runs to max_new_tokens
    other = next(p for p in range(50) if stop not in _pairs(generate(model, torch.tensor([[p] * 4]), 20,
                                                                    temperature=0.0)[0, 4:].tolist()))
    both = generate(model, torch.cat([prompt, torch.tensor([[other] * 4])]), 20, temperature=0.0, stop=stop)
    assert both.shape == (2, 24)


def _pairs(ids: list[int]) -> list[list[int]]:
    return [ids[i : i + 2] for i in range(len(ids) - 1)]


def test_generate_text_stops_at_the_stop_text_and_streams_what_it_keeps():
    model, tokenizer = small_gpt(), CharTokenizer(CHARS)
    free = generate_text(model, tokenizer, "ab", 25, temperature=0.0)[0][2:]
    stop = free[8:10]
    pieces: list[str] = []
    (text,) = generate_text(model, tokenizer, "ab", 25, temperature=0.0, stop=stop, on_text=pieces.append)
    assert text == "ab" + free[: free.find(stop) + len(stop)]  # the prompt, then up to the stop text
    assert "".join(pieces) == text[2:]  # streamed: exactly the kept new text
    samples = generate_text(model, tokenizer, "ab", 25, num_samples=3, temperature=2.0, stop="a",
                            generator=torch.Generator().manual_seed(0))
    for sample in samples:
        new = sample[2:]
        assert "a" not in new or new.index("a") == len(new) - 1  # trimmed after the first stop text
    assert len(set(samples)) > 1
    with pytest.raises(ValueError, match="does not know"):
        generate_text(model, tokenizer, "ü", 5)


def test_streaming_holds_back_unfinished_text():
    assert _held_back("abc\ufffd\ufffd", None) == 2  # half a UTF-8 character
    assert _held_back("line\n", "\n\n") == 1  # may be the start of the stop text
    assert _held_back("line\nx", "\n\n") == 0 and _held_back("abc", "xyz") == 0


def test_cache_follows_the_autocast_dtype_and_training_mode_is_restored():
    model = small_gpt().train()
    prompt = torch.randint(0, 50, (2, 3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, prompt, 8, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 11) and model.training
    generate(model, prompt, 8, temperature=0.0, stop=[0, 0, 0])
    assert model.training


def test_the_bigram_model_ignores_the_cache():
    model = BigramLanguageModel(GPTConfig(model="bigram", vocab_size=50))
    prompt = torch.randint(0, 50, (2, 3))
    a = generate(model, prompt, 10, generator=torch.Generator().manual_seed(1), kv_cache=True)
    b = generate(model, prompt, 10, generator=torch.Generator().manual_seed(1), kv_cache=False)
    assert torch.equal(a, b)


def test_sampling_draws_each_token_with_its_probability():
    """pick_next samples by an exponential race; its frequencies must be the probabilities."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    logits = probs.log().expand(20_000, -1)  # 20k independent rows, one draw each
    draws = pick_next(logits, generator=torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[4] == 0  # a token of probability 0 is never drawn
    torch.testing.assert_close(freq, probs, atol=0.012, rtol=0)  # ~3.5 standard errors at p=0.5
    warm = pick_next(logits, temperature=2.0, generator=torch.Generator().manual_seed(0))[:, 0]
    flatter = probs.pow(0.5) / probs.pow(0.5).sum()  # temperature 2 takes the square root of p
    freq = torch.bincount(warm, minlength=5).float() / warm.numel()
    torch.testing.assert_close(freq, flatter, atol=0.012, rtol=0)


def test_bad_arguments_are_refused_before_the_first_token_is_asked_for():
    model = small_gpt()
    for temperature in (-1.0, float("nan"), float("inf")):  # NaN would pass a plain comparison
        with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
            generate_tokens(model, torch.zeros(1, 1, dtype=torch.long), 5, temperature=temperature)  # no next()
    # one set of checks serves the library and python -m gptforge.gpt.sample (which names them as flags)
    for setting, message in ((dict(top_k=0), "top_k must be >= 1, got 0"),
                             (dict(top_p=float("nan")), "top_p must be in (0, 1], got nan"),
                             (dict(max_new_tokens=-1), "max_new_tokens must be >= 0, got -1"),
                             (dict(num_samples=0), "num_samples must be >= 1, got 0"),
                             (dict(max_new_tokens=2**63), "max_new_tokens must be at most 9,223,372,036,854,775,807"),
                             (dict(num_samples=2**70), "num_samples must be at most 9,223,372,")):  # fmt: skip
        with pytest.raises(ValueError, match="^" + re.escape("--" + message)):
            check_sampling(**setting, flag="--")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        generate_tokens(model, torch.zeros(1, 1, dtype=torch.long), 5, temperature=0.0, top_k=0)  # even greedy


def test_unwrap_returns_the_module_a_compiled_model_wraps():
    model = small_gpt()
    wrapper = torch.nn.Module()
    wrapper._orig_mod = model  # what torch.compile's OptimizedModule holds, without compiling
    assert unwrap(wrapper) is model and unwrap(model) is model


def test_decoding_runs_in_inference_mode_except_under_deepspeed_zero3():
    model = small_gpt()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    assert next(generate_tokens(model, prompt, 1)).is_inference()
    # between steps the caller's code runs in its own grad mode, not in inference mode
    steps = generate_tokens(model, prompt, 2)
    next(steps)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    steps.close()
    # a ZeRO-3 partitioned parameter (DeepSpeed marks it with ds_id) would be gathered into
    # inference tensors and break training afterwards: plain no_grad then
    next(model.parameters()).ds_id = 0
    assert not next(generate_tokens(model, prompt, 1)).is_inference()


def test_a_tiny_temperature_is_nearly_greedy_and_non_finite_logits_are_refused():
    logits = torch.tensor([[-3.0, -1.0, -2.0], [5.0, 7.0, 6.5]])
    assert pick_next(logits, temperature=1e-39).tolist() == [[1], [1]]  # no overflow into NaN
    # below GREEDY_BELOW float32 rounds the temperature to 0 (0 / 0 is NaN): greedy, drawing nothing
    generator = torch.Generator().manual_seed(0)
    for tiny in (GREEDY_BELOW / 2, 1e-46, 5e-324):
        assert pick_next(logits, temperature=tiny, generator=generator).tolist() == [[1], [1]]
    assert generator.initial_seed() == 0 and torch.equal(generator.get_state(),
                                                         torch.Generator().manual_seed(0).get_state())
    model, prompt = small_gpt(), torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, prompt, 8, temperature=1e-46), generate(model, prompt, 8, temperature=0))
    with pytest.raises(ValueError, match="finite logits"):
        pick_next(torch.tensor([[0.0, float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="finite logits"):
        pick_next(torch.tensor([[0.0, float("inf"), 1.0]]))
