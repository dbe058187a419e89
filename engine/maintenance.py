"""What runs between training steps: the maintenance concerns, each a small object that says when it is due
(`due(step)`, from its interval and the run's final step) and does its work (`run(step)`; True stops the loop).

`TrainingRun.maintenance` asks them in this order after every step:

1. `LogInterval` (train.log_every): the interval's means to the metrics, and the checks that end a run;
2. `PostHocSnapshots` (train.post_hoc_ema_every): before the checkpoint, so that a resume never lacks them;
3. `Checkpoints` (train.checkpoint_every);
4. `StopOnRequest`: the ranks' agreed stop on SIGTERM/SIGINT writes the step's checkpoint and ends the loop;
5. `SampleGrids` (train.sample_every): not at the final step, whose grid the run writes when it finishes;
6. `Evaluation` (FID/KID, eval.every) and 7. `Validation` (eval.val_every), each offering its scores to
   `BestCheckpoint` (train.keep_best).

Those that are on (an interval of 0 is off) are also due at the final step (train.steps), but the stop and the
grids. Every rank runs every concern, so that their collectives match; files are written by rank 0.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from engine.checkpoint import TrainingCheckpoint
from engine.config import Config
from engine.distributed import DistributedContext
from engine.metrics_log import MetricsLog
from engine.post_hoc_ema import post_hoc_name, remove_snapshots_after, save_snapshots
from engine.preemption import StopRequest, agreed_stop
from engine.throughput import interval_metrics, progress_fields
from engine.trainer import IntervalStats, Trainer, TrainState, noise_level_names
from engine.validation import ValidationLoss, validation_record


class Concern(Protocol):
    """What `TrainingRun.maintenance` asks after every step: `due(step)`, then, if so, `run(step)`."""

    def due(self, step: int) -> bool: ...

    def run(self, step: int) -> bool | None: ...


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. only non-finite steps): one line naming the step (exit status 1)."""


def due_every(step: int, every: int, final_step: int) -> bool:
    """Every `every` steps (never when 0), and at the final step."""
    return bool(every) and (step % every == 0 or step == final_step)


@dataclasses.dataclass
class LogInterval:
    """The interval's means (one host sync) to metrics.jsonl and the progress bar; then the checks on them."""

    config: Config
    context: DistributedContext
    trainer: Trainer
    state: TrainState
    interval: IntervalStats
    metrics: MetricsLog | None
    progress: Any
    flops_per_image: float  # engine.throughput's, for the MFU
    peak_flops: float | None

    def due(self, step: int) -> bool:
        return due_every(step, self.config.train.log_every, self.config.train.steps)

    def run(self, step: int) -> None:
        config, context, state, interval = self.config, self.context, self.state, self.interval
        reduced = interval.reduce(context)
        state.nonfinite_steps += reduced["nonfinite_steps"]
        record = {"step": step, "loss": reduced["loss"], "lr": float(self.trainer.lr_schedule.get_last_lr()[0]),
                  "grad_norm": reduced["grad_norm"], "skipped_samples": state.skipped_samples,
                  "nonfinite_steps": reduced["nonfinite_steps"], "time": time.time(),
                  "maintenance_seconds": interval.maintenance_seconds,
                  **dict(zip(noise_level_names(self.trainer.schedule.num_timesteps), reduced["loss_by_level"])),
                  **interval_metrics(steps=interval.steps, images=interval.steps * config.train.batch_size,
                                     seconds=interval.training_seconds(), data_wait_seconds=interval.data_wait,
                                     world_size=context.world_size, flops_per_image=self.flops_per_image,
                                     peak_flops_per_device=self.peak_flops, device=context.device)}
        if self.metrics is not None:
            self.metrics.write(record)
        self.progress.set_postfix(loss=f"{reduced['loss']:.4f}", **progress_fields(record))
        interval.restart()
        check_bad_fraction(state.skipped_samples, state.delivered_samples, config.data, step, self.progress)
        streak, limit = reduced["nonfinite_streak"], config.train.max_nonfinite_steps
        if streak >= limit:
            self.progress.close()
            raise TrainingError(
                f"step {step}: the last {streak} steps had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={limit}); none was applied, so the checkpoints hold the weights of "
                f"step {step - streak}; lower optim.lr or check the data")


def check_bad_fraction(skipped: int, delivered: int, cfg_data, step: int, progress) -> None:
    """Stop rather than train on a trickle of data: too many skipped samples is an error (this rank's counts,
    both over the same span: every step since the run began, resumes included)."""
    seen = skipped + delivered
    if seen >= 100 and skipped > cfg_data.max_bad_fraction * seen:
        progress.close()
        raise TrainingError(f"step {step}: {skipped} of the {seen} samples read from {cfg_data.path} could not be used "
                            f"({skipped / seen:.0%} > data.max_bad_fraction={cfg_data.max_bad_fraction}); the warnings "
                            f"above name the shards; prepare the data set again")


