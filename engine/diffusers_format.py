"""The diffusers format: our UNet and schedule as a `DDPMPipeline` folder, and such folders read back.

engine.unet.UNet is the DDPM reference layer for layer, and diffusers' `UNet2DModel` can be configured to
be the same network (`AttnDownBlock2D` where ours attends, `DownBlock2D` elsewhere, 32-group norms with
eps 1e-6, [sin | cos] timestep features with freq_shift 1, right/bottom padding before the stride-2 conv).
This module translates the configuration both ways, refusing with one line (naming the setting and why)
whatever the other side cannot express, and renames the weights by walking our module tree, so that
every key on each side is mapped exactly once.

Writing needs only `safetensors` (not diffusers). Reading accepts a pipeline folder (`model_index.json`,
`unet/`, `scheduler/`), as `DDPMPipeline.save_pretrained` writes it, or a bare UNet folder (`config.json`
with `diffusion_pytorch_model.safetensors`, a sharded safetensors index, or a `.bin`), as
`UNet2DModel.save_pretrained` writes it; old checkpoints' attention names (query/key/value/proj_attn)
are accepted as well.

The scheduler is a `DDPMScheduler` (the training schedule, with the ddpm/ddim settings), or, for a run whose
`sample.sampler` is a fast solver (engine/solvers.py), the `DPMSolverMultistepScheduler` or
`UniPCMultistepScheduler` that steps as ours does, so that the pipeline reproduces our samples; reading such
a scheduler back gives the solver's sample settings.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn

from engine.atomic_files import atomic_folder
from engine.config import Config, ConfigError
from engine.solvers import SOLVERS, solver_order
from engine.unet import AttentionBlock, Downsample, Level, ResnetBlock, UNet, Upsample

DIFFUSERS_VERSION = "0.42.1"  # the diffusers release this layout was checked against
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
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
# DDPMScheduler's defaults for the settings read here.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True, "clip_sample_range": 1.0,
    "prediction_type": "epsilon", "thresholding": False, "rescale_betas_zero_snr": False,
}

TARGET_TO_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
PREDICTION_TO_TARGET = {value: key for key, value in TARGET_TO_PREDICTION.items()}
SCHEDULE_TO_BETA_SCHEDULE = {"linear": "linear", "scaled_linear": "scaled_linear",
                             "cosine": "squaredcos_cap_v2", "squaredcos_cap_v2": "squaredcos_cap_v2"}
# the *_log variants draw the same noise (they keep the variance as a log)
VARIANCE_TYPES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
                  "fixed_large": "fixed_large", "fixed_large_log": "fixed_large"}
MODEL_INDEX = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}

# The fast solvers' diffusers schedulers, and their constructor defaults for every setting read here (a key
# missing from a scheduler_config.json means this value).
DPM_SOLVER = "DPMSolverMultistepScheduler"
UNIPC = "UniPCMultistepScheduler"
SOLVER_SCHEDULERS = {"dpm++2m": DPM_SOLVER, "dpm++3m": DPM_SOLVER, "dpm++2m-sde": DPM_SOLVER, "unipc": UNIPC}
_MULTISTEP_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", "thresholding": False,
    "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "lower_order_final": True,
    "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_flow_sigmas": False,
    "final_sigmas_type": "zero", "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
}
SOLVER_SCHEDULER_DEFAULTS: dict[str, dict[str, Any]] = {
    DPM_SOLVER: {**_MULTISTEP_DEFAULTS, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                 "euler_at_final": False, "use_lu_lambdas": False, "lambda_min_clipped": -math.inf,
                 "variance_type": None},
    UNIPC: {**_MULTISTEP_DEFAULTS, "predict_x0": True, "solver_type": "bh2", "disable_corrector": [],
            "solver_p": None, "sigma_min": None, "sigma_max": None, "shift_terminal": None},
}
# diffusers' thresholding clamps s = the quantile of |x0| to [1, sample_max_value]: a cap this large is none
# for float32 samples (ours, Imagen's dynamic thresholding), while 1.0 makes s = 1, i.e. clipping to [-1, 1].
UNCAPPED = float(torch.finfo(torch.float32).max)


class DiffusersFormatError(ConfigError):
    """A folder or model one side cannot express: one line naming the setting (exit status 2)."""


@dataclass
class DiffusersModel:
    """What a diffusers folder holds, in our terms.

    `model` and `data` are fields of engine.config's ModelConfig / DataConfig; `diffusion` of
    DiffusionConfig (None without a scheduler config); `sample` the SampleConfig fields the scheduler
    fixes (variance, clip_denoised, timestep_spacing; for a solver's scheduler the sampler and its settings,
    see `solver_sample_fields`); `state_dict` is in engine.unet.UNet's key layout.
    """

    model: dict[str, Any]
    data: dict[str, Any]
    diffusion: dict[str, Any] | None
    sample: dict[str, Any]
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    source: Path | None = None


# ----------------------------------------------------------------------------- the key mapping


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


def _skeleton(model: dict[str, Any], data: dict[str, Any]) -> UNet:
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


def key_pairs(model: dict[str, Any], data: dict[str, Any]) -> list[KeyPair]:
    """Every parameter of our UNet with its diffusers name, found by walking the module tree."""
    pairs = list(_walk(_skeleton(model, data), "", ""))
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


# ----------------------------------------------------------------------------- ours -> diffusers


def _as_dict(config: Config | dict[str, Any]) -> dict[str, Any]:
    return config.to_dict() if isinstance(config, Config) else config


def _resolutions(model: dict[str, Any], data: dict[str, Any]) -> list[int]:
    return [data["image_size"] // 2**level for level in range(len(model["channel_mult"]))]


def diffusers_unet_config(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The UNet2DModel config.json of a run's model; DiffusersFormatError for what it cannot express."""
    raw = _as_dict(config)
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
    _skeleton(model, data)  # the remaining checks (image size, attention resolutions, heads) as our UNet makes them
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


