"""The training step and what it needs, shared by engine.train's loop, the train-step benchmark and the tests.

- `build_trainer`: the components, built once (model, EMA, wrapping and compile order; the optimizer and its
  update mode; kernels; the schedule), and `Trainer.state_dict` / `load_state_dict`, its checkpoint part;
- `TrainState`: the step and every counter a resumed run continues;
- `train_step`: one optimizer step from the step's inputs to device-side statistics (no host sync);
- `IntervalStats`: those statistics summed on the device and read once per log interval (EDM's
  `training_stats`), with the data wait and the maintenance seconds kept apart from the step time.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import warnings
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn

from engine import diffusion
from engine.config import Config, ConfigError
from engine.data import random_flip_mask
from engine.distributed import DistributedContext, compute_dtype
from engine.ema import (advance_ema_counters, build_ema, ema_decay, ema_name, ema_state, load_ema_state,
                        load_extra_ema_states, load_post_hoc_ema_states, update_ema)
from engine.loss_weighting import weights_from_config
from engine.lr_schedule import lr_lambda, peak_lr
from engine.parallel import (compile_model, full_model_state, full_optimizer_state, full_tensor, gradient_sync,
                             load_full_model_state, load_full_optimizer_state, shard, wrap)
from engine.post_hoc_ema import post_hoc_name, update_post_hoc_emas
from engine.rng import step_seed
from engine.schedule import NoiseSchedule, schedule_from_config
from engine.unet import build_unet
from kernels.noise import noise_keys
from kernels.registry import Kernels, resolve_kernels_from_config


@dataclasses.dataclass
class TrainState:
    """The step and this rank's counters, all continued by a resume (checkpointed per rank)."""

    step: int = 0
    skipped_samples: int = 0  # unreadable samples the loader skipped
    delivered_samples: int = 0  # samples trained on
    nonfinite_steps: int = 0  # steps not applied for a NaN/inf loss or gradient

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, int(state[field.name]))


