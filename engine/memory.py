"""GPU memory of training a preset, estimated on a CPU without a GPU (issue 27): will it fit 24, 40 or 80 GB?

Two parts. The training state, per parameter: fp32 weights, gradients, Adam's two moments and one fp32 copy per
EMA. The activations: the bytes of every tensor autograd saves for the backward during one forward, found with
`torch.autograd.graph.saved_tensors_hooks` on fake tensors (shapes and dtypes, no compute: instant at 256 px),
under the autocast of the training precision, with activation checkpointing none, resblocks or all. A
checkpointed block keeps only its inputs and recomputes the rest in the backward, one block at a time: its mode
also pays for the largest such block once. Measured at batches 1 and 2 and extrapolated linearly: what does not
grow with the batch (autocast's bf16 copies of the weights) is counted once.

CUDA autocast runs GroupNorm in float32 (its fp32 list) and CPU autocast in bf16; the fake forward follows the
CUDA policy by promoting GroupNorm's input (`device_type="cuda"`), or the CPU's own (`"cpu"`, which a real CPU
run can check). Not counted: the backward's transient gradients, cuDNN workspaces, the CUDA context and
allocator fragmentation; `fits` keeps 10% of the card free for them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode

from engine.config import Config
from engine.distributed import compute_dtype, launched_world_size
from engine.unet import AttentionBlock, Checkpointable, ResnetBlock, UNet, build_unet, count_parameters

GIB = 2**30
CHECKPOINTING_MODES = ("none", "resblocks", "all")
GPU_SIZES_GB = (24, 40, 80)  # nominal sizes, taken as GiB (an 80 GB H100 has 79.6 GiB)
FREE_FRACTION = 0.10  # kept free on the card for what is not counted (see the module docstring)
CHECKPOINTED_KINDS = {"none": (), "resblocks": (ResnetBlock,), "all": (ResnetBlock, AttentionBlock)}
# what a dry run prints above the figures, so nobody takes them for a measurement on a GPU
METHOD = ("activations measured on the CPU with fake tensors (shapes and dtypes, no compute) at batches 1 and 2, "
          "extrapolated linearly")


@dataclass(frozen=True)
class Activations:
    """Bytes kept for the backward: `per_image` more for every image of the micro-batch, `fixed` once."""

    per_image: int
    fixed: int

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_image


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    state_bytes: int  # weights, gradients, Adam moments, EMA copies
    activations: dict[str, Activations]  # by activation checkpointing mode
    dtype: torch.dtype  # the forward's autocast dtype (float32: no autocast)

    def total_bytes(self, mode: str, batch: int) -> int:
        return self.state_bytes + self.activations[mode].at(batch)

    def largest_batch(self, mode: str, gpu_gb: float) -> int:
        """The most images per GPU whose estimate fits `gpu_gb` with FREE_FRACTION kept free (0: none)."""
        room = gpu_gb * GIB * (1 - FREE_FRACTION) - self.total_bytes(mode, 0)
        return max(0, int(room // self.activations[mode].per_image))


def training_state_bytes(parameters: int, num_emas: int) -> int:
    """fp32 weights and gradients, Adam's exp_avg and exp_avg_sq, and each EMA's fp32 copy."""
    return 4 * parameters * (4 + num_emas)


class _GroupNormInFloat32(TorchFunctionMode):
    """CUDA autocast's policy for GroupNorm (float32 in, float32 out), which CPU autocast runs in bf16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.group_norm and torch.is_autocast_enabled("cpu"):
            args = (args[0].float(), *args[1:])
        return func(*args, **kwargs)


def saved_bytes(model: UNet, inputs: tuple[torch.Tensor, ...], dtype: torch.dtype = torch.float32,
                device_type: str = "cpu") -> tuple[int, dict[nn.Module, int]]:
    """One forward of `model` on `inputs` (real or fake CPU tensors) under `dtype` autocast (CUDA's or the CPU's
    policy): the bytes of the distinct tensors autograd saved for the backward, parameters excluded; and, for every
    checkpointable block, the bytes saved while it ran."""
    parameters = {StorageWeakRef(p.untyped_storage()) for p in model.parameters()}
    kept: dict[StorageWeakRef, torch.Tensor] = {}  # by storage: a tensor and its views count once; held alive

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(tensor.untyped_storage())
        if key not in parameters:
            kept.setdefault(key, tensor)
        return tensor

    def total() -> int:
        return sum(tensor.untyped_storage().nbytes() for tensor in kept.values())

    by_block: dict[nn.Module, int] = {}
    started: dict[nn.Module, int] = {}
    hooks = []
    for block in model.modules():
        if isinstance(block, Checkpointable):
            hooks.append(block.register_forward_pre_hook(lambda module, _: started.__setitem__(module, total())))
            hooks.append(block.register_forward_hook(
                lambda module, _, __: by_block.__setitem__(module, total() - started[module])))
    autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
    policy = _GroupNormInFloat32() if device_type == "cuda" else nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast, policy:
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return total(), by_block