def _schedule_fields(diffusion: dict[str, Any], scheduler: str) -> dict[str, Any]:
    """The training schedule and target as every diffusers scheduler spells them."""
    schedule = diffusion["schedule"]
    if schedule not in SCHEDULE_TO_BETA_SCHEDULE:
        raise DiffusersFormatError(f"diffusion.schedule={schedule!r} has no {scheduler} beta_schedule "
                                   f"(it has {', '.join(sorted(set(SCHEDULE_TO_BETA_SCHEDULE.values())))})")
    if diffusion["target"] == "edm":
        raise DiffusersFormatError(f"diffusion.target='edm' (EDM's preconditioning, diffusion.sigma_data="
                                   f"{diffusion.get('sigma_data', 0.5):g}) feeds the network c_in(t) x_t, which UNet2DModel "
                                   f"and {scheduler} cannot express; diffusion.target=v is its sigma_data=1 case and "
                                   f"exports")
    if diffusion["target"] not in TARGET_TO_PREDICTION:
        raise DiffusersFormatError(f"diffusion.target={diffusion['target']!r} has no {scheduler} prediction_type "
                                   f"(it has {', '.join(TARGET_TO_PREDICTION.values())})")
    return {
        "num_train_timesteps": diffusion["num_timesteps"], "beta_schedule": SCHEDULE_TO_BETA_SCHEDULE[schedule],
        "beta_start": diffusion["beta_start"], "beta_end": diffusion["beta_end"],  # read for the linear ones only
        "trained_betas": None, "prediction_type": TARGET_TO_PREDICTION[diffusion["target"]],
        "rescale_betas_zero_snr": False,
    }