@dataclasses.dataclass
class Trainer:
    """Everything a training step uses, built once by `build_trainer`."""

    config: Config
    context: DistributedContext
    model: nn.Module  # the UNet (compiled in place with train.compile); checkpoints hold its weights
    train_model: nn.Module  # what the step calls: the model, wrapped for DDP or FSDP under torchrun
    ema: Any  # ema_pytorch.EMA of train.ema_decay: what sampling uses
    extra_emas: dict[str, Any]  # train.extra_ema_decays' EMAs by name (ema_0.999, ...)
    post_hoc_emas: dict[float, Any]  # train.post_hoc_ema_sigma_rels' power-function EMAs by sigma_rel
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    adam_implementation: dict  # fused (one kernel, skips on the device) or foreach (sharded parameters)
    kernels: Kernels
    schedule: NoiseSchedule  # on the device, float32
    dtype: torch.dtype  # autocast dtype of the forward
    micro_batch: int  # per rank and micro-batch
    generator: torch.Generator  # timesteps and flips, reseeded from (seed, step) every step
    loss_coefficients: tuple[torch.Tensor, torch.Tensor]  # the target as noise_coef[t] eps + x0_coef[t] x0
    noising: tuple[torch.Tensor, torch.Tensor]  # q_sample's tables for the network's input (EDM's c_in folded in)
    sample_timesteps: Callable[[int, torch.Generator], torch.Tensor]  # diffusion.timestep_sampling's draw
    loss_weights: torch.Tensor | None  # (T,) each timestep's loss weight (diffusion.loss_weighting); None: all 1
    sample_offsets: torch.Tensor  # 0 .. micro_batch-1 on the device, for the noise keys
    compiled_update: Callable | None = None  # train.compile_scope=step: (loss, EMA decay) -> (grad norm, finite)
    ema_decay: torch.Tensor | None = None  # the compiled update's EMA decay, filled each step (no recompiles)

    @property
    def device(self) -> torch.device:
        return self.context.device

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else nullcontext()

    def state_dict(self) -> dict[str, Any]:
        """Every rank takes part (FSDP gathers shards); rank 0 ends up with the full tensors."""
        return {"model": full_model_state(self.model), "ema": ema_state(self.ema),
                "extra_emas": {name: ema_state(ema) for name, ema in self.extra_emas.items()},
                "post_hoc_emas": {post_hoc_name(sigma_rel): ema_state(ema) for sigma_rel, ema in self.post_hoc_emas.items()},
                "optimizer": full_optimizer_state(self.model, self.optimizer),
                "lr_schedule": self.lr_schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None, "kernels": self.kernels.names}

    def load_state_dict(self, state: dict[str, Any], lr_schedule: dict | None = None, scaler: dict | None = None) -> None:
        """Tensors from rank 0's `state` (absent on the other ranks: they receive them); the small parts (the LR
        schedule's and the scaler's states: `state`'s own unless given apart) on every rank."""
        lr_schedule = state["lr_schedule"] if lr_schedule is None else lr_schedule
        scaler = state.get("scaler") if scaler is None else scaler
        load_full_model_state(self.model, state.get("model"), self.context)
        load_ema_state(self.ema, state.get("ema"), self.context)
        fresh = load_extra_ema_states(self.extra_emas, state.get("extra_emas") if self.context.is_main else None,
                                      self.context)
        if fresh and self.context.is_main:
            warnings.warn(f"the checkpoint holds no {', '.join(fresh)}: {'they start' if len(fresh) > 1 else 'it starts'} "
                          f"from the resumed weights")
        load_post_hoc_ema_states(self.post_hoc_emas, state.get("post_hoc_emas") if self.context.is_main else None,
                                 self.context)
        load_full_optimizer_state(self.model, self.optimizer, state.get("optimizer"), self.context)
        for group in self.optimizer.param_groups:  # the saved groups carry the writer's implementation choice
            group.update(self.adam_implementation)
            if self.compiled_update is not None and not isinstance(group["lr"], torch.Tensor):
                group["lr"] = torch.tensor(group["lr"], device=self.device)  # a float would recompile every step
        self.lr_schedule.load_state_dict(lr_schedule)
        if scaler:
            self.scaler.load_state_dict(scaler)


def micro_batch_size(batch_size: int, world_size: int, accumulation: int) -> int:
    """Per-rank micro-batch: the global batch is a config value, independent of the world size."""
    if batch_size % (world_size * accumulation):
        raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the world size ({world_size}) x "
                          f"train.grad_accum_steps ({accumulation}); e.g. train.batch_size="
                          f"{-(-batch_size // (world_size * accumulation)) * world_size * accumulation}")
    return batch_size // (world_size * accumulation)


def build_model(config: Config, context: DistributedContext, dtype: torch.dtype,
                initial_weights: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, nn.Module, list]:
    """(model, train_model, EMAs: train.ema_decay's, the extra decays', the post-hoc profiles') in the order that
    matters: weights, EMA copies, layout, wrapping, compile."""
    cfg_train = config.train
    fsdp = context.is_distributed and cfg_train.parallel == "fsdp"
    torch.manual_seed(cfg_train.seed)  # the same initial weights on every rank (FSDP shards them as they are)
    model = build_unet(config, context.device)
    if initial_weights is not None:  # before the EMA copies the model and FSDP shards it; a resume overwrites them
        model.load_state_dict(initial_weights)
    # a post-hoc profile's decay changes every step (post_hoc_ema.power_decay): its fixed one is never used
    decays = [cfg_train.ema_decay, *cfg_train.extra_ema_decays, *[0.0] * len(cfg_train.post_hoc_ema_sigma_rels)]
    # FSDP: each EMA is a second, identically sharded UNet, so that each rank averages its own shard
    ema_models = [build_unet(config, context.device) for _ in decays] if fsdp else [None] * len(decays)
    if cfg_train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = wrap(model, context, cfg_train.parallel, dtype)
    for ema_model in ema_models:
        if ema_model is not None:
            shard(ema_model, dtype).load_state_dict(model.state_dict())
    torch.manual_seed(cfg_train.seed + context.rank)  # dropout differs between ranks
    # before compiling: the copies sample eagerly
    emas = [build_ema(model, decay, ema_model=copy) for decay, copy in zip(decays, ema_models)]
    if cfg_train.compile:
        compile_model(model, cfg_train.compile_mode, cfg_train.compile_scope)
    return model, train_model, emas


