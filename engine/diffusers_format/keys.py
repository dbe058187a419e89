"""The state-dict key mapping: each parameter of our UNet named as UNet2DModel names it, found by walking our
module tree so that every key on each side is mapped exactly once; and the weights renamed both ways by it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from engine.config import Config
from engine.diffusers_format.json_settings import DiffusersFormatError, as_config_dict
from engine.diffusers_format.unet_config import diffusers_unet_config, model_fields_from_unet_config, unet_skeleton
from engine.unet import AttentionBlock, Downsample, Level, ResnetBlock, UNet, Upsample


@dataclass(frozen=True)
class KeyPair:
    ours: str
    theirs: str
    shape: tuple[int, ...]  # ours
    projection: bool  # an attention 1x1 conv here, an nn.Linear there


_UNET_NAMES = {"time_embed": "time_embedding", "conv_in": "conv_in", "down": "down_blocks",
               "mid_block1": "mid_block.resnets.0", "mid_attention": "mid_block.attentions.0",
               "mid_block2": "mid_block.resnets.1", "up": "up_blocks", "norm_out": "conv_norm_out",
               "conv_out": "conv_out", "class_embed": "class_embedding"}
_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2",
                 "conv2": "conv2", "shortcut": "conv_shortcut"}
_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TIME_EMBED_NAMES = {"0": "linear_1", "2": "linear_2"}  # our nn.Sequential(Linear, SiLU, Linear)


def _their_name(parent: nn.Module, name: str, child: nn.Module) -> str:
    """The diffusers name of `parent`'s child `name`."""
    if isinstance(parent, nn.ModuleList):
        return name
    if isinstance(parent, Level):
        if name == "resample":
            return "downsamplers.0" if isinstance(child, Downsample) else "upsamplers.0"
        return {"blocks": "resnets", "attentions": "attentions"}[name]
    if isinstance(parent, UNet):
        return _UNET_NAMES[name]
    if isinstance(parent, ResnetBlock):
        return _RESNET_NAMES[name]
    if isinstance(parent, AttentionBlock):
        return _ATTENTION_NAMES[name]
    if isinstance(parent, (Downsample, Upsample)):
        return {"conv": "conv"}[name]
    if isinstance(parent, nn.Sequential):
        return _TIME_EMBED_NAMES[name]
    raise TypeError(f"no diffusers name for a {type(parent).__name__}'s child {name!r}")  # a new module in unet.py


def _walk(module: nn.Module, ours: str, theirs: str) -> Iterator[KeyPair]:
    for name, parameter in module.named_parameters(recurse=False):
        yield KeyPair(ours + name, theirs + name, tuple(parameter.shape), False)
    for name, child in module.named_children():
        if next(child.parameters(), None) is None:  # SiLU, Identity: nothing to name
            continue
        pairs = _walk(child, f"{ours}{name}.", f"{theirs}{_their_name(module, name, child)}.")
        if isinstance(module, AttentionBlock) and isinstance(child, nn.Conv2d):
            pairs = (KeyPair(p.ours, p.theirs, p.shape, len(p.shape) == 4) for p in pairs)
        yield from pairs


def key_pairs(model: dict[str, Any], data: dict[str, Any]) -> list[KeyPair]:
    """Every parameter of our UNet with its diffusers name, found by walking the module tree."""
    pairs = list(_walk(unet_skeleton(model, data), "", ""))
    for side in ("ours", "theirs"):  # the mapping must be one to one
        names = [getattr(p, side) for p in pairs]
        if len(set(names)) != len(names):
            raise AssertionError(f"the key mapping names a {side} key twice")
    return pairs


def _check_keys(found: Iterable[str], expected: list[str], what: str) -> None:
    found, expected_set = set(found), set(expected)
    missing, unexpected = sorted(expected_set - found), sorted(found - expected_set)
    if missing or unexpected:

        def listing(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        parts = ([f"missing {len(missing)} keys ({listing(missing)})"] if missing else []) + (
            [f"unexpected {len(unexpected)} keys ({listing(unexpected)})"] if unexpected else [])
        raise DiffusersFormatError(f"{what} do not match the architecture: {'; '.join(parts)}")


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], key: str, what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise DiffusersFormatError(f"{what}: {key} has shape {tuple(tensor.shape)}, the architecture needs {shape}")


_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_attention(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention weights of checkpoints older than diffusers' `Attention` class, renamed as diffusers does on load."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_ATTENTION.match(key)
        renamed[f"{match[1]}.{_LEGACY_NAMES[match[2]]}.{match[3]}" if match else key] = value
    return renamed


def unet_to_diffusers(state_dict: dict[str, torch.Tensor],
                      config: Config | dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our UNet's weights and config -> UNet2DModel's config.json dict and state dict (CPU, contiguous)."""
    raw = as_config_dict(config)
    unet_config = diffusers_unet_config(raw)
    pairs = key_pairs(raw["model"], raw["data"])
    _check_keys(state_dict.keys(), [p.ours for p in pairs], "the UNet weights")
    converted = {}
    for pair in pairs:
        tensor = state_dict[pair.ours].detach()
        _check_shape(tensor, pair.shape, pair.ours, "the UNet weights")
        if pair.projection:  # (C, C, 1, 1) conv -> (C, C) linear
            tensor = tensor.reshape(tensor.shape[:2])
        converted[pair.theirs] = tensor.to("cpu").contiguous().clone()  # own storage: safetensors refuses shared
    return unet_config, converted


def diffusers_to_unet(unet_config: dict[str, Any], state_dict: dict[str, torch.Tensor], where: str = "config.json",
                      ) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """UNet2DModel config and weights -> (ModelConfig fields, DataConfig fields, our UNet's state dict in float32)."""
    model, data = model_fields_from_unet_config(unet_config, where)
    state_dict = _rename_legacy_attention(state_dict)
    pairs = key_pairs(model, data)
    what = f"the weights beside {where}"
    _check_keys(state_dict.keys(), [p.theirs for p in pairs], what)
    converted = {}
    for pair in pairs:
        tensor = state_dict[pair.theirs]
        if pair.projection and tensor.ndim == 2:  # (C, C) linear -> (C, C, 1, 1) conv
            tensor = tensor[:, :, None, None]
        _check_shape(tensor, pair.shape, pair.theirs, what)
        converted[pair.ours] = tensor.to(dtype=torch.float32).contiguous()
    return model, data, converted
