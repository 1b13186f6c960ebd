"""What ``--resume`` continues: the saved run, with only the changes its rules allow.

A resumed run takes its configuration from the checkpoint (trainer.json), not from the
defaults: ``python -m gptforge.train --out_dir=RUN --resume`` continues RUN as it was, with no need to
repeat its preset or flags. What the command line (or a ``--config`` file) sets explicitly is
compared with the saved value:

- keys that decide the data, its order or the model (``FIXED_ON_RESUME``) must not change: a
  resumed run that changed them would silently be another run. Start that one in another
  out_dir (or with --overwrite).
- every other key may change (a longer ``max_iters``, a lower ``learning_rate`` after a NaN,
  another ``eval_interval`` or ``device``): the change is applied and printed, one line per key.
- where to continue (``out_dir``) and how (``resume``, ``overwrite``) always come from this
  command, never from the checkpoint: a run folder may have been copied or moved.

"Set explicitly" is exact on the command line (``load_config`` records the keys). For a
TrainConfig built in Python, the keys whose value differs from the default count as set.

``resume_checkpoint`` then loads the checkpoint into the run's strategy, falling back to an
older one (on every rank alike) when one cannot be loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

from gptforge.gpt.config import GPTConfig
from gptforge.gpt.io import read_info
from gptforge.gpt.tokenizer import describe_tokenizer, same_tokenizer
from gptforge.train import checkpoint
from gptforge.train.config import ConfigError, TrainConfig
from gptforge.train.distributed import ProcessGroup
from gptforge.train.strategy import Strategy

# key -> what changing it would change
FIXED_ON_RESUME = {
    "dataset": "the training data", "input": "the training data", "tokenizer": "the tokens",
    "model": "the model", "n_layer": "the model's shape", "n_head": "the model's shape", "n_embd": "the model's shape",
    "block_size": "the model's shape and the batches", "bias": "the model's parameters",
    "batch_size": "the batches and their order", "gradient_accumulation_steps": "the batches and their order",
    "seed": "the order of the batches", "activation": "the model", "rope": "the model's parameters",
    "qk_norm": "the model", "tie_embeddings": "the model's parameters", "optimizer": "the optimizer state",
    "document_mask": "what the model attends to", "stage": "what is trained", "task": "the training data",
    "finetune_data": "the training data", "packing": "the batches", "rl_prompts": "the rollouts",
    "group_size": "the rollouts", "rl_loss": "the objective",
}  # fmt: skip
FROM_THIS_COMMAND = ("out_dir", "resume", "overwrite")  # where and how to continue, not what
NOT_REPORTED = {*FROM_THIS_COMMAND, "init_from"}


def resume_mode(cfg: TrainConfig) -> str:
    """"true", "auto" or "false": --init_from=resume means true; a torchelastic restart of a
    fresh run resumes if it can (the first launch and every restart are the same command)."""
    mode = "true" if cfg.init_from == "resume" else cfg.resume
    if mode == "false" and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return "auto"
    return mode


def explicit_keys(cfg: TrainConfig) -> frozenset[str]:
    """The keys the user set (load_config records them); for a config built in Python, the
    keys whose value differs from the default."""
    recorded = getattr(cfg, "explicit", None)
    if recorded is not None:
        return recorded
    defaults = TrainConfig()
    return frozenset(f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name))


def saved_config(out_dir: str | Path) -> tuple[dict, Path] | None:
    """The config of the newest checkpoint whose trainer.json reads, and that checkpoint."""
    for directory in reversed(checkpoint.list_checkpoints(out_dir)):
        try:
            return json.loads((directory / "trainer.json").read_text())["config"], directory
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged: the newest good checkpoint is chosen (and reported) later
    return None


def resume_config(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainConfig:
    """The config a run with ``cfg`` trains with: ``cfg`` for a fresh run; for a resumed one,
    the saved config with the explicit changes ``cfg`` makes, each printed, or a ConfigError
    if one of them is a key a resumed run must keep."""
    if resume_mode(cfg) == "false":
        return cfg
    found = saved_config(cfg.out_dir)
    if found is None:
        return cfg  # nothing to continue: --resume=true says so once the checkpoints are checked
    saved_raw, directory = found
    saved = normalised(saved_raw, directory)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    explicit = explicit_keys(cfg)
    merged = {**saved, **{k: getattr(cfg, k) for k in (*explicit, *FROM_THIS_COMMAND)}}
    if saved.get("init_from") not in ("scratch", "resume") and "init_from" not in explicit:
        merged["init_from"] = "resume"  # the checkpoint holds the weights: do not load them from their source
    resumed = TrainConfig(**merged)
    resumed.explicit = explicit
    resumed.checkpoint_vocab_size = _vocab_size(directory)
    changes = [(k, saved[k], getattr(resumed, k)) for k in names
               if k not in NOT_REPORTED and not _same(k, saved[k], getattr(resumed, k))]  # fmt: skip
    refused = [f"{k} {old!r} -> {new!r} ({FIXED_ON_RESUME[k]})" for k, old, new in changes if k in FIXED_ON_RESUME]
    if refused:
        raise ConfigError(
            f"--resume continues the run saved in {directory}, and a resumed run keeps its data and model, but this "
            f"command changes {'; '.join(refused)}: drop those flags, or start a new run (another --out_dir, or "
            "--overwrite)"
        )
    for key, old, new in changes:
        log(f"resume: {key} {old!r} -> {new!r} (set on this command line; the saved run had {old!r})")
    return resumed


def normalised(saved: dict, directory: Path) -> dict:
    """A saved config as this version reads it (an older version kept the dataset name a
    preset gave beside --input, say); keys it no longer knows are dropped, new ones default."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    # compile and progress were booleans (TrainConfig reads those as "true"/"false"); progress=true was the
    # old default, not a choice about where the output goes: it becomes today's default, auto
    saved = {**saved, "progress": "auto"} if saved.get("progress") is True else saved
    try:
        return TrainConfig(**{k: v for k, v in saved.items() if k in names}).to_dict()
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"the run saved in {directory} has a configuration this version refuses ({err}); "
                          "start a new run (another --out_dir, or --overwrite)") from None


