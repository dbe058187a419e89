"""Typed configuration: YAML presets in configs/, `section.key=value` overrides, validation.

Every field has a type and a default; loading checks unknown keys (suggesting the closest valid
one), types and impossible values before anything heavy starts, and raises `ConfigError` with a
one-line message naming the key and the file. The resolved config is written into every run
directory, so a run can always be reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from engine.data.remote import is_url, url_problem
from engine.solvers import SAMPLERS
from kernels.ops import OPS as KERNEL_OPS


class ConfigError(ValueError):
    """A configuration mistake, reported to the user as one line (exit status 2)."""


# the loader validates a Literal's values (`_coerce`); this one takes them from the one list of sampler names
SamplerName = Literal[SAMPLERS]

# the longest post-hoc EMA profile (engine/post_hoc_ema.py): gamma = 0, the plain average of all steps
MAX_SIGMA_REL = 12 ** -0.5


@dataclass
class ModelConfig:
    base_channels: int = 128  # `ch` in the DDPM code
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2, 2])
    num_res_blocks: int = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    num_heads: int = 1  # the DDPM reference is single-head
    dropout: float = 0.1
    attention_backend: Literal["sdpa", "xformers", "math"] = "sdpa"
    # class-conditional: a learned class embedding added to the timestep embedding; 0 = unconditional. Index
    # num_classes is the "no class" token (classifier-free guidance's unconditional prediction)
    num_classes: int = 0
    label_dropout: float = 0.0  # training: the share of labels replaced by "no class" (Ho & Salimans use 0.1-0.2)
    # recompute activations in the backward instead of keeping them (non-reentrant torch.utils.checkpoint):
    # the ResNet blocks, or those and the attention blocks; less memory for about a third more compute
    activation_checkpointing: Literal["none", "resblocks", "all"] = "none"


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    schedule: Literal["linear", "cosine", "squaredcos_cap_v2", "scaled_linear"] = "linear"
    beta_start: float = 1e-4  # linear and scaled_linear only
    beta_end: float = 0.02
    # what the network predicts: eps (the paper), x0, v, or edm: EDM's preconditioning (Karras et al. 2022, Table 1;
    # engine/preconditioning.py): input c_in x, output F with D = c_skip x + c_out F, lambda-weighted loss
    target: Literal["eps", "x0", "v", "edm"] = "eps"
    sigma_data: float = 0.5  # edm: the data's standard deviation (0.5 for images in [-1, 1]; 1 makes edm equal -v)
    # uniform, antithetic (t and T-1-t in one batch), or lognormal: EDM's ln(sigma) ~ N(lognormal_mean,
    # lognormal_std^2) (P_mean, P_std), each mapped onto the timestep of the nearest noise level
    timestep_sampling: Literal["uniform", "antithetic", "lognormal"] = "uniform"
    lognormal_mean: float = -1.2
    lognormal_std: float = 1.2
    # Each timestep's loss weighted (engine/loss_weighting.py): none (the paper), min_snr (Hang et al. 2023:
    # min(SNR, min_snr_gamma) on the x0 error) or p2 (Choi et al. 2022: 1 / (p2_k + SNR)^p2_gamma on the eps error)
    loss_weighting: Literal["none", "min_snr", "p2"] = "none"
    min_snr_gamma: float = 5.0
    p2_k: float = 1.0
    p2_gamma: float = 1.0


@dataclass
class DataConfig:
    # a folder written by `python -m engine.data.prepare`, or its URL: https://host/set, s3://bucket/set (any
    # fsspec scheme, with its package), or pipe:COMMAND writing file {} to stdout (pipe:aws s3 cp s3://b/set/{} -)
    path: str = "data/shapes"
    image_size: int = 32
    channels: int = 3
    random_flip: bool = True
    shuffle_buffer: int = 1000
    num_workers: int = 2
    max_bad_fraction: float = 0.05  # more skipped (unreadable) samples than this stops the run: no trickle training
    cache: Literal["none", "device"] = "none"  # device: hold this rank's slice of the set on the GPU, no loader
    cache_dir: str = ""  # a folder keeping the shards read from a URL path, for later reads and runs ("" = off)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 5000  # linear warmup, then lr_schedule (the DDPM code: constant)
    # after the warmup: constant; cosine (to 0 at train.steps); inverse_sqrt (EDM2: lr / sqrt(max(step / lr_ref_steps, 1)))
    lr_schedule: Literal["constant", "cosine", "inverse_sqrt"] = "constant"
    lr_ref_steps: int = 70_000  # inverse_sqrt: EDM2's t_ref, the step where the decay starts
    # lr is the rate at reference_batch_size; at another train.batch_size it is scaled by the ratio (linear) or
    # its square root (sqrt, the usual rule for Adam), so one preset serves any number of GPUs
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch_size: int = 128
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 800_000  # total optimizer steps; the run stops there
    batch_size: int = 128  # global batch size
    seed: int = 0
    run_dir: str = ""  # default: runs/<config file name>
    device: str = "auto"  # auto = cuda if available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on CUDA, fp32 on CPU; fp16 adds a grad scaler
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2) the model
    grad_accum_steps: int = 1  # micro-batches per optimizer step; per-rank micro-batch = batch / (world x this)
    compile: bool = False  # torch.compile the UNet
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # one graph, one per residual/attention block (faster to compile), or the model and the whole update
    # (clip, Adam, EMA, the non-finite mask) as one more graph: no per-parameter kernels launched from Python
    compile_scope: Literal["model", "blocks", "step"] = "model"
    channels_last: bool = False  # NHWC activations and weights (measure: GroupNorm may not keep it)
    max_nonfinite_steps: int = 20  # consecutive steps with a NaN/inf loss or gradient (skipped) before the run stops
    sync_check: bool = False  # CUDA: raise on any host-device sync inside a step (fp16's grad scaler has one)
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # ema-pytorch's power-law warmup of the decay; the DDPM code has none
    # more EMAs beside ema_decay's (improved-diffusion's ema_rate list), each named ema_<decay>, e.g. ema_0.999:
    # checkpoints hold them all, `--ema ema_0.999` samples, evaluates or exports one (each is one more weight copy)
    extra_ema_decays: list[float] = field(default_factory=list)
    # post-hoc EMA (EDM2; engine/post_hoc_ema.py): power-function EMAs of these lengths (EDM2: [0.05, 0.1]; at
    # least two, in (0, 0.288)), snapshotted every post_hoc_ema_every steps (0 = at every checkpoint) to
    # RUN_DIR/post_hoc_ema; `--ema 0.08` then synthesizes any other length (each snapshot: one fp32 weight copy)
    post_hoc_ema_sigma_rels: list[float] = field(default_factory=list)
    post_hoc_ema_every: int = 0
    log_every: int = 100  # steps between metrics lines (the only host syncs of the step)
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    # also keep checkpoints/best.pt, the checkpoint of the best score so far of: fid (eval.every), val_loss or
    # val_loss_ema (eval.val_every); lower is better for each
    keep_best: Literal["none", "fid", "val_loss", "val_loss_ema"] = "none"
    sample_every: int = 10_000  # steps between sample grids; 0 = only at the end
    init_from: str = ""  # a diffusers folder (engine.export's, or saved by diffusers) to start from; a resume ignores it
    tensorboard: bool = False  # also log metrics and sample grids to RUN_DIR/tensorboard (pip install tensorboard)
    # and/or to Weights & Biases (pip install wandb), from rank 0: the project, the run's name ("" = the run
    # directory's), the mode ("" = wandb's default or $WANDB_MODE; online, offline or disabled)
    wandb: bool = False
    wandb_project: str = "ddpm-engine"
    wandb_name: str = ""
    wandb_mode: Literal["", "online", "offline", "disabled"] = ""


@dataclass
class SampleConfig:
    # ddpm, ddim, or a fast multistep solver (engine/solvers.py's SOLVERS)
    sampler: SamplerName = "ddpm"
    steps: Optional[int] = None  # ddim and solver steps (network evaluations); ddpm always runs all num_timesteps
    eta: float = 0.0  # ddim only: 0 = deterministic, 1 = ddpm-like noise
    variance: Literal["fixed_large", "fixed_small"] = "fixed_large"  # ddpm: beta_t or posterior
    clip_denoised: bool = True  # clip the predicted x0 to [-1, 1] (or threshold it: `thresholding`)
    # ddim: the direction term from the network's eps (false: the DDIM paper, diffusers' default) or from the eps
    # of the clipped x0 (true: improved-diffusion); true keeps an undertrained model's x0 overshoot as noise (issue 12)
    use_clipped_model_output: bool = False
    thresholding: Literal["static", "dynamic"] = "static"  # dynamic: Imagen's per-sample quantile rescaling of x0
    dynamic_thresholding_ratio: float = 0.995  # the quantile of |x0| that dynamic thresholding maps to 1
    timestep_spacing: Literal["linspace", "leading", "trailing"] = "linspace"  # ddim/solver timesteps, as diffusers names them
    karras_sigmas: bool = False  # solvers: noise levels spaced as Karras et al. 2022 (rho 7) instead of by timestep
    lower_order_final: bool = True  # solvers: first order at the last step, and lower orders near it under 15 steps
    unipc_order: int = 2  # unipc's order, 2 or 3 (UniPC recommends 2 with guidance, 3 unconditionally)
    # class-conditional models: classifier-free guidance scale s, the output u + s (c - u) of the unconditional (u)
    # and conditional (c) predictions (Ho & Salimans 2022); 1 = conditional only, 0 = unconditional
    guidance: float = 1.0
    classes: list[int] = field(default_factory=list)  # the classes drawn, image i of class classes[i % len]; [] = all
    num_images: int = 64  # images in the grid written during training
    batch_size: int = 64
    use_ema: bool = True
    # which EMA engine.sample, engine.evaluate --run and engine.export use by default: "" = train.ema_decay's; a name
    # (ema_0.999, sigma_rel_0.05) or a post-hoc length, e.g. "0.1" (synthesized); training's own grids and FID use
    # train.ema_decay's
    ema: str = ""
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on the CPU
    compile: Optional[bool] = None  # compile the denoising step (CUDA graphs on CUDA); None = on CUDA, unsharded models


@dataclass
class EvalConfig:
    """FID and KID of the model `sample.use_ema` picks, during training (see engine/evaluate/)."""

    every: int = 0  # steps between evaluations; 0 = never during training
    num_images: int = 10_000  # generated images per evaluation, shared by the ranks (papers report 50,000)
    batch_size: int = 256  # images per sampling batch and rank
    # eta, variance, clipping and the solvers' options come from the sample section
    sampler: SamplerName = "ddim"
    steps: Optional[int] = 100  # ddim or solver steps
    guidance: Optional[float] = None  # class-conditional models: the guidance scale; None = sample.guidance
    # precomputed statistics (.npz) or a data set (folder or URL, as data.path); "" = data.path, statistics
    # cached in the run
    reference: str = ""
    inception: str = ""  # the FID Inception file; "" = $DDPM_INCEPTION or ~/.cache/ddpm-engine/inception-2015-12-05.pt
    kid_subset_size: int = 1000
    seed: int = 1  # keys the evaluation images (other than the sample grids') and the validation noise
    # The validation loss (engine/validation.py): the raw and EMA weights' loss on held-out images at
    # val_timesteps fixed timesteps with fixed noise, every val_every steps (0 = never)
    val_every: int = 0
    # a prepared held-out set (folder or URL, as data.path): `python -m engine.data.prepare SRC out --split test`
    val_data: str = ""
    val_shards: int = 0  # or: hold out the last val_shards shards of data.path (training then never reads them)
    val_images: int = 1000  # at most this many of it
    val_timesteps: int = 8


@dataclass
class KernelsConfig:
    """Which implementation runs each fused op (see kernels/registry.py): auto = Triton on CUDA, PyTorch
    elsewhere; pytorch; triton; a name registered by a plugin; or package.module:function. One key per op,
    in the order of kernels.ops.OPS (tests/test_name_lists.py)."""

    q_sample: str = "auto"  # forward noising of float x0 (plots, user code)
    q_sample_uint8: str = "auto"  # forward noising straight from the loader's uint8 batch (training)
    noise_loss: str = "auto"  # the training loss, recomputing the noise instead of storing it
    posterior_step: str = "auto"  # one DDPM ancestral step (sampling)
    ddim_step: str = "auto"  # one DDIM step (sampling)
    dpm_solver_step: str = "auto"  # one DPM-Solver++ step (dpm++2m, dpm++3m, dpm++2m-sde sampling)
    unipc_step: str = "auto"  # one UniPC corrector-predictor step (unipc sampling)
    plugins: list[str] = field(default_factory=list)  # modules to import first: their @register_kernel names
    check: bool = True  # put every non-reference choice through the quick conformance check at start-up


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML preset (and the preset its `base:` names, if any), apply `section.key=value` overrides,
    check types and values."""
    path = Path(path)
    where = str(path)
    raw = read_preset(path)
    for override in overrides:
        apply_override(raw, override, where)
    config = _build(Config, raw, prefix="", where=where)
    if not config.train.run_dir:
        config.train.run_dir = str(Path("runs") / path.stem)
    validate(config, where)
    return config