@dataclasses.dataclass
class PostHocSnapshots:
    """The post-hoc EMA profiles' snapshots (engine.post_hoc_ema), written by rank 0; every rank gathers."""

    folder: Path
    emas: dict[float, Any]
    every: int  # train.post_hoc_ema_every, by default train.checkpoint_every
    final_step: int
    is_main: bool

    def due(self, step: int) -> bool:
        return bool(self.emas) and due_every(step, self.every, self.final_step)

    def run(self, step: int) -> None:
        save_snapshots(self.folder, self.emas, step, self.is_main)

    def remove_after(self, step: int, log: Callable[[str], None]) -> None:
        """At the start from `step`: those a killed run wrote after it (this run writes them again)."""
        if self.is_main and (removed := remove_snapshots_after(self.folder, step)):
            log(f"removed {removed} post-hoc EMA snapshots after step {step}, from before the restart (this run "
                f"writes them again)")

    def describe(self, log: Callable[[str], None], model: torch.nn.Module) -> None:
        if not self.emas:
            return
        megabytes = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        snapshots = len(self.emas) * -(-self.final_step // self.every)
        log(f"post-hoc EMA: sigma_rel {', '.join(f'{s:g}' for s in self.emas)}, snapshotted every {self.every} steps "
            f"to {self.folder} ({megabytes:.0f} MiB each, {snapshots * megabytes / 1024:.1f} GiB by step "
            f"{self.final_step}); --ema SIGMA_REL synthesizes any length")


@dataclasses.dataclass
class Checkpoints:
    checkpoint: TrainingCheckpoint
    every: int  # train.checkpoint_every
    final_step: int

    def due(self, step: int) -> bool:
        return due_every(step, self.every, self.final_step)

    def run(self, step: int) -> None:
        self.checkpoint.save()


class StopOnRequest:
    """A stop request (SIGTERM, SIGINT: engine.preemption), agreed between ranks over a host-side group every
    `check_every` steps (every step in one process, where checking is free), writes the step's checkpoint (unless
    it just was) and ends the loop; `stopped_by` names the request."""

    def __init__(self, checkpoint: TrainingCheckpoint, context: DistributedContext):
        self.checkpoint = checkpoint
        self.request = StopRequest(announce=context.is_main)
        self.group = torch.distributed.new_group(backend="gloo") if context.is_distributed else None
        self.check_every = 10 if context.is_distributed else 1
        self.stopped_by: str | None = None

    def due(self, step: int) -> bool:
        return step % self.check_every == 0

    def run(self, step: int) -> bool:
        if not agreed_stop(self.request, self.group):
            return False
        self.stopped_by = self.request.requested or "another rank's stop request"
        if self.checkpoint.saved_step != step:
            self.checkpoint.save()
        return True

    def close(self) -> None:
        """The signals' previous handlers back."""
        self.request.restore()


@dataclasses.dataclass
class SampleGrids:
    write_samples: Callable[[str], Path | None]  # TrainingRun.write_samples
    every: int  # train.sample_every
    final_step: int  # its grid is the run's final one, written when the run finishes

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step != self.final_step

    def run(self, step: int) -> None:
        self.write_samples(f"step-{step:08d}.png")


@dataclasses.dataclass
class BestCheckpoint:
    """With train.keep_best, a score below the best so far writes best.pt (the same on every rank: the measures
    are reduced)."""

    metric: str  # train.keep_best: "none", or the score to keep the best of
    checkpoint: TrainingCheckpoint
    log: Callable[[str], None]
    best: dict[str, Any] | None = dataclasses.field(init=False)  # {"metric", "value", "step"}

    def __post_init__(self):
        # best.pt's, so that a resumed run keeps a better old best
        self.best = self.checkpoint.read_best_score() if self.metric != "none" else None

    def offer(self, scores: dict[str, float], step: int) -> None:
        metric = self.metric
        if metric not in scores or not math.isfinite(value := scores[metric]):
            return
        if self.best is not None and self.best["metric"] == metric and value >= self.best["value"]:
            return
        previous = f" (was {self.best['value']:.6g} at step {self.best['step']})" if self.best else ""
        self.best = {"metric": metric, "value": value, "step": step}
        self.checkpoint.save_best(self.best)
        self.log(f"step {step}: best {metric} {value:.6g}{previous}: {self.checkpoint.best_path}")


@dataclasses.dataclass
class Evaluation:
    evaluate_now: Callable[[int], dict] | None  # FID and KID (engine.training_run.build_evaluation); None: off
    every: int  # eval.every
    final_step: int
    best: BestCheckpoint

    def due(self, step: int) -> bool:
        return due_every(step, self.every, self.final_step)

    def run(self, step: int) -> None:
        self.best.offer(self.evaluate_now(step), step)


@dataclasses.dataclass
class Validation:
    """The validation loss of the raw and the EMA weights (every rank takes part) to the metrics."""

    loss: ValidationLoss | None  # None: off
    trainer: Trainer
    metrics: MetricsLog | None
    progress: Any
    every: int  # eval.val_every
    final_step: int
    best: BestCheckpoint

    def due(self, step: int) -> bool:
        return self.loss is not None and due_every(step, self.every, self.final_step)

    def run(self, step: int) -> None:
        loss, trainer = self.loss.loss, self.trainer
        others = {**trainer.extra_emas, **{post_hoc_name(s): ema for s, ema in trainer.post_hoc_emas.items()}}
        record = validation_record(step, loss(trainer.model), loss(trainer.ema.ema_model),
                                   {name: loss(ema.ema_model) for name, ema in others.items()})
        if self.metrics is not None:
            self.metrics.write(record)
        self.progress.set_postfix(val=f"{record['val_loss']:.4f}", val_ema=f"{record['val_loss_ema']:.4f}")
        self.best.offer(record, step)

    def describe(self, log: Callable[[str], None]) -> None:
        if self.loss is not None:
            log(f"validation: the loss every {self.every} steps on {self.loss.num_images:,} held-out images of "
                f"{self.loss.source} at t = {self.loss.timesteps}")
