"""Checkpoints that a crash or kill cannot destroy.

Each checkpoint is written to a temporary name, flushed and fsynced, then renamed into place
(engine.atomic_files.atomic_write); the `latest` pointer is replaced the same way only after that.
Loading falls back to the previous checkpoint when the newest cannot be read, with a warning naming it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from engine.atomic_files import atomic_write, remove_stale_temporaries

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
BEST = "best.pt"  # train.keep_best's checkpoint: never pruned, never resumed from
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointError(OSError):
    """A checkpoint could not be written (full disk, no permission): one line; the previous one is intact."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def checkpoint_step(name: str) -> int | None:
    """The step of a `checkpoint_name`, or None for any other file name."""
    return int(match.group(1)) if (match := _NAME.match(name)) else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary files are never listed)."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := checkpoint_step(p.name)) is not None]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write `state` as the checkpoint of `step`, point `latest` at it, keep the newest `keep`."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    path = folder / checkpoint_name(step)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: torch.save(state, file))
        atomic_write(folder / LATEST, lambda file: file.write(path.name.encode() + b"\n"))
    except OSError as error:  # the temporary file is gone and `latest` still names the previous checkpoint
        previous = list_checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no previous checkpoint"
        raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}; {kept}") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    remove_stale_temporaries(folder)  # half-written by a process that was killed mid-save
    return path


def save_best_checkpoint(run_dir: str | Path, state: dict[str, Any], score: dict[str, Any]) -> Path:
    """Replace checkpoints/best.pt, as atomically as the others, by `state` with `score` under "best"
    ({"metric", "value", "step"}); the previous best stays until the new one is complete."""
    path = Path(run_dir) / CHECKPOINT_DIR / BEST
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: torch.save({**state, "best": score}, file))
    except OSError as error:
        raise CheckpointError(f"cannot write the best checkpoint {path}: {error.strerror or error}; the previous "
                              f"best checkpoint is intact") from None
    return path


def best_score(run_dir: str | Path) -> dict[str, Any] | None:
    """The score of checkpoints/best.pt ({"metric", "value", "step"}), or None if there is none (or unreadable)."""
    path = Path(run_dir) / CHECKPOINT_DIR / BEST
    if not path.is_file():
        return None
    try:  # mmap: the score without reading the weights
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("best")
    except Exception as error:
        warnings.warn(f"the best checkpoint {path} cannot be read ({type(error).__name__}: {error}); the next "
                      f"evaluation replaces it")
        return None


def load_latest_checkpoint(run_dir: str | Path, map_location: Any = "cpu") -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of a run and its path, or None when the run has none."""
    candidates = list_checkpoints(run_dir)
    pointer = Path(run_dir) / CHECKPOINT_DIR / LATEST
    if pointer.is_file():  # trust the pointer first; it is only written after a complete save
        named = pointer.parent / pointer.read_text().strip()
        if named in candidates:
            candidates.remove(named)
            candidates.append(named)
    for path in reversed(candidates):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # truncated or corrupt: fall back to the one before
            warnings.warn(f"checkpoint {path} cannot be read ({type(error).__name__}: {error}); trying the previous one")
            continue
        if not isinstance(state, dict) or "step" not in state or "model" not in state:
            warnings.warn(f"checkpoint {path} is not a complete training checkpoint; trying the previous one")
            continue
        return state, path
    return None
