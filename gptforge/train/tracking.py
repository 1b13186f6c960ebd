"""Experiment trackers: TensorBoard (``--tensorboard_log``) and Weights & Biases (``--wandb_log``,
nanoGPT's keys), both optional: ``pip install -e ".[tensorboard]"`` or ``".[wandb]"``.

Metrics.record (gptforge/train/metrics.py) hands every row it records to every tracker. A row's
numeric fields go in as scalars at the row's step, nested ones flattened
(``memory_per_rank/0/parameters``), so whatever a stage records (pre-training's loss and MFU, a
fine-tuning stage's reward, accuracy or KL) reaches the dashboard with no code here. The config
goes in as hyperparameters and the samples as text. Only rank 0 opens trackers.

A tracker that fails during a run (a full disk, a W&B error) is reported once and dropped: the
run and its metrics.jsonl go on without it.
"""

from __future__ import annotations

import importlib.util
import math
import netrc
import os
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse

from gptforge.train.config import ConfigError, TrainConfig

Log = Callable[[str], None]
TENSORBOARD_DIR = "tensorboard"  # inside out_dir unless --tensorboard_dir says otherwise
WANDB_ID_FILE = "wandb_run_id"  # out_dir/: a resumed run goes on in the same W&B run


class Tracker(Protocol):
    name: str

    def start(self, resumed_at: int | None) -> None:
        """Open the run: fresh (``resumed_at`` None) or resumed after the checkpoint of that step."""

    def scalars(self, step: int, values: dict[str, float]) -> None: ...

    def text(self, name: str, text: str, step: int) -> None: ...

    def close(self) -> None: ...


def scalars_of(row: dict, prefix: str = "") -> dict[str, float]:
    """The numeric fields of a metrics row, nested dicts and lists flattened into ``a/b`` keys;
    text, None and booleans are left out (a row's "skipped" reason, say)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars_of(value, f"{name}/"))
        elif isinstance(value, list | tuple):
            out.update(scalars_of(dict(enumerate(value)), f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def require(package: str, extra: str, flag: str) -> None:
    """A ConfigError (one line, exit 2) naming the pip command when ``package`` is not installed."""
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"--{flag}=true needs the {package} package: pip install -e \".[{extra}]\" "
                          f"(or pip install {package})")


def open_trackers(cfg: TrainConfig, out_dir: Path, log: Log) -> list[Tracker]:
    """The trackers ``cfg`` asks for (not yet started), each checked to be installed."""
    trackers: list[Tracker] = []
    if cfg.tensorboard_log:
        require("tensorboard", "tensorboard", "tensorboard_log")
        folder = Path(cfg.tensorboard_dir) if cfg.tensorboard_dir else out_dir / TENSORBOARD_DIR
        trackers.append(TensorBoard(folder, cfg.to_dict(), own_folder=not cfg.tensorboard_dir))
    if cfg.wandb_log:
        require("wandb", "wandb", "wandb_log")
        trackers.append(WandB(out_dir, cfg.wandb_project, cfg.wandb_run_name or out_dir.resolve().name,
                              cfg.to_dict(), log))
    return trackers


def hyperparameters(config: dict) -> dict:
    """The config's values TensorBoard's hparams plugin takes (numbers, text, booleans)."""
    return {k: v for k, v in config.items() if isinstance(v, int | float | str | bool)}


class TensorBoard:
    """Event files in ``folder``. A fresh run starts its steps over (``purge_step=0``: TensorBoard
    drops what an earlier run wrote there), a resumed one drops the steps after its checkpoint,
    as metrics.jsonl does; in its default folder inside out_dir the earlier run's files go."""

    name = "tensorboard"

    def __init__(self, folder: Path, config: dict, own_folder: bool):
        self.folder, self.config, self.own_folder = folder, config, own_folder
        self.writer = None

    def start(self, resumed_at: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        if resumed_at is None and self.own_folder and self.folder.is_dir():
            shutil.rmtree(self.folder)
        self.writer = SummaryWriter(str(self.folder), purge_step=0 if resumed_at is None else resumed_at + 1)
        for summary in hparams(hyperparameters(self.config), {}):  # the hparams tab: this run's config
            self.writer.file_writer.add_summary(summary)
        table = "\n".join(f"| {k} | {v!r} |" for k, v in self.config.items())
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + table, resumed_at or 0)
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a row per log interval: cheap, and nothing is lost to a crash

    def text(self, name: str, text: str, step: int) -> None:
        self.writer.add_text(name, "```\n" + text + "\n```", step)  # fenced: markdown would eat the newlines
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandB:
    """One W&B run per out_dir (a resumed run continues it), logged against the row's ``step``.
    Online with an API key and a reachable server, else offline, said in one line."""

    name = "wandb"

    def __init__(self, out_dir: Path, project: str, run_name: str, config: dict, log: Log):
        self.out_dir, self.project, self.run_name, self.config, self.log = out_dir, project, run_name, config, log
        self.run = None

    def start(self, resumed_at: int | None) -> None:
        import wandb

        id_file = self.out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resumed_at is not None and id_file.is_file() else None
        run_id = run_id or secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        mode, why = wandb_mode()
        settings = wandb.Settings(silent=True, console="off")  # our log lines stay ours; the one line below says where
        self.run = wandb.init(project=self.project, name=self.run_name, config=self.config, dir=str(self.out_dir),
                              id=run_id, resume="allow", mode=mode, settings=settings)
        self.run.define_metric("*", step_metric="step")  # a resumed run may log a step again: no ordering rule
        if mode == "offline":
            folder = Path(self.run.dir).parent
            self.log(f"wandb: {why}: logging offline to {folder}; upload it later with `wandb sync {folder}`")
        elif mode != "disabled":
            self.log(f"wandb: logging to {self.run.url or self.project}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({**{k: v for k, v in values.items() if math.isfinite(v)}, "step": step})

    def text(self, name: str, text: str, step: int) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=["text"], data=[[text]]), "step": step})

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def wandb_mode() -> tuple[str, str]:
    """("online" | "offline" | WANDB_MODE's value, why). WANDB_MODE wins; without it, offline
    when there is no API key (WANDB_API_KEY or ``wandb login``'s ~/.netrc entry) or the server
    does not answer within 2 s."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], f"WANDB_MODE={os.environ['WANDB_MODE']}"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY") and not _netrc_has(host):
        return "offline", "no API key (run `wandb login` or set WANDB_API_KEY)"
    try:
        socket.create_connection((host, 443), timeout=2).close()
    except OSError as err:
        return "offline", f"{host} cannot be reached ({err.strerror or err})"
    return "online", ""


def _netrc_has(host: str) -> bool:
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