def read_preset(path: Path, including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A preset's raw sections. `base: other.yaml` (relative to the preset) starts from that preset's sections,
    and this file's keys replace its keys one by one, section by section."""
    where = str(path)
    if path.resolve() in including:
        raise ConfigError(f"{where}: base presets form a cycle ({' -> '.join(map(str, including))} -> {where})")
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"{where}: cannot read config file ({error.strerror or error})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}:{line} malformed YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{where}: base must name a preset file, got {_describe(base)}")
    merged = read_preset(path.parent / base, (*including, path.resolve()))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def config_from_dict(raw: dict[str, Any], where: str = "<dict>") -> Config:
    """Rebuild a config (e.g. the one stored in a checkpoint or run directory) with the same checks."""
    config = _build(Config, raw, prefix="", where=where)
    validate(config, where)
    return config


def apply_override(raw: dict, override: str, where: str) -> None:
    """Set `section.key=value` (the value read as YAML) in a raw config dict."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    parts = key.split(".")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # e.g. an unquoted string with a colon: take it verbatim
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[:depth + 1])} is not a section ({where})")
        node = child
    node[parts[-1]] = value


def _build(cls, raw: Any, prefix: str, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(prefix + n for n in names)}"
            raise ConfigError(f"{where}: unknown key '{full}'{hint}")
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, raw[name] if raw[name] is not None else {}, f"{prefix}{name}.", where)
        else:
            values[name] = _coerce(raw[name], hint, f"{prefix}{name}", where)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(value, dict):
        raise ConfigError(f"{where}: {key} is a single value, not a section (got {_describe(value)})")
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key, where)
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
            hint_text = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, args))}; got {value!r}{hint_text}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {_describe(value)}")
        return [_coerce(item, args[0], f"{key}[{i}]", where) for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)  # 1e5 in YAML is a float; accept whole numbers
            raise ConfigError(f"{where}: {key} must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {key} must be a finite number, got {value}")
        return float(value)
    if hint is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `ema: 0.1` or `wandb_name: 2024` as numbers; the text is what was meant
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # a bug in this file, not user input


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) < 40 else text[:37] + '...'}"


# ----------------------------------------------------------------------------- validation


def validate(config: Config, where: str) -> None:
    """Impossible values, each reported against the key that holds it."""

    def require(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{where}: {key} {message}")

    for check in (_check_model, _check_diffusion, _check_data, _check_optim, _check_train, _check_ema, _check_sample,
                  _check_eval, _check_kernels):
        check(config, require)


def _check_model(config: Config, require) -> None:
    """Widths, heads, dropout."""
    model = config.model
    require(model.base_channels > 0, "model.base_channels", f"must be positive, got {model.base_channels}")
    require(len(model.channel_mult) > 0 and all(m > 0 for m in model.channel_mult),
            "model.channel_mult", f"must be a non-empty list of positive integers, got {model.channel_mult}")
    require(model.num_res_blocks > 0, "model.num_res_blocks", f"must be positive, got {model.num_res_blocks}")
    require(model.num_heads > 0, "model.num_heads", f"must be positive, got {model.num_heads}")
    require(model.num_classes >= 0, "model.num_classes", f"must be >= 0 (0 = unconditional), got {model.num_classes}")
    require(0.0 <= model.label_dropout < 1.0, "model.label_dropout", f"must be in [0, 1), got {model.label_dropout}")
    require(model.label_dropout == 0.0 or model.num_classes > 0, "model.label_dropout",
            "needs a class-conditional model (model.num_classes > 0)")
    require(0.0 <= model.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {model.dropout}")
    for level, mult in enumerate(model.channel_mult):
        channels = model.base_channels * mult
        require(channels % model.num_heads == 0, "model.num_heads",
                f"must divide the channels of every level ({channels} at level {level})")


def _check_diffusion(config: Config, require) -> None:
    """The schedule and its batch constraints."""
    diffusion, train = config.diffusion, config.train
    require(diffusion.num_timesteps >= 2, "diffusion.num_timesteps", f"must be at least 2, got {diffusion.num_timesteps}")
    if diffusion.schedule in ("linear", "scaled_linear"):
        require(0.0 < diffusion.beta_start < 1.0, "diffusion.beta_start", f"must be in (0, 1), got {diffusion.beta_start}")
        require(diffusion.beta_start < diffusion.beta_end < 1.0, "diffusion.beta_end",
                f"must be greater than diffusion.beta_start ({diffusion.beta_start}) and below 1, got {diffusion.beta_end}")
    require(diffusion.min_snr_gamma > 0, "diffusion.min_snr_gamma", f"must be > 0, got {diffusion.min_snr_gamma}")
    require(diffusion.p2_k > 0, "diffusion.p2_k", f"must be > 0, got {diffusion.p2_k}")
    require(diffusion.p2_gamma >= 0, "diffusion.p2_gamma", f"must be >= 0, got {diffusion.p2_gamma}")
    require(diffusion.sigma_data > 0, "diffusion.sigma_data", f"must be > 0, got {diffusion.sigma_data}")
    require(diffusion.lognormal_std > 0, "diffusion.lognormal_std", f"must be > 0, got {diffusion.lognormal_std}")
    if diffusion.timestep_sampling == "antithetic":
        require(train.batch_size % 2 == 0, "train.batch_size", f"must be even for antithetic timestep sampling, got {train.batch_size}")


def _check_data(config: Config, require) -> None:
    """Sizes against the UNet, the loader."""
    model, data = config.model, config.data
    require(data.image_size > 0, "data.image_size", f"must be positive, got {data.image_size}")
    require(data.channels in (1, 3, 4), "data.channels", f"must be 1, 3 or 4, got {data.channels}")
    factor = 2 ** (len(model.channel_mult) - 1)
    require(data.image_size % factor == 0, "data.image_size",
            f"({data.image_size}) must be divisible by the UNet's downsampling factor {factor} "
            f"(2 ** (len(model.channel_mult) - 1))")
    resolutions = [data.image_size // 2 ** level for level in range(len(model.channel_mult))]
    for resolution in model.attention_resolutions:
        require(resolution in resolutions, "model.attention_resolutions",
                f"contains {resolution}, which is not a resolution of this UNet (it has {resolutions})")
    require(data.shuffle_buffer >= 0, "data.shuffle_buffer", f"must be >= 0, got {data.shuffle_buffer}")
    require(0.0 <= data.max_bad_fraction <= 1.0, "data.max_bad_fraction", f"must be in [0, 1], got {data.max_bad_fraction}")
    require(data.num_workers >= 0, "data.num_workers", f"must be >= 0, got {data.num_workers}")
    require(bool(data.path), "data.path", "must name a prepared data folder")
    _check_url(data.path, "data.path", require)
    require(not is_url(data.cache_dir), "data.cache_dir", f"must be a local folder, not {data.cache_dir}")


def _check_url(location: str, key: str, require) -> None:
    """A URL's form and the package or program that reads it, without touching the network."""
    if is_url(location):
        problem = url_problem(location)
        require(problem is None, key, f"{location}: {problem}")


