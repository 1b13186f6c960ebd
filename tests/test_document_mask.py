"""The document mask (--document_mask): documents found at the end-of-text token, attention
kept inside each and positions restarting at each, so a packed batch computes every document
as if it ran alone; training with it runs and resumes exactly; what cannot work is refused.

Attention's own parity with packed documents is tests/test_documents.py's; this file is the
model's and the training's side.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F

from gptforge.data import corpus
from gptforge.data.inputs import expand_inputs
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.documents import cu_seqlens_from_eot, document_positions
from gptforge.gpt.model import GPT, KVCache
from gptforge.gpt.tokenizer import GPT2_EOT_TOKEN, GPT2Tokenizer
from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.loop import Trainer, train
from gptforge.train.strategy import documents
from tests import helpers
from tests.conftest import SHARED_DATA
from tests.helpers import TINY, logs_and_evals

pytestmark = pytest.mark.usefixtures("one_thread")
quiet = functools.partial(train, log=lambda *_: None)
EOT = 9  # the end-of-text id of the small models below


def test_cu_seqlens_from_eot_tokens():
    x = torch.tensor([[1, 2, EOT, 3, 4, EOT],  # an eot at the row's end ends the row's last document
                      [EOT, 1, 2, 3, 4, 5],  # at the row's start: a document of one token, then the next
                      [1, EOT, EOT, EOT, 2, 3],  # consecutive eots: one-token documents
                      [1, 2, 3, 4, 5, 6]])  # none: the row is one document
    cu = cu_seqlens_from_eot(x, EOT)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 6, 7, 12, 14, 15, 16, 18, 24]
    assert cu_seqlens_from_eot(x[3:], EOT).tolist() == [0, 6]
    assert document_positions(cu, 4, 6).tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 1, 2, 3, 4],
                                                     [0, 1, 0, 0, 0, 1], [0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        cu_seqlens_from_eot(x.view(-1), EOT)


def tiny_gpt(**options) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=12, block_size=16, n_layer=2, n_head=2, n_embd=16, **options))


def packed_batch() -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randint(0, EOT, (3, 16))
    x[0, [3, 9, 10]] = EOT  # documents of 4, 6, 1 and 5 tokens
    x[1, 15] = EOT  # one document ending at the row's end
    x[2, 0] = EOT  # the end of a document cut by the window, then one of 15 tokens
    return x


@pytest.mark.parametrize("options", [{}, dict(rope=True), dict(rope=True, qk_norm=True)],
                         ids=["learned", "rope", "rope+qk_norm"])
def test_a_packed_batch_gives_each_document_its_own_losses(options):
    """The core property: every token's loss in a packed batch is its loss with its document alone."""
    model = tiny_gpt(**options).eval()
    x, y = packed_batch(), torch.randint(0, 12, (3, 16))
    cu = cu_seqlens_from_eot(x, EOT)
    logits, _ = model(x, cu_seqlens=cu)
    packed = F.cross_entropy(logits.view(-1, 12), y.view(-1), reduction="none")
    starts, ends = cu[:-1].tolist(), cu[1:].tolist()
    assert len(starts) == 7
    for a, b in zip(starts, ends, strict=True):
        alone, _ = model(x.view(-1)[a:b][None])
        want = F.cross_entropy(alone[0], y.view(-1)[a:b], reduction="none")
        torch.testing.assert_close(packed[a:b], want, rtol=1e-5, atol=1e-5)
    # without the mask the documents see each other: the losses differ after the first document
    unmasked = F.cross_entropy(model(x)[0].view(-1, 12), y.view(-1), reduction="none")
    assert not torch.allclose(unmasked[4:16], packed[4:16], atol=1e-4)
    torch.testing.assert_close(unmasked[16:32], packed[16:32])  # row 1 is one document: unchanged


def test_positions_restart_at_each_document():
    x = packed_batch()
    pos = document_positions(cu_seqlens_from_eot(x, EOT), 3, 16)
    assert pos[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 0, 1, 2, 3, 4]
    assert pos[1].tolist() == list(range(16)) and pos[2].tolist() == [0, *range(15)]
    rotary = tiny_gpt(rope=True).rotary
    cos, sin = rotary.at(pos)
    assert cos.shape == sin.shape == (3, 1, 16, 8)
    for row in range(3):
        for t in range(16):  # the same angles as the slice of an unpacked sequence at that position
            want_cos, want_sin = rotary(int(pos[row, t]), 1)
            assert torch.equal(cos[row, 0, t], want_cos[0]) and torch.equal(sin[row, 0, t], want_sin[0])


