"""The samplers against an exact denoiser: Gaussian data, whose optimal denoiser is known in closed form.

    python -m benchmarks.solver_oracle     # the markdown tables, ~10 s on a CPU

The data is a diagonal Gaussian over a (1, 4, 4) "image", N(mu_j, s_j^2) per element. Its noised marginal
at t is N(a mu, a^2 s^2 + b^2) with a = sqrt(abar_t), b = sqrt(1 - abar_t), so the denoiser is exact:
E[x_0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2). With it the only error a sampler makes is its
own discretisation.

Every sampler is then affine in x_T per element (x_0 = A x_T + c), plus noise independent of x_T for the
stochastic ones (DDPM, dpm++2m-sde). Regressing each element's output on its known x_T over the batch gives
A, c and the residual variance r, so the output distribution is N(c, A^2 + r) for x_T ~ N(0, 1): exact for
the deterministic samplers at any batch size, a finite-sample estimate (`noise_floor`) for the others.
Two 2-Wasserstein distances (closed form between diagonal Gaussians):
  - to the data N(mu, s^2): what sampling is for;
  - to the exact probability-flow ODE endpoint from x_T ~ N(0, 1) at the first timestep, which is not quite
    the data (x_T is N(0, 1), not the true marginal N(a_T mu, r_T^2); 2e-3 apart) but has no floor.

What the tables show: end to end, every solver's error is nearly all its last step's, the first-order jump
from the last timestep to sigma = 0 (`final_step_alone`), so all higher-order solvers converge at that step's
rate, not their own. Their orders show in the order study (`order_table`): the same update equations over
a fixed interval on refining grids, with no jump to sigma = 0.

Timesteps: "trailing" spacing for every sampler (Lin et al. 2024, table 2, which diffusers' schedulers cite
for `timestep_spacing`; their default is still "linspace"). Under it DDIM and the solvers visit the same
timesteps (T/n - 1, ..., T - 1) and end with the same first-order jump to the data, so DDIM is exactly the
first-order solver on the same grid; under "linspace" the solvers' grid (n + 1 points, t = 0 dropped) differs
from DDIM's (n points including t = 0: see engine/solvers.py). clip_denoised is off: the data is unbounded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine import diffusion, solvers
from engine.schedule import NoiseSchedule
from kernels.noise import noise_keys, randn
from kernels.registry import Kernels, resolve_kernels

SHAPE = (1, 4, 4)
STEPS = (5, 10, 20, 50)
REFERENCE_STEPS = 1000  # DDPM at every timestep: the reference row
BATCH = 2048  # DDPM-1000 in a few seconds; its W2 noise floor ~0.04 (sqrt(1/N) scaling)
SPACING = "trailing"
# (row label, sampler, extra sample() options); unipc-2/-3 are UniPC's orders via unipc_order.
SAMPLERS = (("ddim", "ddim", {"eta": 0.0}), ("dpm++2m", "dpm++2m", {}), ("dpm++3m", "dpm++3m", {}),
            ("unipc-2", "unipc", {"unipc_order": 2}), ("unipc-3", "unipc", {"unipc_order": 3}),
            ("dpm++2m-sde", "dpm++2m-sde", {}))
ODE_ROWS = ("ddim", "dpm++2m", "dpm++3m", "unipc-2", "unipc-3")


@dataclass(frozen=True)
class GaussianData:
    """N(mean_j, std_j^2) per element, float64, shaped like one image."""

    mean: torch.Tensor
    std: torch.Tensor


@dataclass(frozen=True)
class Measurement:
    """One sampler run: W2 to the data, to the exact ODE endpoint, and the regression's noise floor."""

    label: str
    steps: int
    w2_data: float
    w2_ode: float
    floor: float


def gaussian_data(shape: tuple[int, ...] = SHAPE, seed: int = 0) -> GaussianData:
    """Fixed, seeded moderate moments (|mu| <= 0.5, s in [0.1, 0.6]): well inside what the schedule resolves."""
    generator = torch.Generator().manual_seed(seed)
    mean = torch.rand(shape, generator=generator, dtype=torch.float64) - 0.5
    std = 0.1 + 0.5 * torch.rand(shape, generator=generator, dtype=torch.float64)
    return GaussianData(mean, std)


