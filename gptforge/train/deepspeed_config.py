"""DeepSpeed's JSON config, generated from our flags, or a user's file checked against them.

Our flags own the batch, accumulation, clipping, ZeRO stage and precision; a user's
``--deepspeed_config`` may add any other setting (offload, bucket sizes, ...) but may not
contradict a flag. The optimizer and the lr schedule are always ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.distributed import per_rank_accum


def read_user_config(path: str) -> dict:
    if not path:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"--deepspeed_config {path}: cannot read it ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"--deepspeed_config {path} must hold a JSON object, not {type(config).__name__}")
    return config


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(cfg: TrainConfig, world_size: int, dtype: torch.dtype, user: dict | None = None) -> dict:
    """DeepSpeed's config for our flags. ``user`` (from --deepspeed_config) may add any other
    setting (offload, bucket sizes, ...) but may not contradict a flag: its keys must agree
    with ours or say "auto". The optimizer and lr schedule are always ours."""
    user = user or {}
    stage = cfg.zero_stage if cfg.zero_stage >= 0 else user.get("zero_optimization", {}).get("stage", 1)
    ours = {
        "train_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps,  # the global batch
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": per_rank_accum(cfg.gradient_accumulation_steps, world_size),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    for block in ("optimizer", "scheduler"):
        if block in user:
            raise ConfigError(f"--deepspeed_config {cfg.deepspeed_config}: remove its {block!r} block; training "
                              "uses its own AdamW (--learning_rate, --weight_decay, --beta1/2) and lr schedule")
    ours_flat, user_flat = _flatten(ours), _flatten(user)
    conflicts = [f"{key} is {user_flat[key]!r} in the file but {value!r} from our flags"
                 for key, value in ours_flat.items() if key in user_flat and user_flat[key] not in ("auto", value)]
    if conflicts:
        raise ConfigError(f"--deepspeed_config {cfg.deepspeed_config} contradicts the training flags: "
                          + "; ".join(conflicts))
    defaults = {
        "zero_allow_untested_optimizer": True,  # our torch AdamW, not DeepSpeed's own
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return _merge(_merge(defaults, user), ours)
