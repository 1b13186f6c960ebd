"""``--stage``: which trainer runs a config. Pre-training is gptforge/train/loop.py's Trainer;
the fine-tuning stages (gptforge/train/finetune/) extend it."""

from __future__ import annotations

from tqdm import tqdm

from gptforge.train import loop
from gptforge.train.config import TrainConfig


def trainer_for(stage: str) -> type[loop.Trainer]:
    if stage == "sft":
        from gptforge.train.finetune.sft import SFTTrainer

        return SFTTrainer
    if stage == "rl":
        from gptforge.train.finetune.rl import RLTrainer

        return RLTrainer
    return loop.Trainer


def train(cfg: TrainConfig, log=tqdm.write) -> dict:
    """Train ``cfg`` with its stage's trainer; the last evaluation's figures."""
    return loop.train(cfg, log, trainer=trainer_for(cfg.stage))
