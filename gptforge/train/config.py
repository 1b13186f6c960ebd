"""Training configuration: one dataclass, presets in TOML, overrides on the command line.

    python -m gptforge.train --config gptforge/train/configs/shakespeare_char.toml --batch_size=32 --compile=false

Order of precedence: the dataclass defaults (a CPU-sized character model), then the TOML
file, then ``--key=value`` flags. Keys keep nanoGPT's names where they overlap. Unknown keys
and values of the wrong type are errors that name the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from gptforge.data import BUILTIN_DATASETS, valid_dataset_name
from gptforge.gpt.config import ACTIVATIONS, MODELS, GPTConfig, parse_bool
from gptforge.train.finetune.tasks import TASKS


class ConfigError(ValueError):
    """A bad configuration: unknown key, wrong type or value. Its message is for the user."""


def opt(default, help: str, choices: tuple = ()):
    """A config field with its one-line description and, where the values are a fixed set,
    the allowed ones: ``--help`` prints both and validation checks the choices."""
    return field(default=default, metadata=dict(help=help, choices=choices))


OPTIMIZERS = ("adamw", "muon")  # see gptforge/train/optim.py
TRI_STATE = ("auto", "true", "false")
STAGES = ("pretrain", "sft", "rl")  # see gptforge/train/finetune/
RL_LOSSES = ("grpo", "reinforce")
MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name != "vocab_size")  # the rest are TrainConfig's
SEED_LIMIT = 2**32  # numpy's seeds are 32-bit
INT_LIMIT = 2**63 - 1  # an int64: the largest count torch and numpy hold


@dataclass
class TrainConfig:
    # data
    dataset: str = opt("shakespeare_char", "the dataset's folder under data_dir; built in: shakespeare_char, "
                       "shakespeare (with --input: your text's file stem unless named)")
    data_dir: str = opt("data", "where datasets are prepared and kept")
    input: str = opt("", "a local UTF-8 text file to train on, prepared as its own dataset; or a corpus as "
                         "python -m gptforge.data prepare takes it (a glob, a folder, .jsonl[.gz|.bz2|.zst], .parquet)")
    tokenizer: str = opt("", "the tokenizer; empty: the dataset's default", ("", "char", "gpt2"))
    document_mask: bool = opt(False, "attend within documents only, positions restarting at each: a document "
                              "ends with the tokenizer's end-of-text token (corpora from gptforge.data prepare)")
    # model: the fields of gpt.config.GPTConfig but vocab_size (the data's), with its defaults
    model: str = opt(GPTConfig.model, "the Transformer, or the lecture's bigram baseline", MODELS)
    n_layer: int = opt(GPTConfig.n_layer, "Transformer blocks")
    n_head: int = opt(GPTConfig.n_head, "attention heads per block (must divide n_embd)")
    n_embd: int = opt(GPTConfig.n_embd, "width of the residual stream")
    block_size: int = opt(GPTConfig.block_size, "context length in tokens")
    dropout: float = opt(GPTConfig.dropout, "dropout probability in [0, 1)")
    bias: bool = opt(GPTConfig.bias, "biases in Linear layers and LayerNorms, as GPT-2")
    activation: str = opt(GPTConfig.activation, "the MLP's nonlinearity: GPT-2's tanh GELU, the exact GELU "
                          "(nanoGPT's), or ReLU squared", ACTIVATIONS)
    rope: bool = opt(GPTConfig.rope, "rotary position embeddings instead of a learned position table")
    qk_norm: bool = opt(GPTConfig.qk_norm, "RMS-normalise queries and keys per head")
    tie_embeddings: bool = opt(GPTConfig.tie_embeddings, "the output layer shares the token embedding")
    zero_init_proj: bool = opt(GPTConfig.zero_init_proj, "residual projections (and an untied head) start at 0")
    # optimisation: AdamW with linear warmup and cosine decay to min_lr
    batch_size: int = opt(32, "micro-batch of one rank, in sequences")
    gradient_accumulation_steps: int = opt(1, "micro-steps per optimizer step, over all ranks together "
                                              "(the global batch is the same on any number of ranks)")
    max_iters: int = opt(2000, "optimizer steps in all")
    optimizer: str = opt("adamw", "adamw, or muon: Muon for the blocks' matrices and AdamW for the rest, "
                         "at the same learning rate", OPTIMIZERS)
    learning_rate: float = opt(2e-3, "peak learning rate, after warmup")
    min_lr: float = opt(-1.0, "learning rate at the end of the cosine decay; -1: learning_rate / 10")
    warmup_iters: int = opt(100, "steps of linear warmup")
    lr_decay_iters: int = opt(0, "step at which the decay reaches min_lr; 0: max_iters")
    decay_lr: bool = opt(True, "warmup and cosine decay; false: a constant learning rate")
    weight_decay: float = opt(0.1, "AdamW weight decay (Linear weights only)")
    beta1: float = opt(0.9, "AdamW beta1, in [0, 1)")
    beta2: float = opt(0.99, "AdamW beta2, in [0, 1)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this; 0 disables clipping")
    # evaluation, logging, output
    eval_interval: int = opt(500, "steps between evaluations")
    eval_iters: int = opt(20, "batches per evaluation and split")
    log_interval: int = opt(50, "steps between log lines")
    out_dir: str = opt("out", "checkpoints, metrics.jsonl, loss.png and samples.txt go here")
    resume: str = opt("false", "continue the run saved in out_dir (auto: if there is one)", ("false", "true", "auto"))
    overwrite: bool = opt(False, "a fresh run may replace an earlier run's checkpoints in out_dir")
    checkpoint_interval: int = opt(0, "steps between checkpoints; 0: at every evaluation")
    keep_last: int = opt(2, "checkpoints kept on disk")
    init_from: str = opt("scratch", "scratch, resume, gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a model's path")
    nan_policy: str = opt("stop", "on a non-finite loss or gradient norm: stop (checkpoint, exit 3) or skip the "
                          "step", ("stop", "skip"))
    num_samples: int = opt(2, "samples printed and saved when training ends")
    sample_tokens: int = opt(300, "tokens per sample")
    progress: str = opt("auto", "a progress bar; auto: where stdout and stderr are terminals, else plain log lines "
                        "with the time and ETA", TRI_STATE)
    tensorboard_log: bool = opt(False, "log metrics, config and samples to TensorBoard (pip install -e "
                                "'.[tensorboard]')")
    tensorboard_dir: str = opt("", "TensorBoard's log folder; empty: out_dir/tensorboard")
    wandb_log: bool = opt(False, "log metrics, config and samples to Weights & Biases (pip install -e '.[wandb]'); "
                          "offline without an API key or network")
    wandb_project: str = opt("gptforge", "the W&B project")
    wandb_run_name: str = opt("", "the W&B run's name; empty: out_dir's folder name")
    # system
    device: str = opt("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = opt("auto", "compute precision; auto: bf16 on CUDA where supported (else fp16) and on "
                     "CPUs with AMX, else fp32",
                     ("auto", "bf16", "fp16", "fp32"))
    compile: str = opt("auto", "torch.compile the model (under fsdp: each block); auto: when the run is long "
                       "enough that compiling pays (gptforge/train/compile_policy.py)", TRI_STATE)
    activation_checkpointing: str = opt("none", "recompute activations in the backward instead of keeping them: "
                                        "full (every block) or selective (every other block)",
                                        ("none", "selective", "full"))
    attn_backend: str = opt("auto", "attention kernels; auto: GPT_KERNELS if set, else the fastest here",
                            ("auto", "torch", "sdpa", "flash_attn", "triton"))
    ln_backend: str = opt("auto", "LayerNorm kernels; auto: GPT_KERNELS if set, else the fastest here",
                          ("auto", "torch", "triton"))
    seed: int = opt(1337, f"random seed, 0 to {SEED_LIMIT - 1}")
    peak_flops: float = opt(0.0, "the device's peak FLOP/s for MFU; 0: this machine's matmul ceiling, measured "
                            "once and cached (gptforge/train/ceiling.py)")
    # distributed (see gptforge/train/strategy.py): launch with torchrun or the deepspeed launcher
    strategy: str = opt("auto", "auto: ddp when launched with several ranks, else single; fsdp: PyTorch FSDP2 "
                        "(weights, gradients and AdamW state sharded over ranks)",
                        ("auto", "single", "ddp", "fsdp", "deepspeed"))
    zero_stage: int = opt(-1, "DeepSpeed ZeRO stage 0-3; -1: the stage in --deepspeed_config, else 1")
    deepspeed_config: str = opt("", "a DeepSpeed JSON config to start from; our flags fill in the rest")
    # fine-tuning (gptforge/train/finetune/): a stage after pre-training, from --init_from weights
    stage: str = opt("pretrain", "pretrain: language modelling on --dataset; sft: supervised fine-tuning on "
                     "conversations (loss on the responses only); rl: policy-gradient updates against a reward",
                     STAGES)
    task: str = opt("", "a built-in task (generated problems with an exact checker): SFT examples, RL prompts, "
                    "the reward and the held-out accuracy", ("", *TASKS))
    finetune_data: str = opt("", "JSONL of {prompt, response} or {messages: [{role, content}]} lines (SFT), or "
                             "of {prompt, ...} lines (RL); empty: the --task's problems")
    packing: bool = opt(True, "SFT: pack several examples into each row (attention kept within each); false: "
                        "one example per row, padded")
    eval_problems: int = opt(200, "held-out problems whose accuracy (or reward) each evaluation measures")
    reward: str = opt("task", "RL: task (the --task's checker) or module:function, called as "
                      "function(prompt, completion, example) -> float")
    rl_loss: str = opt("grpo", "RL: grpo (PPO's clipped objective over group-normalised advantages) or "
                       "reinforce (REINFORCE with the group's mean reward as baseline)", RL_LOSSES)
    rl_prompts: int = opt(16, "RL: prompts per step, over all ranks")
    group_size: int = opt(8, "RL: completions sampled per prompt")
    ppo_epochs: int = opt(2, "RL: updates on each step's rollouts (grpo)")
    clip_eps: float = opt(0.2, "RL: PPO's clip range, ratios kept in [1 - clip_eps, 1 + clip_eps]")
    kl_coef: float = opt(0.02, "RL: weight of the KL penalty against the frozen starting model")
    temperature: float = opt(1.0, "RL: sampling temperature of the rollouts")
    top_k: int = opt(0, "RL: sample among the top_k tokens only; 0: all")
    top_p: float = opt(1.0, "RL: nucleus sampling's probability mass, in (0, 1]")
    max_new_tokens: int = opt(32, "SFT/RL: the longest response a rollout or an accuracy check generates")

    def __post_init__(self) -> None:
        for name in ("resume", "progress", "compile"):  # True/False from Python or an old trainer.json
            text = str(getattr(self, name)).lower()
            setattr(self, name, {"1": "true", "yes": "true", "0": "false", "no": "false", "": "false"}.get(text, text))
        for f in fields(self):  # the fixed sets of values, as the fields declare them
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                allowed = ", ".join(repr(c) if c == "" else c for c in choices)
                raise ConfigError(f"{f.name} must be one of {allowed}; got {getattr(self, f.name)!r}")
        for f in fields(self):  # NaN passes every comparison below, and inf means nothing here
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}")
            if isinstance(value, int) and not -INT_LIMIT <= value <= INT_LIMIT:  # past an int64: nothing holds it
                raise ConfigError(f"{f.name} must be at most {INT_LIMIT:,} in size, got {value}")
        if self.input and self.dataset in BUILTIN_DATASETS:
            # your text is a dataset of its own, named after its file: never Tiny Shakespeare's folder
            self.dataset = Path(self.input).stem
            if not valid_dataset_name(self.dataset) or self.dataset in BUILTIN_DATASETS:
                raise ConfigError(f"--input {self.input}: its file name {self.dataset!r} cannot name its dataset "
                                  "(not a folder name, or a built-in dataset's); name it with --dataset=NAME")
        if not self.init_from:
            raise ConfigError("init_from must be scratch, resume, a GPT-2 name or a path; got ''")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                    "eval_interval", "eval_iters", "log_interval", "keep_last", "eval_problems", "rl_prompts",
                    "ppo_epochs", "max_new_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "checkpoint_interval", "num_samples",
                     "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("learning_rate", *(("min_lr",) if self.min_lr != -1 else ()), "weight_decay", "grad_clip",
                     "peak_flops"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.final_lr() > self.learning_rate:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be from 0 to {SEED_LIMIT - 1}, got {self.seed}")
        if not -1 <= self.zero_stage <= 3:
            raise ConfigError(f"zero_stage must be 0, 1, 2 or 3 (or -1 for the default), got {self.zero_stage}")
        self._check_finetuning()
        if self.document_mask and self.model == "bigram":
            raise ConfigError("--document_mask=true masks attention, and the bigram model has none; use "
                              "--model=gpt or --document_mask=false")
        if self.deepspeed_config and self.strategy != "deepspeed":
            raise ConfigError("--deepspeed_config is only used with --strategy=deepspeed")
        try:
            self.model_config(vocab_size=1)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def _check_finetuning(self) -> None:
        """The settings of the fine-tuning stages (gptforge/train/finetune/)."""
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages compare completions of one prompt), got "
                              f"{self.group_size}")
        if not 0 < self.clip_eps < 1:
            raise ConfigError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.kl_coef < 0:
            raise ConfigError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0 (rollouts sample), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k} and {self.top_p}")
        if self.stage == "rl" and self.dropout > 0:
            raise ConfigError(f"--stage=rl compares log-probabilities of one model across forward passes, which "
                              f"dropout ({self.dropout}) would make differ; use --dropout=0")
        if self.stage != "pretrain" and (self.document_mask or self.input):
            raise ConfigError(f"--stage={self.stage} reads --task or --finetune_data; --document_mask and --input "
                              "are pre-training's")
        if self.stage == "pretrain" and (self.task or self.finetune_data):
            raise ConfigError("--task and --finetune_data are the fine-tuning stages' data: add --stage=sft or "
                              "--stage=rl (and --init_from a trained model)")

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model these settings describe, for data of ``vocab_size`` tokens."""
        return GPTConfig(vocab_size=vocab_size, **{name: getattr(self, name) for name in MODEL_FIELDS})

    def with_model(self, model_config: GPTConfig) -> TrainConfig:
        """These settings with the model's shape taken from ``model_config`` (pretrained weights)."""
        return dataclasses.replace(self, **{name: getattr(model_config, name) for name in MODEL_FIELDS})

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``: linear warmup to learning_rate, then cosine decay to
        min_lr at lr_decay_iters (or max_iters)."""
        if not self.decay_lr:
            return self.learning_rate
        if step < self.warmup_iters:
            return self.learning_rate * (step + 1) / (self.warmup_iters + 1)
        decay_iters = self.lr_decay_iters or self.max_iters
        if step >= decay_iters:
            return self.final_lr()
        progress = (step - self.warmup_iters) / max(1, decay_iters - self.warmup_iters)
        return self.final_lr() + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.learning_rate - self.final_lr())

    def final_lr(self) -> float:
        """min_lr, or (-1, the default) a tenth of learning_rate, nanoGPT's rule: a lower learning
        rate (a fine-tune, or a resumed run after a NaN) lowers the floor with it."""
        return self.learning_rate / 10 if self.min_lr == -1 else self.min_lr

    def model_changes(self, other: TrainConfig) -> list[tuple[str, object, object]]:
        """(key, ours, other's) for each model field in which ``other`` differs."""
        return [(k, getattr(self, k), getattr(other, k)) for k in MODEL_FIELDS if getattr(self, k) != getattr(other, k)]

    def backends(self) -> dict[str, str]:
        """The kernel backend of each op family (``kernels.use_backend``'s keywords)."""
        return {"attention": self.attn_backend, "layer_norm": self.ln_backend}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# not bool-typed (true, false or auto; a choice), but meaningful bare: --resume means --resume=true
BARE_FLAGS = {"resume": "true", "progress": "true", "compile": "true", "activation_checkpointing": "full"}


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
                return parse_bool(text)
            if t is int:
                return int(text)
            if t is float:
                return float(text)
        except ValueError:
            raise ConfigError(f"--{name} expects {t.__name__}, got {value!r}") from None
        return text
    if name in BARE_FLAGS and isinstance(value, bool):  # resume = true (compile = true ...) in a TOML file
        if name == "activation_checkpointing":
            return BARE_FLAGS[name] if value else "none"
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


PRESETS_DIR = Path(__file__).resolve().parent / "configs"  # installed with the package


def find_config(path: str | Path) -> Path:
    """A TOML file's path, or the name of a preset shipped in gptforge/train/configs/
    (``shakespeare_char_cpu`` or ``shakespeare_char_cpu.toml``), so presets work from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent != Path("."):  # a path, not a name
        raise ConfigError(f"config file {path} not found")
    preset = PRESETS_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if preset.is_file():
        return preset
    names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.toml")))
    raise ConfigError(f"config file {path} not found, nor a preset of that name ({names})")


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> TrainConfig:
    """Defaults, then the TOML file at ``path``, then string overrides (from the command line)."""
    values: dict[str, object] = {}
    if path:
        path = find_config(path)
        try:
            table = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
        _check_known(table, str(path))
        values.update({k: _coerce(k, v, from_text=False) for k, v in table.items()})
    overrides = overrides or {}
    _check_known(overrides, "the command line")
    values.update({k: _coerce(k, v, from_text=True) for k, v in overrides.items()})
    cfg = TrainConfig(**values)
    cfg.explicit = frozenset(values)  # what the user set: a resumed run takes the rest from its checkpoint
    return cfg


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
            elif key.replace("-", "_") in BARE_FLAGS:
                value = BARE_FLAGS[key.replace("-", "_")]
            elif key in {f.name for f in fields(TrainConfig)} and _field_type(key) is bool:
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
    """Every key with its default, type, description and allowed values, for --help."""
    rows = []
    for f in fields(TrainConfig):
        choices = f.metadata.get("choices")
        allowed = " [" + "|".join(c or "''" for c in choices) + "]" if choices else ""
        text = f.metadata.get("help", "") + allowed
        rows.append((f"--{f.name}={f.default!r}", _field_type(f.name).__name__, text))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"  {flag:<{width}}  {kind:<5}  {text}" for flag, kind, text in rows)