def posterior_x0(data: GaussianData, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x_0 | x_t]: the Gaussian conditional of x_0 given x_t = a x_0 + b eps."""
    a = diffusion.extract(schedule.sqrt_alphas_cumprod, t, x_t)
    b2 = diffusion.extract(1.0 - schedule.alphas_cumprod, t, x_t)
    s2 = data.std**2
    return data.mean + a * s2 * (x_t - a * data.mean) / (a * a * s2 + b2)


def oracle(data: GaussianData, schedule: NoiseSchedule, target: str = "eps") -> diffusion.Denoiser:
    """The optimal network for `target`: E[x_0 | x_t] in the target's terms (as `diffusion.training_target`)."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = posterior_x0(data, schedule, x_t, t)
        if target == "x0":
            return x0
        a = diffusion.extract(schedule.sqrt_alphas_cumprod, t, x_t)
        b = diffusion.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
        eps = (x_t - a * x0) / b
        return eps if target == "eps" else a * eps - b * x0  # v = sqrt(abar) eps - sqrt(1 - abar) x_0

    return model


def initial_noise(batch: int, shape: tuple[int, ...], seed: int, num_timesteps: int,
                  first_index: int = 0) -> torch.Tensor:
    """The x_T `diffusion.sample` starts from, bit for bit: drawn in float32 (randn's default dtype, which
    sample does not override), then cast to float64."""
    keys = noise_keys(seed, torch.arange(first_index, first_index + batch))
    x_end = torch.full((batch,), num_timesteps)
    return randn(keys, x_end, math.prod(shape)).view(batch, *shape).to(torch.float64)


def run(data: GaussianData, schedule: NoiseSchedule, kernels: Kernels, sampler: str, steps: int, *,
        batch: int = BATCH, seed: int = 0, target: str = "eps", **options) -> torch.Tensor:
    """x_0 of one sampler with the oracle, float64 throughout."""
    return diffusion.sample(oracle(data, schedule, target), schedule, kernels, (batch, *data.mean.shape), seed=seed,
                            sampler=sampler, steps=steps, timestep_spacing=SPACING, dtype=torch.float64,
                            target=target, clip_denoised=False, **options)


def output_moments(x_T: torch.Tensor, x_0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, c, r) per element: the least-squares fit x_0 = A x_T + c over the batch and its residual variance.

    The output distribution for x_T ~ N(0, 1) is then N(c, A^2 + r): the batch's own x_T moments drop out.
    """
    x, y = x_T.flatten(1), x_0.flatten(1)
    dx, dy = x - x.mean(0), y - y.mean(0)
    slope = (dx * dy).sum(0) / (dx * dx).sum(0)
    intercept = y.mean(0) - slope * x.mean(0)
    residual = y - slope * x - intercept
    variance = (residual**2).sum(0) / (len(x) - 2)  # two fitted parameters
    shape = x_0.shape[1:]
    return slope.view(shape), intercept.view(shape), variance.view(shape)


def w2_gaussian(mean: torch.Tensor, std: torch.Tensor, other_mean: torch.Tensor, other_std: torch.Tensor) -> float:
    """2-Wasserstein distance between diagonal Gaussians: sqrt(sum (m - m')^2 + (s - s')^2)."""
    return float((((mean - other_mean) ** 2 + (std - other_std) ** 2).sum()).sqrt())


def ode_marginal(data: GaussianData, schedule: NoiseSchedule, t_start: int,
                 t: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of the exact probability-flow ODE's state at t (-1: the data end) from x_T ~ N(0, 1) at t_start.

    The ODE maps each marginal N(a mu, r^2), r^2 = a^2 s^2 + b^2, affinely onto the next:
    x_t = a_t mu + r_t (x_T - a_T mu) / r_T, so N(0, 1) lands on N(a_t mu - r_t a_T mu / r_T, r_t^2 / r_T^2)
    (at the data a = 1, r = s: N(mu - s a_T mu / r_T, s^2 / r_T^2)).
    """
    def a_r(step: int) -> tuple[float, torch.Tensor]:
        abar = 1.0 if step < 0 else float(schedule.alphas_cumprod[step])
        return math.sqrt(abar), (abar * data.std**2 + (1.0 - abar)).sqrt()

    (a_T, r_T), (a_t, r_t) = a_r(t_start), a_r(t)
    return a_t * data.mean - r_t * a_T * data.mean / r_T, r_t / r_T


def final_step_alone(data: GaussianData, schedule: NoiseSchedule, steps: int) -> float:
    """W2 to the ODE endpoint of the exact ODE down to the last timestep and then the solvers' first-order
    last step (to sigma = 0 it returns the x_0 prediction E[x_0 | x_t]): the error every solver shares.

    E[x_0 | x_t] is affine in x_t with slope k = a s^2 / r^2, so it shrinks the spread by a s / r = 1 - O(sigma^2)
    against the ODE's: at trailing spacing's last timestep T/n - 1 that is far from 1 for small n.
    """
    t_last = int(solvers.solver_timesteps(schedule.num_timesteps, steps, SPACING)[-1])
    mean, std = ode_marginal(data, schedule, schedule.num_timesteps - 1, t_last)
    abar = float(schedule.alphas_cumprod[t_last])
    slope = math.sqrt(abar) * data.std**2 / (abar * data.std**2 + 1.0 - abar)
    jumped_mean, jumped_std = data.mean + slope * (mean - math.sqrt(abar) * data.mean), slope * std
    return w2_gaussian(jumped_mean, jumped_std, *ode_marginal(data, schedule, schedule.num_timesteps - 1))