def _same(key: str, old: object, new: object) -> bool:
    if key == "input" and old and new:  # one file, however the path is written
        return Path(str(old)).resolve() == Path(str(new)).resolve()
    return old == new


def _vocab_size(directory: Path) -> int | None:
    """The vocabulary of the checkpoint's model (fine-tuned weights may have a padded one)."""
    try:
        return int(read_info(directory)["config"]["vocab_size"])
    except (OSError, ValueError):
        return None


def check_same_run(cfg: TrainConfig, directory: Path, trainer_config: dict) -> None:
    """The checkpoint about to be loaded (perhaps an older one than resume_config read, after a
    damaged newer one) must be of the same run in every key a resumed run keeps."""
    trainer_config = normalised(trainer_config, directory)
    differ = [f"{k} {trainer_config[k]!r} (this run: {getattr(cfg, k)!r})" for k in FIXED_ON_RESUME
              if k in trainer_config and not _same(k, trainer_config[k], getattr(cfg, k))]  # fmt: skip
    if differ:
        raise ConfigError(f"checkpoint {directory} is of another run: {'; '.join(differ)}")


def checkpoint_to_resume(cfg: TrainConfig, group: ProcessGroup, log: Callable[[str], None],
                         before: Path | None = None, problems: list[str] = ()) -> Path | None:
    """The checkpoint this run continues from, or None for a fresh start. --resume=true needs
    one; --resume=auto takes one if there is one, as does a torchelastic restart, so that the
    first launch and every restart are the same command. ``before``: only checkpoints older
    than it (it could not be loaded, for the reasons in ``problems``). Rank 0 verifies the
    checkpoints (hashing every file once) and tells the others which to load."""
    mode, out_dir = resume_mode(cfg), Path(cfg.out_dir)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 and cfg.resume == "false" and cfg.init_from != "resume" and before is None:
        log(f"torchelastic restart {restart}: continuing from the newest good checkpoint, if any")
    if mode == "false":
        return None
    problems = list(problems)

    def report(problem: str) -> None:
        problems.append(problem)
        log(problem)

    directory = checkpoint.latest_valid(out_dir, warn=report, before=before) if group.is_main else None
    directory, problems = group.broadcast_object((directory, problems))
    if directory is None and (mode == "true" or problems):
        found = f": {'; '.join(problems)}" if problems else ""
        raise ConfigError(f"--resume: no usable checkpoint in {out_dir / 'checkpoints'}{found}")
    if directory is not None and problems:
        log(f"falling back to {directory}, the newest usable checkpoint")
    return directory


