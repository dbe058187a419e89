"""What the Triton kernels share: whether Triton can run here, autotuning, the noise, input checks.

Triton runs on CUDA devices, and on the CPU in its interpreter when TRITON_INTERPRET=1 is set
before triton is imported (that is how the tests check every kernel). On a machine without Triton
the kernel modules still import; only their PyTorch implementations are registered.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. macOS: the PyTorch implementations still work
    triton = tl = None

HAVE_TRITON = triton is not None
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on `device`, or None when they can."""
    if not HAVE_TRITON:
        return "triton is not installed"
    if device.type == "cuda" and not interpreting():
        return None
    if device.type == "cpu" and interpreting():
        return None
    return f"Triton kernels run on CUDA devices (or on the CPU with TRITON_INTERPRET=1), not on {device.type}"


def check_batch(op: str, name: str, tensor: torch.Tensor, batch: int, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """A (B, ...) operand in a supported dtype, made contiguous once (the kernels index C-order)."""
    if tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must be one of {allowed}, got {str(tensor.dtype).removeprefix('torch.')}")
    if tensor.ndim < 1 or tensor.shape[0] != batch:
        raise ValueError(f"{op}: {name} must have batch size {batch} in dim 0, got shape {tuple(tensor.shape)}")
    return tensor.contiguous()


def check_pair(op: str, names: tuple[str, str], first: torch.Tensor, second: torch.Tensor):
    """Two (B, ...) operands that must have one shape (x_t and eps; prediction and x0), checked as check_batch."""
    return check_same_shape(op, names, first, second)


def check_same_shape(op: str, names: tuple[str, ...], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, ...) operands that must all have the first one's shape, each checked as check_batch."""
    batch = tensors[0].shape[0]
    checked = tuple(check_batch(op, name, tensor, batch) for name, tensor in zip(names, tensors))
    for name, tensor in zip(names[1:], checked[1:]):
        if tensor.shape != checked[0].shape:
            raise ValueError(f"{op}: {name} {tuple(tensor.shape)} and {names[0]} {tuple(checked[0].shape)} differ in shape")
    return checked


def check_per_sample(op: str, name: str, tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """A (B,) integer operand (timesteps, noise keys) as contiguous int64."""
    if tensor.shape != (batch,) or tensor.is_floating_point():
        raise ValueError(f"{op}: {name} must be an integer tensor of shape ({batch},), got {tensor.dtype} {tuple(tensor.shape)}")
    return tensor.to(torch.int64).contiguous()


def table(tensor: torch.Tensor) -> torch.Tensor:
    """A per-timestep coefficient table as the kernels read it: contiguous float32."""
    return tensor.to(torch.float32).contiguous()


if HAVE_TRITON:
    # Elementwise kernels: the block (counters per program; each covers 4 elements) and warps are chosen
    # per per-sample size. The interpreter cannot time configs: it takes the first. Each config names a
    # register budget (maxnreg): without one, ptxas held some kernels to 40-48 registers and spilled
    # (Triton 3.6's at (1024, 8); 3.9's at (256, 4) on sm_80's unaligned path); with it they take the 55-95
    # they need. No (512, 4): the same work per thread as (1024, 8), and it spilled in posterior_step on
    # sm_90. python -m kernels.ahead_of_time shows every config's registers and spills.
    ELEMENTWISE_CONFIGS = [triton.Config({"BLOCK": block}, num_warps=warps, maxnreg=96)
                           for block, warps in ((256, 4), (128, 4), (1024, 8))]

    def autotune_elementwise(fn=None, *, key: tuple[str, ...] = ()):
        """triton.autotune over the elementwise configs, keyed on the per-sample size, the dtypes and `key`."""
        configs = ELEMENTWISE_CONFIGS[:1] if interpreting() else ELEMENTWISE_CONFIGS
        decorate = triton.autotune(configs=configs, key=["numel", *key])
        return decorate(fn) if fn is not None else decorate

    @triton.jit
    def gaussian_quarters(key, t, counters):
        """The four noise quarters for these counters: kernels.noise's spec, as tl.randn4x computes it."""
        return tl.randn4x(key, (t.to(tl.int64) << 32) | counters.to(tl.int64))

    @triton.jit
    def load_timestep(t_ptr, sample, num_timesteps, lowest=0):
        """t[sample], clamped into the tables so a bad timestep can never read out of bounds.

        Checking the range on the host would cost a device sync per call; callers must pass
        timesteps in [0, num_timesteps) (the PyTorch references raise IndexError otherwise).
        """
        return tl.minimum(tl.maximum(tl.load(t_ptr + sample), lowest), num_timesteps - 1)

    @triton.jit
    def quarter_elements(counters, j: tl.constexpr, numel, EVEN: tl.constexpr):
        """The element indices (within the sample) that quarter j of these counters covers, and their mask.

        EVEN (numel a multiple of 16, as every image shape the engine trains on) tells the compiler that
        each quarter starts 4-element aligned, so loads and stores vectorise; the general form hides that.
        """
        if EVEN:
            quarter_size = tl.multiple_of(numel // 4, 4)
            return j * quarter_size + counters, counters < quarter_size
        else:
            quarter_size = (numel + 3) // 4
            index = j * quarter_size + counters
            return index, (counters < quarter_size) & (index < numel)

    @triton.jit
    def quarter(n0, n1, n2, n3, j: tl.constexpr):
        """Quarter j of the noise (resolved at compile time)."""
        if j == 0:
            noise = n0
        elif j == 1:
            noise = n1
        elif j == 2:
            noise = n2
        else:
            noise = n3
        return noise

    def even(numel: int) -> bool:
        """Whether quarter_elements may take its aligned form for samples of `numel` elements."""
        return numel % 16 == 0

    def grid(batch: int, numel: int):
        """One program per (sample, block of counters); counters cover a quarter of a sample each."""
        counters = -(-numel // 4)
        return lambda meta: (batch, triton.cdiv(counters, meta["BLOCK"]))
