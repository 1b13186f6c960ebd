"""A decoder-only Transformer (GPT-2 shape), and the lecture's bigram baseline.

Attention and LayerNorm go through ``kernels``, so the backend (torch, sdpa, flash_attn,
triton) is chosen outside the model: ``with kernels.use_backend(attention="triton"): ...``.
Parameter names follow nanoGPT / GPT-2, so their weights map onto ours one to one.

GPTConfig's speedrun options (rotary positions, QK-norm, ReLU² or the exact GELU, an untied
head, zero-initialised projections) are off by default: the default model is GPT-2's.

Generation passes a ``KVCache`` to ``GPT.forward``: the keys and values of the tokens already
seen are kept, so each new token costs one position's work instead of the whole context's.
Training never passes one.

Activation checkpointing (``GPT.set_activation_checkpointing``) keeps only each checkpointed
block's input in the forward and recomputes the block in the backward: the same gradients
(dropout masks replay from the saved RNG state) for about a third more compute.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gptforge import kernels
from gptforge.gpt.config import GPTConfig
from gptforge.gpt.documents import document_positions

ACTIVATION_CHECKPOINTING = ("none", "selective", "full")


def dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an Identity when p is 0: a Dropout(0) still costs a call per use,
    which adds up when decoding one token at a time."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class KVCache:
    """Keys and values of every layer for the tokens seen so far, for fast generation.

    Each layer's keys and values share one buffer, (2, B, n_head, block_size, head_dim),
    allocated on the first write with the dtype and device written (bf16 under autocast, say),
    so a decoding step stores both with one copy. ``length`` is how many positions are
    filled; the model appends the new tokens' keys and values and advances it once per
    forward pass.
    """

    def __init__(self, config: GPTConfig):
        self.block_size = config.block_size
        self.kv: list[torch.Tensor | None] = [None] * config.n_layer
        self.length = 0

    def update(self, layer: int, kv: torch.Tensor) -> torch.Tensor:
        """Write ``kv`` (2, B, H, T, D), the new keys and values, after the cached positions
        of ``layer``; return that layer's keys and values for every position so far (a view)."""
        if self.kv[layer] is None:
            _, B, H, _, D = kv.shape
            self.kv[layer] = kv.new_empty(2, B, H, self.block_size, D)
        buffer, new = self.kv[layer], kv.size(3)
        buffer.narrow(3, self.length, new).copy_(kv)
        return buffer.narrow(3, 0, self.length + new)

    def reset(self) -> None:
        """Forget every position (the buffers stay allocated)."""
        self.length = 0


