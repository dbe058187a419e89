"""Fast multistep samplers: DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095) and UniPC (Zhao et al. 2023,
arXiv:2302.04867), at 10-25 network evaluations instead of DDPM's 1,000.

Both solve the diffusion ODE (or, for `dpm++2m-sde`, the SDE) in lambda = log(alpha / sigma), the
log signal-to-noise ratio, with the network's data prediction x_0 (whatever its target: eps, x0 or v).
Every update is a linear combination of the sample and the last few x_0 predictions whose weights
depend only on the noise levels, so a `SolverPlan` computes each step's weights once, in float64, from
the papers' equations (`dpm_solver_weights`, `unipc_weights`), and the step is one fused op of the
kernel registry (`kernels/dpm_solver_step.py`, `kernels/unipc_step.py`) that takes them as a tensor.
The step is a function of tensors only (sample, timestep, keys, weights and the solver's history), so
it compiles and CUDA-graphs like the DDPM and DDIM steps.

Noise levels follow diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler: the timestep
spacings `linspace`, `leading`, `trailing`, optionally Karras et al.'s sigmas, and a last step to
sigma = 0 (`final_sigmas_type="zero"`), which is first order (it returns the x_0 prediction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine import preconditioning
from engine.progress import progress_bar
from engine.schedule import NoiseSchedule
from kernels.registry import Kernels

SOLVERS = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc")
# every sampler name, the one list: DDPM's ancestral step and DDIM (engine/diffusion.py), then these solvers;
# the config's sampler keys and the CLIs' --sampler choices are read from it
SAMPLERS = ("ddpm", "ddim", *SOLVERS)
DEFAULT_STEPS = 20
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5
SolverStep = Callable[..., tuple]  # (x, t, keys, weights, history[, class_labels]) -> (x_next, history)


def solver_order(solver: str, unipc_order: int = 2) -> int:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    return {"dpm++2m": 2, "dpm++3m": 3, "dpm++2m-sde": 2}.get(solver, unipc_order)


def history_length(solver: str, unipc_order: int = 2) -> int:
    """How many earlier x_0 predictions the solver's update reads (UniPC's corrector needs one more)."""
    order = solver_order(solver, unipc_order)
    return order if solver == "unipc" else order - 1


# ----------------------------------------------------------------------------- noise levels


def solver_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> np.ndarray:
    """The network's timesteps, descending, as diffusers' multistep schedulers space them (Lin et al. 2024,
    table 2). Unlike DDIM's, linspace and leading never include t = 0: the last step goes to sigma = 0."""
    if not 0 < steps <= num_timesteps:
        raise ValueError(f"solver steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "linspace":
        return np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(steps + 1) * (num_timesteps // (steps + 1))).round()[::-1][:-1].astype(np.int64)
    if spacing == "trailing":
        return np.arange(num_timesteps, 0, -num_timesteps / steps).round().astype(np.int64) - 1
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose linspace, leading or trailing")


def karras_sigmas(schedule: NoiseSchedule, steps: int) -> np.ndarray:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, descending, in the
    variance-exploding sigma = sqrt((1 - abar) / abar) of the training schedule's ends (Karras et al. 2022, eq. 5)."""
    sigmas = ((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt().numpy()
    ramp = np.linspace(0, 1, steps)
    low, high = sigmas[0] ** (1 / KARRAS_RHO), sigmas[-1] ** (1 / KARRAS_RHO)
    return (high + ramp * (low - high)) ** KARRAS_RHO


def timesteps_of_sigmas(schedule: NoiseSchedule, sigmas: np.ndarray) -> np.ndarray:
    """The nearest integer timesteps of noise levels, interpolated in log sigma (the network takes integers;
    diffusers keeps fractional ones for the cosine schedule)."""
    log_sigmas = np.log(((1 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt().numpy())
    return np.interp(np.log(np.maximum(sigmas, 1e-10)), log_sigmas, np.arange(len(log_sigmas))).round().astype(np.int64)


def noise_levels(schedule: NoiseSchedule, steps: int, spacing: str = "linspace",
                 karras: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas): the network's timestep at each step, and the steps+1 noise levels the solver moves
    between (sigma = sqrt((1 - abar) / abar), the last one 0)."""
    schedule = schedule.to("cpu", torch.float64)
    if karras:
        sigmas = karras_sigmas(schedule, steps)
        timesteps = timesteps_of_sigmas(schedule, sigmas)
    else:
        timesteps = solver_timesteps(schedule.num_timesteps, steps, spacing)
        abar = schedule.alphas_cumprod.numpy()[timesteps]
        sigmas = np.sqrt((1 - abar) / abar)
    return timesteps, np.append(sigmas, 0.0)


def alpha_sigma(sigma: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) = (sqrt(abar), sqrt(1 - abar)) of the variance-exploding sigma."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def log_snr(sigma: float) -> float:
    """lambda = log(alpha_t / sigma_t) = -log(sigma); +inf at the data."""
    return -math.log(sigma) if sigma > 0 else math.inf


def x0_weights(sigma: float, target: str, sigma_data: float = 0.5) -> tuple[float, float]:
    """(a, b) with x_0 = a x_t + b output for the network's target at noise level sigma."""
    return preconditioning.x0_coefficients(sigma, target, sigma_data)


# ----------------------------------------------------------------------------- the papers' equations


def dpm_solver_weights(sigmas: np.ndarray, i: int, order: int, sde: bool) -> np.ndarray:
    """DPM-Solver++ from sigmas[i] to sigmas[i+1] as weights of (x, m0, m1, m2, z), m0 this step's x_0.

    Lu et al. 2022, Algorithm 2 (2M, the midpoint form diffusers uses), the third-order multistep update,
    and SDE-DPM-Solver++(2M) (eq. 18). Each line is the paper's, evaluated on unit vectors.
    """
    X, M0, M1, M2, Z = np.eye(5)
    alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
    _, sigma_s0 = alpha_sigma(sigmas[i])
    h = log_snr(sigmas[i + 1]) - log_snr(sigmas[i])
    D0 = M0
    if order >= 2:
        r0 = (log_snr(sigmas[i]) - log_snr(sigmas[i - 1])) / h
        D1 = (M0 - M1) / r0
    if sde:
        x_t = (sigma_t / sigma_s0 * math.exp(-h)) * X - alpha_t * math.expm1(-2.0 * h) * D0 \
            + sigma_t * math.sqrt(-math.expm1(-2.0 * h)) * Z
        return x_t - 0.5 * alpha_t * math.expm1(-2.0 * h) * D1 if order >= 2 else x_t
    x_t = (sigma_t / sigma_s0) * X - alpha_t * math.expm1(-h) * D0
    if order == 2:
        return x_t - 0.5 * alpha_t * math.expm1(-h) * D1
    if order == 3:
        r1 = (log_snr(sigmas[i - 1]) - log_snr(sigmas[i - 2])) / h
        D1_0, D1_1 = (M0 - M1) / r0, (M1 - M2) / r1
        D1 = D1_0 + r0 / (r0 + r1) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        return x_t + alpha_t * (math.expm1(-h) / h + 1.0) * D1 - alpha_t * ((math.expm1(-h) + h) / h**2 - 0.5) * D2
    return x_t


def unipc_rhos(h: float, rks: list[float], order: int, corrector: bool) -> np.ndarray:
    """UniPC's rho: R_p(h) rho = g(h) with R's rows powers of r_k and g from phi_k(h) (Zhao et al. 2023,
    Algorithm 2; B(h) = e^{-h} - 1, "bh2"). Order 2 of the predictor and order 1 of the corrector take 1/2."""
    hh = -h  # data prediction
    h_phi_k, factorial, b_h = math.expm1(hh) / hh - 1.0, 1, math.expm1(hh)
    rks = np.array([*rks, 1.0])
    R, b = [], []
    for k in range(1, order + 1):
        R.append(rks ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R, b = np.array(R), np.array(b)
    if corrector:
        return np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
    return np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])


def unipc_update(sigmas: np.ndarray, s: int, t: int, order: int, corrector: bool, start, m0, earlier, model_t=None):
    """x_t from x_s (`start`) of UniP (predictor) or UniC (corrector, with model_t, the x_0 at t), order `order`.

    x_t = sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) m0 - alpha_t B(h) sum_k rho_k D_k, with
    D_k = (m_k - m0) / r_k for the earlier predictions m_k at lambda_{s_k}, r_k = (lambda_{s_k} - lambda_s) / h,
    and for the corrector the extra D = model_t - m0 (Zhao et al. 2023, eqs. 8 and 10).
    """
    alpha_t, sigma_t = alpha_sigma(sigmas[t])
    _, sigma_s = alpha_sigma(sigmas[s])
    h = log_snr(sigmas[t]) - log_snr(sigmas[s])
    rks = [(log_snr(sigmas[s - k]) - log_snr(sigmas[s])) / h for k in range(1, order)]
    differences = [(earlier[k - 1] - m0) / rks[k - 1] for k in range(1, order)]
    x_t = sigma_t / sigma_s * start - alpha_t * math.expm1(-h) * m0
    if not differences and not corrector:
        return x_t
    rhos = unipc_rhos(h, rks, order, corrector)
    residual = sum(rho * d for rho, d in zip(rhos, differences)) if differences else 0.0
    if corrector:
        residual = residual + rhos[-1] * (model_t - m0)
    return x_t - alpha_t * math.expm1(-h) * residual


def unipc_weights(sigmas: np.ndarray, i: int, order: int, corrector_order: int) -> np.ndarray:
    """Step i of UniPC as the op's 10 weights after x0's: the corrector of sigmas[i]'s sample (order of the
    previous predictor; none at i = 0) on (x_t, x_last, m_t, m1, m2, m3), then the predictor to sigmas[i+1]
    on (x_corrected, m_t, m1, m2)."""
    X, XL, MT, C1, C2, C3 = np.eye(6)
    if corrector_order:
        corrected = unipc_update(sigmas, i - 1, i, corrector_order, True, XL, C1, [C2, C3], model_t=MT)
    else:
        corrected = X
    XC, P0, P1, P2 = np.eye(4)
    predicted = unipc_update(sigmas, i, i + 1, order, False, XC, P0, [P1, P2])
    return np.concatenate([corrected, predicted])


# ----------------------------------------------------------------------------- the plan and the step


@dataclass(frozen=True)
class SolverPlan:
    """A solver's whole run: the network's timestep and the op's weights at every step."""

    solver: str
    timesteps: np.ndarray  # (steps,) int64, descending
    sigmas: np.ndarray  # (steps + 1,) float64, the noise levels, the last one 0
    weights: torch.Tensor  # (steps, K) float64: the op's `coefficients` at each step
    orders: tuple[int, ...]  # the order each step's update takes (warm-up and final steps are lower)


def step_orders(solver: str, steps: int, unipc_order: int = 2, lower_order_final: bool = True) -> tuple[int, ...]:
    """Each step's order as diffusers chooses it: warm-up from first order (there is no history yet), first
    order to sigma = 0, and with `lower_order_final` lower orders near the end (DPM-Solver++ under 15 steps).
    One difference on purpose: UniPC without `lower_order_final` still steps first order to sigma = 0, where
    diffusers' keeps its order and fails (its r_k are 0 there)."""
    order = solver_order(solver, unipc_order)
    orders = []
    for i in range(steps):
        if solver == "unipc":
            this = min(order, steps - i) if lower_order_final else order
            orders.append(1 if i == steps - 1 else min(this, i + 1))
            continue
        short = lower_order_final and steps < 15
        if i == steps - 1:
            orders.append(1)
        elif (i == steps - 2 and short) or order == 2 or i < 2:
            orders.append(min(2, i + 1))
        else:
            orders.append(3)
    return tuple(orders)


def solver_plan(schedule: NoiseSchedule, solver: str, steps: int | None = None, *, spacing: str = "linspace",
                karras: bool = False, target: str = "eps", sigma_data: float = 0.5, unipc_order: int = 2,
                lower_order_final: bool = True) -> SolverPlan:
    """Every step's weights for the op, in float64, from the papers' equations."""
    steps = steps or DEFAULT_STEPS
    timesteps, sigmas = noise_levels(schedule, steps, spacing, karras)
    orders = step_orders(solver, steps, unipc_order, lower_order_final)
    rows = []
    for i in range(steps):
        if solver == "unipc":
            update = unipc_weights(sigmas, i, orders[i], orders[i - 1] if i else 0)
        else:
            update = dpm_solver_weights(sigmas, i, orders[i], sde=solver == "dpm++2m-sde")
        rows.append(np.concatenate([x0_weights(sigmas[i], target, sigma_data), update]))
    weights = torch.tensor(np.array(rows), dtype=torch.float64)
    if not torch.isfinite(weights).all():
        raise ValueError(f"{solver} at {steps} steps has non-finite weights (repeated noise levels?); "
                         f"choose another spacing or number of steps")
    return SolverPlan(solver, timesteps, sigmas, weights, orders)


def threshold_x0(x0: torch.Tensor, ratio: float) -> torch.Tensor:
    """Dynamic thresholding (Imagen, Saharia et al. 2022, sec. 2.3): per sample s = max(1, the `ratio`
    quantile of |x_0|), x_0 <- clip(x_0, -s, s) / s."""
    magnitude = x0.abs().flatten(1).to(torch.promote_types(x0.dtype, torch.float32))  # quantile needs float32+
    s = torch.quantile(magnitude, ratio, dim=1).clamp_min(1.0).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return torch.minimum(torch.maximum(x0, -s), s) / s


def solver_step(model: Callable, kernels: Kernels, solver: str, *, clip_denoised: bool = False,
                thresholding: str = "static", dynamic_thresholding_ratio: float = 0.995, unipc_order: int = 2,
                dtype: torch.dtype = torch.float32, on_step: Callable | None = None) -> SolverStep:
    """One solver step, the network and the fused update, as a function of tensors only:
    (x, t, keys, weights, history[, class_labels]) -> (x_next, history), history a tuple of tensors
    (`initial_history`); a class-conditional model takes the labels.

    With dynamic thresholding the x_0 is formed and thresholded here, then passed to the op as an x0 target.
    `on_step(t, x_t, x0)`, if given, sees every step's input and (unclipped) x_0 prediction.
    """
    history = history_length(solver, unipc_order)
    noise = solver == "dpm++2m-sde"
    dynamic = clip_denoised and thresholding == "dynamic"
    as_x0 = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def step(x, t, keys, weights, state, class_labels=None):
        output = (model(x, t) if class_labels is None else model(x, t, class_labels)).to(dtype)
        if dynamic or on_step is not None:
            x0 = weights[0] * x + weights[1] * output
            if on_step is not None:
                on_step(int(t[0]), x, x0)
            if dynamic:
                output, weights = threshold_x0(x0, dynamic_thresholding_ratio), torch.cat([as_x0.to(weights), weights[2:]])
        clip = clip_denoised and not dynamic
        if solver == "unipc":
            x_last, *previous = state
            x_corrected, x_next, x0 = kernels.unipc_step(x, output, x_last, *previous, weights, history, clip)
            return x_next, (x_corrected, x0, *previous[:-1])
        x_next, x0 = kernels.dpm_solver_step(x, output, *state, t, keys, weights, history, noise, clip)
        return x_next, (x0, state[0])

    return step


def initial_history(solver: str, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The history before the first step (its weights are 0): x_last and three x_0 for UniPC, two x_0 else.

    Distinct tensors: a compiled step guards on which of its inputs alias, so one shared zero tensor would
    recompile it at each of the first steps."""
    return tuple(torch.zeros_like(x) for _ in range(4 if solver == "unipc" else 2))


def solve(step: SolverStep, plan: SolverPlan, x: torch.Tensor, keys: torch.Tensor, *, dtype: torch.dtype,
          progress: bool = False, class_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Run the plan from x (pure noise at sigmas[0]) to the data (of classes `class_labels`, if given)."""
    batch, device = x.shape[0], x.device
    times = torch.as_tensor(plan.timesteps, device=device)  # one copy to the device each, not one per step
    weights = plan.weights.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    state = initial_history(plan.solver, x)
    for i in progress_bar(range(len(times)), desc=plan.solver, disable=not progress, leave=False):
        arguments = (x, times[i].expand(batch), keys, weights[i], state)
        x, state = step(*arguments) if class_labels is None else step(*arguments, class_labels)
    return x