def test_checkpointed_blocks_give_the_same_loss_and_gradients_with_documents():
    x, y = packed_batch(), torch.randint(0, 12, (3, 16))
    cu = cu_seqlens_from_eot(x, EOT)
    results = []
    for mode in ("none", "full"):
        model = tiny_gpt(rope=True, dropout=0.1)
        model.set_activation_checkpointing(mode)
        torch.manual_seed(2)
        loss = model(x, y, cu_seqlens=cu)[1]
        loss.backward()
        results.append((loss, [p.grad for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb)


def test_compiled_model_takes_any_document_count_without_recompiling_each_step():
    """The count of documents changes from batch to batch; ``documents`` marks it dynamic, so
    the model is one graph for every count (unmarked, the second count would recompile it)."""
    model = tiny_gpt(rope=True)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=count)
    counts_after = []
    for i in range(4):
        x, y = packed_batch(), torch.randint(0, 12, (3, 16))
        x[0, i + 11] = EOT  # 7 documents and then 8: other lengths of cu_seqlens
        cu = cu_seqlens_from_eot(x, EOT)
        loss = compiled(x, y, **documents(cu))[1]
        torch.testing.assert_close(loss, model(x, y, cu_seqlens=cu)[1])
        counts_after.append(len(graphs))
    assert counts_after == [1, 1, 1, 1]  # no graph break, no recompile


def test_no_documents_with_a_kv_cache():
    model = tiny_gpt()
    x = packed_batch()
    with pytest.raises(ValueError, match="not with a KV cache"):
        model(x, cu_seqlens=cu_seqlens_from_eot(x, EOT), cache=KVCache(model.config))


# --- training -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lines_corpus(tmp_path_factory):
    """Tiny Shakespeare's first 400 paragraphs as jsonl documents, in GPT-2 tokens with an eot after each."""
    text = SHARED_DATA / "tinyshakespeare.txt"
    if not text.is_file() or not (SHARED_DATA / "tiktoken_cache").is_dir():
        pytest.skip(f"Tiny Shakespeare or the GPT-2 BPE files not found in {SHARED_DATA}")
    root = tmp_path_factory.mktemp("docs")
    paragraphs = [p for p in text.read_text().split("\n\n") if p.strip()][:400]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    folder = root / "data" / "lines"
    corpus.prepare_corpus(folder, expand_inputs(str(root / "docs.jsonl")), GPT2Tokenizer().to_meta(),
                          val_fraction=0.1, log=lambda *_: None)
    return folder


def corpus_config(folder, out, **overrides) -> TrainConfig:
    base = dict(TINY, dataset=folder.name, n_embd=16, max_iters=6, lr_decay_iters=6, eval_interval=3,
                dropout=0.1, document_mask=True)
    return helpers.config(folder.parent, out, base=base, **overrides)


def test_training_with_the_document_mask_resumes_exactly(lines_corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    quiet(corpus_config(lines_corpus, full))
    quiet(corpus_config(lines_corpus, part, max_iters=3))
    quiet(corpus_config(lines_corpus, part, resume=True))
    (logs, evals), (want, want_evals) = logs_and_evals(part), logs_and_evals(full)
    assert len(want) == 6 and [r["loss"] for r in logs] == [r["loss"] for r in want]  # bit for bit
    assert evals[-1]["val_loss"] == want_evals[-1]["val_loss"]
    # the batches do hold several documents each, and the mask changes what the model computes
    trainer = Trainer(corpus_config(lines_corpus, tmp_path / "look", max_iters=0), log=lambda *_: None)
    try:
        x, y, cu = trainer._batch(trainer.sampler, 0, 0)
        assert trainer.eot == GPT2_EOT_TOKEN and len(cu) > x.shape[0] + 1
        with torch.no_grad():
            assert trainer.strategy.eval_loss(x, y, cu) != trainer.strategy.eval_loss(x, y)
    finally:
        trainer.close()


def test_resume_keeps_the_document_mask(lines_corpus, tmp_path):
    out = tmp_path / "run"
    quiet(corpus_config(lines_corpus, out, max_iters=1, eval_interval=1))
    cfg = corpus_config(lines_corpus, out, max_iters=2, document_mask=False, resume=True)
    cfg.explicit = frozenset({"max_iters", "document_mask"})  # as the command line would record them
    with pytest.raises(ConfigError, match=r"document_mask True -> False \(what the model attends to\)"):
        quiet(cfg)


def test_what_cannot_work_is_refused_in_one_line(data_dir, tmp_path):
    with pytest.raises(ConfigError) as err:  # the character tokenizer has no end-of-text token
        quiet(helpers.config(data_dir, tmp_path / "a", document_mask=True, max_iters=1))
    message = str(err.value)
    assert "\n" not in message and "--document_mask=true" in message and "char tokenizer" in message
    assert "--document_mask=false" in message
    with pytest.raises(ConfigError, match=r"^--document_mask=true masks attention, and the bigram model has none") \
            as err:
        TrainConfig(model="bigram", document_mask=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="document_mask expects bool"):
        from gptforge.train.config import load_config

        load_config(overrides={"document_mask": "maybe"})