class Rotary(nn.Module):
    """Rotary position embeddings (RoFormer): each pair of a head's channels (i, i + D/2) is
    rotated by an angle proportional to the position, so that a query-key product depends on
    the distance between them. The angles are a buffer, not weights."""

    def __init__(self, head_dim: int, block_size: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (T, D/2)
        # laid out for rotate(): cos of both halves, -sin for the first and +sin for the second
        self.register_buffer("cos", torch.cat([angles.cos(), angles.cos()], dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat([-angles.sin(), angles.sin()], dim=-1), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start : start + length], self.sin[start : start + length]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The angles of per-token ``positions`` (B, T) (packed documents: each restarts at 0),
        shaped (B, 1, T, D) to broadcast over the heads. A gather: forward's slice stays the
        cheaper path when every row counts from the same start."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` (..., T, D) with its channel pairs (i, i + D/2) rotated by the angles whose cosines
    and sines are ``cos`` and ``sin`` (T, D), each half repeated (sines negated in the first):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([x2, x1], dim=-1) * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # which of the cache's layers is ours
        self.n_head = config.n_head
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        if cache is None:
            q, k, v = self._split_heads(self.c_attn(x), rope)
        else:
            # (B, T, 3C) -> (3, B, n_head, T, head_dim): keys and values side by side, so that the
            # cache stores both with one copy
            qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
            q, kv = qkv[0], qkv[1:]
            if self.qk_norm or rope is not None:  # the options that change queries and keys: both at once
                qk = qkv[:2]
                if self.qk_norm:
                    qk = F.rms_norm(qk, (qk.size(-1),))
                if rope is not None:
                    qk = rotate(qk, *rope)
                q, kv = qk[0], torch.cat([qk[1:], qkv[2:]])
            # attend to the cached positions too; the causal mask is aligned bottom-right, so
            # the T new queries see every cached key and the new keys up to their own position
            k, v = cache.update(self.layer, kv).unbind(0)
        # a single query (one decoding step) sees every key: no mask to build (the same result, faster)
        causal = T > 1 or cu_seqlens is not None  # packed documents are always causal inside each
        y = kernels.attention(q, k, v, causal=causal, dropout_p=self.dropout if self.training else 0.0,
                              cu_seqlens=cu_seqlens)
        y = y.transpose(1, 2).reshape(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))

    def _split_heads(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        """(B, T, 3C) -> q, k, v, each (B, n_head, T, head_dim), views of the split, as nanoGPT
        takes them: the split's backward is one concatenation, where the (3, B, H, T, D) view's
        select and unbind cost zero-filled buffers, copies and adds (3% of an fp32 step at 4x128,
        T=128, B=32 on 2 CPU cores). qk_norm and rope act on q and k one at a time for the same
        reason (with both on, the step got 10% faster)."""
        B, T, C3 = qkv.shape
        C = C3 // 3
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.act = activation(config.activation)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


def activation(name: str) -> nn.Module:
    """GPT-2's tanh GELU, the exact GELU (nanoGPT's, and on the CPU 3x cheaper than the tanh
    form), or ReLU squared (modded-nanogpt)."""
    return {"gelu_tanh": lambda: nn.GELU(approximate="tanh"), "gelu": nn.GELU, "relu2": ReLUSquared}[name]()


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln_1(x)), then + mlp(ln_2(...))."""

    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = kernels.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = kernels.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)
        self.checkpointed = False  # recompute this block in the backward (GPT.set_activation_checkpointing)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled() and cache is None:
            # inside forward, so that wrappers hooked onto the block (FSDP's all-gather) stay outside
            # the recomputed region; non-reentrant: works with torch.compile and keyword arguments
            return torch.utils.checkpoint.checkpoint(self._forward, x, None, rope, cu_seqlens, use_reentrant=False)
        return self._forward(x, cache, rope, cu_seqlens)

    def _forward(self, x: torch.Tensor, cache: KVCache | None,
                 rope: tuple[torch.Tensor, torch.Tensor] | None,
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        a = self.attn(self.ln_1(x), cache, rope, cu_seqlens)
        y, x = self.ln_2(a, residual=x)  # x = x + a; y = ln_2(x): one fused kernel where available
        return x + self.mlp(y)


class LMHead(nn.Linear):
    """The output layer (``nn.Linear`` without bias, same state_dict key). Given targets it
    returns the loss instead of the logits, through ``kernels.linear_cross_entropy``, which
    never holds the (B, T, vocab) logits. The loss is computed inside this module's forward so
    that wrappers that gather a parameter around its module's forward (DeepSpeed ZeRO-3) see it."""

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return kernels.linear_cross_entropy(x, self.weight, targets)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
                # position embeddings; with rope, positions enter attention by rotation instead
                **({} if config.rope else dict(wpe=nn.Embedding(config.block_size, config.n_embd))),
                drop=dropout(config.dropout),
                h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
                ln_f=kernels.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        if config.rope:
            self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)
        self.lm_head = LMHead(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        # GPT-2: scale the init of projections into the residual stream by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init_proj:  # modded-nanogpt: every block starts as the identity
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight") or name == "lm_head.weight" and not config.tie_embeddings:
                    nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        last_only: bool = False,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, vocab), None) for token ids (B, T); given targets, (None, the mean
        cross-entropy over the targets not at -100), computed without the logits
        (``kernels.linear_cross_entropy``; choose its backend with ``use_backend(linear_cross_entropy=...)``).

        ``last_only`` computes logits for the last position only (generation needs no more).
        With a ``cache``, ``idx`` continues the cached tokens: its positions start at
        ``cache.length``, and its keys and values are added to the cache.
        ``cu_seqlens`` packs documents into the rows (int32 offsets over the flattened B * T
        tokens, as ``flash_attn_varlen_func`` takes them; see gptforge/gpt/documents.py): every
        token attends within its own document only, and positions restart at 0 at each
        document's start, so each document is computed as if it ran alone. Not with a cache.
        """
        B, T = idx.shape
        if cu_seqlens is not None and cache is not None:
            raise ValueError("packed documents (cu_seqlens) are for training and evaluation, not with a KV cache")
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            cached = f" ({start} cached + {T} new)" if start else ""
            raise ValueError(f"sequence length {start + T}{cached} exceeds block_size {self.config.block_size}")
        x, rope = self.transformer.wte(idx), None
        # packed documents: each token's position within its own document, (B, T), computed once
        pos = document_positions(cu_seqlens, B, T) if cu_seqlens is not None else None
        if self.config.rope:
            rope = self.rotary(start, T) if pos is None else self.rotary.at(pos)
        else:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device) if pos is None else pos)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cache, rope, cu_seqlens)
        if cache is not None:
            cache.length += T
        if last_only:  # LayerNorm and the head act per position: only the last one is needed
            return self.lm_head(self.transformer.ln_f(x[:, -1:, :] if T > 1 else x)), None
        if targets is not None:  # the loss without the logits: (None, loss)
            return None, self.lm_head(self.transformer.ln_f(x), targets)
        return self.lm_head(self.transformer.ln_f(x)), None

    def set_dropout(self, p: float) -> None:
        """Use dropout rate ``p`` everywhere from now on (fine-tuning a model saved with another)."""
        self.config = dataclasses.replace(self.config, dropout=p)  # validates p
        self.transformer.drop = dropout(p)
        for block in self.transformer.h:
            block.attn.dropout = p
            block.attn.resid_dropout = dropout(p)
            block.mlp.dropout = dropout(p)
        self.train(self.training)  # new modules start in training mode: give them the model's

    def set_activation_checkpointing(self, mode: str) -> None:
        """Which blocks recompute their activations in the backward: ``none``, ``full`` (every
        block: activation memory of one block plus the blocks' inputs) or ``selective`` (every
        other block, from the first: about half the saving for half the extra compute)."""
        if mode not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
        for i, block in enumerate(self.transformer.h):
            block.checkpointed = mode == "full" or mode == "selective" and i % 2 == 0

    @torch.no_grad()
    def grow_vocab(self, vocab_size: int) -> None:
        """Rows for token ids up to ``vocab_size`` (new tokens for fine-tuning: the chat template's).
        The rows there are kept; each new one starts near the mean of the old ones (plus noise of
        the init's scale, so that the new tokens differ), a plausible token the model has seen."""
        old = self.config.vocab_size
        if vocab_size <= old:
            return
        wte = self.transformer.wte.weight
        mean = wte.mean(0, keepdim=True)
        rows = mean + 0.02 * torch.randn(vocab_size - old, wte.size(1), dtype=wte.dtype, device=wte.device)
        self.transformer.wte = nn.Embedding.from_pretrained(torch.cat([wte, rows]), freeze=False)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            head = self.lm_head.weight
            grown = torch.cat([head, head.mean(0, keepdim=True).expand(vocab_size - old, -1)])
            self.lm_head.weight = nn.Parameter(grown)
        self.lm_head.out_features = vocab_size
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without the position embedding (the token embedding
        counts, being tied to the output layer), as nanoGPT reports it."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs (forward + backward) per token: 6N for the weights plus the attention
        scores and mixing, 12 * n_layer * n_embd * T (PaLM appendix B)."""
        c, T = self.config, seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * T

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Weight decay on the Linear weights only; none on biases, LayerNorms and embeddings
        (the output layer shares the token embedding, so it is not decayed either)."""
        no_decay = {id(p) for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        decay = [
            m.weight for m in self.modules() if isinstance(m, nn.Linear) and id(m.weight) not in no_decay
        ]
        decay_ids = {id(p) for p in decay}
        rest = [p for p in self.parameters() if id(p) not in decay_ids]
        return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


class BigramLanguageModel(nn.Module):
    """The lecture's starting point: each token reads the logits for the next one from a table."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.vocab_size)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, last_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if last_only:
            idx = idx[:, -1:]
        logits = self.token_embedding_table(idx)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return 6 * self.num_params()

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        return [dict(params=list(self.parameters()), weight_decay=0.0)]


def build_model(config: GPTConfig) -> GPT | BigramLanguageModel:
    return GPT(config) if config.model == "gpt" else BigramLanguageModel(config)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module a ``torch.compile``'d model wraps (``model._orig_mod``), else ``model`` itself."""
    return getattr(model, "_orig_mod", model)
