"""Helpers the PyTorch references share: per-sample coefficients and the precision they compute in."""

from __future__ import annotations

import torch


def extract(coefficients: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coefficients[t], shaped to broadcast over a batch shaped like `like`."""
    return coefficients[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The references compute in float32 as the kernels do, or in float64 when asked for the oracle."""
    return torch.float64 if dtype == torch.float64 else torch.float32
