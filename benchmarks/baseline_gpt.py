"""The baseline our training step is measured against: a GPT written the way nanoGPT writes
it, in plain PyTorch (``nn.LayerNorm``, ``F.scaled_dot_product_attention``, an exact-GELU MLP
as nanoGPT's, tied embeddings, GPT-2's initialisation as nanoGPT applies it), with none of
our dispatch. Same shapes and parameter count as ``gpt.GPT``, which the benchmark runs with
``activation="gelu"`` so that both compute the same function; ``bias=False`` drops the biases
of every Linear and LayerNorm, as nanoGPT's ``bias=False`` and our CPU recipe do.

To measure against nanoGPT's own ``model.py`` instead, pass ``--nanogpt PATH`` (a checkout
of github.com/karpathy/nanoGPT) to ``benchmarks/test_train_step.py``; see its docstring.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class BaselineBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, bias: bool = True):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd, bias=bias), nn.LayerNorm(n_embd, bias=bias)
        self.c_attn, self.attn_proj = nn.Linear(n_embd, 3 * n_embd, bias=bias), nn.Linear(n_embd, n_embd, bias=bias)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd, bias=bias), nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class BaselineGPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 bias: bool = True):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList([BaselineBlock(n_embd, n_head, bias) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        # nanoGPT's (GPT-2's) initialisation. PyTorch's defaults would leave N(0, 1) embeddings tied
        # to the output layer: huge logits that make every step about twice as slow on a CPU.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:  # Linear and Embedding weights; the residual projections scaled by depth
                std = 0.02 / (2 * n_layer) ** 0.5 if name.endswith(("attn_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
