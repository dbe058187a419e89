"""Exponential moving average of the weights, through ema-pytorch.

The DDPM reference updates with a fixed decay from the first step; ema-pytorch's `update()` warms
the decay up and reads two counters with `.item()` (a host sync per step), so the fixed-decay path
calls its multi-tensor `update_moving_average` directly with the configured decay.
"""

from __future__ import annotations

import torch
from ema_pytorch import EMA

from engine.config import ConfigError
from engine.distributed import all_gather_objects
from engine.parallel import full_model_state, load_full_model_state
from engine.post_hoc_ema import post_hoc_name


def build_ema(model: torch.nn.Module, decay: float, ema_model: torch.nn.Module | None = None) -> EMA:
    """The EMA of `model`'s weights; `ema_model` is the copy to average into (default: a deep copy).

    Under FSDP the copy is a second, identically sharded UNet, so each rank averages its own shard.
    The EMA copy stays in fp32 whatever the compute precision: with decay 0.9999, bf16 would round
    most updates away.
    """
    return EMA(model, ema_model=ema_model, beta=decay, update_after_step=0, update_every=1, use_foreach=True,
               include_online_model=False)


def update_ema(ema: EMA, step: int, warmup: bool = False) -> None:
    """One EMA update after training step `step` (0-based): the fixed decay, or ema-pytorch's warmup decay.

    ema-pytorch's own `update()` reads its `step` and `initted` counters and its warmup decay with
    `.item()`, four host syncs per step; the trainer knows the step as a Python int, so the same
    schedule is computed here (`ema_decay`) and the counters are only written, never read.
    """
    advance_ema_counters(ema, step, warmup)
    if warmup and step == 0:
        ema.copy_params_from_model_to_ema()
        return
    ema.update_moving_average(ema.ema_model, ema.model, current_decay=ema_decay(ema, step, warmup))


def ema_decay(ema: EMA, step: int, warmup: bool) -> float:
    """The decay of the update after step `step`: the fixed one, or ema-pytorch's warmup schedule (step 0
    copies the weights, i.e. decay 0, then 1 - (1 + step / inv_gamma)^-power clamped to [min_value, beta])."""
    if not warmup:
        return ema.beta
    if step == 0:
        return 0.0
    decay = 1 - (1 + step / ema.inv_gamma) ** -ema.power
    return min(max(decay, ema.min_value), ema.beta)


def advance_ema_counters(ema: EMA, step: int, warmup: bool) -> None:
    """ema-pytorch's counters, kept as its `update()` keeps them (written on the device, never read)."""
    if warmup:
        ema.step.add_(1)
        if step == 0:
            ema.initted.fill_(True)


def ema_state(ema: EMA) -> dict[str, torch.Tensor]:
    """ema-pytorch's state dict layout ("ema_model.<name>", "initted", "step") with full, unsharded
    weights on rank 0, so a checkpoint's EMA loads whatever the layout that wrote or reads it."""
    weights = {f"ema_model.{name}": value for name, value in full_model_state(ema.ema_model).items()}
    return {**weights, "initted": ema.initted.detach().cpu(), "step": ema.step.detach().cpu()}


def load_ema_state(ema: EMA, state: dict[str, torch.Tensor] | None, context) -> None:
    """Inverse of `ema_state`; `state` is read on rank 0 only under torchrun."""
    weights = {name.removeprefix("ema_model."): value for name, value in (state or {}).items()
               if name.startswith("ema_model.")}
    load_full_model_state(ema.ema_model, weights, context)
    counters = torch.tensor([int(state["initted"]), int(state["step"])] if context.is_main else [0, 0])
    if context.is_distributed:
        counters = counters.to(context.device)
        torch.distributed.broadcast(counters, src=0)
    ema.initted.fill_(bool(counters[0])), ema.step.fill_(int(counters[1]))


def ema_name(decay: float) -> str:
    """The name an EMA goes by in checkpoints and on the command line (`--ema ema_0.999`)."""
    return f"ema_{decay:g}"


def load_extra_ema_states(emas: dict[str, EMA], saved: dict[str, dict] | None, context) -> list[str]:
    """Each of `emas` from the checkpoint's `saved` (rank 0's; None on the others); one the checkpoint lacks (a
    decay added on resume) starts from the current weights. Returns the names that started afresh."""
    present = _saved_names(saved, context)
    fresh = []
    for name, ema in emas.items():
        if name in present:
            load_ema_state(ema, (saved or {}).get(name), context)
        else:
            ema.copy_params_from_model_to_ema()
            fresh.append(name)
    return fresh


def load_post_hoc_ema_states(emas: dict[float, EMA], saved: dict[str, dict] | None, context) -> None:
    """The post-hoc profiles from the checkpoint, as `load_extra_ema_states`; but a profile cannot start late
    (its average covers the whole run), so one the checkpoint lacks is an error."""
    present = _saved_names(saved, context)
    missing = [sigma_rel for sigma_rel in emas if post_hoc_name(sigma_rel) not in present]
    if missing:
        raise ConfigError(f"train.post_hoc_ema_sigma_rels: the checkpoint holds no profile for {missing} (it has "
                          f"{sorted(present) or 'none'}); a post-hoc EMA averages the whole run, so it cannot be added "
                          f"on resume: start a new run, or leave the list as it was")
    for sigma_rel, ema in emas.items():
        load_ema_state(ema, (saved or {}).get(post_hoc_name(sigma_rel)), context)


def _saved_names(saved: dict | None, context) -> list[str]:
    """The names in rank 0's `saved`, on every rank."""
    return all_gather_objects(sorted(saved or {}) if context.is_main else None)[0]
