"""Process-group and device setup: the same code runs under `python -m` and under torchrun."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return is_distributed()


def choose_device(requested: str, local_rank: int = 0, setting: str = "train.device") -> torch.device:
    """`requested` (auto, cpu, cuda, cuda:N) as a device; `setting` names where the user asked for it."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"{setting} is {requested!r} but CUDA is not available on this machine "
                           "(auto picks a GPU where there is one)")
    if requested == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(requested)


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast (and FSDP compute) dtype of a precision setting: auto = bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def launched_world_size() -> int:
    """The number of ranks torchrun launched (its WORLD_SIZE; 1 outside torchrun), known before the group exists."""
    return int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(requested_device: str = "auto", setting: str = "train.device") -> DistributedContext:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = launched_world_size()
    device = choose_device(requested_device, local_rank, setting)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "MASTER_ADDR" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def is_distributed() -> bool:
    """Whether this process is in an initialised process group (under torchrun)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) outside one."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def rank_slice(num_images: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Rank `rank`'s contiguous share of items 0..num_images-1 (the current process's by default)."""
    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    return range(num_images * rank // world_size, num_images * (rank + 1) // world_size)


def all_gather_objects(value) -> list:
    """`value` from every rank, in rank order (just [value] outside torchrun)."""
    if not is_distributed():
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def gather_to_main(value) -> list | None:
    """`value` from every rank, in rank order, on rank 0 only (None elsewhere); [value] outside torchrun."""
    if not is_distributed():
        return [value]
    gathered: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def shutdown_distributed(*, every_rank_done: bool = False) -> None:
    """Leave the process group; with `every_rank_done`, once every rank has got here (a barrier first)."""
    if dist.is_available() and dist.is_initialized():
        if every_rank_done:
            dist.barrier()
        dist.destroy_process_group()


@contextmanager
def leaving_together() -> Iterator[None]:
    """The process group is left when the block ends: after the other ranks have finished too when it ends without
    an error. A rank that left while another still worked (rank 0 writing a run's closing grid) sometimes aborted as
    its process exited (gloo: 'terminate called without an active exception', exit -6 for a finished run). After
    an error there is no barrier: a rank stuck in a collective would never reach it (torchrun stops the others)."""
    try:
        yield
    except BaseException:
        shutdown_distributed()
        raise
    shutdown_distributed(every_rank_done=True)
