"""The in-kernel Gaussian noise, specified in PyTorch so that every implementation draws the same numbers.

Noise is a pure function of counters, never of generator state. For a sample with `numel` elements,
key `key` (one int64 per sample) and timestep `t`, let Q = ceil(numel / 4). Counter c < Q gives four
normals from one Philox call, as Triton's `tl.randn4x(key, (t << 32) | c)` computes them:

    (n0, n1, n2, n3) = Box-Muller pairs of Philox4x32-10(key; counter words c, t, 0, 0)
    noise[j * Q + c] = n_j[c]          (element index in C order within the sample)

One Philox call per four elements (rather than `tl.randn`'s one per element) keeps the kernels
memory-bound on a GPU, and the quarter layout keeps every load and store contiguous. `randn` below
is the same computation in PyTorch, so the reference, the Triton kernels and a user's own kernel
produce the same noise for the same counters (bit-identical uniforms; normals equal to float32
rounding of log/cos). The fused loss can therefore recompute the noise `q_sample` used, a resumed
run draws the noise it would have drawn, and a sampler split over ranks gives one process's images.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011), as in triton.language.random.
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUNDS = 10
# Triton's uint32 -> [0, 1) scale: the largest float32 with (2**31 - 1) * scale < 1.
_UNIFORM_SCALE = 4.6566127342e-10
_TWO_PI = 6.283185307179586
MAX_SEED = 2**31 - 1  # a run seed occupies the key's high word; kept positive in int64


def noise_keys(seed: int, sample_indices: torch.Tensor) -> torch.Tensor:
    """One Philox key per sample: the run seed in the high word, the sample's global index in the low word.

    Global indices (not batch positions) make the noise independent of how a batch is split
    over ranks or steps.
    """
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"noise seed must be in [0, {MAX_SEED}], got {seed}")
    return (sample_indices.to(torch.int64) & _MASK32) | (seed << 32)


def philox4x32(key: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four output words of Philox4x32-10 for 64-bit keys and counters (c0, c1, 0, 0), as int64 in [0, 2**32).

    A 32 x 32-bit product fits in 64 bits; int64 multiplication wraps modulo 2**64 on every device
    PyTorch runs on, so its high and low words are exact after masking.
    """
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    c0, c1 = c0 & _MASK32, c1 & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(_ROUNDS):
        product_b, product_a = c2 * _ROUND_B, c0 * _ROUND_A
        c0, c1, c2, c3 = ((product_b >> 32) & _MASK32) ^ c1 ^ k0, product_b & _MASK32, ((product_a >> 32) & _MASK32) ^ c3 ^ k1, product_a & _MASK32
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(bits: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: a uint32 read as int32, folded to non-negative, scaled to [0, 1)."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative x
    return folded.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def randn(keys: torch.Tensor, t: torch.Tensor, numel: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """noise(keys[b], t[b]) for the `numel` elements of each sample, shaped (B, numel).

    The uniforms are computed exactly as the kernels do; the Box-Muller transform runs in `dtype`
    (float64 gives the oracle the tests compare against).
    """
    if keys.shape != t.shape or keys.ndim != 1:
        raise ValueError(f"keys and t must both have shape (B,), got {tuple(keys.shape)} and {tuple(t.shape)}")
    quarter = -(-numel // 4)
    counters = torch.arange(quarter, device=keys.device, dtype=torch.int64)[None, :]
    words = philox4x32(keys.to(torch.int64)[:, None], counters, t.to(torch.int64)[:, None].expand(-1, quarter))
    u0, u1, u2, u3 = (_uniform(word) for word in words)
    n0, n1 = _box_muller(u0, u1, dtype)
    n2, n3 = _box_muller(u2, u3, dtype)
    return torch.cat([n0, n1, n2, n3], dim=1)[:, :numel]


def _box_muller(u1: torch.Tensor, u2: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton's pair_uniform_to_normal: two uniforms to two independent standard normals."""
    radius = torch.sqrt(-2.0 * torch.log(u1.clamp_min(1.0e-7).to(dtype)))
    theta = (u2 * torch.tensor(_TWO_PI, dtype=torch.float32)).to(dtype)
    return radius * torch.cos(theta), radius * torch.sin(theta)


def randn_like(x: torch.Tensor, keys: torch.Tensor, t: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Noise shaped like the batch `x` (B, ...), in `dtype` (default: x's dtype, computed in float32)."""
    dtype = dtype or x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return randn(keys, t, x[0].numel() if x.shape[0] else 0, dtype=compute).view(x.shape).to(dtype)
