"""The learning rate: scaled from its reference batch, warmed up linearly, then constant, cosine or EDM2's
inverse square root.

    lr(step) = optim.lr * (batch / reference_batch)^p * warmup(step) * decay(step)

- p: 0 (`lr_scaling: none`), 1/2 (`sqrt`, the usual rule for Adam: the gradient noise falls as 1/sqrt(batch))
  or 1 (`linear`, Goyal et al. 2017); the batch is `train.batch_size`, the global one, so the rate does not
  change with the number of GPUs, only with the batch a preset is run at;
- warmup(step) = min(1, (step + 1) / warmup_steps) (the DDPM code's);
- decay: 1 (`constant`, the DDPM code); 0.5 (1 + cos(pi (step - warmup) / (steps - warmup))) after the warmup
  (`cosine`, Loshchilov & Hutter 2017, to 0 at train.steps); 1 / sqrt(max(step / lr_ref_steps, 1))
  (`inverse_sqrt`, Karras et al. 2024, EDM2's t_ref form).

`step` is the index of the optimizer step about to be taken (0 first), as `torch.optim.lr_scheduler.LambdaLR`
counts, so the schedule resumes with the scheduler's state.
"""

from __future__ import annotations

import math
from typing import Callable

SCHEDULES = ("constant", "cosine", "inverse_sqrt")
SCALING_POWERS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


def scaled_lr(lr: float, batch_size: int, reference_batch_size: int, scaling: str) -> float:
    """The peak rate at `batch_size` of a rate tuned at `reference_batch_size`."""
    if scaling not in SCALING_POWERS:
        raise ValueError(f"unknown lr scaling {scaling!r}; choose one of {', '.join(SCALING_POWERS)}")
    return lr * (batch_size / reference_batch_size) ** SCALING_POWERS[scaling]


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, ref_steps: int) -> float:
    """The multiplier of the peak rate at optimizer step `step`."""
    warmup = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warmup
    if schedule == "cosine":
        progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
        return warmup * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "inverse_sqrt":
        return warmup / math.sqrt(max(step / ref_steps, 1.0))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def lr_lambda(optim, total_steps: int) -> Callable[[int], float]:
    """`LambdaLR`'s function for a config's `optim` section and `train.steps`."""
    lr_factor(0, optim.lr_schedule, optim.warmup_steps, total_steps, optim.lr_ref_steps)  # an unknown name fails now
    return lambda step: lr_factor(step, optim.lr_schedule, optim.warmup_steps, total_steps, optim.lr_ref_steps)


def peak_lr(config) -> float:
    """A config's learning rate after its scaling rule: what Adam is built with."""
    optim = config.optim
    return scaled_lr(optim.lr, config.train.batch_size, optim.reference_batch_size, optim.lr_scaling)


def describe(config) -> str:
    """One line for the log: the peak rate, how it was scaled, and its schedule."""
    optim, lr = config.optim, peak_lr(config)
    scaled = (f" ({optim.lr:g} at batch {optim.reference_batch_size}, {optim.lr_scaling} scaling to batch "
              f"{config.train.batch_size})" if optim.lr_scaling != "none" else "")
    after = {"constant": "constant", "cosine": f"cosine to 0 at step {config.train.steps}",
             "inverse_sqrt": f"1/sqrt(step/{optim.lr_ref_steps}) from step {optim.lr_ref_steps}"}[optim.lr_schedule]
    return f"lr {lr:.4g}{scaled}: {optim.warmup_steps} warmup steps, then {after}"
