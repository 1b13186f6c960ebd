"""Training configuration: one dataclass, presets in TOML, overrides on the command line.

    python -m train --config train/configs/shakespeare_char.toml --batch_size=32 --compile=false

Order of precedence: the dataclass defaults (a CPU-sized character model), then the TOML
file, then ``--key=value`` flags. Keys keep nanoGPT's names where they overlap. Unknown keys
and values of the wrong type are errors that name the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from gpt.config import GPTConfig


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or value. Its message is for the user."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "shakespeare_char"
    data_dir: str = "data"
    input: str = ""  # a local text file to train on instead of the named dataset
    tokenizer: str = ""  # "char" or "gpt2"; empty: the dataset's default
    # model (see gpt/config.py)
    model: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    # optimisation: AdamW with linear warmup and cosine decay to min_lr
    batch_size: int = 32  # micro-batch of one rank
    gradient_accumulation_steps: int = 1  # in total over all ranks: the global batch is the same on any number
    max_iters: int = 2000
    learning_rate: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # 0: decay over max_iters
    decay_lr: bool = True
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    # evaluation, logging, output
    eval_interval: int = 500
    eval_iters: int = 20
    log_interval: int = 50
    out_dir: str = "out"
    resume: str = "false"  # true: continue from the newest good checkpoint in out_dir; auto: if there is one
    overwrite: bool = False  # a fresh run may replace an earlier run's checkpoints in out_dir
    checkpoint_interval: int = 0  # 0: checkpoint at every evaluation
    keep_last: int = 2  # checkpoints kept on disk
    init_from: str = "scratch"  # scratch, resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a model's path
    nan_policy: str = "stop"  # a NaN/inf loss or gradient norm: stop (checkpoint, exit 3) or skip the step
    num_samples: int = 2  # samples printed and saved when training ends
    sample_tokens: int = 300
    progress: bool = True  # tqdm progress bar
    # system
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (bf16 where supported on CUDA, else fp32), bf16, fp16, fp32
    compile: bool = False
    attn_backend: str = "auto"  # auto, torch, sdpa, flash_attn, triton
    ln_backend: str = "auto"  # auto, torch, triton
    seed: int = 1337
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0: look the device up
    # distributed (see train/strategy.py): launch with torchrun or the deepspeed launcher
    strategy: str = "auto"  # auto (ddp when launched with several ranks, else single), single, ddp, deepspeed
    zero_stage: int = -1  # DeepSpeed ZeRO stage 0-3; -1: the stage in --deepspeed_config, else 1
    deepspeed_config: str = ""  # a DeepSpeed JSON config to start from; our flags fill in the rest

    def __post_init__(self) -> None:
        resume = str(self.resume).lower()  # True/False from Python, text from the command line
        self.resume = {"1": "true", "yes": "true", "0": "false", "no": "false", "": "false"}.get(resume, resume)
        if self.resume not in ("false", "true", "auto"):
            raise ConfigError(f"resume must be true, false or auto; got {self.resume!r}")
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"nan_policy must be stop or skip; got {self.nan_policy!r}")
        if not self.init_from:
            raise ConfigError("init_from must be scratch, resume, a GPT-2 name or a path; got ''")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                    "eval_interval", "eval_iters", "log_interval", "keep_last")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "checkpoint_interval", "num_samples",
                     "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"dtype must be one of auto, bf16, fp16, fp32; got {self.dtype!r}")
        if self.strategy not in ("auto", "single", "ddp", "deepspeed"):
            raise ConfigError(f"strategy must be one of auto, single, ddp, deepspeed; got {self.strategy!r}")
        if not -1 <= self.zero_stage <= 3:
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3 (or -1 for the default), got {self.zero_stage}")
        if self.deepspeed_config and self.strategy != "deepspeed":
            raise ConfigError("--deepspeed_config is only used with --strategy=deepspeed")
        if self.tokenizer not in ("", "char", "gpt2"):
            raise ConfigError(f"tokenizer must be 'char' or 'gpt2' (or empty for the dataset's default), "
                              f"got {self.tokenizer!r}")
        try:
            self.model_config(vocab_size=1)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(model=self.model, vocab_size=vocab_size, block_size=self.block_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                         dropout=self.dropout, bias=self.bias)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


BARE_FLAGS = {"resume"}  # not bool-typed (true, false or auto), but a bare --resume means --resume=true


def _field_type(name: str) -> type:
    hints = typing.get_type_hints(TrainConfig)
    t = hints[name]
    if isinstance(t, types.UnionType):  # "X | None": the non-None member
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _coerce(name: str, value: object, from_text: bool) -> object:
    """Turn ``value`` into the field's type, or raise a ConfigError that says what was expected."""
    t = _field_type(name)
    if from_text and isinstance(value, str):
        text = value.strip()
        try:
            if t is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return lowered in ("true", "1", "yes")
            if t is int:
                return int(text)
            if t is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"--{name} expects {t.__name__}, got {value!r}") from None
        return text
    if name in BARE_FLAGS and isinstance(value, bool):  # resume = true in a TOML file
        return str(value).lower()
    # values from TOML already carry a type: check it (an int is a fine float, a bool is no int)
    ok = isinstance(value, t) and not (t is int and isinstance(value, bool))
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"{name} expects {t.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _check_known(keys: typing.Iterable[str], where: str) -> None:
    known = [f.name for f in fields(TrainConfig)]
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {key!r} in {where}{hint}")


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Defaults, then the TOML file at ``path``, then string overrides (from the command line)."""
    values: dict[str, object] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        _check_known(table, str(path))
        values.update({k: _coerce(k, v, from_text=False) for k, v in table.items()})
    overrides = overrides or {}
    _check_known(overrides, "the command line")
    values.update({k: _coerce(k, v, from_text=True) for k, v in overrides.items()})
    return TrainConfig(**values)


def parse_args(argv: list[str]) -> tuple[str | None, dict[str, str]]:
    """``[--config FILE] [--key=value | --key value ...]`` -> (config path, overrides)."""
    config_path, overrides, i = None, {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; expected --key=value (see --help)")
        key, sep, value = arg[2:].partition("=")
        if not sep:  # "--key value", or a bare "--flag" meaning true for booleans
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                value, i = nxt, i + 1
            elif key in BARE_FLAGS or key in {f.name for f in fields(TrainConfig)} and _field_type(key) is bool:
                value = "true"
            elif key != "config":
                raise ConfigError(f"--{key} needs a value (--{key}=VALUE)")
        key = key.replace("-", "_")
        if key == "config":
            config_path = value
        else:
            overrides[key] = value
        i += 1
    return config_path, overrides


def describe() -> str:
    """Every key with its type and default, for --help."""
    rows = [f"  --{f.name}={f.default!r:<20} ({_field_type(f.name).__name__})" for f in fields(TrainConfig)]
    return "\n".join(rows)
