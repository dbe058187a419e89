"""The DDPM UNet (Ho et al. 2020, appendix B; the `diffusion_tf` model, layer for layer).

A PixelCNN++-style UNet: wide ResNet blocks conditioned on a sinusoidal timestep embedding,
self-attention at chosen resolutions, and a skip connection from every down-path block to the
up path. With the CIFAR-10 settings (ch=128, mult 1,2,2,2, attention at 16x16) it has 35.7M
parameters. The forward pass branches only on construction-time Python values, so it compiles
to a single graph.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.attention import resolve_attention_backend
from engine.attention import attention as attend

if TYPE_CHECKING:
    from engine.config import Config


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_unet(config: Config, device: torch.device | str) -> UNet:
    """The UNet a run's config describes, on `device`; it predicts a tensor shaped like its input."""
    model = config.model
    return UNet(image_size=config.data.image_size, in_channels=config.data.channels,
                out_channels=config.data.channels, base_channels=model.base_channels,
                channel_mult=model.channel_mult, num_res_blocks=model.num_res_blocks,
                attention_resolutions=model.attention_resolutions, dropout=model.dropout,
                num_heads=model.num_heads, attention_backend=model.attention_backend, num_classes=model.num_classes,
                activation_checkpointing=model.activation_checkpointing, device=device).to(device)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) [sin | cos] features at geometric frequencies 1 .. 1/max_period."""
    half = dim // 2
    # float32 whatever the model dtype: bf16 cannot resolve t * freq for t near 1000
    exponents = torch.arange(half, device=timesteps.device, dtype=torch.float32) / (half - 1)
    freqs = torch.exp(-math.log(max_period) * exponents)
    angles = timesteps.float()[:, None] * freqs[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, dim % 2))  # odd dim: one zero column, as the reference does


def group_norm(channels: int) -> nn.GroupNorm:
    """32 groups as in the paper, or the largest divisor of `channels` below 32 for small models."""
    groups = next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=1e-6)


def _init(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """The reference init: fan-avg uniform (Xavier) weights, zero biases; scale 0 zeroes the layer
    so residual branches start as the identity."""
    if scale == 0:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    nn.init.zeros_(layer.bias)
    return layer


class Checkpointable(nn.Module):
    """A block (its `compute`) whose activations can be recomputed in the backward instead of kept
    (`checkpointed`): non-reentrant torch.utils.checkpoint, which replays the RNG, so that dropout draws the
    same mask, and which torch.compile traces without a graph break."""

    checkpointed = False

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self.compute, *args, use_reentrant=False)
        return self.compute(*args)


class ResnetBlock(Checkpointable):
    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = _init(nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.temb_proj = _init(nn.Linear(temb_channels, out_channels))
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _init(nn.Conv2d(out_channels, out_channels, 3, padding=1), scale=0.0)
        # a 1x1 conv ("NIN") only where the residual must change width
        self.shortcut = _init(nn.Conv2d(in_channels, out_channels, 1)) if in_channels != out_channels else nn.Identity()

    def compute(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttentionBlock(Checkpointable):
    """Self-attention over the H*W positions, split into `num_heads` heads, added back residually."""

    def __init__(self, channels: int, num_heads: int, backend: str):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide the channels ({channels})")
        self.num_heads = num_heads
        self.backend = backend
        self.norm = group_norm(channels)
        self.q = _init(nn.Conv2d(channels, channels, 1))
        self.k = _init(nn.Conv2d(channels, channels, 1))
        self.v = _init(nn.Conv2d(channels, channels, 1))
        self.proj_out = _init(nn.Conv2d(channels, channels, 1), scale=0.0)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # The 1x1 convolutions run as matmuls over the (B, H*W, C) tokens: each head's features then lie
        # contiguous, which the fused SDPA kernels need (strided features send scaled_dot_product_attention to
        # its unfused math path), and on the CPU a matmul is far cheaper than a 1x1 convolution.
        tokens = self.norm(x).flatten(2).transpose(1, 2)

        def heads(conv: nn.Conv2d) -> torch.Tensor:  # -> (B, heads, H*W, head_dim)
            return _pointwise(conv, tokens).unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        h = attend(heads(self.q), heads(self.k), heads(self.v), self.backend)
        h = _pointwise(self.proj_out, h.transpose(1, 2).flatten(2))
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


def _pointwise(conv: nn.Conv2d, tokens: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to (..., C) tokens: the same weights, as a linear layer."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(channels, channels, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # TensorFlow's 'SAME' padding for a stride-2 conv: one extra row/column at the bottom/right only
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _init(nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the UNet: ResNet blocks, each followed by attention or nothing, then a resample."""

    def __init__(self, blocks: list[ResnetBlock], attentions: list[nn.Module], resample: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)
        self.resample = resample


