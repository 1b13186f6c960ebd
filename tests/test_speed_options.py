"""The options that make training fast: the speedruns' architecture options (rotary positions,
QK-norm, ReLU², an untied head, zero-initialised projections), Muon, fused AdamW and the
compiled model, bf16 on CPUs with AMX, and commands that answer --help without importing torch."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.hf_export import export_hf
from gptforge.gpt.model import GPT, BigramLanguageModel, KVCache, Rotary, rotate
from gptforge.gpt.nanogpt_import import load_nanogpt
from gptforge.train import device as train_device
from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.loop import Trainer, train
from gptforge.train.optim import Optimizers, build_optimizer
from gptforge.train.strategy import Strategy
from tests import helpers
from tests.helpers import REPO, TINY, read_metrics

SMALL = dict(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=32)
OPTIONS = [dict(rope=True), dict(qk_norm=True), dict(activation="relu2"), dict(activation="gelu"),
           dict(tie_embeddings=False), dict(rope=True, qk_norm=True, activation="gelu", zero_init_proj=True)]
config = functools.partial(helpers.config, base={**TINY, "gradient_accumulation_steps": 1, "batch_size": 8})


def small_gpt(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**SMALL, **options))


# --- architecture options ---


def test_rotate_turns_each_channel_pair_by_its_angle():
    rotary = Rotary(head_dim=8, block_size=16)
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    cos, sin = rotary(0, 16)
    positions = torch.arange(16, dtype=torch.float64)[:, None]
    angles = positions * 10000.0 ** -(torch.arange(0, 8, 2, dtype=torch.float64) / 8)  # (T, D/2)
    x1, x2 = x[..., :4], x[..., 4:]
    expected = torch.cat([x1 * angles.cos() - x2 * angles.sin(), x2 * angles.cos() + x1 * angles.sin()], dim=-1)
    torch.testing.assert_close(rotate(x, cos.double(), sin.double()), expected, rtol=1e-6, atol=1e-6)
    # a query-key product depends on the distance only: shifting both positions changes nothing
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()
    near = rotate(q, cos[5], sin[5]) @ rotate(k, cos[2], sin[2])
    far = rotate(q, cos[12], sin[12]) @ rotate(k, cos[9], sin[9])
    torch.testing.assert_close(near, far, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options_keep_the_model_causal_and_the_cache_exact(options):
    model = small_gpt(**options).eval()
    idx = torch.randint(0, 50, (2, 20))
    full, _ = model(idx)
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 50
    torch.testing.assert_close(model(changed)[0][:, :12], full[:, :12], rtol=0, atol=0)
    cache = KVCache(model.config)
    pieces = [model(idx[:, :7], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_each_option_changes_what_it_says():
    plain = small_gpt()
    assert "wpe" in plain.transformer and plain.lm_head.weight is plain.transformer.wte.weight
    rope = small_gpt(rope=True)
    assert "wpe" not in rope.transformer and "rotary.cos" not in rope.state_dict()  # angles are no weights
    assert rope.num_params() == sum(p.numel() for p in rope.parameters())
    untied = small_gpt(tie_embeddings=False, zero_init_proj=True)
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    zeroed = [n for n, p in untied.named_parameters() if n.endswith("weight") and not p.any()]
    assert sorted(zeroed) == sorted([f"transformer.h.{i}.{m}.c_proj.weight" for i in range(2) for m in ("attn", "mlp")]
                                    + ["lm_head.weight"])
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(small_gpt(activation="relu2").transformer.h[0].mlp.act(x), torch.relu(x) ** 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        GPTConfig(activation="swish")
    with pytest.raises(ValueError, match="rope needs an even head size"):
        GPTConfig(n_embd=30, n_head=2, rope=True)


def test_only_gpt2s_architecture_exports_to_its_layout(tmp_path):
    with pytest.raises(ValueError, match="only GPT-2's architecture exports.*rope=True"):
        export_hf(small_gpt(rope=True), tmp_path / "hf")
    with pytest.raises(ValueError, match="only GPT-2's architecture exports.*activation=relu2"):
        export_hf(small_gpt(activation="relu2"), tmp_path / "hf")


def test_nanogpt_checkpoints_load_with_the_exact_gelu(tmp_path):
    model = small_gpt(activation="gelu", bias=False)
    args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=50, dropout=0.0)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save(dict(model=state, model_args=args), tmp_path / "ckpt.pt")
    loaded, _ = load_nanogpt(tmp_path / "ckpt.pt")
    assert loaded.config.activation == "gelu"
    idx = torch.randint(0, 50, (1, 16))
    torch.testing.assert_close(loaded.eval()(idx)[0], model.eval()(idx)[0])


# --- Muon ---


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = small_gpt(tie_embeddings=False)
    opt = build_optimizer(model, "muon", lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    assert isinstance(opt, Optimizers)
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    assert muon == {id(p) for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2}
    assert muon.isdisjoint(adamw) and muon | adamw == {id(p) for p in model.parameters()}
    assert id(model.lm_head.weight) in adamw and id(model.transformer.wte.weight) in adamw
    with pytest.raises(ValueError, match="needs a model with Transformer blocks"):
        build_optimizer(BigramLanguageModel(GPTConfig(model="bigram")), "muon", 1e-2, (0.9, 0.99), 0.1)


def test_muon_resumes_exactly(data_dir, tmp_path):
    common = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, optimizer="muon", rope=True, qk_norm=True)
    full, part = tmp_path / "full", tmp_path / "part"
    train(config(data_dir, full, **common), log=lambda *_: None)
    train(config(data_dir, part, **{**common, "max_iters": 4}), log=lambda *_: None)
    train(config(data_dir, part, **common, resume=True), log=lambda *_: None)
    losses = [[r["loss"] for r in read_metrics(out) if "loss" in r] for out in (full, part)]
    assert len(losses[0]) == 8 and losses[0] == losses[1]  # bit for bit: momentum buffers included


def test_resume_with_another_optimizer_is_refused(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=2, eval_interval=2), log=lambda *_: None)
    with pytest.raises(ConfigError, match="optimizer"):
        Trainer(config(data_dir, tmp_path, max_iters=4, eval_interval=2, optimizer="muon", resume=True),
                log=lambda *_: None)


# --- the compiled step ---


def test_compiled_training_compiles_once_and_matches_eager(data_dir, tmp_path, monkeypatch):
    """Under --compile the training forward is one graph, whatever the schedule and the
    evaluations in between do (on the CPU they run the plain model: no second compile), and it
    trains as the eager model does."""
    from torch._dynamo.testing import CompileCounter

    losses = {}
    for compiled in (False, True):
        counter = CompileCounter()  # counts the graphs it is given, then runs them eagerly
        monkeypatch.setattr("gptforge.train.strategy.torch.compile", functools.partial(torch.compile, backend=counter))
        torch._dynamo.reset()
        out = tmp_path / f"compile_{compiled}"
        train(config(data_dir, out, max_iters=6, warmup_iters=3, eval_interval=2, compile=compiled),
              log=lambda *_: None)
        losses[compiled] = [r["loss"] for r in read_metrics(out) if "loss" in r]
        assert counter.frame_count == (1 if compiled else 0)
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


# --- precision and start-up ---


@pytest.mark.parametrize("amx, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_the_cpu_is_bf16_only_with_amx(monkeypatch, amx, expected):
    monkeypatch.setattr(train_device, "cpu_has_amx", lambda: amx)
    assert train_device.pick_dtype("auto", torch.device("cpu")) == expected
    assert train_device.pick_dtype("fp32", torch.device("cpu")) == torch.float32


def test_cpu_half_attention_with_gradients_matches_fp32():
    """On the CPU a bf16 attention that will be differentiated runs in fp32 (much faster there):
    bf16 in, bf16 out, and the same values as the fp32 computation rounded to bf16."""
    from gptforge.kernels import attention, use_backend

    half = [torch.randn(2, 2, 16, 8).bfloat16().requires_grad_() for _ in range(3)]
    with use_backend(attention="sdpa"):
        out = attention(*half, causal=True)
        with torch.no_grad():  # no gradients: the half-precision kernel itself
            native = attention(*half, causal=True)
        ref = attention(*(t.detach().float() for t in half), causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(native.float(), ref, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in half)


def test_strategy_builds_the_configured_optimizer_fused_on_the_cpu():
    for name in ("adamw", "muon"):
        strategy = Strategy(TrainConfig(device="cpu", dtype="fp32", optimizer=name))
        strategy.setup(small_gpt())
        adamw = strategy.optimizer.optimizers["adamw"] if name == "muon" else strategy.optimizer
        assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"]
        assert isinstance(strategy.optimizer, Optimizers) == (name == "muon")


@pytest.mark.parametrize("module", ["gptforge.train", "gptforge.gpt.sample"])
def test_help_answers_without_importing_torch(module):
    code = (f"import runpy, sys; sys.argv = ['{module}', '--help']\n"
            f"try:\n    runpy.run_module('{module}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in proc.stdout.lower()
