"""Diffusers folders on disk: a DDPMPipeline folder written atomically, a pipeline or bare UNet folder read
back in our terms (`DiffusersModel`), and a run started from one."""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.atomic_files import atomic_folder
from engine.config import Config
from engine.diffusers_format.json_settings import DIFFUSERS_VERSION, DiffusersFormatError, as_config_dict
from engine.diffusers_format.keys import diffusers_to_unet, unet_to_diffusers
from engine.diffusers_format.scheduler_config import diffusion_fields_from_scheduler_config, run_scheduler_config
from engine.diffusers_format.unet_config import model_fields_from_unet_config


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.bin"
MODEL_INDEX = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


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

    raw = as_config_dict(config)
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
