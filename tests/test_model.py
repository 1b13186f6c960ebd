"""The model: causality, shapes, parameter and FLOP counts, optimizer groups, generation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.generate import filter_logits, generate
from gptforge.gpt.io import load_model, save_model
from gptforge.gpt.model import GPT, BigramLanguageModel, build_model
from gptforge.kernels import use_backend

SMALL = dict(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=32)


def small_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **overrides}))


@pytest.mark.parametrize("backend", ["torch", "sdpa"])
def test_changing_a_later_token_never_changes_earlier_logits(backend):
    model = small_gpt().eval()
    idx = torch.randint(0, 50, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    with use_backend(attention=backend):
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_backends_give_the_same_logits_and_gradients():
    model = small_gpt()
    idx = torch.randint(0, 50, (3, 32))
    results = {}
    for backend in ("torch", "sdpa"):
        model.zero_grad()
        with use_backend(attention=backend):
            _, loss = model(idx, idx)
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(results["torch"][0], results["sdpa"][0], rtol=1e-5, atol=1e-6)
    for g_torch, g_sdpa in zip(results["torch"][1], results["sdpa"][1], strict=True):
        torch.testing.assert_close(g_torch, g_sdpa, rtol=1e-4, atol=1e-6)


def test_initial_loss_is_near_uniform():
    model = small_gpt()
    idx, targets = torch.randint(0, 50, (4, 32)), torch.randint(0, 50, (4, 32))
    _, loss = model(idx, targets)
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.3


def test_parameter_count_matches_the_formula():
    c = GPTConfig(**SMALL)
    model = GPT(c)
    per_block = 12 * c.n_embd**2 + 13 * c.n_embd  # weights: qkv 3C², proj C², mlp 8C²; biases 9C; 2 LNs 4C
    expected = c.vocab_size * c.n_embd + c.n_layer * per_block + 2 * c.n_embd  # tied wte/lm_head, ln_f
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + c.block_size * c.n_embd
    assert model.flops_per_token(32) == 6 * expected + 12 * c.n_layer * c.n_embd * 32


def test_gpt2_small_has_124m_parameters():
    config = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, as published


def test_weight_tying_and_decay_groups():
    model = small_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    decay, no_decay = model.optimizer_groups(0.1)
    decay_ids = {id(p) for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert id(model.transformer.wte.weight) not in decay_ids and id(model.transformer.wpe.weight) not in decay_ids
    assert id(model.transformer.h[0].attn.c_attn.weight) in decay_ids
    assert id(model.transformer.h[0].ln_1.weight) not in decay_ids
    all_ids = decay_ids | {id(p) for p in no_decay["params"]}
    assert all_ids == {id(p) for p in model.parameters()}  # every parameter exactly once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_scaled_residual_init():
    model = GPT(GPTConfig(**{**SMALL, "n_layer": 8, "n_embd": 128}))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.001
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="exceeds block_size 32"):
        small_gpt()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(model="rnn"), "model must be one of"),
    ],
)
def test_bad_model_config_is_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **overrides})


def test_bigram_baseline():
    model = build_model(GPTConfig(model="bigram", vocab_size=50))
    assert isinstance(model, BigramLanguageModel)
    idx = torch.randint(0, 50, (2, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 50) and loss.item() > 0
    out = generate(model, idx[:, :1], 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6)


def test_sampling_is_reproducible_under_a_seed():
    model = small_gpt()
    prompt = torch.randint(0, 50, (2, 5))
    runs = [generate(model, prompt, 40, top_k=10, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = generate(model, prompt, 40, top_k=10, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)
    assert torch.equal(runs[0][:, :5], prompt)  # the prompt is kept
    assert runs[0].shape == (2, 45)  # longer than block_size minus prompt: the context slides


def test_greedy_is_argmax():
    model = small_gpt().eval()
    prompt = torch.randint(0, 50, (1, 4))
    out = generate(model, prompt, 1, temperature=0.0)
    logits, _ = model(prompt)
    assert out[0, -1] == logits[0, -1].argmax()


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus: 0.5 + 0.25 reaches 0.7, so the smallest set is the first two tokens
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()
    shuffled = logits[:, [2, 0, 3, 1]]
    assert torch.isinf(filter_logits(shuffled, top_p=0.7)).tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError, match="top_p must be in"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        filter_logits(logits, top_k=0)


def test_save_and_load_round_trip(tmp_path):
    model = small_gpt(bias=False)
    save_model(model, tmp_path, {"name": "char", "vocab_size": 50, "chars": "x"})
    loaded, info = load_model(tmp_path)
    assert loaded.config == model.config and info["tokenizer"]["name"] == "char"
    idx = torch.randint(0, 50, (1, 10))
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # tying survives the round trip


COMPILE_SCRIPT = """
import torch
from gptforge import kernels
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.model import GPT
torch.manual_seed(0)
model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32))
idx = torch.randint(0, 50, (2, 16))
for choice in ({{}}, {{"attention": "torch"}}, {{"attention": "sdpa"}}):
    with kernels.use_backend(**choice):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        loss = compiled(idx, idx)[1]
        loss.backward()
        torch.testing.assert_close(loss, model(idx, idx)[1])
        torch._dynamo.reset()
print("ok")
"""


def test_model_compiles_without_graph_breaks_in_a_fresh_process():
    """fullgraph=True fails on any graph break: the dispatch (backend choice, env var, module
    lookup) must be traceable, even on the first kernel call of the process."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT.format()], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_dropout_zero_builds_nothing_to_run_and_set_dropout_turns_it_on():
    model = small_gpt(dropout=0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    idx = torch.randint(0, 50, (2, 8))
    assert torch.equal(model.train()(idx)[0], model(idx)[0])  # no randomness in training mode
    model.set_dropout(0.5)
    assert model.config.dropout == 0.5
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 1 + 2 * SMALL["n_layer"]
    assert not torch.equal(model(idx)[0], model(idx)[0])  # dropout now acts in training mode
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    model.set_dropout(0.3)  # in eval mode: the new modules follow it
    assert not model.training and all(not m.training for m in model.modules())
    assert torch.equal(model(idx)[0], model(idx)[0])
    with pytest.raises(ValueError, match="dropout must be in"):
        model.set_dropout(1.5)
