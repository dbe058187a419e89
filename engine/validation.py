"""The validation loss: the training objective on held-out images at fixed timesteps with fixed noise.

The training loss draws new timesteps and noise every step, so its curve is noisy and flattens early
while samples keep improving. Measured instead on the same held-out images, at the same K evenly
spaced timesteps and with the same counter noise every time (torchtitan #1210, after SD3), the loss is a
deterministic function of the weights: two evaluations of the same weights give the same number, and
its fall tracks what the model has learned. It is the plain (unweighted) loss of the model's target.

Every rank loads the whole held-out set (`eval.val_data`, e.g. `prepare cifar10 --split test`, or the last
`eval.val_shards` shards of `data.path`, which training then never reads; at most `eval.val_images` of it) and evaluates every world_size-th image, the same number on each rank (an FSDP
forward is a collective); the sums are all-reduced, so the number does not depend on the world size.
"""

from __future__ import annotations

import torch

from engine import diffusion
from engine.config import Config
from engine.distributed import DistributedContext
from kernels.noise import noise_keys


def held_out_source(config: Config) -> tuple[str, slice | None]:
    """(data set, shard slice) of the held-out images: eval.val_data, or data.path's last eval.val_shards."""
    shards = config.eval.val_shards
    return (config.data.path, slice(-shards, None)) if shards else (config.eval.val_data, None)


def training_shards(config: Config) -> slice | None:
    """The shards of data.path that training reads: all but eval.val_shards' (None: all)."""
    return slice(0, -config.eval.val_shards) if config.eval.val_shards else None


def validation_timesteps(num_timesteps: int, count: int) -> list[int]:
    """`count` timesteps at the middles of equal parts of [0, T): 62, 187, ..., 937 for T = 1000 and 8."""
    return [int((k + 0.5) * num_timesteps / count) for k in range(count)]


class ValidationLoss:
    """`loss(model)` -> {t: mean loss at t} on this rank's share of the held-out images, reduced over ranks."""

    def __init__(self, config: Config, context: DistributedContext, trainer):
        from engine.data import load_device_cache  # the data package imports webdataset: only when used

        options, data = config.eval, config.data
        source, shards = held_out_source(config)
        held_out = load_device_cache(source, image_size=data.image_size, channels=data.channels,
                                     device=context.device, num_workers=0, shard_slice=shards)
        count = min(options.val_images, held_out.num_samples) // context.world_size * context.world_size
        mine = torch.arange(context.rank, count, context.world_size, device=context.device)
        self.images = held_out.images[mine]
        self.labels = held_out.labels[mine] if config.model.num_classes else None
        self.num_images, self.skipped = count, held_out.skipped
        self.source = f"the last {options.val_shards} shards of {source}" if shards else source
        self.keys = noise_keys(options.seed, mine)  # the same noise at every evaluation
        self.no_flip = torch.zeros(len(mine), dtype=torch.bool, device=context.device)
        self.timesteps = validation_timesteps(trainer.schedule.num_timesteps, options.val_timesteps)
        self.config, self.context, self.trainer = config, context, trainer

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> dict[int, float]:
        trainer, options = self.trainer, self.config.eval
        was_training = model.training
        model.eval()  # no dropout: the number is a function of the weights alone
        sums = torch.zeros(len(self.timesteps), device=self.context.device, dtype=torch.float64)
        try:
            for position, t in enumerate(self.timesteps):
                for first in range(0, len(self.images), options.batch_size):
                    batch = slice(first, first + options.batch_size)
                    timesteps = torch.full((len(self.images[batch]),), t, device=self.context.device)
                    labels = None if self.labels is None else self.labels[batch]
                    with trainer.autocast():
                        losses = diffusion.training_loss(
                            model, trainer.kernels, trainer.schedule, self.images[batch], self.no_flip[batch], timesteps,
                            self.keys[batch], target=self.config.diffusion.target, coefficients=trainer.loss_coefficients,
                            class_labels=labels, noising=trainer.noising)
                    sums[position] += losses.double().sum()
        finally:
            model.train(was_training)
        if self.context.is_distributed:
            torch.distributed.all_reduce(sums)
        return {t: float(total) / self.num_images for t, total in zip(self.timesteps, sums.tolist())}


def validation_record(step: int, raw: dict[int, float], ema: dict[int, float],
                      extra_emas: dict[str, dict[int, float]] | None = None) -> dict[str, float]:
    """The metrics line: the mean over the timesteps for the raw and the EMA weights (and each extra EMA, as
    val_loss_ema_0.999), and the EMA's per t."""
    def mean(losses: dict[int, float]) -> float:
        return sum(losses.values()) / len(losses)

    record = {"step": step, "val_loss": mean(raw), "val_loss_ema": mean(ema)}
    record.update({f"val_loss_{name}": mean(losses) for name, losses in (extra_emas or {}).items()})
    record.update({f"val_loss_ema_t{t}": value for t, value in ema.items()})
    return record
