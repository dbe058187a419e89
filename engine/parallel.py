"""How the model is spread over ranks: DDP or FSDP2, gradient accumulation, and full state dicts.

`parallel: ddp` replicates the model and all-reduces gradients; `parallel: fsdp` shards parameters,
gradients and optimizer state with FSDP2 (`fully_shard` on every residual and attention block, then
the root), computing in bf16 (or fp16) with fp32 gradient reduction and fp32 master weights.
Checkpoints always hold full, unsharded tensors (gathered to rank 0), so any world size and either
layout can load them.

FSDP and its state-dict helpers are imported where they are used: they take over a second to import,
which every command-line start that never shards or checkpoints (sampling, export, plots) would pay.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from engine.distributed import DistributedContext
from engine.unet import AttentionBlock, ResnetBlock


def blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP shards and `compile_scope: blocks` compiles: every residual and attention block.

    (The UNet's levels are containers whose forward is never called, so they cannot carry FSDP hooks.)
    """
    return [module for module in model.modules() if isinstance(module, (ResnetBlock, AttentionBlock))]


def compile_model(model: nn.Module, mode: str, scope: str) -> None:
    """torch.compile in place (parameter names and checkpoints do not change), whole or per block.

    Static shapes: the blocks of one class come in many shapes (one per level), and automatic dynamic
    shapes would merge them into one symbolic graph; each shape compiles once instead.
    """
    if scope == "blocks":  # one compiled graph per distinct block shape, training and sampling batch
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for module in blocks(model) if scope == "blocks" else [model]:
        module.compile(mode=None if mode == "default" else mode, dynamic=False)


def shard(model: nn.Module, compute_dtype: torch.dtype) -> nn.Module:
    """FSDP2 in place: each block, then the root (the stem, time embedding and head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if compute_dtype == torch.float32:
        policy = MixedPrecisionPolicy()
    else:  # compute in bf16/fp16; reduce gradients and keep the sharded master weights in fp32
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def wrap(model: nn.Module, context: DistributedContext, parallel: str, compute_dtype: torch.dtype) -> nn.Module:
    """The module the training step calls. FSDP shards `model` itself; DDP wraps it."""
    if not context.is_distributed:
        return model
    if parallel == "fsdp":
        return shard(model, compute_dtype)
    return DistributedDataParallel(model, device_ids=[context.device.index] if context.device.type == "cuda" else None)


@contextmanager
def gradient_sync(train_model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inner micro-batches of an accumulated step skip the gradient all-reduce / reduce-scatter."""
    if isinstance(train_model, DistributedDataParallel):
        with nullcontext() if enabled else train_model.no_sync():
            yield
    elif is_sharded(train_model):
        train_model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 shards `module` (False before anything imported FSDP: then nothing can be sharded)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, fsdp.FSDPModule)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (a collective for DTensors, but no host sync)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def _state_dicts():
    """torch.distributed.checkpoint.state_dict, imported on first use (this module's docstring says why)."""
    import torch.distributed.checkpoint.state_dict as state_dicts

    return state_dicts


def _save_options():
    # rank 0 gets every tensor, on the CPU
    return _state_dicts().StateDictOptions(full_state_dict=True, cpu_offload=True)


def _load_options(context: DistributedContext):
    # under torchrun: rank 0's tensors, sharded or copied out to the other ranks
    return _state_dicts().StateDictOptions(full_state_dict=True, broadcast_from_rank0=context.is_distributed)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU: on rank 0 under torchrun (other ranks get {})."""
    return _state_dicts().get_model_state_dict(module, options=_save_options())


def load_full_model_state(module: nn.Module, state: dict[str, torch.Tensor] | None, context: DistributedContext) -> None:
    """Load a full state dict, read on rank 0 only, into a plain, DDP-replicated or sharded module."""
    _state_dicts().set_model_state_dict(module, state if context.is_main else {}, options=_load_options(context))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name (not position), unsharded, on rank 0."""
    return _state_dicts().get_optimizer_state_dict(model, optimizer, options=_save_options())


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict | None,
                              context: DistributedContext) -> None:
    _state_dicts().set_optimizer_state_dict(model, optimizer, state if context.is_main else {},
                                            options=_load_options(context))
