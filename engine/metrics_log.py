"""One JSONL metrics file per run (mirrored to TensorBoard and W&B when asked), and reading it back.

(FID and KID are engine.evaluate's; the loss curve drawn from this file is engine.plot's.)"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from engine.config import ConfigError


class MetricsLog:
    """Appends one JSON object per line. On resume, records past the resumed step are dropped,
    since those steps are about to be trained again.

    With `tensorboard_dir`, every numeric field of a record is also a TensorBoard scalar (tag = field
    name) at the record's step, images go there too, and events past the resumed step are purged.
    A `wandb_run` (`start_wandb`) gets the same scalars and images.
    """

    def __init__(self, path: str | Path, resume_step: int = 0, tensorboard_dir: str | Path | None = None,
                 wandb_run: Any = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = open(self.path, "a")
        self._tensorboard = None
        if tensorboard_dir is not None:
            summary_writer = tensorboard_writer_class()
            self._tensorboard = summary_writer(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)
        self._wandb = wandb_run

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if "step" not in record:
            return
        scalars = {name: value for name, value in record.items()
                   if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, record["step"])
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An (H, W, C) uint8 image (e.g. a sample grid), to TensorBoard and W&B (not to the JSONL)."""
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, image, step, dataformats="HWC")
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log({tag: wandb_module().Image(image)}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_module():
    """The wandb package, or a clear error when the optional dependency is missing."""
    try:
        import wandb
    except ImportError as error:
        raise ConfigError("train.wandb is true but the wandb package is not installed; pip install "
                          "'ddpm-engine[wandb]' (or wandb), or set train.wandb=false") from error
    return wandb


def start_wandb(options, run_dir: Path, config: dict[str, Any]):
    """A W&B run for this run directory (`train.wandb_*` options; its files under RUN_DIR/wandb). Its id is kept
    in RUN_DIR/wandb_run_id, so that a resumed training run continues the same W&B run (W&B ignores the steps
    it has already seen: an exact resume logs the same values for them anyway)."""
    wandb = wandb_module()
    id_file = Path(run_dir) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)  # W&B ids: [a-z0-9]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=options.wandb_project or None, name=options.wandb_name or Path(run_dir).name,
                      id=run_id, resume="allow", dir=str(run_dir), config=config, mode=options.wandb_mode or None)


def tensorboard_writer_class():
    """torch's SummaryWriter, or a clear error when the optional tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch.utils.tensorboard imports the tensorboard package
        raise ConfigError("train.tensorboard is true but the tensorboard package is not installed; "
                          "pip install 'ddpm-engine[tensorboard]' (or tensorboard), or set train.tensorboard=false") from error
    return SummaryWriter


def _step_of(line: str) -> float:
    try:
        return json.loads(line).get("step", math.inf)
    except (json.JSONDecodeError, AttributeError):
        return math.inf  # a line cut off by a kill


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
