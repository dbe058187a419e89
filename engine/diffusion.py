"""The DDPM forward process, training loss and samplers (Ho et al. 2020; DDIM: Song et al. 2021).

Each function maps onto one equation of the papers. The per-element hot paths (q_sample, the loss,
the posterior and DDIM updates) are ops in `kernels/`: the functions here that take explicit noise
evaluate the ops' reference formulas (for tests and plots), while `training_loss` and `sample` run
whichever implementation the `Kernels` set resolved, with the noise drawn from counters
(`kernels.noise`). Timesteps index the schedule from 0 (the paper's t = 1) to T-1 (the paper's t = T).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine import preconditioning, solvers
from engine.preconditioning import TARGETS
from engine.progress import progress_bar
from engine.schedule import NoiseSchedule
from kernels import ddim_step as ddim_step_op
from kernels import posterior_step as posterior_step_op
from kernels import q_sample as q_sample_op
from kernels.noise import noise_keys, randn
from kernels.reference import extract
from kernels.registry import Kernels

TIMESTEP_SAMPLING = ("uniform", "antithetic", "lognormal")
Denoiser = Callable[..., torch.Tensor]  # (x_t, t) or, class-conditional, (x_t, t, class_labels) -> model output
__all__ = ["extract", "TARGETS"]  # re-exported: the per-sample coefficient gather every formula uses; the targets


# ----------------------------------------------------------------------------- forward process


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps  (eq. 4)."""
    return q_sample_op.formula(x0, t, noise, schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod)


def sample_timesteps(batch_size: int, num_timesteps: int, mode: str, *, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform t, or antithetic pairs (t, T-1-t) that lower the variance of the batch loss."""
    if mode == "uniform":
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)
    if mode == "antithetic":
        if batch_size % 2:
            raise ValueError(f"antithetic timestep sampling needs an even batch size, got {batch_size}")
        half = torch.randint(0, num_timesteps, (batch_size // 2,), generator=generator, device=device)
        return torch.cat([half, num_timesteps - 1 - half])
    raise ValueError(f"unknown timestep sampling {mode!r}; choose one of {', '.join(TIMESTEP_SAMPLING)}")


def log_sigma_edges(schedule: NoiseSchedule) -> torch.Tensor:
    """(T-1,) the midpoints between consecutive timesteps' ln sigma (sigma = sqrt((1 - abar) / abar), ascending in
    t), in float64: a noise level maps onto the timestep whose ln sigma is nearest."""
    log_sigma = preconditioning.vp_sigma(schedule).log()
    return (log_sigma[1:] + log_sigma[:-1]) / 2


def lognormal_timesteps(batch_size: int, edges: torch.Tensor, mean: float, std: float, *,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's noise levels (Karras et al. 2022, sec. 5): ln sigma ~ N(mean, std^2) (P_mean, P_std), each mapped
    onto the timestep of the nearest ln sigma (`log_sigma_edges`); beyond the schedule's ends, its first or last
    timestep. On the device: no host sync."""
    log_sigma = mean + std * torch.randn(batch_size, generator=generator, device=edges.device, dtype=torch.float64)
    return torch.bucketize(log_sigma, edges)


def untrained_start_warning(diffusion_config, schedule: NoiseSchedule) -> str | None:
    """Why lognormal noise levels with an eps target give noise images: the top tenth of the timesteps, where every
    sampler starts, is almost never drawn, and an untrained eps there is amplified by 1 / sqrt(abar_t) in x0
    (measured in benchmarks/RECIPE.md's ablation). None when the combination is fine."""
    if diffusion_config.timestep_sampling != "lognormal" or diffusion_config.target != "eps":
        return None
    first = int(0.9 * schedule.num_timesteps)
    edge = float(log_sigma_edges(schedule)[first - 1])
    drawn = 0.5 * math.erfc((edge - diffusion_config.lognormal_mean) / (diffusion_config.lognormal_std * math.sqrt(2)))
    if drawn >= 1e-3:
        return None
    return (f"diffusion.timestep_sampling=lognormal with diffusion.target=eps draws the timesteps from {first} up, "
            f"where sampling starts, with probability {drawn:.1e}; an untrained eps there is amplified "
            f"{1 / float(schedule.alphas_cumprod[-1]) ** 0.5:.0f}x in x0 and the samples come out as noise: use "
            f"diffusion.target=v (or edm), or a larger diffusion.lognormal_mean or lognormal_std")


