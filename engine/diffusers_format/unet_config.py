"""The UNet's config both ways: a run's model and data settings as UNet2DModel's config.json, and a
config.json as ModelConfig / DataConfig fields, refusing with one line whatever the other side cannot express."""

from __future__ import annotations

import json
import math
from typing import Any, Callable

import torch

from engine.config import Config
from engine.diffusers_format.json_settings import (DIFFUSERS_VERSION, DiffusersFormatError, as_config_dict,
                                                   is_int, json_equal)
from engine.unet import UNet


NORM_GROUPS = 32
NORM_EPS = 1e-6

# UNet2DModel's constructor defaults: a key missing from a config.json means this value.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
    "num_train_timesteps": None,
}


def unet_skeleton(model: dict[str, Any], data: dict[str, Any]) -> UNet:
    """Our UNet for these fields on the meta device: its structure and shapes, no memory."""
    try:
        with torch.device("meta"):
            return UNet(image_size=data["image_size"], in_channels=data["channels"], out_channels=data["channels"],
                        base_channels=model["base_channels"], channel_mult=model["channel_mult"],
                        num_res_blocks=model["num_res_blocks"], attention_resolutions=model["attention_resolutions"],
                        dropout=model["dropout"], num_heads=model["num_heads"], attention_backend="math",
                        num_classes=model.get("num_classes", 0), device="cpu")
    except ValueError as error:
        raise DiffusersFormatError(str(error)) from None