def noise_floor(slope: torch.Tensor, residual: torch.Tensor, batch: int) -> float:
    """The W2 a perfect stochastic sampler would still show from a batch of `batch`: the standard errors of
    the fitted mean (r / N) and of the std (about r^2 / (2 N (A^2 + r)) from the residual's chi-square)."""
    return float((residual / batch + residual**2 / (2 * batch * (slope**2 + residual))).sum().sqrt())


def measure(data: GaussianData, schedule: NoiseSchedule, kernels: Kernels, label: str, sampler: str, steps: int,
            *, batch: int = BATCH, seed: int = 0, **options) -> Measurement:
    """One sampler's two W2 numbers (and its noise floor) at `steps`."""
    x_T = initial_noise(batch, data.mean.shape, seed, schedule.num_timesteps)
    x_0 = run(data, schedule, kernels, sampler, steps, batch=batch, seed=seed, **options)
    slope, intercept, residual = output_moments(x_T, x_0)
    std = (slope**2 + residual).sqrt()
    ode_mean, ode_std = ode_marginal(data, schedule, schedule.num_timesteps - 1)  # every sampler starts at T-1
    return Measurement(label, steps, w2_gaussian(intercept, std, data.mean, data.std),
                       w2_gaussian(intercept, std, ode_mean, ode_std), noise_floor(slope, residual, batch))


def setup(seed: int = 0) -> tuple[GaussianData, NoiseSchedule, Kernels]:
    """The data, the float64 linear schedule (T = 1000) and the PyTorch reference kernels."""
    return gaussian_data(seed=seed), NoiseSchedule.create("linear", 1000), resolve_kernels({}, "cpu")


def error_table(steps: tuple[int, ...] = STEPS, *, batch: int = BATCH, seed: int = 0) -> list[Measurement]:
    """Every sampler at every step count, then DDPM at 1,000 steps as the reference row."""
    data, schedule, kernels = setup(seed)
    rows = [measure(data, schedule, kernels, label, sampler, n, batch=batch, seed=seed, **options)
            for label, sampler, options in SAMPLERS for n in steps]
    rows.append(measure(data, schedule, kernels, "ddpm", "ddpm", REFERENCE_STEPS, batch=batch, seed=seed))
    return rows


# ----------------------------------------------------------------------------- the order study
# End to end, every solver's error is mostly its last step's (`final_step_alone`), which hides the orders. So the
# solvers are also run over a fixed interval, T-1 down to ORDER_END, on uniform timestep grids that refine one
# another, stopping at sigma(ORDER_END) with no jump to 0, against the exact ODE state there.

ORDER_END = 199  # 999 - 199 = 800 divides by 5, 10, 20 and 50; h shrinks as 1/n everywhere on the interval


def interval_timesteps(num_timesteps: int, steps: int, t_end: int = ORDER_END) -> list[int]:
    """steps + 1 evenly spaced timesteps from T-1 down to t_end, both included."""
    stride, rest = divmod(num_timesteps - 1 - t_end, steps)
    if rest:
        raise ValueError(f"{steps} steps do not divide [{t_end}, {num_timesteps - 1}] evenly")
    return list(range(num_timesteps - 1, t_end - 1, -stride))


def interval_plan(schedule: NoiseSchedule, solver: str, steps: int, t_end: int = ORDER_END,
                  unipc_order: int = 2) -> solvers.SolverPlan:
    """`solvers.solver_plan`'s weights (the same equations) on the interval's grid, ending at sigma(t_end) > 0:
    every step at full order once the history allows, as the last step is no jump to sigma = 0."""
    times = interval_timesteps(schedule.num_timesteps, steps, t_end)
    abar = schedule.alphas_cumprod.numpy()[times]
    sigmas = np.sqrt((1.0 - abar) / abar)
    order = solvers.solver_order(solver, unipc_order)
    orders = tuple(min(order, i + 1) for i in range(steps))  # warm-up as diffusers' lower_order_nums
    rows = []
    for i in range(steps):
        if solver == "unipc":
            update = solvers.unipc_weights(sigmas, i, orders[i], orders[i - 1] if i else 0)
        else:
            update = solvers.dpm_solver_weights(sigmas, i, orders[i], sde=False)
        rows.append(np.concatenate([solvers.x0_weights(sigmas[i], "eps"), update]))
    weights = torch.tensor(np.array(rows), dtype=torch.float64)
    return solvers.SolverPlan(solver, np.array(times[:-1]), sigmas, weights, orders)