def check_resumable(cfg: TrainConfig, model_config: GPTConfig, directory: Path,
                    tokenizer_meta: dict | None = None) -> None:
    """The checkpoint in ``directory`` holds a model of ``model_config``'s shape, of this run,
    trained on the tokens of ``tokenizer_meta`` (the dataset's tokenizer, where given)."""
    info = read_info(directory)
    saved = GPTConfig.from_dict(info["config"])
    if saved != model_config:
        raise ConfigError(f"checkpoint {directory} holds a model of shape {saved.to_dict()}, "
                          f"but this run asks for {model_config.to_dict()}")
    check_same_run(cfg, directory, json.loads((directory / "trainer.json").read_text())["config"])
    trained_on = info.get("tokenizer")
    # the same dataset name and vocabulary size may hold another tokenizer's ids (prepared again)
    if tokenizer_meta is not None and isinstance(trained_on, dict) and not same_tokenizer(trained_on, tokenizer_meta):
        raise ConfigError(f"checkpoint {directory} was trained on the tokens of the {describe_tokenizer(trained_on)} "
                          f"tokenizer, but dataset {cfg.dataset!r} now holds those of the "
                          f"{describe_tokenizer(tokenizer_meta)} one (prepared again?): one model cannot learn two "
                          "token spaces; prepare the data with the checkpoint's tokenizer under another name, or "
                          "start a new run (another --out_dir, or --overwrite)")


def resume_checkpoint(cfg: TrainConfig, strategy: Strategy, log: Callable[[str], None],
                      tokenizer_meta: dict | None = None) -> dict | None:
    """Load the checkpoint this run continues from into ``strategy`` (set up already), if any;
    its trainer state (trainer.json), or None for a fresh start. A checkpoint that passed its
    manifest but cannot be loaded makes every rank fall back alike to the one before it. A
    ConfigError if out_dir holds an earlier run's checkpoints and this run neither resumes nor
    overwrites them. ``tokenizer_meta``: the dataset's tokenizer, which must be the checkpoint's."""
    group, out_dir = strategy.group, Path(cfg.out_dir)
    directory, unusable = checkpoint_to_resume(cfg, group, log), []
    while directory is not None:
        try:
            check_resumable(cfg, strategy.model.config, directory, tokenizer_meta)
            state = strategy.load(directory)
            error = None
        except checkpoint.CheckpointError as err:
            error = str(err)
        errors = [e for e in group.gather_objects(error) if e is not None]
        if not errors:
            log(f"resumed from {directory} at step {state['step']}")
            return state
        unusable.append(f"checkpoint {directory} is unusable ({errors[0]})")
        log(f"{unusable[-1]}; trying the previous one")
        directory = checkpoint_to_resume(cfg, group, log, before=directory, problems=unusable)
    if checkpoint.list_checkpoints(out_dir) and not cfg.overwrite:
        raise ConfigError(f"{out_dir} holds checkpoints of an earlier run; pass --resume to continue it, "
                          "--overwrite to start afresh and replace them, or choose another --out_dir")
    return None
