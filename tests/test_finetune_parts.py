"""The fine-tuning stages' parts, without a training run: the chat template in every tokenizer,
the loss mask, packed against one-at-a-time examples, the tasks, and the policy-gradient loss
worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gptforge.gpt.chat import SPECIAL_TOKENS, ChatTokenizer
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.model import GPT
from gptforge.gpt.tokenizer import CharTokenizer, GPT2Tokenizer, tokenizer_from_meta
from gptforge.train.finetune.examples import IGNORE, Example, ExampleBatches, encode_example
from gptforge.train.finetune.ppo import group_advantages, policy_loss
from gptforge.train.finetune.tasks import TASK_LIST, get_task

CONVERSATION = [dict(role="system", content="Answer briefly."), dict(role="user", content="reverse stone"),
                dict(role="assistant", content="enots"), dict(role="user", content="sort it"),
                dict(role="assistant", content="enost")]
TEXT = "".join(m["content"] for m in CONVERSATION) + "".join(SPECIAL_TOKENS) + " ab"


def trained_tokenizers(tmp_path_factory) -> list:
    """SentencePiece and byte-level BPE models trained on a few lines, as a user's corpus would give."""
    from gptforge.gpt.tokenizer_training import train_tokenizer

    documents = ["reverse stone enots sort it enost Answer briefly. " * 3] * 200
    found = []
    for kind in ("sentencepiece", "bpe"):
        found.append(train_tokenizer(documents, kind, 300, tmp_path_factory.mktemp(kind)))
    return found


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory) -> list:
    bases = [CharTokenizer.from_text(TEXT), GPT2Tokenizer()]
    try:
        bases += trained_tokenizers(tmp_path_factory)
    except (ImportError, TypeError) as err:  # pragma: no cover - the trainer's signature is the contract here
        pytest.fail(f"cannot train the tokenizers: {err}")
    return [ChatTokenizer(base) for base in bases]


def test_chat_template_round_trips_through_every_tokenizer(tokenizers):
    for tok in tokenizers:
        ids, trained = tok.encode_conversation(CONVERSATION)
        assert tok.parse_conversation(ids) == CONVERSATION, tok
        assert [tok.special_text.get(i) for i in ids if i >= tok.base.vocab_size][:3] == \
            ["<|system|>", "<|end|>", "<|user|>"]
        # trained: the assistant's content and its end, nothing else
        assert tok.base.decode([i for i, t in zip(ids, trained, strict=True) if t and i != tok.end_id]) == \
            "enotsenost"
        assert sum(trained[i] for i, t in enumerate(ids) if t == tok.end_id) == 2
        # the meta round-trips, and the special ids sit above the base vocabulary
        again = tokenizer_from_meta(tok.to_meta())
        assert again.encode_conversation(CONVERSATION) == (ids, trained)
        assert sorted(tok.special.values()) == list(range(tok.base.vocab_size, tok.vocab_size))


def test_text_never_produces_a_special_token(tokenizers):
    for tok in tokenizers:
        for token in SPECIAL_TOKENS:
            ids = tok.encode(f"a {token} b{token}")
            assert all(i < tok.base.vocab_size for i in ids), (tok, token)
            assert token in tok.decode(ids)  # it stays text
        assert tok.decode(tok.encode_conversation(CONVERSATION)[0]).count("<|end|>") == 5


def tiny_gpt(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=48, bias=False))


def examples(tok: ChatTokenizer) -> list[Example]:
    words = ["stone", "ab", "river", "quiet", "xyz"]
    return [encode_example(tok, [dict(role="user", content=f"reverse {w}"), dict(role="assistant", content=w[::-1])],
                           48, f"example {i}") for i, w in enumerate(words)]


