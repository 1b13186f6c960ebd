"""The strategies by the name ``--strategy`` gives them: ``make_strategy`` builds single, ddp or
deepspeed (gptforge/train/strategy.py) or fsdp (gptforge/train/fsdp.py, imported only when named).
"""

from __future__ import annotations

import os

from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.strategy import DDPStrategy, DeepSpeedStrategy, Strategy


def make_strategy(cfg: TrainConfig) -> Strategy:
    """The strategy ``cfg.strategy`` names; ``auto``: ddp when launched with several ranks."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    name = cfg.strategy
    if name == "auto":
        name = "ddp" if ranks > 1 else "single"
    if name == "single":
        if ranks > 1:
            raise ConfigError(f"--strategy=single, but the launcher started {ranks} ranks; use ddp, fsdp or "
                              "deepspeed")
        return Strategy(cfg)
    if name == "fsdp":
        from gptforge.train.fsdp import FSDPStrategy  # torch.distributed's FSDP and checkpoint modules: only when used

        return FSDPStrategy(cfg)
    return DDPStrategy(cfg) if name == "ddp" else DeepSpeedStrategy(cfg)