def activation_bytes(model: UNet, batch: int, image_size: int, channels: int, dtype: torch.dtype = torch.float32,
                     device_type: str = "cpu") -> dict[str, int]:
    """Bytes held for the backward at `batch` by checkpointing mode: what is saved, plus, where blocks are
    checkpointed, the largest block's own saved bytes, which its recompute holds during its backward. `model` is
    left in mode none."""
    labels = torch.zeros(batch, dtype=torch.long) if model.num_classes else None
    inputs = (torch.randn(batch, channels, image_size, image_size), torch.randint(0, 1000, (batch,)), labels)
    held = {}
    for mode in ("resblocks", "all", "none"):  # none last: its per-block figures are the recompute's
        model.set_activation_checkpointing(mode)
        held[mode], by_block = saved_bytes(model, inputs, dtype, device_type)
    for mode, kinds in CHECKPOINTED_KINDS.items():
        held[mode] += max((size for block, size in by_block.items() if isinstance(block, kinds)), default=0)
    return held


def _to_fake_cpu(model: nn.Module) -> None:
    """Replaces the (meta) parameters with fake CPU ones: call it under FakeTensorMode."""
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            module._parameters[name] = nn.Parameter(torch.empty(parameter.shape), parameter.requires_grad)


def estimate_memory(config: Config, device_type: str = "cuda") -> MemoryEstimate:
    """The preset's training memory on one GPU at the training precision there (auto: bf16 autocast), all three
    checkpointing modes; fake tensors throughout, so a 256 px model takes seconds and no memory."""
    dtype = compute_dtype(config.train.precision, torch.device(device_type))
    with torch.device("meta"):  # no memory, no initialisation
        model = build_unet(config, "meta")
    with FakeTensorMode():
        _to_fake_cpu(model)
        measured = {batch: activation_bytes(model, batch, config.data.image_size, config.data.channels, dtype,
                                            device_type) for batch in (1, 2)}
    activations = {mode: Activations(per_image=measured[2][mode] - measured[1][mode],
                                     fixed=2 * measured[1][mode] - measured[2][mode]) for mode in CHECKPOINTING_MODES}
    parameters = count_parameters(model)
    train = config.train
    num_emas = 1 + len(train.extra_ema_decays) + len(train.post_hoc_ema_sigma_rels)
    return MemoryEstimate(parameters=parameters, state_bytes=training_state_bytes(parameters, num_emas),
                          activations=activations, dtype=dtype)


def per_gpu_batch(config: Config) -> int:
    """The micro-batch one GPU runs: train.batch_size over the ranks torchrun launched and the accumulation
    steps."""
    return max(1, config.train.batch_size // (launched_world_size() * config.train.grad_accum_steps))


def describe(estimate: MemoryEstimate, batch: int, chosen: str) -> list[str]:
    """The dry run's table: the state, then per checkpointing mode (* = the config's) the activations per image,
    the total at `batch` images per GPU and the most images per GPU that fit each card size."""
    precision = "fp32" if estimate.dtype == torch.float32 else f"{str(estimate.dtype).removeprefix('torch.')} autocast"
    sizes = "/".join(str(gb) for gb in GPU_SIZES_GB)
    lines = [f"memory per CUDA GPU at {precision}, estimated: {METHOD}; {FREE_FRACTION:.0%} of the card kept free",
             f"  weights, gradients, Adam and EMA (fp32): {estimate.state_bytes / GIB:.2f} GiB",
             f"  checkpointing  GiB per image  GiB at {batch} per GPU  most images per GPU in {sizes} GB"]
    for mode in CHECKPOINTING_MODES:
        per_image = estimate.activations[mode].per_image / GIB
        total = estimate.total_bytes(mode, batch) / GIB
        fits = " / ".join(str(estimate.largest_batch(mode, gb)) for gb in GPU_SIZES_GB)
        name = f"{mode}{' *' if mode == chosen else ''}"
        lines.append(f"  {name:<13}  {per_image:>13.3f}  {total:>{len(str(batch)) + 17}.1f}  {fits}")
    return lines