def diffusers_scheduler_config(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The DDPMScheduler scheduler_config.json of a run's diffusion and sample settings (whatever its sampler:
    the training schedule; `run_scheduler_config` is what an export writes)."""
    raw = _as_dict(config)
    diffusion, sample = raw["diffusion"], raw["sample"]
    return {
        "_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
        **_schedule_fields(diffusion, "DDPMScheduler"),
        "variance_type": sample["variance"], "clip_sample": sample["clip_denoised"], "clip_sample_range": 1.0,
        "thresholding": False, "timestep_spacing": sample.get("timestep_spacing", "linspace"), "steps_offset": 0,
    }


def solver_scheduler_config(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The DPMSolverMultistepScheduler or UniPCMultistepScheduler scheduler_config.json that steps as the run's
    `sample.sampler` (a fast solver) does: the same noise levels (timestep spacing or Karras sigmas, a last step
    to sigma = 0), orders, target and x0 clipping, so diffusers' loop reproduces `diffusion.sample`.

    x0 clipping maps onto diffusers' thresholding, which clamps x0 to [-s, s] / s with s the
    `dynamic_thresholding_ratio` quantile of |x0| clamped to [1, sample_max_value]:
    - `clip_denoised: false`: thresholding off;
    - `thresholding: static` (clip to [-1, 1]): sample_max_value 1.0, so s = 1 and x0 is clipped to [-1, 1]
      (these schedulers have no `clip_sample`; this is its exact counterpart);
    - `thresholding: dynamic` (ours: s = max(1, quantile), no upper bound): sample_max_value = the largest
      float32 (`UNCAPPED`), a cap no float32 quantile exceeds.

    UniPC with `lower_order_final: false` is written as lower_order_final true at unipc_order 2 (the same
    steps) and refused at order 3 (see below). DiffusersFormatError names what cannot be expressed.
    """
    raw = _as_dict(config)
    diffusion, sample = raw["diffusion"], raw["sample"]
    sampler = sample["sampler"]
    if sampler not in SOLVER_SCHEDULERS:
        raise ValueError(f"sample.sampler={sampler!r} is not a fast solver ({', '.join(SOLVERS)})")
    scheduler = SOLVER_SCHEDULERS[sampler]
    clip = bool(sample.get("clip_denoised", True))
    dynamic = clip and sample.get("thresholding", "static") == "dynamic"
    common = {
        "_class_name": scheduler, "_diffusers_version": DIFFUSERS_VERSION, **_schedule_fields(diffusion, scheduler),
        "lower_order_final": bool(sample.get("lower_order_final", True)),
        "use_karras_sigmas": bool(sample.get("karras_sigmas", False)), "use_exponential_sigmas": False,
        "use_beta_sigmas": False, "use_flow_sigmas": False, "use_dynamic_shifting": False,
        "timestep_spacing": sample.get("timestep_spacing", "linspace"), "steps_offset": 0,
        "final_sigmas_type": "zero",  # ours ends at sigma = 0 with a first-order step (returns the x0 prediction)
        # x0 clipping as diffusers' thresholding (see the docstring): static clipping is sample_max_value 1.0
        # (s clamped to [1, 1]); dynamic thresholding has no cap in ours, hence the largest float32
        "thresholding": clip, "dynamic_thresholding_ratio": float(sample.get("dynamic_thresholding_ratio", 0.995)),
        "sample_max_value": UNCAPPED if dynamic else 1.0,
    }
    if scheduler == UNIPC:
        order = int(sample.get("unipc_order", 2))
        if not common["lower_order_final"]:
            # diffusers' UniPC then keeps its order at the last step, to sigma = 0, where its r_k are 0 (NaN at
            # order 2, a singular solve at 3); ours steps first order there. At order 2 that is all
            # lower_order_final changes, so True takes the same steps; at order 3 it also lowers the one before.
            if order != 2:
                raise DiffusersFormatError(
                    f"sample.lower_order_final=false with sample.unipc_order={order} has no diffusers "
                    f"UniPCMultistepScheduler counterpart (it fails at the last step, to sigma = 0); set "
                    f"sample.lower_order_final=true or sample.unipc_order=2")
            common["lower_order_final"] = True
        return {**common, "solver_order": order, "solver_type": "bh2",
                "predict_x0": True, "disable_corrector": [], "solver_p": None, "sigma_min": None, "sigma_max": None,
                "shift_terminal": None}
    # lambda_min_clipped stays out: its value here, -inf (no clipping), is diffusers' default and no JSON number
    return {**common, "solver_order": solver_order(sampler),
            "algorithm_type": "sde-dpmsolver++" if sampler == "dpm++2m-sde" else "dpmsolver++",
            "solver_type": "midpoint", "euler_at_final": False, "use_lu_lambdas": False, "variance_type": None}