def timestep_sampler(diffusion_config, schedule: NoiseSchedule) -> Callable[..., torch.Tensor]:
    """(batch_size, generator) -> timesteps on the schedule's device, as `diffusion.timestep_sampling` says."""
    mode, num_timesteps = diffusion_config.timestep_sampling, schedule.num_timesteps
    device = schedule.alphas_cumprod.device
    if mode == "lognormal":
        edges = log_sigma_edges(schedule).to(device)
        mean, std = diffusion_config.lognormal_mean, diffusion_config.lognormal_std
        return lambda batch_size, generator: lognormal_timesteps(batch_size, edges, mean, std, generator=generator)
    sample_timesteps(2, num_timesteps, mode)  # an unknown mode fails here, not at the first step
    return lambda batch_size, generator: sample_timesteps(batch_size, num_timesteps, mode, generator=generator,
                                                          device=device)


def training_target(schedule: NoiseSchedule, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, target: str,
                    sigma_data: float = 0.5) -> torch.Tensor:
    """What the network is trained to predict: eps (the paper), x0, v = sqrt(abar) eps - sqrt(1-abar) x0, or EDM's
    F = (x0 - c_skip x) / c_out (engine/preconditioning.py)."""
    noise_coef, x0_coef = loss_coefficients(schedule, target, sigma_data)
    return extract(noise_coef.to(x0.dtype), t, x0) * noise + extract(x0_coef.to(x0.dtype), t, x0) * x0


def loss_coefficients(schedule: NoiseSchedule, target: str, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise_coef, x0_coef) with training_target = noise_coef[t] eps + x0_coef[t] x0, as the fused loss takes it,
    in the schedule's dtype and device."""
    return tuple(c.to(schedule.alphas_cumprod) for c in preconditioning.target_coefficients(schedule, target, sigma_data))


def noising_tables(schedule: NoiseSchedule, target: str, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """The q_sample coefficients of the network's input: (sqrt(abar), sqrt(1 - abar)) times its input scale (1,
    or EDM's c_in / sqrt(abar)), so that the fused noising op hands the network c_in x at no extra pass."""
    scale = preconditioning.input_scales(schedule, target, sigma_data).to(schedule.alphas_cumprod)
    return schedule.sqrt_alphas_cumprod * scale, schedule.sqrt_one_minus_alphas_cumprod * scale


def training_loss(model: Denoiser, kernels: Kernels, schedule: NoiseSchedule, images: torch.Tensor, flip: torch.Tensor,
                  t: torch.Tensor, keys: torch.Tensor, *, target: str = "eps",
                  coefficients: tuple[torch.Tensor, torch.Tensor] | None = None,
                  class_labels: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                  noising: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The simplified objective L_simple (eq. 14) from the loader's uint8 batch, in fp32, per sample (B,).

    x_t is built straight from the uint8 images (scaled, flipped where `flip` is set) with noise drawn
    from the counters (keys, t), and the loss recomputes that noise, so it never exists as a tensor.
    A class-conditional model also takes `class_labels` (the "no class" index where a label was dropped).
    `weights` (T,), e.g. `loss_weighting.loss_weights`, scales each sample's loss by its timestep's entry.
    `coefficients` and `noising` (`loss_coefficients`, `noising_tables`) default to those of `target` with
    sigma_data 0.5; pass both for another sigma_data.
    """
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod = noising or noising_tables(schedule, target)
    x_t = kernels.q_sample_uint8(images, flip, t, keys, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                                 torch.float32)
    prediction = predict(model, x_t, t, class_labels)
    noise_coef, x0_coef = coefficients or loss_coefficients(schedule, target)
    x0 = None if target == "eps" else q_sample_op.images_to_unit_range(images, flip, torch.float32)
    losses = kernels.noise_loss(prediction, t, keys, noise_coef, x0_coef, x0)
    return losses if weights is None else losses * weights[t]  # per sample: B products, on the device


# ----------------------------------------------------------------------------- reverse process


def predict(model: Denoiser, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
    """The network's output; an unconditional model (or one asked for "no class" throughout) takes no labels."""
    return model(x_t, t) if class_labels is None else model(x_t, t, class_labels)


def classifier_free_guidance(model: Denoiser, scale: float, no_class: int) -> Denoiser:
    """(x_t, t, labels) -> u + s (c - u), the conditional (c) and unconditional (u, label `no_class`) outputs
    combined (Ho & Salimans 2022, eq. 6 with s = 1 + w; diffusers' guidance_scale).

    Both predictions come from one forward of the doubled batch: one pass over the weights and twice the
    rows per kernel, rather than two passes. The combination is linear in the output, so it is the same
    for every target (eps, x0, v) and comes before the samplers' update kernels. Scale 1 is the
    conditional prediction and 0 the unconditional one, each a single forward of the batch.
    """
    def guided(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        if scale == 1.0:
            return model(x, t, class_labels)
        nothing = torch.full_like(class_labels, no_class)
        if scale == 0.0:
            return model(x, t, nothing)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, nothing])).to(x.dtype)
        conditional, unconditional = both.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided


def predict_x0_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. 4 solved for x_0."""
    return extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t) * eps


def predict_eps_from_x0(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t)


def eps_from_model_output(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor, target: str,
                          sigma_data: float = 0.5) -> torch.Tensor:
    """Whatever the network predicts, the samplers work with its implied eps."""
    if target == "eps":
        return output
    if target == "x0":
        return predict_eps_from_x0(schedule, x_t, t, output)
    if target == "v":  # eps = sqrt(abar) v + sqrt(1 - abar) x_t
        return extract(schedule.sqrt_alphas_cumprod, t, x_t) * output + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
    if target == "edm":  # eps = (x_t - sqrt(abar) D) / sqrt(1 - abar), D = c_skip x_t / sqrt(abar) + c_out F
        sigma = preconditioning.vp_sigma(schedule)
        c_skip, c_out, _ = preconditioning.edm_scalings(sigma, sigma_data)
        x_t_coef = ((1.0 - c_skip) / schedule.sqrt_one_minus_alphas_cumprod.double()).to(x_t.dtype)
        output_coef = (-c_out / sigma).to(x_t.dtype)
        return extract(x_t_coef.to(x_t.device), t, x_t) * x_t + extract(output_coef.to(x_t.device), t, x_t) * output
    raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def scaled_input(model: Denoiser, scales: torch.Tensor) -> Denoiser:
    """The network fed scales[t] * x_t (EDM's c_in, `noising_tables`' factor) in place of x_t."""
    def scaled(x: torch.Tensor, t: torch.Tensor, *class_labels: torch.Tensor) -> torch.Tensor:
        return model(x * extract(scales, t, x).to(x.dtype), t, *class_labels)

    return scaled


def q_posterior_mean(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """mu~_t(x_t, x_0) = coef1 x_0 + coef2 x_t  (eq. 7)."""
    return extract(schedule.posterior_mean_coef1, t, x_t) * x0 + extract(schedule.posterior_mean_coef2, t, x_t) * x_t


def posterior_mean_from_eps(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """mu = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t)  (eq. 11)."""
    return extract(schedule.sqrt_recip_alphas, t, x_t) * (x_t - extract(schedule.eps_coef, t, x_t) * eps)


def posterior_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor, *,
                   variance: str = "fixed_large", clip_denoised: bool = False) -> torch.Tensor:
    """One ancestral step x_{t-1} = mu + sigma_t z (Algorithm 2), with no noise at t = 0.

    With `clip_denoised` the predicted x_0 is clipped to [-1, 1] and the mean is taken from eq. 7
    (as the DDPM code samples); otherwise the direct eps form of eq. 11 is used.
    """
    return posterior_step_op.formula(x_t, eps, t, noise, *posterior_step_op.schedule_tables(schedule, variance), clip_denoised)


def ddim_step(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, eps: torch.Tensor,
              noise: torch.Tensor | None, *, eta: float = 0.0, clip_denoised: bool = False,
              use_clipped_model_output: bool = False) -> torch.Tensor:
    """One DDIM update from t to t_prev (Song et al. 2021, eq. 12); t_prev = -1 means the data end (abar = 1)."""
    return ddim_step_op.formula(x_t, eps, t, t_prev, noise, schedule.alphas_cumprod, eta, clip_denoised,
                                use_clipped_model_output)


def dynamic_threshold(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, ratio: float,
                      use_clipped_model_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic thresholding (Imagen, Saharia et al. 2022, sec. 2.3) as inputs for the update kernels.

    Per sample, s = max(1, the `ratio` quantile of |x_0|) and x_0 <- clip(x_0, -s, s) / s. Returns
    (x_t', eps') whose implied x_0 = (x_t' - sqrt(1 - abar) eps') / sqrt(abar) is that x_0, so the
    kernels' own clipping is a no-op on it: eps' is the network's eps (x_t' re-noised from x_0 with it)
    or, with `use_clipped_model_output`, the eps re-derived from x_0 (then x_t' = x_t; the DDPM
    posterior mean always takes this form, as it needs the true x_t).
    """
    x0 = solvers.threshold_x0(predict_x0_from_eps(schedule, x_t, t, eps), ratio)
    if use_clipped_model_output:
        return x_t, predict_eps_from_x0(schedule, x_t, t, x0)
    renoised = extract(schedule.sqrt_alphas_cumprod, t, x0) * x0 + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0) * eps
    return renoised, eps