def test_a_prompt_tokens_target_changes_neither_loss_nor_gradients():
    tok = ChatTokenizer(CharTokenizer.from_text("reverse stonabiqutxyz"))
    exs = examples(tok)
    batches = ExampleBatches(exs, batch_size=2, block_size=48, seed=3)
    x, y, cu = batches.batch(0)
    # the same rows with every target kept: what training on the whole conversation would read
    unmasked = [Example(e.ids, np.ones_like(e.trained)) for e in exs]
    x_all, y_all, _ = ExampleBatches(unmasked, batch_size=2, block_size=48, seed=3).batch(0)
    assert torch.equal(x, x_all)
    prompt = (y == IGNORE) & (y_all != IGNORE)  # a prompt token's target (padding is IGNORE in both)
    assert torch.equal(y[~prompt], y_all[~prompt])
    # exactly the responses are trained: each word's letters and its <|end|>
    words = ["stone", "ab", "river", "quiet", "xyz"]
    rows = batches.step_rows(0)[:2]
    assert int((y != IGNORE).sum()) == sum(len(words[i]) + 1 for row in rows for i in row) and prompt.any()

    def ours() -> tuple[torch.Tensor, list[torch.Tensor]]:  # the fused loss of the masked targets
        model = tiny_gpt(tok.vocab_size)
        _, loss = model(x, y, cu_seqlens=cu)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def response_only(prompt_labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The responses' mean cross-entropy from the full logits, the prompt targets set to
        ``prompt_labels`` and weighted by 0."""
        model = tiny_gpt(tok.vocab_size)
        logits, _ = model(x, cu_seqlens=cu)
        targets = torch.where(prompt, prompt_labels, y_all).clamp(min=0)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        weight = (y != IGNORE).flatten().float()
        loss = (per_token * weight).sum() / weight.sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = ours()
    for labels in (y_all, torch.randint_like(y, tok.vocab_size), torch.zeros_like(y)):
        want, want_grads = response_only(labels)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        for got, expected in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_packed_examples_give_the_losses_of_each_example_alone():
    tok = ChatTokenizer(CharTokenizer.from_text("reverse stonabiqutxyz"))
    exs = examples(tok)
    packed = ExampleBatches(exs, batch_size=2, block_size=48, seed=1, packing=True)
    rows = packed.step_rows(0)[:2]
    assert max(len(r) for r in rows) > 1  # several examples share a row
    x, y, cu = packed.batch(0)
    model = tiny_gpt(tok.vocab_size).eval()
    logits, _ = model(x, cu_seqlens=cu)
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE, reduction="none")
    per_token = per_token.view_as(y)
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            e = exs[i]
            n = len(e) - 1
            alone, _ = model(torch.from_numpy(e.ids[:-1])[None])
            target = torch.from_numpy(np.where(e.trained[1:], e.ids[1:], IGNORE))
            want = F.cross_entropy(alone[0].float(), target, ignore_index=IGNORE, reduction="none")
            torch.testing.assert_close(per_token[r, pos : pos + n], want, rtol=1e-4, atol=1e-5)
            pos += n
    # padded: one example a row, the same mean over the same examples' response tokens
    padded = ExampleBatches([exs[i] for row in rows for i in row], batch_size=sum(map(len, rows)), block_size=48,
                            packing=False)
    padded.step_rows = lambda step: [[i] for i in range(len(padded.examples))]
    px, py, pcu = padded.batch(0)
    assert pcu is None
    _, packed_loss = model(x, y, cu_seqlens=cu)
    _, padded_loss = model(px, py)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-5)


def test_packing_fills_rows_and_a_step_is_a_function_of_the_step():
    tok = ChatTokenizer(CharTokenizer.from_text("reverse stonabiqutxyz"))
    batches = ExampleBatches(examples(tok), batch_size=3, block_size=48, accum_steps=2, seed=5, world_size=2)
    rows = batches.step_rows(7)
    assert len(rows) == 2 * 2 * 3 and rows == batches.step_rows(7) and rows != batches.step_rows(8)
    assert all(sum(batches.lengths[i] for i in row) <= 48 for row in rows)
    # rank 1's second micro-batch is its slice of the same global rows
    rank1 = ExampleBatches(examples(tok), batch_size=3, block_size=48, accum_steps=2, seed=5, rank=1, world_size=2)
    x, _, cu = rank1.batch(7, 1)
    first = rows[(1 * 2 + 1) * 3]
    assert torch.equal(x[0, : batches.lengths[first[0]]], torch.from_numpy(batches.examples[first[0]].ids[:-1]))
    assert cu[-1] == x.numel()


def test_tasks_train_and_held_out_never_share_a_problem():
    for task in TASK_LIST:
        held = task.problems("held_out", 300)
        train = task.problems("train", 3000, seed=1) + task.problems("train", 3000, seed=2)
        assert not {p.prompt for p in held} & {p.prompt for p in train}, task.name
        assert len({p.prompt for p in held}) == 300 and held == task.problems("held_out", 300)
        assert all(task.check(p, f" {p.answer}\n") and not task.check(p, p.answer + "x") for p in held[:50])
    assert get_task("reverse").problems("train", 3, seed=1) != get_task("reverse").problems("train", 3, seed=2)
    with pytest.raises(ValueError, match="unknown task"):
        get_task("chess")


def test_group_advantages_are_normalised():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv.mean(1), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(adv[[0, 2]].std(1), torch.ones(2), atol=1e-3, rtol=0)
    assert torch.equal(adv[1], torch.zeros(4))  # a group that agrees teaches nothing
    torch.testing.assert_close(group_advantages(rewards, normalise=False)[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_policy_loss_matches_a_case_worked_by_hand():
    # two sequences, two completion tokens each (the third position of the second is padding)
    logp = torch.tensor([[math.log(0.5), math.log(0.2), 0.0], [math.log(0.9), math.log(0.4), 0.0]],
                        requires_grad=True)
    old = torch.log(torch.tensor([[0.4, 0.2, 1.0], [0.6, 0.45, 1.0]]))
    ref = torch.log(torch.tensor([[0.5, 0.1, 1.0], [0.9, 0.8, 1.0]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    out = policy_loss(logp, old, ref, adv, mask, "grpo", clip_eps=0.2, kl_coef=0.1)
    # ratios 0.5/0.4 = 1.25 (clipped to 1.2 with A = 2: min(2.5, 2.4) = 2.4), 0.2/0.2 = 1 (2.0);
    # 0.9/0.6 = 1.5 with A = -1: min(-1.5, -1.2) = -1.5; 0.4/0.45 = 0.889, inside the range: -0.889
    pg = [-2.4, -2.0, 1.5, 0.4 / 0.45]
    # k3 KL: r = ref/p; r - log r - 1 for r = 1, 0.5, 1, 2
    kl = [0.0, 0.5 - math.log(0.5) - 1, 0.0, 2 - math.log(2) - 1]
    expected = sum(p + 0.1 * k for p, k in zip(pg, kl, strict=True)) / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.kl.item() == pytest.approx(sum(kl) / 4, rel=1e-6)
    assert out.clip_fraction.item() == pytest.approx(2 / 4)  # 1.25 and 1.5 were clipped
    reinforce = policy_loss(logp, old, ref, adv, mask, "reinforce", kl_coef=0.0)
    want = -(2 * (math.log(0.5) + math.log(0.2)) - (math.log(0.9) + math.log(0.4))) / 4
    assert reinforce.loss.item() == pytest.approx(want, rel=1e-6)


def test_zero_advantages_leave_only_the_kl_terms_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 5).clamp(max=0).requires_grad_()
    old, ref = torch.randn(3, 5).clamp(max=0), torch.randn(3, 5).clamp(max=0)
    mask = torch.rand(3, 5) > 0.3
    zero = torch.zeros(3)
    for kind in ("grpo", "reinforce"):
        full = policy_loss(logp, old, ref, zero, mask, kind, kl_coef=0.3).loss
        (grad,) = torch.autograd.grad(full, logp)
        kl_only = policy_loss(logp, old, ref, zero, mask, kind, kl_coef=0.3).kl  # detached: rebuild with grad
        to_ref = ref - logp
        kl = ((to_ref.exp() - to_ref - 1) * mask).sum() / mask.sum()
        (kl_grad,) = torch.autograd.grad(0.3 * kl, logp)
        torch.testing.assert_close(grad, kl_grad)
        assert kl_only.item() == pytest.approx(kl.item(), rel=1e-6)
        no_kl = policy_loss(logp, old, ref, zero, mask, kind, kl_coef=0.0).loss
        (grad,) = torch.autograd.grad(no_kl, logp)
        assert torch.count_nonzero(grad) == 0


def test_grow_vocab_keeps_the_old_rows_and_predictions_of_old_tokens():
    model = tiny_gpt(20).eval()
    x = torch.randint(0, 20, (2, 9))
    before, _ = model(x)
    model.grow_vocab(24)
    after, _ = model(x)
    assert model.config.vocab_size == 24 and after.shape[-1] == 24
    torch.testing.assert_close(after[..., :20], before)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied


def test_lifecycle_refuses_bad_seeds_in_one_line(capsys):
    from gptforge.train.finetune.lifecycle import main, spread

    assert main(["--seeds", "one,two"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --seeds expects comma-separated integers, got 'one,two'"
    assert spread([0.5]) == " 50.0%" and spread([0.8, 1.0]).startswith(" 90.0% ± 14.1 (min 80.0, max 100.0)")
