"""The optimizer: AdamW (GPT-2's), or Muon for the blocks' matrices with AdamW for the rest.

Muon (``torch.optim.Muon``) orthogonalises each 2-D weight's momentum with a few Newton-Schulz
iterations before the update; the speedruns (modded-nanogpt) train with it in fewer steps. It
only takes matrices, so embeddings, the output layer, LayerNorm gains and biases stay with
AdamW. With ``adjust_lr_fn="match_rms_adamw"`` (Moonshot's scaling) Muon's updates have the
RMS of AdamW's, so one learning rate and one schedule drive both.
"""

from __future__ import annotations

import torch

from gptforge.train.config import OPTIMIZERS


class Optimizers:
    """Several optimizers stepped as one: ``param_groups`` lists all their groups (the lr
    schedule sets them all), and the state dict holds each under its name."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != set(self.optimizers):
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"expected the state of optimizers {sorted(self.optimizers)}, got {found}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


def build_optimizer(model: torch.nn.Module, name: str, lr: float, betas: tuple[float, float], weight_decay: float,
                    fused: bool = False) -> torch.optim.Optimizer | Optimizers:
    """AdamW over the model's parameter groups (weight decay on the Linear weights only), or
    (``muon``) Muon for the Linear weights inside the Transformer blocks and AdamW for the rest."""
    groups = model.optimizer_groups(weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    if name != "muon":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    in_blocks = {id(p) for p in blocks.parameters() if p.dim() == 2} if blocks is not None else set()
    matrices = [p for g in groups for p in g["params"] if id(p) in in_blocks]
    if not matrices:
        raise ValueError("optimizer muon needs a model with Transformer blocks (not the bigram model)")
    rest = [dict(g, params=[p for p in g["params"] if id(p) not in in_blocks]) for g in groups]
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([g for g in rest if g["params"]], lr=lr, betas=betas, fused=fused)
    return Optimizers(muon=muon, adamw=adamw)