def build_optimizer(config: Config, model: nn.Module, sharded: bool, compiled_update: bool = False):
    """(optimizer, LR schedule, implementation): Adam(W) fused, so that a non-finite step is skipped on the
    device; foreach for sharded (DTensor) parameters; for the compiled update, foreach with the step counters
    and the learning rate as device tensors (`capturable`), which Inductor fuses and CUDA graphs replay."""
    optim = config.optim
    if compiled_update:
        implementation = {"fused": None, "foreach": True, "capturable": True}
    else:
        implementation = {"fused": None, "foreach": True} if sharded else {"fused": True, "foreach": None}
    lr = peak_lr(config)  # optim.lr scaled to the batch by optim.lr_scaling
    lr = torch.tensor(lr, device=next(model.parameters()).device) if compiled_update else lr
    optimizer_class = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=lr, betas=tuple(optim.betas), eps=optim.eps,
                                weight_decay=optim.weight_decay, **implementation)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim, config.train.steps))
    return optimizer, lr_schedule, implementation


def build_trainer(config: Config, context: DistributedContext,
                  initial_weights: dict[str, torch.Tensor] | None = None, check_kernels: bool | None = None) -> Trainer:
    """Every component of a step, once; the kernels are resolved (and checked) before any step runs."""
    device = context.device
    dtype = compute_dtype(config.train.precision, device)
    micro_batch = micro_batch_size(config.train.batch_size, context.world_size, config.train.grad_accum_steps)
    model, train_model, (ema, *emas) = build_model(config, context, dtype, initial_weights)
    extra_decays, sigma_rels = config.train.extra_ema_decays, config.train.post_hoc_ema_sigma_rels
    sharded = context.is_distributed and config.train.parallel == "fsdp"
    step_scope = config.train.compile and config.train.compile_scope == "step"
    if step_scope and sharded:
        raise ConfigError("train.compile_scope=step compiles the update of whole (unsharded) parameters; "
                          "with train.parallel=fsdp use train.compile_scope=model or blocks")
    optimizer, lr_schedule, implementation = build_optimizer(config, model, sharded, compiled_update=step_scope)
    schedule = schedule_from_config(config.diffusion).to(device)
    target, sigma_data = config.diffusion.target, config.diffusion.sigma_data
    compiled = compile_update(optimizer, ema, config.optim.grad_clip, config.train.compile_mode) if step_scope else None
    return Trainer(config=config, context=context, model=model, train_model=train_model, ema=ema,
                   extra_emas={ema_name(decay): e for decay, e in zip(extra_decays, emas)},
                   post_hoc_emas=dict(zip(sigma_rels, emas[len(extra_decays):])), optimizer=optimizer,
                   lr_schedule=lr_schedule, scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                   adam_implementation=implementation,
                   kernels=resolve_kernels_from_config(config, device, check=check_kernels),
                   schedule=schedule, dtype=dtype, micro_batch=micro_batch, generator=torch.Generator(device=device),
                   loss_coefficients=diffusion.loss_coefficients(schedule, target, sigma_data),
                   noising=diffusion.noising_tables(schedule, target, sigma_data),
                   sample_timesteps=diffusion.timestep_sampler(config.diffusion, schedule),
                   loss_weights=weights_from_config(config.diffusion, schedule),
                   sample_offsets=torch.arange(micro_batch, device=device), compiled_update=compiled,
                   ema_decay=torch.zeros((), device=device) if step_scope else None)


# ----------------------------------------------------------------------------- the step


