"""Exponential moving average of the weights, through ema-pytorch.

The DDPM reference updates with a fixed decay from the first step; ema-pytorch's `update()` warms
the decay up and reads two counters with `.item()` (a host sync per step), so the fixed-decay path
calls its multi-tensor `update_moving_average` directly with the configured decay.
"""

from __future__ import annotations

import torch
from ema_pytorch import EMA


def build_ema(model: torch.nn.Module, decay: float) -> EMA:
    # The EMA copy stays in fp32 whatever the compute precision: with decay 0.9999, bf16 would
    # round most updates away.
    return EMA(model, beta=decay, update_after_step=0, update_every=1, use_foreach=True, include_online_model=False)


def update_ema(ema: EMA, warmup: bool = False) -> None:
    if warmup:
        ema.update()
    else:
        ema.update_moving_average(ema.ema_model, ema.model, current_decay=ema.beta)
