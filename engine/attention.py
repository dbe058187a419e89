"""The one attention function the UNet calls, with interchangeable backends.

`sdpa` is PyTorch's fused kernel and the default; `math` is the readable reference the others
must match; `xformers` is the memory-efficient kernel, CUDA only. The backend is a plain string
resolved once, so `attention` dispatches without looking at tensor values (no graph breaks).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "xformers", "math")
DEFAULT_BACKEND = "sdpa"


@functools.lru_cache(maxsize=None)
def _warn_once(requested: str, fallback: str, reason: str) -> None:
    # cached so a model with many attention blocks, or many models, warns once per cause
    warnings.warn(f"attention backend {requested!r} is unavailable ({reason}); falling back to {fallback!r}",
                  UserWarning, stacklevel=3)


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            return "not installed"
        if device.type != "cuda":
            return f"xformers has no {device.type} kernels"
    return None


def resolve_attention_backend(requested: str, device: torch.device | str) -> str:
    """The backend that will actually run on `device`: `requested`, or `sdpa` with a warning."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    reason = _unavailable_reason(requested, torch.device(device))
    if reason is None:
        return requested
    _warn_once(requested, DEFAULT_BACKEND, reason)
    return DEFAULT_BACKEND


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for (batch, heads, length, head_dim) inputs, same layout out."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return math_attention(q, k, v)
    if backend == "xformers":
        import xformers.ops  # lazily: an optional dependency that only exists on CUDA machines

        # xformers wants (batch, length, heads, head_dim)
        out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference: matmuls in the input dtype, softmax in float32 so bf16 logits do not saturate."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    weights = scores.float().softmax(dim=-1).to(v.dtype)
    return weights @ v
