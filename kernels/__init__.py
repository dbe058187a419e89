"""Fused kernels with PyTorch references behind one registry (filled by the kernels issue)."""
