"""The model trains through our Triton kernels (the interpreter on a CPU) exactly as it does
through the PyTorch reference, and the weights do not care which backend made them."""

from __future__ import annotations

import pytest
import torch

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.model import GPT
from gptforge.kernels import available_backends, use_backend

pytestmark = pytest.mark.skipif(
    "triton" not in available_backends("attention") or "triton" not in available_backends("layer_norm"),
    reason="the triton backends need CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)",
)
CONFIG = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32)  # head_dim 16


def train_losses(backends: dict[str, str], steps: int = 3) -> tuple[list[float], dict]:
    torch.manual_seed(0)
    model = GPT(CONFIG)
    # SGD, not Adam: the key bias's true gradient is zero (softmax ignores a shift shared by all
    # keys), and Adam would blow its rounding noise up to full-size, backend-dependent steps
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    data = torch.randint(0, CONFIG.vocab_size, (steps, 2, 17), generator=torch.Generator().manual_seed(1))
    losses = []
    with use_backend(**backends):
        for batch in data:
            _, loss = model(batch[:, :-1], batch[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.parametrize(
    "backends",
    [dict(attention="triton", layer_norm="torch"), dict(attention="torch", layer_norm="triton"),
     dict(attention="triton", layer_norm="triton")],
    ids=["attention", "layer_norm", "both"],
)
def test_training_through_triton_matches_torch(backends):
    reference, ref_state = train_losses(dict(attention="torch", layer_norm="torch"))
    ours, state = train_losses(backends)
    assert reference[-1] < reference[0]  # it did learn something
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(reference), rtol=1e-5, atol=1e-5)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_state_dicts_are_interchangeable_between_backends():
    _, state = train_losses(dict(attention="torch", layer_norm="torch"), steps=1)
    model = GPT(CONFIG).eval()
    model.load_state_dict(state)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 16))
    with use_backend(attention="torch", layer_norm="torch"):
        expected, _ = model(idx)
    with use_backend(attention="triton", layer_norm="triton"):
        got, _ = model(idx)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