def run_scheduler_config(config: Config | dict[str, Any]) -> dict[str, Any]:
    """The scheduler_config.json an export writes: `solver_scheduler_config` when `sample.sampler` is a fast
    solver, else the DDPMScheduler's (`diffusers_scheduler_config`)."""
    raw = _as_dict(config)
    if raw["sample"].get("sampler") in SOLVER_SCHEDULERS:
        return solver_scheduler_config(raw)
    return diffusers_scheduler_config(raw)


def unet_to_diffusers(state_dict: dict[str, torch.Tensor],
                      config: Config | dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Our UNet's weights and config -> UNet2DModel's config.json dict and state dict (CPU, contiguous)."""
    raw = _as_dict(config)
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


# ----------------------------------------------------------------------------- diffusers -> ours


def _unet_setting(unet_config: dict[str, Any], key: str) -> Any:
    return unet_config[key] if key in unet_config else UNET_DEFAULTS[key]


def _refuse(where: str, key: str, value: Any, why: str) -> DiffusersFormatError:
    return DiffusersFormatError(f"{where}: {key}={json.dumps(value)} cannot be expressed by engine.unet.UNet: {why}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same(value: Any, required: Any) -> bool:
    """JSON equality that keeps true apart from 1 (and 1.0 equal to 1)."""
    if isinstance(value, bool) or isinstance(required, bool) or value is None or required is None:
        return type(value) is type(required) and value == required
    return value == required


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
    if embeds is not None and (not _is_int(embeds) or embeds < 2):
        raise _refuse(where, "num_class_embeds", embeds, "ours needs at least one class and the \"no class\" row")
    model["num_classes"] = 0 if embeds is None else embeds - 1
    return model, {"image_size": size, "channels": channels}


def _check_fixed_settings(setting: Callable[[str], Any], where: str) -> None:
    """The settings ours has one value for: activation, norms, the _REQUIRED table."""
    for key, (required, why) in _REQUIRED.items():
        if not _same(setting(key), required):
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
    if not _is_int(size) or size <= 0:
        raise _refuse(where, "sample_size", setting("sample_size"),
                      "ours needs one positive image size (it places attention by resolution)")
    channels = setting("in_channels")
    if setting("out_channels") != channels:
        raise _refuse(where, "out_channels", setting("out_channels"),
                      f"ours predicts a tensor shaped like its input (in_channels={json.dumps(channels)})")
    if channels not in (1, 3, 4) or not _is_int(channels):
        raise _refuse(where, "in_channels", channels, "data.channels must be 1, 3 or 4")
    return size, channels


def _level_fields(setting: Callable[[str], Any], where: str) -> tuple[list[int], int, float]:
    """(widths per level, residual blocks per level, dropout)."""
    widths = setting("block_out_channels")
    if not isinstance(widths, (list, tuple)) or not widths or not all(_is_int(w) and w > 0 for w in widths):
        raise _refuse(where, "block_out_channels", widths, "must be a non-empty list of positive integers")
    base = widths[0]
    if any(w % base for w in widths):
        raise _refuse(where, "block_out_channels", widths,
                      f"ours has widths base_channels x channel_mult, so each must be a multiple of the first ({base})")
    if setting("time_embedding_dim") not in (None, 4 * base):
        raise _refuse(where, "time_embedding_dim", setting("time_embedding_dim"),
                      f"ours has a time embedding 4 x block_out_channels[0] = {4 * base} wide")
    layers = setting("layers_per_block")
    if not _is_int(layers) or layers < 1:
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
        if not _is_int(head_dim) or head_dim <= 0:
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


_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_legacy_attention(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Attention weights of checkpoints older than diffusers' `Attention` class, renamed as diffusers does on load."""
    renamed = {}
    for key, value in state_dict.items():
        match = _LEGACY_ATTENTION.match(key)
        renamed[f"{match[1]}.{_LEGACY_NAMES[match[2]]}.{match[3]}" if match else key] = value
    return renamed


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


def diffusion_fields_from_scheduler_config(scheduler_config: dict[str, Any], where: str = "scheduler_config.json",
                                           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A scheduler config -> (DiffusionConfig fields, SampleConfig fields); refuses what ours cannot express.

    A DPMSolverMultistepScheduler or UniPCMultistepScheduler gives the fast solver that steps as it does
    (`solver_sample_fields`); any other class is read as a DDPMScheduler (its clip_sample, variance_type and
    DDIM timestep spacing, where it has them)."""
    cfg = scheduler_config
    class_name = cfg.get("_class_name", "DDPMScheduler")
    is_ddpm = class_name == "DDPMScheduler"
    defaults = SOLVER_SCHEDULER_DEFAULTS.get(class_name, SCHEDULER_DEFAULTS)

    def setting(key: str) -> Any:
        return cfg[key] if key in cfg else defaults[key]

    def refuse(key: str, why: str) -> DiffusersFormatError:
        return DiffusersFormatError(f"{where}: {key}={json.dumps(setting(key))} cannot be expressed by the engine's "
                                    f"diffusion config: {why}")

    if setting("trained_betas") is not None:
        raise refuse("trained_betas", "ours computes betas from a named schedule")
    beta_schedule = setting("beta_schedule")
    if beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise refuse("beta_schedule", "ours has linear, scaled_linear and squaredcos_cap_v2 (cosine)")
    if setting("rescale_betas_zero_snr"):
        raise refuse("rescale_betas_zero_snr", "ours does not rescale the schedule to zero terminal SNR")
    if setting("prediction_type") not in PREDICTION_TO_TARGET:
        raise refuse("prediction_type", f"ours predicts {', '.join(PREDICTION_TO_TARGET)}")
    if setting("thresholding") and class_name not in SOLVER_SCHEDULER_DEFAULTS:
        raise refuse("thresholding", "ours clips the predicted x0 to [-1, 1] (clip_sample) instead")
    steps = setting("num_train_timesteps")
    if not _is_int(steps) or steps < 2:
        raise refuse("num_train_timesteps", "must be an integer of at least 2")
    diffusion = {"num_timesteps": steps, "schedule": beta_schedule, "beta_start": float(setting("beta_start")),
                 "beta_end": float(setting("beta_end")), "target": PREDICTION_TO_TARGET[setting("prediction_type")]}
    if class_name in SOLVER_SCHEDULER_DEFAULTS:
        return diffusion, solver_sample_fields(cfg, where)

    sample: dict[str, Any] = {}
    if "clip_sample" in cfg or is_ddpm:
        clip = bool(setting("clip_sample"))
        if clip and not math.isclose(float(setting("clip_sample_range")), 1.0):
            raise refuse("clip_sample_range", "ours clips the predicted x0 to [-1, 1]")
        sample["clip_denoised"] = clip
    if "variance_type" in cfg or is_ddpm:  # only DDPMScheduler has one
        variance = setting("variance_type")
        if variance not in VARIANCE_TYPES:
            raise refuse("variance_type", "ours has fixed_small and fixed_large (no learned variance)")
        sample["variance"] = VARIANCE_TYPES[variance]
    if cfg.get("timestep_spacing") in ("linspace", "leading", "trailing") and not cfg.get("steps_offset"):
        sample["timestep_spacing"] = cfg["timestep_spacing"]  # the DDIM timesteps the folder's author chose
    return diffusion, sample


def solver_sample_fields(scheduler_config: dict[str, Any], where: str = "scheduler_config.json") -> dict[str, Any]:
    """A DPMSolverMultistepScheduler / UniPCMultistepScheduler config -> the SampleConfig fields of the fast solver
    that steps as it does (sampler, timestep_spacing, karras_sigmas, lower_order_final, unipc_order, x0
    clipping; sample.steps is not a scheduler setting and stays as it is). The inverse of
    `solver_scheduler_config`; refuses, naming the key, what our solvers cannot do."""
    cfg, class_name = scheduler_config, scheduler_config["_class_name"]
    defaults = SOLVER_SCHEDULER_DEFAULTS[class_name]

    def setting(key: str) -> Any:
        return cfg[key] if key in cfg else defaults[key]

    def refuse(key: str, why: str) -> DiffusersFormatError:
        return DiffusersFormatError(f"{where}: {key}={json.dumps(setting(key))} cannot be expressed by the engine's "
                                    f"solvers: {why}")

    def require(key: str, value: Any, why: str) -> None:
        if not _same(setting(key), value):
            raise refuse(key, why)

    order = setting("solver_order")
    if class_name == DPM_SOLVER:
        algorithm = setting("algorithm_type")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
            raise refuse("algorithm_type", "ours is DPM-Solver++ on the data prediction: dpmsolver++ or "
                                           "sde-dpmsolver++")
        orders = {"dpmsolver++": (2, 3), "sde-dpmsolver++": (2,)}[algorithm]
        if not _is_int(order) or order not in orders:
            raise refuse("solver_order", f"ours has {algorithm} of order {' and '.join(map(str, orders))}")
        sampler = "dpm++2m-sde" if algorithm == "sde-dpmsolver++" else f"dpm++{order}m"
        require("solver_type", "midpoint", "ours takes the midpoint form of the second-order update")
        require("euler_at_final", False, "ours ends with a first-order step to sigma = 0 only")
        require("use_lu_lambdas", False, "ours spaces the noise levels by timestep or as Karras et al.")
        if setting("lambda_min_clipped") != -math.inf:
            raise refuse("lambda_min_clipped", "ours does not clip lambda")
        if setting("variance_type") is not None:
            raise refuse("variance_type", "ours has no learned variance")
    else:
        if not _is_int(order) or order not in (2, 3):
            raise refuse("solver_order", "ours has UniPC of order 2 and 3 (sample.unipc_order)")
        sampler = "unipc"
        require("predict_x0", True, "ours is UniPC on the data prediction")
        require("solver_type", "bh2", "ours is UniPC with B(h) = e^-h - 1 (bh2)")
        if setting("disable_corrector"):  # [] or null
            raise refuse("disable_corrector", "ours corrects at every step")
        require("solver_p", None, "ours predicts with UniP")
        for key in ("sigma_min", "sigma_max"):
            require(key, None, "ours takes the training schedule's ends")
    for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas", "use_dynamic_shifting"):
        require(key, False, "ours spaces the noise levels by timestep or as Karras et al.")
    require("final_sigmas_type", "zero", "ours ends at sigma = 0")
    if setting("timestep_spacing") not in ("linspace", "leading", "trailing"):
        raise refuse("timestep_spacing", "ours has linspace, leading and trailing")
    require("steps_offset", 0, "ours spaces the timesteps without an offset")

    sample: dict[str, Any] = {"sampler": sampler, "timestep_spacing": setting("timestep_spacing"),
                              "karras_sigmas": bool(setting("use_karras_sigmas")),
                              "lower_order_final": bool(setting("lower_order_final"))}
    if sampler == "unipc":
        sample["unipc_order"] = order
    return {**sample, **_clipping_fields(setting, refuse)}


def _clipping_fields(setting, refuse) -> dict[str, Any]:
    """A solver scheduler's thresholding as our x0 clipping (the inverse of `solver_scheduler_config`'s mapping)."""
    if not setting("thresholding"):
        return {"clip_denoised": False}
    cap = setting("sample_max_value")
    if not isinstance(cap, (int, float)) or isinstance(cap, bool):
        raise refuse("sample_max_value", "must be a number")
    if math.isclose(cap, 1.0):  # s clamped to [1, 1]: clipping to [-1, 1]
        return {"clip_denoised": True, "thresholding": "static"}
    if cap >= UNCAPPED:  # s = max(1, quantile): our dynamic thresholding
        return {"clip_denoised": True, "thresholding": "dynamic",
                "dynamic_thresholding_ratio": float(setting("dynamic_thresholding_ratio"))}
    raise refuse("sample_max_value", f"with thresholding, ours clips x0 to [-1, 1] (sample_max_value 1.0) or "
                                     f"thresholds it with no upper bound on s (sample_max_value {UNCAPPED:.7g})")


# ----------------------------------------------------------------------------- folders


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except OSError as error:
        raise DiffusersFormatError(f"{path}: cannot read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise DiffusersFormatError(f"{path}: malformed JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(value, dict):
        raise DiffusersFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, LEGACY_WEIGHTS_NAME))


def is_diffusers_folder(path: str | Path) -> bool:
    """Whether `path` is a diffusers pipeline folder (model_index.json or unet/) or a bare UNet folder
    (config.json beside diffusion_pytorch_model weights). Looks at file names only."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        return True
    return (path / "config.json").is_file() and _has_weights(path)


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(the UNet folder, the scheduler config or None) of a pipeline or bare UNet folder."""
    if not path.is_dir():
        raise DiffusersFormatError(f"{path} is not a folder")
    index = path / "model_index.json"
    if index.is_file() or (path / "unet").is_dir():
        if index.is_file():
            entry = _read_json(index).get("unet")
            if entry is not None and list(entry) != ["diffusers", "UNet2DModel"]:
                raise DiffusersFormatError(f"{index}: unet={json.dumps(entry)}; only a diffusers UNet2DModel can be "
                                           f"read")
        unet_dir = path / "unet"
        if not (unet_dir / "config.json").is_file():
            raise DiffusersFormatError(f"{path} is a pipeline folder without unet/config.json")
        scheduler = path / "scheduler" / "scheduler_config.json"
        return unet_dir, scheduler if scheduler.is_file() else None
    if (path / "config.json").is_file():
        return path, None
    raise DiffusersFormatError(f"{path} is not a diffusers folder: no model_index.json, unet/ or config.json")


def _read_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index, legacy = unet_dir / WEIGHTS_NAME, unet_dir / WEIGHTS_INDEX_NAME, unet_dir / LEGACY_WEIGHTS_NAME
    try:
        if single.is_file():
            return load_file(single)
        if index.is_file():  # sharded: {"weight_map": {key: shard file}}
            weights = {}
            for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
                weights.update(load_file(unet_dir / shard))
            return weights
        if legacy.is_file():
            loaded = torch.load(legacy, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise DiffusersFormatError(f"{legacy}: expected a state dict, got {type(loaded).__name__}")
            return loaded
    except (OSError, EOFError, pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError) as error:
        if isinstance(error, DiffusersFormatError):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DiffusersFormatError(f"{unet_dir}: cannot read the weights ({message})") from None
    raise DiffusersFormatError(f"{unet_dir}: no weights ({WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or "
                               f"{LEGACY_WEIGHTS_NAME})")


def read_diffusers_folder(path: str | Path) -> DiffusersModel:
    """A pipeline or bare UNet folder in our terms (see DiffusersModel); DiffusersFormatError otherwise."""
    path = Path(path)
    unet_dir, scheduler_path = _locate(path)
    config_path = unet_dir / "config.json"
    unet_config = _read_json(config_path)
    model_fields_from_unet_config(unet_config, str(config_path))  # refuse before reading the weights
    model, data, state_dict = diffusers_to_unet(unet_config, _read_weights(unet_dir), str(config_path))
    diffusion, sample = None, {}
    if scheduler_path is not None:
        diffusion, sample = diffusion_fields_from_scheduler_config(_read_json(scheduler_path), str(scheduler_path))
    return DiffusersModel(model=model, data=data, diffusion=diffusion, sample=sample, state_dict=state_dict,
                          source=path)


def check_destination(out_dir: str | Path, overwrite: bool = False) -> Path:
    """`out_dir` if a folder can be written there: absent, empty, or replaceable with `overwrite`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DiffusersFormatError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DiffusersFormatError(f"{out} exists and is not empty; pass --overwrite to replace it")
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_diffusers_folder(out_dir: str | Path, config: Config | dict[str, Any], state_dict: dict[str, torch.Tensor],
                           overwrite: bool = False) -> Path:
    """Write a DDPMPipeline folder (model_index.json, unet/, scheduler/) of our UNet's weights and config.

    The scheduler is `run_scheduler_config`'s: a DDPMScheduler, or for a fast solver run the
    DPMSolverMultistepScheduler / UniPCMultistepScheduler that reproduces its samples (`DDPMPipeline` steps
    any scheduler; x0 clipping becomes diffusers' thresholding, see `solver_scheduler_config`).

    The folder is written beside `out_dir` under a temporary name and renamed into place
    (engine.atomic_files.atomic_folder), so a failure leaves no half-written folder; an existing
    non-empty `out_dir` is replaced only with `overwrite`.
    """
    from safetensors.torch import save_file

    raw = _as_dict(config)
    out = check_destination(out_dir, overwrite)
    unet_config, weights = unet_to_diffusers(state_dict, raw)
    scheduler_config = run_scheduler_config(raw)
    model_index = {**MODEL_INDEX, "scheduler": ["diffusers", scheduler_config["_class_name"]]}
    try:
        with atomic_folder(out) as tmp:
            (tmp / "unet").mkdir()
            (tmp / "scheduler").mkdir()
            _write_json(tmp / "model_index.json", model_index)
            _write_json(tmp / "unet" / "config.json", unet_config)
            save_file(weights, str(tmp / "unet" / WEIGHTS_NAME), metadata={"format": "pt"})
            _write_json(tmp / "scheduler" / "scheduler_config.json", scheduler_config)
    except OSError as error:
        raise DiffusersFormatError(f"cannot write {out}: {error.strerror or error}") from None
    return out


# ----------------------------------------------------------------------------- starting from a folder


def config_with_diffusers(raw: dict[str, Any], found: DiffusersModel) -> dict[str, Any]:
    """A copy of config dict `raw` (Config.to_dict() layout, may be partial) with the folder's model, image
    size, channels, schedule and sampler settings laid over it; check it with config_from_dict.
    (engine.sample.load_run starts from a diffusers folder this way.)"""
    merged = copy.deepcopy(raw)
    for section, fields in (("model", found.model), ("data", found.data), ("diffusion", found.diffusion or {}),
                            ("sample", found.sample)):
        merged.setdefault(section, {}).update(copy.deepcopy(fields))
    return merged


def init_state_dict(path: str | Path, config: Config) -> dict[str, torch.Tensor]:
    """The weights of a diffusers folder for a run whose config has the same architecture (dropout aside);
    DiffusersFormatError naming the first model/data setting that differs."""
    found = read_diffusers_folder(path)
    ours = {**{f"model.{k}": getattr(config.model, k) for k in found.model if k != "dropout"},
            **{f"data.{k}": getattr(config.data, k) for k in found.data}}
    theirs = {**{f"model.{k}": v for k, v in found.model.items() if k != "dropout"},
              **{f"data.{k}": v for k, v in found.data.items()}}
    for key, value in theirs.items():
        mine = ours[key]
        if key == "model.attention_resolutions":  # an order or repeat there changes nothing
            mine, value = sorted(set(mine)), sorted(set(value))
        elif isinstance(value, list):
            mine = list(mine)
        if mine != value:
            raise DiffusersFormatError(f"{path}: the folder's model has {key}={json.dumps(value)}, the config "
                                       f"{json.dumps(mine)}; set {key}={json.dumps(value).replace(' ', '')}")
    return found.state_dict