def _resolutions(model: dict[str, Any], data: dict[str, Any]) -> list[int]:
    return [data["image_size"] // 2**level for level in range(len(model["channel_mult"]))]


def diffusers_unet_config(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The UNet2DModel config.json of a run's model; DiffusersFormatError for what it cannot express."""
    raw = as_config_dict(config)
    model, data = raw["model"], raw["data"]
    base, mult = model["base_channels"], list(model["channel_mult"])
    if mult[0] != 1:
        raise DiffusersFormatError(
            f"model.channel_mult starts with {mult[0]}: UNet2DModel's conv_in and timestep features have "
            f"block_out_channels[0] channels where ours has model.base_channels, so channel_mult must start with 1")
    widths = [base * m for m in mult]
    if any(width % NORM_GROUPS for width in widths):
        raise DiffusersFormatError(
            f"model.base_channels={base} with channel_mult {mult} gives block widths {widths}: UNet2DModel uses "
            f"{NORM_GROUPS} GroupNorm groups in every block, so every width must be a multiple of {NORM_GROUPS} "
            f"(ours falls back to fewer groups for narrower blocks)")
    attends = [resolution in model["attention_resolutions"] for resolution in _resolutions(model, data)]
    heads = model["num_heads"]
    head_dim = None  # one head over all channels of every attention block
    if heads != 1:
        attention_widths = sorted({w for w, a in zip(widths, attends) if a} | {widths[-1]})
        if len(attention_widths) > 1:
            raise DiffusersFormatError(
                f"model.num_heads={heads} with attention blocks {attention_widths} channels wide (the middle block "
                f"attends at {widths[-1]}): UNet2DModel takes one attention_head_dim for all attention blocks, so it "
                f"gives blocks of different widths different head counts; use num_heads 1, or attention only at "
                f"levels {widths[-1]} channels wide")
        head_dim = attention_widths[0] // heads
    unet_skeleton(model, data)  # the remaining checks (image size, attention resolutions, heads) as our UNet makes them
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": data["image_size"], "in_channels": data["channels"], "out_channels": data["channels"],
        "center_input_sample": False, "time_embedding_type": "positional", "time_embedding_dim": None,
        "freq_shift": 1, "flip_sin_to_cos": False,  # [sin | cos] at 10000^(-i / (half - 1)), as ours
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "block_out_channels": widths, "layers_per_block": model["num_res_blocks"], "mid_block_scale_factor": 1,
        "downsample_padding": 0,  # pad right/bottom by one, then the stride-2 conv: TF's 'SAME', as ours
        "downsample_type": "conv", "upsample_type": "conv", "dropout": model["dropout"], "act_fn": "silu",
        "attention_head_dim": head_dim, "norm_num_groups": NORM_GROUPS, "attn_norm_num_groups": None,
        "norm_eps": NORM_EPS, "resnet_time_scale_shift": "default", "add_attention": True,
        # a class-conditional model's embedding has one more row than classes: the last is "no class"
        "class_embed_type": None, "num_class_embeds": model["num_classes"] + 1 if model.get("num_classes") else None,
        "num_train_timesteps": None,
    }


def _unet_setting(unet_config: dict[str, Any], key: str) -> Any:
    return unet_config[key] if key in unet_config else UNET_DEFAULTS[key]


def _refuse(where: str, key: str, value: Any, why: str) -> DiffusersFormatError:
    return DiffusersFormatError(f"{where}: {key}={json.dumps(value)} cannot be expressed by engine.unet.UNet: {why}")


# Settings that must have one value (a missing key means diffusers' default, checked the same way).
_REQUIRED = {
    "center_input_sample": (False, "ours takes inputs in [-1, 1] as they are"),
    "time_embedding_type": ("positional", "ours has sinusoidal (positional) timestep features"),
    "freq_shift": (1, "ours spaces the frequencies as 10000^(-i / (half - 1)), which is freq_shift 1"),
    "flip_sin_to_cos": (False, "ours orders the timestep features [sin | cos]"),
    "mid_block_type": ("UNetMidBlock2D", "ours has a ResNet-attention-ResNet middle block"),
    "mid_block_scale_factor": (1, "ours does not rescale residual sums"),
    "downsample_padding": (0, "ours pads right/bottom by one before the stride-2 conv (downsample_padding 0)"),
    "downsample_type": ("conv", "ours downsamples with a stride-2 conv"),
    "upsample_type": ("conv", "ours upsamples by nearest neighbour then a 3x3 conv"),
    "norm_num_groups": (NORM_GROUPS, f"ours uses {NORM_GROUPS} GroupNorm groups"),
    "resnet_time_scale_shift": ("default", "ours adds the timestep embedding (no scale-shift)"),
    "add_attention": (True, "ours always attends in the middle block"),
    "class_embed_type": (None, "ours adds a learned class embedding (num_class_embeds) to the timestep embedding"),
}


def model_fields_from_unet_config(unet_config: dict[str, Any],
                                  where: str = "config.json") -> tuple[dict[str, Any], dict[str, Any]]:
    """UNet2DModel config.json -> (ModelConfig fields, DataConfig fields); refuses what ours cannot express."""
    cfg = unet_config
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise _refuse(where, unknown[0], cfg[unknown[0]],
                      f"not a UNet2DModel setting of diffusers {DIFFUSERS_VERSION}, so its meaning is unknown here")
    class_name = cfg.get("_class_name", "UNet2DModel")
    if class_name != "UNet2DModel":
        raise _refuse(where, "_class_name", class_name, "only UNet2DModel folders can be read")

    def setting(key: str) -> Any:
        return _unet_setting(cfg, key)

    _check_fixed_settings(setting, where)
    size, channels = _image_fields(setting, where)
    widths, layers, dropout = _level_fields(setting, where)
    attends = _attending_levels(setting, where, len(widths))
    factor = 2 ** (len(widths) - 1)
    if size % factor:
        raise _refuse(where, "sample_size", size, f"must be divisible by the downsampling factor {factor}")
    resolutions = [size // 2**level for level in range(len(widths))]
    base = widths[0]
    model = {"base_channels": base, "channel_mult": [w // base for w in widths], "num_res_blocks": layers,
             "attention_resolutions": [r for r, a in zip(resolutions, attends) if a],
             "num_heads": _num_heads(setting, where, widths, attends), "dropout": float(dropout)}
    embeds = setting("num_class_embeds")  # ours: num_classes + 1 rows, the last one "no class"
    if embeds is not None and (not is_int(embeds) or embeds < 2):
        raise _refuse(where, "num_class_embeds", embeds, "ours needs at least one class and the \"no class\" row")
    model["num_classes"] = 0 if embeds is None else embeds - 1
    return model, {"image_size": size, "channels": channels}


def _check_fixed_settings(setting: Callable[[str], Any], where: str) -> None:
    """The settings ours has one value for: activation, norms, the _REQUIRED table."""
    for key, (required, why) in _REQUIRED.items():
        if not json_equal(setting(key), required):
            raise _refuse(where, key, setting(key), why)
    if setting("act_fn") not in ("silu", "swish"):  # diffusers' swish is SiLU
        raise _refuse(where, "act_fn", setting("act_fn"), "ours uses SiLU")
    eps = setting("norm_eps")
    if not isinstance(eps, (int, float)) or not math.isclose(eps, NORM_EPS, rel_tol=1e-6):
        raise _refuse(where, "norm_eps", eps, f"ours normalises with eps {NORM_EPS}")
    if setting("attn_norm_num_groups") not in (None, NORM_GROUPS):
        raise _refuse(where, "attn_norm_num_groups", setting("attn_norm_num_groups"),
                      f"ours uses {NORM_GROUPS} GroupNorm groups in attention as well")


def _image_fields(setting: Callable[[str], Any], where: str) -> tuple[int, int]:
    """(image size, channels) of the data the UNet takes."""
    size = setting("sample_size")
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not is_int(size) or size <= 0:
        raise _refuse(where, "sample_size", setting("sample_size"),
                      "ours needs one positive image size (it places attention by resolution)")
    channels = setting("in_channels")
    if setting("out_channels") != channels:
        raise _refuse(where, "out_channels", setting("out_channels"),
                      f"ours predicts a tensor shaped like its input (in_channels={json.dumps(channels)})")
    if channels not in (1, 3, 4) or not is_int(channels):
        raise _refuse(where, "in_channels", channels, "data.channels must be 1, 3 or 4")
    return size, channels


def _level_fields(setting: Callable[[str], Any], where: str) -> tuple[list[int], int, float]:
    """(widths per level, residual blocks per level, dropout)."""
    widths = setting("block_out_channels")
    if not isinstance(widths, (list, tuple)) or not widths or not all(is_int(w) and w > 0 for w in widths):
        raise _refuse(where, "block_out_channels", widths, "must be a non-empty list of positive integers")
    base = widths[0]
    if any(w % base for w in widths):
        raise _refuse(where, "block_out_channels", widths,
                      f"ours has widths base_channels x channel_mult, so each must be a multiple of the first ({base})")
    if setting("time_embedding_dim") not in (None, 4 * base):
        raise _refuse(where, "time_embedding_dim", setting("time_embedding_dim"),
                      f"ours has a time embedding 4 x block_out_channels[0] = {4 * base} wide")
    layers = setting("layers_per_block")
    if not is_int(layers) or layers < 1:
        raise _refuse(where, "layers_per_block", layers, "ours takes one positive num_res_blocks for every level")
    dropout = setting("dropout")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        raise _refuse(where, "dropout", dropout, "model.dropout must be in [0, 1)")
    return list(widths), layers, dropout


def _attending_levels(setting: Callable[[str], Any], where: str, levels: int) -> list[bool]:
    """Which levels attend, from the block types (the way up must mirror the way down)."""

    def block_types(key: str) -> list[Any]:
        types = setting(key)
        if not isinstance(types, (list, tuple)):
            raise _refuse(where, key, types, "must be a list of block type names")
        return [t.removeprefix("UNetRes") if isinstance(t, str) else t for t in types]  # as diffusers reads them

    down, up = block_types("down_block_types"), block_types("up_block_types")
    for key, types in (("down_block_types", down), ("up_block_types", up)):
        if len(types) != levels:
            raise _refuse(where, key, setting(key), f"needs one block per entry of block_out_channels ({levels})")
    for i, kind in enumerate(down):
        if kind not in ("DownBlock2D", "AttnDownBlock2D"):
            raise _refuse(where, f"down_block_types[{i}]", kind, "ours has DownBlock2D or AttnDownBlock2D levels only")
    attends = [kind == "AttnDownBlock2D" for kind in down]
    for j, kind in enumerate(up):
        mirror = levels - 1 - j
        expected = "AttnUpBlock2D" if attends[mirror] else "UpBlock2D"
        if kind != expected:
            raise _refuse(where, f"up_block_types[{j}]", kind,
                          f"ours attends at the same resolutions on the way up as down, so with down_block_types"
                          f"[{mirror}]={json.dumps(down[mirror])} it must be {json.dumps(expected)}")
    return attends


def _num_heads(setting: Callable[[str], Any], where: str, widths: list[int], attends: list[bool]) -> int:
    """One head count for every attention block, from attention_head_dim."""
    head_dim = setting("attention_head_dim")
    attention_widths = sorted({w for w, a in zip(widths, attends) if a} | {widths[-1]})  # + the middle block
    if head_dim is None:
        num_heads = 1  # diffusers then makes each block's head as wide as the block
    else:
        if not is_int(head_dim) or head_dim <= 0:
            raise _refuse(where, "attention_head_dim", head_dim, "must be a positive integer or null")
        uneven = [w for w in attention_widths if w % head_dim]
        if uneven:
            raise _refuse(where, "attention_head_dim", head_dim,
                          f"does not divide the {uneven[0]}-channel attention block, where diffusers then projects "
                          f"to fewer channels than the block has")
        counts = sorted({w // head_dim for w in attention_widths})
        if len(counts) > 1:
            raise _refuse(where, "attention_head_dim", head_dim,
                          f"gives the attention blocks ({attention_widths} channels wide) {counts} heads; ours uses "
                          f"one model.num_heads for every attention block")
        num_heads = counts[0]
    uneven = [w for w in widths if w % num_heads]
    if uneven:
        raise _refuse(where, "attention_head_dim", head_dim,
                      f"means {num_heads} heads, which must divide every level's width (not {uneven[0]})")
    return num_heads
