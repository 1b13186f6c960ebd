"""Weights from elsewhere: Hugging Face GPT-2 directories (in and out), nanoGPT checkpoints,
the GPT-2 names, and sampling from any of them. No download: every model is made here."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.hf_export import export_hf
from gptforge.gpt.model import GPT
from gptforge.gpt.nanogpt_import import load_nanogpt
from gptforge.gpt.pretrained import load_pretrained
from gptforge.gpt.pretrained import main as pretrained_main
from gptforge.gpt.sample import main as sample_main
from gptforge.train import checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is not installed")

HF_SHAPE = dict(vocab_size=100, n_positions=32, n_embd=128, n_layer=2, n_head=2)  # 64-wide heads, as GPT-2


def random_hf_model(**overrides) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(**{**HF_SHAPE, **overrides}, bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and LayerNorms start at 0 and 1: make every weight count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf") / "gpt2"
    random_hf_model().save_pretrained(directory, safe_serialization=True)
    return directory


def hf_logits(model: transformers.GPT2LMHeadModel, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


def test_a_hugging_face_gpt2_gives_the_same_logits(hf_dir):
    model, tokenizer_meta = load_pretrained(hf_dir)
    assert model.config == GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=128, dropout=0.1)
    assert tokenizer_meta == {"name": "gpt2", "vocab_size": 50257, "encoding": "gpt2"}
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())  # ready to fine-tune
    idx = torch.randint(0, 100, (2, 32))
    reference = hf_logits(transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval(), idx)
    torch.testing.assert_close(our_logits(model, idx), reference, rtol=1e-4, atol=1e-4)


def test_other_gpt2_file_layouts_load_too(hf_dir, tmp_path):
    """OpenAI's own files: pytorch_model.bin without the 'transformer.' prefix and with the
    causal-mask buffers; and a bare model.safetensors whose shape is read from its tensors."""
    expected = load_pretrained(hf_dir)[0]
    idx = torch.randint(0, 100, (1, 20))
    state = safetensors.torch.load_file(hf_dir / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state |= {f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 32, 32)) for i in range(2)}
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(hf_dir / "config.json", tmp_path / "bin")
    bare = tmp_path / "bare" / "weights.safetensors"
    bare.parent.mkdir()
    shutil.copy(hf_dir / "model.safetensors", bare)
    for spec in (tmp_path / "bin", tmp_path / "bin" / "pytorch_model.bin", bare):
        model, _ = load_pretrained(spec)
        torch.testing.assert_close(our_logits(model, idx), our_logits(expected, idx), rtol=0, atol=0)


def test_export_to_hugging_face_gives_the_same_logits(tmp_path):
    # no biases: exported as zero biases, which compute the same; either GELU has a GPT-2 name
    for bias, activation in ((True, "gelu_tanh"), (False, "gelu_tanh"), (False, "gelu")):
        torch.manual_seed(1)
        model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, bias=bias,
                              activation=activation)).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        directory = export_hf(model, tmp_path / f"bias{bias}_{activation}")
        hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        idx = torch.randint(0, 65, (2, 32))
        torch.testing.assert_close(hf_logits(hf, idx), our_logits(model, idx), rtol=1e-4, atol=1e-4)
        again, _ = load_pretrained(directory)  # and back
        assert again.config.activation == activation
        torch.testing.assert_close(our_logits(again, idx), our_logits(model, idx), rtol=0, atol=0)


def test_export_cli_and_sampling_from_the_export(tmp_path, capsys):
    torch.manual_seed(2)
    model = GPT(GPTConfig(vocab_size=3, block_size=16, n_layer=1, n_head=2, n_embd=32))
    chars = {"name": "char", "vocab_size": 3, "chars": "ab\n"}
    checkpoint.save_checkpoint(tmp_path / "run", 10, model, None, None, {}, chars)  # a training run's checkpoint
    assert pretrained_main(["export", "--out_dir", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["gpt_tokenizer"] == chars
    assert load_pretrained(tmp_path / "hf")[1] == chars  # the char tokenizer travels with the export
    capsys.readouterr()
    common = ["--init_from", str(tmp_path / "hf"), "--prompt=ab", "--num_samples=1", "--max_new_tokens=12"]
    outputs = []
    for flags in (["--kv_cache=true", "--temperature=0"], ["--kv_cache=false", "--temperature=0"],
                  ["--stop=b", "--seed=3"]):
        assert sample_main([*common, *flags]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("ab") and outputs[0].endswith("\n---------------\n")
    stopped = outputs[2].removesuffix("\n---------------\n")[2:]
    assert stopped.count("b") <= 1 and (stopped.endswith("b") or len(stopped) == 12)
    assert pretrained_main(["export", "--out_dir", str(tmp_path / "nothing"), "--to", str(tmp_path / "x")]) == 2
    # an earlier export is not replaced silently, a file is not a folder, and --overwrite replaces
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    again = ["export", "--out_dir", str(tmp_path / "run"), "--to", str(tmp_path / "hf")]
    assert pretrained_main(again) == 2 and "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before
    (tmp_path / "file").write_text("x")
    assert pretrained_main([*again[:-1], str(tmp_path / "file")]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"
    assert pretrained_main([*again, "--overwrite"]) == 0


def test_nanogpt_checkpoint_import(tmp_path):
    torch.manual_seed(3)
    # nanoGPT's MLP computes the exact GELU
    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False, activation="gelu")
    model = GPT(config).eval()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # saved from a torch.compile'd model
    state |= {f"_orig_mod.transformer.h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)}
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=65, dropout=0.0)
    ckpt = dict(model=state, model_args=model_args, optimizer={"state": {}, "param_groups": []}, iter_num=100,
                best_val_loss=torch.tensor(1.5), config=dict(dataset="shakespeare_char", batch_size=12))
    torch.save(ckpt, tmp_path / "ckpt.pt")
    chars = "".join(chr(32 + i) for i in range(65))
    with open(tmp_path / "meta.pkl", "wb") as f:  # nanoGPT's character-level vocabulary
        pickle.dump({"vocab_size": 65, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    for spec in (tmp_path, tmp_path / "ckpt.pt"):
        loaded, tokenizer_meta = load_pretrained(spec)
        assert loaded.config == config and tokenizer_meta == {"name": "char", "vocab_size": 65, "chars": chars}
        idx = torch.randint(0, 65, (2, 32))
        torch.testing.assert_close(our_logits(loaded, idx), our_logits(model, idx), rtol=0, atol=0)
    loaded, _ = load_pretrained(tmp_path, dropout=0.1, block_size=16)  # for fine-tuning
    assert loaded.config.dropout == 0.1 and loaded.config.block_size == 16
    assert loaded.transformer.wpe.weight.shape == (16, 32)
    torch.save({"weights": state}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a nanoGPT checkpoint"):
        load_nanogpt(tmp_path / "other.pt")


def test_gpt2_names_resolve_to_local_copies_or_say_where_to_get_them(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("GPT_MODELS_DIR", str(hf_dir.parent))  # holds a (tiny) folder named gpt2
    assert load_pretrained("gpt2")[0].config.n_embd == 128
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "abc123"
    shutil.copytree(hf_dir, snapshot)
    monkeypatch.delenv("GPT_MODELS_DIR")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert load_pretrained("gpt2")[0].config.n_layer == 2  # found in the Hugging Face cache
    with pytest.raises(FileNotFoundError, match=r"config\.json and model\.safetensors from .*openai-community/gpt2-xl"):
        load_pretrained("gpt2-xl")


def test_clear_errors_for_missing_or_unsupported_files(hf_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file or folder"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no model found"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "no_weights").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match="no weights: expected model.safetensors"):
        load_pretrained(tmp_path / "no_weights")
    other = tmp_path / "gelu"
    shutil.copytree(hf_dir, other)
    hf_config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**hf_config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="activation_function='relu' is not supported"):
        load_pretrained(other)