def interval_error(data: GaussianData, schedule: NoiseSchedule, kernels: Kernels, sampler: str, steps: int, *,
                   batch: int = 8, seed: int = 0, t_end: int = ORDER_END, **options) -> float:
    """W2 at t_end between an ODE sampler's state and the exact ODE's (deterministic: any batch >= 3 is exact)."""
    x_T = initial_noise(batch, data.mean.shape, seed, schedule.num_timesteps)
    keys = noise_keys(seed, torch.arange(batch))
    step = diffusion.denoising_step(oracle(data, schedule), schedule, kernels, sampler=sampler, clip_denoised=False,
                                    dtype=torch.float64, **options)
    if sampler == "ddim":  # the engine's own DDIM step, from each grid point to the next
        times, x = interval_timesteps(schedule.num_timesteps, steps, t_end), x_T
        for t, t_prev in zip(times, times[1:]):
            x = step(x, torch.full((batch,), t), torch.full((batch,), t_prev), keys)
    else:
        plan = interval_plan(schedule, sampler, steps, t_end, options.get("unipc_order", 2))
        x = solvers.solve(step, plan, x_T, keys, dtype=torch.float64)
    slope, intercept, residual = output_moments(x_T, x)
    exact = ode_marginal(data, schedule, schedule.num_timesteps - 1, t_end)
    return w2_gaussian(intercept, (slope**2 + residual).sqrt(), *exact)


def order_table(steps: tuple[int, ...] = STEPS, seed: int = 0) -> dict[str, list[float]]:
    """The ODE samplers' interval errors at every step count, by row label."""
    data, schedule, kernels = setup(seed)
    return {label: [interval_error(data, schedule, kernels, sampler, n, seed=seed, **options) for n in steps]
            for label, sampler, options in SAMPLERS if label in ODE_ROWS}


def observed_order(errors: list[float], steps: tuple[int, ...], i: int) -> float:
    """p with error ~ n^-p between steps[i] and steps[i + 1]."""
    return math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i])


# ----------------------------------------------------------------------------- the report


def markdown(rows: list[Measurement], orders: dict[str, list[float]], batch: int = BATCH,
             steps: tuple[int, ...] = STEPS) -> str:
    """The end-to-end tables (W2 to the ODE endpoint, to the data) and the order study's."""
    data, schedule, _ = setup()
    columns = sorted({row.steps for row in rows})
    cells = {(row.label, row.steps): row for row in rows}
    labels = list(dict.fromkeys(row.label for row in rows))
    header = ["| sampler | " + " | ".join(map(str, columns)) + " |", "|---" * (len(columns) + 1) + "|"]
    lines = []
    for title, field in (("W2 to the exact ODE endpoint", "w2_ode"), ("W2 to the data", "w2_data")):
        lines += [f"{title} (float64, batch {batch}, {SPACING} spacing):", "", *header]
        for label in labels:
            values = [f"{getattr(cells[label, n], field):.2e}" if (label, n) in cells else "" for n in columns]
            lines.append(f"| {label} | " + " | ".join(values) + " |")
        if field == "w2_ode":
            lines.append("| exact ODE + last x0 step | "
                         + " | ".join(f"{final_step_alone(data, schedule, n):.2e}" if n in steps else ""
                                      for n in columns) + " |")
        lines.append("")
    ode_mean, ode_std = ode_marginal(data, schedule, schedule.num_timesteps - 1)
    stochastic = [row for row in rows if row.label in ("ddpm", "dpm++2m-sde")]
    lines += [f"W2 between the ODE endpoint and the data: {w2_gaussian(ode_mean, ode_std, data.mean, data.std):.1e}. "
              "Batch noise floor of the stochastic rows: "
              + ", ".join(f"{row.label} {row.steps}: {row.floor:.1e}" for row in stochastic) + ".", ""]
    pairs = [f"p {steps[i]}-{steps[i + 1]}" for i in range(len(steps) - 1)]
    lines += [f"Order study: W2 at t = {ORDER_END} to the exact ODE state, uniform grids from t = "
              f"{schedule.num_timesteps - 1}, no final jump:", "",
              "| sampler | " + " | ".join(map(str, steps)) + " | " + " | ".join(pairs) + " |",
              "|---" * (len(steps) + len(pairs) + 1) + "|"]
    for label, errors in orders.items():
        rates = [f"{observed_order(errors, steps, i):.2f}" for i in range(len(steps) - 1)]
        lines.append(f"| {label} | " + " | ".join(f"{e:.2e}" for e in errors) + " | " + " | ".join(rates) + " |")
    return "\n".join(lines)


def main() -> None:
    print(markdown(error_table(), order_table()))


if __name__ == "__main__":
    main()