class _Blocks:
    """Makes the blocks of one UNet, which share the timestep embedding width, the dropout and the
    attention settings."""

    def __init__(self, temb_channels: int, dropout: float, num_heads: int, attention_resolutions: Sequence[int],
                 attention_backend: str):
        self.temb_channels, self.dropout, self.num_heads = temb_channels, dropout, num_heads
        self.attention_resolutions, self.attention_backend = attention_resolutions, attention_backend

    def resnet(self, in_channels: int, out_channels: int) -> ResnetBlock:
        return ResnetBlock(in_channels, out_channels, self.temb_channels, self.dropout)

    def attention(self, channels: int) -> AttentionBlock:
        return AttentionBlock(channels, self.num_heads, self.attention_backend)

    def attention_or_identity(self, channels: int, resolution: int) -> nn.Module:
        return self.attention(channels) if resolution in self.attention_resolutions else nn.Identity()


def _down_path(make: _Blocks, base_channels: int, channel_mult: tuple[int, ...], resolutions: list[int],
               num_res_blocks: int) -> tuple[nn.ModuleList, list[int], int]:
    """The down path's levels, the width of every activation the up path will concatenate (the
    input convolution's first), and the width it ends with."""
    skip_channels, channels = [base_channels], base_channels
    down = nn.ModuleList()
    for level, (mult, resolution) in enumerate(zip(channel_mult, resolutions)):
        blocks, attentions = [], []
        for _ in range(num_res_blocks):
            blocks.append(make.resnet(channels, base_channels * mult))
            channels = base_channels * mult
            attentions.append(make.attention_or_identity(channels, resolution))
            skip_channels.append(channels)
        is_last = level == len(channel_mult) - 1
        down.append(Level(blocks, attentions, nn.Identity() if is_last else Downsample(channels)))
        if not is_last:
            skip_channels.append(channels)
    return down, skip_channels, channels


def _up_path(make: _Blocks, base_channels: int, channel_mult: tuple[int, ...], resolutions: list[int],
             num_res_blocks: int, skip_channels: list[int], channels: int) -> tuple[nn.ModuleList, int]:
    """The up path's levels, from the lowest resolution up, consuming `skip_channels` from the end;
    and the width it ends with. Each level has one block more than down, to take the downsample's
    skip as well."""
    up = nn.ModuleList()
    for level in reversed(range(len(channel_mult))):
        blocks, attentions = [], []
        for _ in range(num_res_blocks + 1):
            blocks.append(make.resnet(channels + skip_channels.pop(), base_channels * channel_mult[level]))
            channels = base_channels * channel_mult[level]
            attentions.append(make.attention_or_identity(channels, resolutions[level]))
        up.append(Level(blocks, attentions, Upsample(channels) if level > 0 else nn.Identity()))
    return up, channels