@dataclasses.dataclass
class StepStats:
    """A step's statistics, on the device: nothing here has been read by the host."""

    loss: torch.Tensor  # mean over the global batch's micro-batches (this rank's share)
    grad_norm: torch.Tensor  # before clipping
    finite: torch.Tensor  # bool: the update was applied
    loss_by_level: torch.Tensor  # (NOISE_LEVELS,) sums of per-sample losses by quarter of the timestep range
    samples_by_level: torch.Tensor  # (NOISE_LEVELS,) how many samples each sum has


NOISE_LEVELS = 4  # the loss is also reported per quarter of the timestep range (least noise first)


def noise_level_names(num_timesteps: int) -> list[str]:
    """The metrics' names of the levels, e.g. loss_t0_249 .. loss_t750_999 for T = 1000."""
    edges = [level * num_timesteps // NOISE_LEVELS for level in range(NOISE_LEVELS + 1)]
    return [f"loss_t{low}_{high - 1}" for low, high in zip(edges, edges[1:])]


def add_by_noise_level(sums: torch.Tensor, counts: torch.Tensor, losses: torch.Tensor, t: torch.Tensor,
                       num_timesteps: int) -> None:
    """Per-sample `losses` added into their level's sum, on the device (fixed shapes: no host sync)."""
    level = (t * NOISE_LEVELS // num_timesteps).clamp_(0, NOISE_LEVELS - 1)
    sums.index_add_(0, level, losses.detach().float())
    counts.index_add_(0, level, torch.ones_like(losses, dtype=torch.float32))


def step_inputs(trainer: Trainer, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Timesteps, flips and (for a class-conditional model with label dropout) the labels to drop, of the whole
    global batch of `step`, from (seed, step) on every rank, which takes its slice: independent of the world
    size and of resumes."""
    config, device = trainer.config, trainer.device
    trainer.generator.manual_seed(step_seed(config.train.seed, step))
    batch_size = config.train.batch_size
    t = trainer.sample_timesteps(batch_size, trainer.generator)
    flip = (random_flip_mask(batch_size, generator=trainer.generator, device=device) if config.data.random_flip
            else torch.zeros(batch_size, dtype=torch.bool, device=device))
    dropout = config.model.label_dropout
    drop = (torch.rand(batch_size, generator=trainer.generator, device=device) < dropout) if dropout else None
    return t, flip, drop


def class_labels(trainer: Trainer, batch: dict, drop: torch.Tensor | None) -> torch.Tensor | None:
    """The labels a class-conditional model trains on, "no class" (index num_classes) where dropped; None for an
    unconditional model."""
    num_classes = trainer.config.model.num_classes
    if not num_classes:
        return None
    labels = batch["label"].to(trainer.device, non_blocking=True)
    return labels if drop is None else torch.where(drop, torch.full_like(labels, num_classes), labels)


def train_step(trainer: Trainer, step: int, next_batch: Callable[[], dict]) -> StepStats:
    """One optimizer step: `train.grad_accum_steps` micro-batches from `next_batch()` (uint8 images under
    "image"), forward, the fused loss, backward, then `apply_update`."""
    config, context, micro_batch = trainer.config, trainer.context, trainer.micro_batch
    accumulation, batch_size = config.train.grad_accum_steps, config.train.batch_size
    t_global, flip_global, drop_global = step_inputs(trainer, step)
    trainer.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), device=trainer.device)
    level_sums, level_counts = (torch.zeros(NOISE_LEVELS, device=trainer.device) for _ in range(2))
    for micro in range(accumulation):
        batch = next_batch()
        images = batch["image"].to(trainer.device, non_blocking=True)
        # Global sample index: step, then micro-batch, then rank; it keys the noise of each sample.
        first = micro * context.world_size * micro_batch + context.rank * micro_batch
        index = slice(first, first + micro_batch)
        labels = class_labels(trainer, batch, None if drop_global is None else drop_global[index])
        keys = noise_keys(config.train.seed, trainer.sample_offsets + (step * batch_size + first))
        with gradient_sync(trainer.train_model, enabled=micro == accumulation - 1):  # all-reduce on the last only
            with trainer.autocast():
                losses = diffusion.training_loss(trainer.train_model, trainer.kernels, trainer.schedule, images,
                                                 flip_global[index], t_global[index], keys,
                                                 target=config.diffusion.target, coefficients=trainer.loss_coefficients,
                                                 class_labels=labels, weights=trainer.loss_weights,
                                                 noising=trainer.noising)
            loss = losses.mean()
            trainer.scaler.scale(loss / accumulation).backward()
        step_loss += loss.detach() / accumulation
        add_by_noise_level(level_sums, level_counts, losses, t_global[index], trainer.schedule.num_timesteps)
    grad_norm, finite = apply_update(trainer, step, step_loss)
    return StepStats(loss=step_loss, grad_norm=grad_norm, finite=finite, loss_by_level=level_sums,
                     samples_by_level=level_counts)


def apply_update(trainer: Trainer, step: int, step_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, Adam, LR schedule, EMA. A NaN/inf loss or gradient skips the update (and so the EMA's move)."""
    if trainer.compiled_update is not None:
        return apply_compiled_update(trainer, step, step_loss)
    grad_clip = trainer.config.optim.grad_clip
    optimizer, scaler = trainer.optimizer, trainer.scaler
    scaler.unscale_(optimizer)
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: measure only
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), max_norm, foreach=True))
    finite = torch.isfinite(grad_norm) & torch.isfinite(step_loss)
    if scaler.is_enabled():
        scaler.step(optimizer)  # fp16: the scaler skips non-finite steps itself (reading found_inf: a sync)
    elif trainer.adam_implementation["fused"]:
        optimizer.found_inf = (~finite).float()  # fused Adam skips on the device: no sync
        optimizer.step()
    elif bool(finite):  # sharded parameters: decided on the host (one sync per step on a GPU)
        optimizer.step()
    scaler.update()
    trainer.lr_schedule.step()
    for ema in (trainer.ema, *trainer.extra_emas.values()):
        update_ema(ema, step, trainer.config.train.ema_warmup)
    update_post_hoc_emas(trainer.post_hoc_emas, step)
    return grad_norm.detach(), finite


