"""The scheduler config both ways: a run's schedule, target and sampler as a DDPMScheduler, or for a fast
solver (engine/solvers.py) the DPMSolverMultistepScheduler / UniPCMultistepScheduler that steps as ours does,
and such a scheduler_config.json read back as DiffusionConfig and SampleConfig fields."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from engine.config import Config
from engine.diffusers_format.json_settings import (DIFFUSERS_VERSION, DiffusersFormatError, as_config_dict,
                                                   is_int, json_equal)
from engine.solvers import SOLVERS, solver_order


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
    raw = as_config_dict(config)
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
    raw = as_config_dict(config)
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
    raw = as_config_dict(config)
    if raw["sample"].get("sampler") in SOLVER_SCHEDULERS:
        return solver_scheduler_config(raw)
    return diffusers_scheduler_config(raw)


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
    if not is_int(steps) or steps < 2:
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
        if not json_equal(setting(key), value):
            raise refuse(key, why)

    order = setting("solver_order")
    if class_name == DPM_SOLVER:
        algorithm = setting("algorithm_type")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
            raise refuse("algorithm_type", "ours is DPM-Solver++ on the data prediction: dpmsolver++ or "
                                           "sde-dpmsolver++")
        orders = {"dpmsolver++": (2, 3), "sde-dpmsolver++": (2,)}[algorithm]
        if not is_int(order) or order not in orders:
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
        if not is_int(order) or order not in (2, 3):
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