def _check_optim(config: Config, require) -> None:
    """Adam and its schedule."""
    optim = config.optim
    require(optim.lr > 0, "optim.lr", f"must be positive, got {optim.lr}")
    require(len(optim.betas) == 2 and all(0.0 <= b < 1.0 for b in optim.betas), "optim.betas",
            f"must be two numbers in [0, 1), got {optim.betas}")
    require(optim.eps > 0, "optim.eps", f"must be positive, got {optim.eps}")
    require(optim.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {optim.weight_decay}")
    require(optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {optim.warmup_steps}")
    require(optim.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables clipping), got {optim.grad_clip}")
    require(optim.lr_ref_steps > 0, "optim.lr_ref_steps", f"must be positive, got {optim.lr_ref_steps}")
    require(optim.reference_batch_size > 0, "optim.reference_batch_size",
            f"must be positive, got {optim.reference_batch_size}")
    if optim.lr_schedule == "cosine":
        require(optim.warmup_steps < config.train.steps, "optim.warmup_steps",
                f"({optim.warmup_steps}) must be below train.steps ({config.train.steps}) for the cosine schedule")


def _check_train(config: Config, require) -> None:
    """The step budget, seeds and intervals."""
    train = config.train
    require(train.steps > 0, "train.steps", f"must be positive, got {train.steps}")
    require(train.batch_size > 0, "train.batch_size", f"must be positive, got {train.batch_size}")
    require(train.max_nonfinite_steps > 0, "train.max_nonfinite_steps", f"must be positive, got {train.max_nonfinite_steps}")
    require(train.grad_accum_steps > 0, "train.grad_accum_steps", f"must be positive, got {train.grad_accum_steps}")
    require(0 <= train.seed < 2**31, "train.seed", f"must be in [0, 2**31) (it keys the noise), got {train.seed}")
    require(train.device == "auto" or train.device == "cpu" or train.device.startswith("cuda"),
            "train.device", f"must be auto, cpu or cuda[:N], got {train.device!r}")
    for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
        value = getattr(train, key)
        require(value > 0, f"train.{key}", f"must be positive, got {value}")
    if train.keep_best == "fid":
        require(config.eval.every > 0, "train.keep_best", "fid needs FID during training: set eval.every")
    elif train.keep_best != "none":
        require(config.eval.val_every > 0, "train.keep_best",
                f"{train.keep_best} needs the validation loss: set eval.val_every and eval.val_data (or eval.val_shards)")
    require(train.sample_every >= 0, "train.sample_every", f"must be >= 0 (0 = only at the end), got {train.sample_every}")
    require(not (train.compile and train.compile_scope == "step" and train.precision == "fp16"), "train.compile_scope",
            "step does not take train.precision=fp16 (its grad scaler decides on the host); use bf16 or fp32")


def _check_ema(config: Config, require) -> None:
    """The EMA decays and the post-hoc EMA profiles."""
    train = config.train
    require(0.0 <= train.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {train.ema_decay}")
    for decay in train.extra_ema_decays:
        require(0.0 <= decay < 1.0, "train.extra_ema_decays", f"must be decays in [0, 1), got {decay}")
    decays = [train.ema_decay, *train.extra_ema_decays]
    require(len(set(decays)) == len(decays), "train.extra_ema_decays",
            f"must differ from each other and from train.ema_decay ({train.ema_decay}), got {train.extra_ema_decays}")
    sigma_rels = train.post_hoc_ema_sigma_rels
    require(len(sigma_rels) != 1 and len(set(sigma_rels)) == len(sigma_rels), "train.post_hoc_ema_sigma_rels",
            f"must be empty or at least two different lengths (the synthesis combines them), e.g. [0.05,0.1]; "
            f"got {sigma_rels}")
    for sigma_rel in sigma_rels:
        require(0.0 < sigma_rel < MAX_SIGMA_REL, "train.post_hoc_ema_sigma_rels",
                f"must be in (0, 0.288) (0.288: the plain average of all steps), got {sigma_rel}")
    require(train.post_hoc_ema_every >= 0, "train.post_hoc_ema_every",
            f"must be >= 0 (0 = at every checkpoint), got {train.post_hoc_ema_every}")
    _check_sample_ema(config, require)


def _check_sample_ema(config: Config, require) -> None:
    """sample.ema names an EMA the run keeps, or a post-hoc length it can synthesize."""
    train, choice = config.train, config.sample.ema
    if not choice:
        return
    names = [f"ema_{decay:g}" for decay in (train.ema_decay, *train.extra_ema_decays)]
    names += [f"sigma_rel_{sigma_rel:g}" for sigma_rel in train.post_hoc_ema_sigma_rels]
    try:
        sigma_rel = float(choice)
    except ValueError:
        require(choice in names, "sample.ema", f"must be one of the run's EMAs ({', '.join(names)}) or a post-hoc "
                                               f"sigma_rel, got {choice!r}")
        return
    require(bool(train.post_hoc_ema_sigma_rels), "sample.ema",
            f"{choice} is a post-hoc EMA length: it needs train.post_hoc_ema_sigma_rels")
    require(0.0 < sigma_rel < MAX_SIGMA_REL, "sample.ema", f"as a post-hoc length must be in (0, 0.288), got {choice}")


def _check_sample(config: Config, require) -> None:
    """The sampler."""
    diffusion, sample = config.diffusion, config.sample
    if sample.steps is not None:
        require(0 < sample.steps <= diffusion.num_timesteps, "sample.steps",
                f"must be in [1, diffusion.num_timesteps={diffusion.num_timesteps}], got {sample.steps}")
        require(sample.sampler != "ddpm" or sample.steps == diffusion.num_timesteps, "sample.steps",
                f"applies to ddim and the solvers; ddpm always runs all {diffusion.num_timesteps} steps")
    require(sample.unipc_order in (2, 3), "sample.unipc_order", f"must be 2 or 3, got {sample.unipc_order}")
    require(sample.eta >= 0, "sample.eta", f"must be >= 0, got {sample.eta}")
    require(0.5 <= sample.dynamic_thresholding_ratio <= 1.0, "sample.dynamic_thresholding_ratio",
            f"must be in [0.5, 1] (a quantile of |x0|), got {sample.dynamic_thresholding_ratio}")
    require(sample.num_images > 0, "sample.num_images", f"must be positive, got {sample.num_images}")
    require(sample.batch_size > 0, "sample.batch_size", f"must be positive, got {sample.batch_size}")
    require(0 <= sample.seed < 2**31, "sample.seed", f"must be in [0, 2**31) (it keys the noise), got {sample.seed}")
    _check_guidance(config, sample.guidance, "sample.guidance", require)
    num_classes = config.model.num_classes
    require(not sample.classes or num_classes > 0, "sample.classes", "needs a class-conditional model (model.num_classes > 0)")
    require(all(0 <= label < num_classes for label in sample.classes) or not num_classes, "sample.classes",
            f"must be classes in [0, model.num_classes={num_classes}), got {sample.classes}")


def _check_guidance(config: Config, guidance: float, key: str, require) -> None:
    require(guidance >= 0, key, f"must be >= 0 (1 = conditional only, 0 = unconditional), got {guidance}")
    require(guidance == 1.0 or config.model.num_classes > 0, key,
            "needs a class-conditional model (model.num_classes > 0)")


def _check_eval(config: Config, require) -> None:
    """Evaluation during training."""
    diffusion = config.diffusion
    evaluation = config.eval
    require(evaluation.every >= 0, "eval.every", f"must be >= 0 (0 = never), got {evaluation.every}")
    require(evaluation.num_images >= 2, "eval.num_images", f"must be at least 2 (FID needs a covariance), got {evaluation.num_images}")
    require(evaluation.batch_size > 0, "eval.batch_size", f"must be positive, got {evaluation.batch_size}")
    require(evaluation.kid_subset_size > 1, "eval.kid_subset_size", f"must be at least 2, got {evaluation.kid_subset_size}")
    require(0 <= evaluation.seed < 2**31, "eval.seed", f"must be in [0, 2**31) (it keys the noise), got {evaluation.seed}")
    if evaluation.guidance is not None:
        _check_guidance(config, evaluation.guidance, "eval.guidance", require)
    require(evaluation.val_every >= 0, "eval.val_every", f"must be >= 0 (0 = never), got {evaluation.val_every}")
    require(evaluation.val_shards >= 0, "eval.val_shards", f"must be >= 0, got {evaluation.val_shards}")
    _check_url(evaluation.val_data, "eval.val_data", require)
    _check_url(evaluation.reference, "eval.reference", require)
    require(not (is_url(evaluation.reference) and evaluation.reference.endswith(".npz")), "eval.reference",
            f"{evaluation.reference}: a statistics .npz must be a local file (a URL may name a prepared data set)")
    require(not (evaluation.val_data and evaluation.val_shards), "eval.val_shards",
            f"holds out part of data.path: set it or eval.val_data ({evaluation.val_data}), not both")
    if evaluation.val_every:
        require(bool(evaluation.val_data) or evaluation.val_shards > 0, "eval.val_data",
                "must name a prepared held-out data set when eval.val_every is set (or set eval.val_shards to hold "
                "out the last shards of data.path)")
        require(evaluation.val_images >= 1, "eval.val_images", f"must be positive, got {evaluation.val_images}")
        require(1 <= evaluation.val_timesteps <= diffusion.num_timesteps, "eval.val_timesteps",
                f"must be in [1, diffusion.num_timesteps={diffusion.num_timesteps}], got {evaluation.val_timesteps}")
    if evaluation.every and evaluation.sampler != "ddpm" and evaluation.steps is not None:
        require(0 < evaluation.steps <= diffusion.num_timesteps, "eval.steps",
                f"must be in [1, diffusion.num_timesteps={diffusion.num_timesteps}], got {evaluation.steps}")


def _check_kernels(config: Config, require) -> None:
    """Each op names an implementation."""
    for op in KERNEL_OPS:
        choice = getattr(config.kernels, op)
        require(bool(choice) and not any(c.isspace() for c in choice), f"kernels.{op}",
                f"must name an implementation (auto, pytorch, triton, a registered name or package.module:function), "
                f"got {choice!r}")
