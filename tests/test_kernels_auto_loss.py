"""``auto``'s choice of the loss backend by size: the materialised loss where all the fp32
logits fit in one chunk of the ``chunked`` backend (no memory to save, and faster), ``chunked``
beyond; a named backend is always the one that runs."""

from __future__ import annotations

import torch

from gptforge import kernels
from gptforge.kernels import chunked_cross_entropy as chunked
from gptforge.kernels import dispatch
from gptforge.kernels.dispatch import resolve

KWARGS = dict(ignore_index=-100, reduction="mean")


def loss_args(rows: int, vocab: int, device: str = "meta") -> tuple:
    """Shapes only: auto's choice reads no data, so meta tensors stand in for large ones."""
    return (torch.empty(rows, 8, device=device), torch.empty(vocab, 8, device=device),
            torch.zeros(rows, dtype=torch.long, device=device))


def chosen(args: tuple, backend: str | None = None) -> str:
    return resolve("linear_cross_entropy", "linear_cross_entropy", backend, args, KWARGS).__module__


def test_auto_materialises_small_logits_and_chunks_large_ones():
    vocab = 1000
    fits = chunked.CHUNK_BYTES // (4 * vocab)  # rows whose fp32 logits fill exactly one chunk
    assert chosen(loss_args(fits, vocab)) == "gptforge.kernels.reference"
    assert chosen(loss_args(fits + 1, vocab)) == "gptforge.kernels.chunked_cross_entropy"


def test_a_named_backend_runs_whatever_the_size():
    assert chosen(loss_args(4, 65), "chunked") == "gptforge.kernels.chunked_cross_entropy"
    assert chosen(loss_args(4, 65), "torch") == "gptforge.kernels.reference"


def test_a_size_dependent_answer_is_not_memoised():
    dispatch._selection_changed()
    chosen(loss_args(4, 65))
    assert not any(key[0] == "linear_cross_entropy" for key in dispatch._resolved)


def test_a_passed_backend_runs_when_no_later_one_can(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO_ORDER, "linear_cross_entropy", {"cpu": ("chunked",)})
    assert chosen(loss_args(4, 65)) == "gptforge.kernels.chunked_cross_entropy"


def test_auto_and_chunked_agree_on_loss_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(2, 24, 16, requires_grad=True)
    weight = (0.1 * torch.randn(65, 16)).requires_grad_()
    targets = torch.randint(0, 65, (2, 24))
    targets[0, :5] = -100
    results = []
    for backend in (None, "chunked"):
        loss = kernels.linear_cross_entropy(hidden, weight, targets, backend=backend)
        results.append((loss, *torch.autograd.grad(loss, (hidden, weight))))
    for auto, named in zip(*results, strict=True):
        torch.testing.assert_close(auto, named, rtol=1e-5, atol=1e-6)
