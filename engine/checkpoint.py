"""Checkpoints that a crash or kill cannot destroy, and what a training checkpoint holds (`TrainingCheckpoint`).

Each checkpoint is written to a temporary name, flushed and fsynced, then renamed into place
(engine.atomic_files.atomic_write); the `latest` pointer is replaced the same way only after that.
Loading falls back to the previous checkpoint when the newest cannot be read, with a warning naming it.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

import engine
from engine.atomic_files import atomic_write, remove_stale_temporaries
from engine.data.stream_position import data_position, rank_position, stream_layout
from engine.distributed import DistributedContext, all_gather_objects
from engine.rng import step_seed

if TYPE_CHECKING:
    from engine.config import Config
    from engine.data.stream_position import StreamPosition
    from engine.rng import Generators

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


# ----------------------------------------------------------------------------- the training state as a checkpoint

# The small parts every rank needs, which rank 0 (the one that reads the file) broadcasts: the header.
HEADER = ("step", "lr_schedule", "scaler", "rng", "counters", "data_position")


class Part(Protocol):
    """A part of the training state that a checkpoint holds."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class TrainingCheckpoint:
    """The training state as a checkpoint, each part under its fixed name, and back:

    - the trainer (engine.trainer.Trainer: model, EMAs, optimizer, LR schedule, scaler, kernels) under its own keys;
    - per rank, as lists in rank order: the counters ("counters", engine.trainer.TrainState), the global
      generators ("rng", engine.rng.Generators) and the data stream's position ("data_position", with the layout
      it holds for: engine.data.stream_position);
    - "step", "config" and "engine_version".

    A rank without a saved part of its own (another world size or stream layout, or an older checkpoint) goes
    on from the step: the ranks' mean counters, generators reseeded, a fresh stream of the step's seed.
    """

    def __init__(self, config: Config, context: DistributedContext, trainer: Part, counters: Part,
                 generators: Generators, stream: StreamPosition, log: Callable[[str], None]):
        self.config, self.context, self.log = config, context, log
        self.trainer, self.counters, self.generators, self.stream = trainer, counters, generators, stream
        self.run_dir = Path(config.train.run_dir)
        self.stream_layout = stream_layout(context.world_size, config.data.num_workers, trainer.micro_batch,
                                           config.train.seed)
        self.saved_step = 0  # the step of the latest checkpoint written or resumed from
        self.best_path = self.run_dir / CHECKPOINT_DIR / BEST

    def state_dict(self) -> dict[str, Any]:
        """Every rank takes part (the trainer gathers FSDP shards, the per-rank parts are gathered); rank 0's is
        the whole checkpoint."""
        trainer = self.trainer.state_dict()
        counters, generators, streams = (all_gather_objects(part.state_dict())
                                         for part in (self.counters, self.generators, self.stream))
        return {"step": self.counters.step, **trainer, "counters": counters, "rng": generators,
                "data_position": data_position(self.stream_layout, streams),
                "config": self.config.to_dict(), "engine_version": engine.__version__}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        """Every part but the generators (`load_generators`). Every rank calls it: rank 0 with the whole checkpoint,
        the others with its header (`read_latest`; the trainer's tensors reach them from rank 0)."""
        step, context = int(checkpoint["step"]), self.context
        self.trainer.load_state_dict(checkpoint)
        saved_counters = checkpoint.get("counters")
        self.counters.load_state_dict(own_part(saved_counters, context) or
                                      mean_counters(saved_counters, step, context.world_size,
                                                    self.config.train.batch_size))
        position = rank_position(checkpoint.get("data_position"), self.stream_layout, context.rank)
        if position is not None:
            self.stream.load_state_dict(position)
        else:
            self.stream.restart(step_seed(self.config.train.seed, step))
            if self.config.data.cache != "device":  # the device cache resumes from the step alone
                self.log("the data stream starts afresh (seeded by the step): the checkpoint's stream positions "
                         "are for another world size, worker count or batch size")
        self.saved_step = step

    def load_generators(self, checkpoint: dict[str, Any]) -> None:
        """The generators: last thing before the first step, since setting up the run draws from them too."""
        saved = own_part(checkpoint.get("rng"), self.context)
        if saved is not None:
            self.generators.load_state_dict(saved)
            return
        self.generators.reseed(int(checkpoint["step"]))
        self.log("the checkpoint holds no generator states for this world size: dropout's generators are "
                 "reseeded from (seed, rank, step)")

    def read_latest(self) -> dict[str, Any] | None:
        """The run's latest checkpoint, None if it has none: rank 0 reads it, and its header (what every rank
        needs besides the tensors, small enough to broadcast as objects) reaches the other ranks, which get that
        alone; no shared disk needed. "path" names the file."""
        found = load_latest_checkpoint(self.run_dir, map_location="cpu") if self.context.is_main else None
        header = None
        if found is not None:
            header = {**{key: found[0].get(key) for key in HEADER}, "step": int(found[0]["step"]),
                      "path": str(found[1])}
        if self.context.is_distributed:
            shared = [header]
            torch.distributed.broadcast_object_list(shared, src=0)
            header = shared[0]
        return None if header is None else {**(found[0] if found else {}), **header}

    def resume(self) -> dict[str, Any] | None:
        """Every part but the generators from the run's latest checkpoint, if there is one; returns its header."""
        checkpoint = self.read_latest()
        if checkpoint is None:
            return None
        self.load_state_dict(checkpoint)
        self.log(f"resumed from {checkpoint['path']} at step {self.counters.step}")
        return {key: checkpoint[key] for key in (*HEADER, "path")}

    def save(self) -> None:
        """The step's checkpoint: every rank gathers its part, rank 0 writes it."""
        checkpoint = self.state_dict()
        if self.context.is_main:
            save_checkpoint(self.run_dir, self.counters.step, checkpoint, keep=self.config.train.keep_checkpoints)
        self.saved_step = self.counters.step

    def save_best(self, score: dict[str, Any]) -> None:
        """best.pt, with `score` ({"metric", "value", "step"}); every rank gathers its part, rank 0 writes it."""
        checkpoint = self.state_dict()
        if self.context.is_main:
            save_best_checkpoint(self.run_dir, checkpoint, score)

    def read_best_score(self) -> dict[str, Any] | None:
        """best.pt's score, read by rank 0 and given to every rank."""
        return all_gather_objects(best_score(self.run_dir) if self.context.is_main else None)[0]


def own_part(saved: list | None, context: DistributedContext) -> Any:
    """This rank's entry of a per-rank list saved under the same world size, else None."""
    return saved[context.rank] if saved and len(saved) == context.world_size else None


def mean_counters(saved: list[dict] | None, step: int, world_size: int, batch_size: int) -> dict[str, int]:
    """A rank's counters from those saved under another world size: the ranks' mean; from a checkpoint of before
    the counters were saved, the samples of the steps trained and nothing skipped."""
    if not saved:
        return {"step": step, "skipped_samples": 0, "delivered_samples": step * batch_size // world_size,
                "nonfinite_steps": 0}
    mean = {key: sum(rank[key] for rank in saved) // len(saved) for key in saved[0]}
    return {**mean, "step": step, "nonfinite_steps": saved[0]["nonfinite_steps"]}