SPACINGS = ("linspace", "leading", "trailing")  # diffusers' `timestep_spacing` names
SAMPLERS = solvers.SAMPLERS  # written once, in engine/solvers.py, where engine/config.py reads it too


def ddim_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> list[int]:
    """`steps` timesteps in ascending order, spaced as diffusers' `timestep_spacing` of that name does.

    linspace: evenly over [0, T-1], both ends included; leading: 0, k, 2k, ... with k = T // steps
    (diffusers' default; it never starts at T-1); trailing: ..., T-1-k, T-1 (starts at T-1, as
    Lin et al. 2024 recommend).
    """
    if not 0 < steps <= num_timesteps:
        raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "linspace":
        chosen = np.linspace(0, num_timesteps - 1, steps).round() if steps > 1 else [num_timesteps - 1]
    elif spacing == "leading":
        chosen = np.arange(steps) * (num_timesteps // steps)
    elif spacing == "trailing":
        chosen = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    return sorted({int(x) for x in chosen})


Step = Callable[..., torch.Tensor]  # (x_t, t, t_prev, keys[, class_labels]) -> x_prev


def denoising_step(model: Denoiser, schedule: NoiseSchedule, kernels: Kernels, *, sampler: str = "ddpm", eta: float = 0.0,
                   variance: str = "fixed_large", clip_denoised: bool = True, use_clipped_model_output: bool = False,
                   thresholding: str = "static", dynamic_thresholding_ratio: float = 0.995, target: str = "eps",
                   sigma_data: float = 0.5, unipc_order: int = 2, dtype: torch.dtype = torch.float32,
                   on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> Step | solvers.SolverStep:
    """One reverse step, the network and the update kernel, as a function of tensors only.

    Everything that varies between steps and batches (x_t, t, t_prev, the noise keys) is an argument,
    so the function can be compiled, or captured in a CUDA graph, once and replayed at every step of
    every batch. DDPM ignores t_prev (it always steps to t - 1); no noise is added at t = 0.
    With `clip_denoised`, the predicted x_0 is clipped to [-1, 1] (`thresholding="static"`) or
    dynamically thresholded; DDIM's direction term then takes the network's eps, or with
    `use_clipped_model_output` the eps of the clipped x_0 (see kernels/ddim_step.py).
    `on_step(t, x_t, eps)`, if given, sees every step's input and predicted noise (plots use it).
    A class-conditional model's labels are the step's last argument (a `classifier_free_guidance` model
    guides them).
    The fast solvers' step (`solvers.solver_step`: its own signature, with the solver's history; on_step
    sees x_0 instead of eps) ignores eta, variance and use_clipped_model_output.
    With `target="edm"` the network is fed EDM's c_in x (`scaled_input`) and its output read with `sigma_data`.
    """
    if thresholding not in ("static", "dynamic"):
        raise ValueError(f"unknown thresholding {thresholding!r}; choose static or dynamic")
    if target == "edm":
        model = scaled_input(model, preconditioning.input_scales(schedule, target, sigma_data).to(schedule.alphas_cumprod))
    if sampler in solvers.SOLVERS:
        return solvers.solver_step(model, kernels, sampler, clip_denoised=clip_denoised, thresholding=thresholding,
                                   dynamic_thresholding_ratio=dynamic_thresholding_ratio, unipc_order=unipc_order,
                                   dtype=dtype, on_step=on_step)
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    tables = posterior_step_op.schedule_tables(schedule, variance) if sampler == "ddpm" else None
    dynamic = clip_denoised and thresholding == "dynamic"

    def step(x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, keys: torch.Tensor,
             class_labels: torch.Tensor | None = None) -> torch.Tensor:
        eps = eps_from_model_output(schedule, x, t, predict(model, x, t, class_labels).to(dtype), target, sigma_data)
        if on_step is not None:
            on_step(int(t[0]), x, eps)
        if dynamic:
            x, eps = dynamic_threshold(schedule, x, t, eps, dynamic_thresholding_ratio,
                                       use_clipped_model_output or tables is not None)
        if tables is not None:
            return kernels.posterior_step(x, eps, t, keys, *tables, clip_denoised)
        return kernels.ddim_step(x, eps, t, t_prev, keys, schedule.alphas_cumprod, float(eta), clip_denoised,
                                 use_clipped_model_output)

    return step


def sampling_timesteps(num_timesteps: int, sampler: str, steps: int | None = None,
                       spacing: str = "linspace") -> list[tuple[int, int]]:
    """The (t, t_prev) pairs a sampler visits, from its first timestep down to the data (t_prev = -1 at the end)."""
    if sampler == "ddpm":
        descending = list(range(num_timesteps - 1, -1, -1))
    elif sampler == "ddim":
        descending = ddim_timesteps(num_timesteps, steps or num_timesteps, spacing)[::-1]
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim (the solvers have a SolverPlan)")
    return list(zip(descending, descending[1:] + [-1]))


@dataclass(frozen=True)
class SamplingPlan:
    """Which timesteps (or a solver's noise levels) a sampler visits and how it reads the network's output:
    what `sample` needs besides the step's own options (clipping, eta, variance)."""

    sampler: str = "ddpm"
    steps: int | None = None  # DDIM or solver steps; None: every timestep (DDIM), solvers.DEFAULT_STEPS (solvers)
    timestep_spacing: str = "linspace"
    karras_sigmas: bool = False
    lower_order_final: bool = True
    target: str = "eps"
    sigma_data: float = 0.5
    unipc_order: int = 2

    def step_keywords(self) -> dict:
        """The fields `denoising_step` takes as well."""
        return dict(sampler=self.sampler, target=self.target, sigma_data=self.sigma_data, unipc_order=self.unipc_order)


PLAN_FIELDS = frozenset(field.name for field in dataclasses.fields(SamplingPlan))


@torch.no_grad()
def sample(model: Denoiser | None, schedule: NoiseSchedule, kernels: Kernels, shape: tuple[int, ...], *, seed: int = 0,
           first_index: int = 0, plan: SamplingPlan | None = None, device: torch.device | str = "cpu",
           dtype: torch.dtype = torch.float32, progress: bool = False, step: Step | None = None,
           class_labels: torch.Tensor | None = None, **options) -> torch.Tensor:
    """Draw images from pure noise with DDPM ancestral sampling, DDIM or a fast solver (`solvers.SOLVERS`),
    through the resolved kernels.

    `plan` says which steps are taken; without one it is made from the `SamplingPlan` fields among `options`
    (sampler, steps, timestep_spacing, karras_sigmas, lower_order_final, target, sigma_data, unipc_order).
    `step` is a prebuilt (e.g. compiled) `denoising_step` for these settings; by default one is built from the
    plan and the other `options` (eta, variance, clipping, on_step: `denoising_step`'s keywords).

    Image i of the batch is image number `first_index + i` of the seed: its noise (x_T and every
    step's z) is keyed by (seed, that number), so a set of images does not depend on how it is
    split into batches or over ranks. A class-conditional model draws image i of class `class_labels[i]`.
    """
    if plan is None:
        plan = SamplingPlan(**{name: value for name, value in options.items() if name in PLAN_FIELDS})
        options = {name: value for name, value in options.items() if name not in PLAN_FIELDS}
    batch, numel = shape[0], math.prod(shape[1:])
    keys = noise_keys(seed, torch.arange(first_index, first_index + batch, device=device))
    x_end = torch.full((batch,), schedule.num_timesteps, device=device)  # x_T uses the counter t = T
    x = randn(keys, x_end, numel).view(shape).to(dtype)
    if step is None:
        step = denoising_step(model, schedule, kernels, dtype=dtype, **plan.step_keywords(), **options)
    if plan.sampler in solvers.SOLVERS:
        levels = solvers.solver_plan(schedule, plan.sampler, plan.steps, spacing=plan.timestep_spacing,
                                     karras=plan.karras_sigmas, target=plan.target, sigma_data=plan.sigma_data,
                                     unipc_order=plan.unipc_order, lower_order_final=plan.lower_order_final)
        return solvers.solve(step, levels, x, keys, dtype=dtype, progress=progress, class_labels=class_labels)
    pairs = sampling_timesteps(schedule.num_timesteps, plan.sampler, plan.steps, plan.timestep_spacing)
    times = torch.tensor(pairs, device=device, dtype=torch.long)  # one copy to the device, not two per step
    for index in progress_bar(range(len(pairs)), desc=plan.sampler, disable=not progress, leave=False):
        t, t_prev = times[index, 0].expand(batch), times[index, 1].expand(batch)
        x = step(x, t, t_prev, keys) if class_labels is None else step(x, t, t_prev, keys, class_labels)
    return x