class UNet(nn.Module):
    def __init__(self, *, image_size: int, in_channels: int, out_channels: int, base_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (16,), dropout: float = 0.1, num_heads: int = 1,
                 attention_backend: str = "sdpa", num_classes: int = 0, activation_checkpointing: str = "none",
                 device: torch.device | str | None = None):
        """`device` is where the model will run (default: CUDA if present); it only decides which attention
        backend can run there. Parameters are created on the CPU; move them with `.to(device)`.

        With `num_classes`, a learned embedding of num_classes + 1 rows (the last: "no class") is added to the
        timestep embedding, as improved-diffusion's class_cond and diffusers' `num_class_embeds` do."""
        super().__init__()
        self.channel_mult = tuple(channel_mult)
        resolutions = self._resolutions(image_size, attention_resolutions)
        # resolved once, so forward dispatches on a constant string
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.attention_backend = resolve_attention_backend(attention_backend, device)
        self.base_channels = base_channels
        temb_channels = 4 * base_channels
        make = _Blocks(temb_channels, dropout, num_heads, attention_resolutions, self.attention_backend)

        # created in this order: it is the order of the state_dict keys and of the random initialisation
        self.time_embed = nn.Sequential(_init(nn.Linear(base_channels, temb_channels)), nn.SiLU(),
                                        _init(nn.Linear(temb_channels, temb_channels)))
        self.conv_in = _init(nn.Conv2d(in_channels, base_channels, 3, padding=1))
        self.down, skip_channels, channels = _down_path(make, base_channels, self.channel_mult, resolutions,
                                                        num_res_blocks)
        self.mid_block1 = make.resnet(channels, channels)
        self.mid_attention = make.attention(channels)
        self.mid_block2 = make.resnet(channels, channels)
        self.up, channels = _up_path(make, base_channels, self.channel_mult, resolutions, num_res_blocks,
                                     skip_channels, channels)
        self.norm_out = group_norm(channels)
        self.conv_out = _init(nn.Conv2d(channels, out_channels, 3, padding=1), scale=0.0)
        # created last, so that a conditional model's other layers start as the unconditional one's
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, temb_channels) if num_classes else None
        self.set_activation_checkpointing(activation_checkpointing)

    def set_activation_checkpointing(self, mode: str) -> None:
        """none, resblocks (every ResnetBlock) or all (and every AttentionBlock)."""
        kinds = {"none": (), "resblocks": (ResnetBlock,), "all": (ResnetBlock, AttentionBlock)}
        if mode not in kinds:
            raise ValueError(f"unknown activation checkpointing {mode!r}; choose one of {', '.join(kinds)}")
        for module in self.modules():
            if isinstance(module, Checkpointable):
                module.checkpointed = isinstance(module, kinds[mode])

    def _resolutions(self, image_size: int, attention_resolutions: Sequence[int]) -> list[int]:
        """The feature map size of every level; ValueError when the image size or an attention
        resolution does not fit the levels."""
        if image_size % self.downsample_factor:
            raise ValueError(f"image_size ({image_size}) must be divisible by the UNet's downsampling factor "
                             f"{self.downsample_factor} (2 ** (len(channel_mult) - 1))")
        resolutions = [image_size // 2**level for level in range(len(self.channel_mult))]
        unused = sorted(set(attention_resolutions) - set(resolutions))
        if unused:
            raise ValueError(f"attention_resolutions {unused} are not resolutions of this UNet ({resolutions})")
        return resolutions

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """`class_labels` (B,) in [0, num_classes], num_classes meaning "no class"; None: "no class" for all."""
        temb = self.time_embed(timestep_embedding(timesteps, self.base_channels).to(x.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full_like(timesteps, self.num_classes, dtype=torch.long)
            temb = temb + self.class_embed(class_labels).to(temb.dtype)

        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(h, temb))
                skips.append(h)
            if not isinstance(level.resample, nn.Identity):
                h = level.resample(h)
                skips.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(h, temb)), temb)

        for level in self.up:
            for block, attention in zip(level.blocks, level.attentions):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), temb))
            h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))