def apply_compiled_update(trainer: Trainer, step: int, step_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_update` as one compiled graph (train.compile_scope=step); the LR schedule and the EMA's
    counters stay outside it, as host-side writes."""
    warmup = trainer.config.train.ema_warmup
    trainer.ema_decay.fill_(ema_decay(trainer.ema, step, warmup))  # a fill from a host number: no sync
    advance_ema_counters(trainer.ema, step, warmup)
    grad_norm, finite = trainer.compiled_update(step_loss, trainer.ema_decay)
    for ema in trainer.extra_emas.values():  # outside the graph, after it (the weights are final by then)
        update_ema(ema, step, warmup)
    update_post_hoc_emas(trainer.post_hoc_emas, step)
    with warnings.catch_warnings():  # the compiled region calls Adam's step below the hook the scheduler watches
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        trainer.lr_schedule.step()
    return grad_norm, finite


def compile_update(optimizer: torch.optim.Optimizer, ema: Any, grad_clip: float, mode: str,
                   backend: str | Callable = "inductor") -> Callable:
    """Clipping, the non-finite mask, Adam and the EMA lerp as one graph (fullgraph=True; CUDA graphs with
    train.compile_mode=reduce-overhead).

    Adam is the library's own step, unwrapped from the wrappers that break the graph on purpose (they set
    the grad mode for eager use). A non-finite step puts the weights and Adam's state back with `where`,
    which Inductor fuses into the update's own pass: the skip is decided on the device.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not optimizer.state:
        initialise_state(optimizer)
    adam_step = inspect.unwrap(type(optimizer).step)
    max_norm = grad_clip if grad_clip > 0 else float("inf")

    def update(step_loss: torch.Tensor, decay: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        finite = torch.isfinite(grad_norm) & torch.isfinite(step_loss)
        with torch.no_grad():
            before = [(param.clone(), {key: value.clone() for key, value in optimizer.state[param].items()})
                      for param in params]
            adam_step(optimizer)
            for param, (old, old_state) in zip(params, before):
                param.copy_(torch.where(finite, param, old))
                for key, value in optimizer.state[param].items():
                    value.copy_(torch.where(finite, value, old_state[key]))
            ema.update_moving_average(ema.ema_model, ema.model, current_decay=decay)
        return grad_norm.detach(), finite

    return torch.compile(update, fullgraph=True, dynamic=False, backend=backend,
                         mode=None if mode == "default" or backend != "inductor" else mode)


def initialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Adam's state as a fresh optimizer has it after its lazy init (zero moments, step 0), made before the
    update is traced: the graph then only reads and writes it (one graph, and the skip mask covers it all).

    The layout comes from the library: a throwaway optimizer of the same class takes one step on zero-valued
    copies of the parameters; its state, zeroed, is loaded (load_state_dict puts it on the devices).
    """
    groups = optimizer.state_dict()["param_groups"]
    shadow_params = [torch.zeros_like(p, requires_grad=True) for group in optimizer.param_groups for p in group["params"]]
    for param in shadow_params:
        param.grad = torch.zeros_like(param)
    shadow = type(optimizer)(shadow_params, lr=0.0, foreach=False)
    shadow.step()
    state = shadow.state_dict()["state"]
    for tensors in state.values():
        for value in tensors.values():
            value.zero_()
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- interval statistics


class IntervalStats:
    """Step statistics summed on the device, read (and averaged over ranks) once per log interval.

    The interval's wall time excludes what `maintenance()` covers (checkpoints, samples, evaluation), so
    images/s, step time and MFU count training only; those seconds are reported apart.
    """

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.grad_norm_sum = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device, dtype=torch.long)
        self.nonfinite_streak = torch.zeros((), device=device, dtype=torch.long)  # consecutive, across intervals
        self.level_sums = torch.zeros(NOISE_LEVELS, device=device)
        self.level_counts = torch.zeros(NOISE_LEVELS, device=device)
        self.restart()

    def restart(self) -> None:
        self.loss_sum.zero_(), self.grad_norm_sum.zero_(), self.finite_steps.zero_()
        self.level_sums.zero_(), self.level_counts.zero_()
        self.steps, self.data_wait, self.maintenance_seconds = 0, 0.0, 0.0
        self.started = time.perf_counter()

    def add(self, stats: StepStats) -> None:
        self.loss_sum += torch.where(stats.finite, stats.loss, 0.0)
        self.grad_norm_sum += torch.where(stats.finite, stats.grad_norm, 0.0)
        self.finite_steps += stats.finite
        self.level_sums += torch.where(stats.finite, stats.loss_by_level, 0.0)
        self.level_counts += torch.where(stats.finite, stats.samples_by_level, 0.0)
        self.nonfinite_streak.copy_(torch.where(stats.finite, 0, self.nonfinite_streak + 1))
        self.steps += 1

    def training_seconds(self) -> float:
        return time.perf_counter() - self.started - self.maintenance_seconds

    def reduce(self, context: DistributedContext) -> dict[str, Any]:
        """Means over the interval's finite steps (NaN when there were none): the one host sync of the interval.
        "loss_by_level" holds the mean per-sample loss of each quarter of the timestep range."""
        stats = torch.cat([torch.stack([self.loss_sum, self.grad_norm_sum, self.finite_steps.float(),
                                        self.nonfinite_streak.float()]), self.level_sums, self.level_counts])
        if context.is_distributed:
            torch.distributed.all_reduce(stats)
            stats /= context.world_size
        (loss, grad_norm, finite, streak), levels = stats[:4].tolist(), stats[4:].view(2, NOISE_LEVELS).tolist()
        return {"loss": loss / finite if finite else float("nan"),
                "grad_norm": grad_norm / finite if finite else float("nan"),
                "nonfinite_steps": self.steps - round(finite), "nonfinite_streak": round(streak),
                "loss_by_level": [total / count if count else float("nan") for total, count in zip(*levels)]}
