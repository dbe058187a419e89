"""The fast solvers (engine/solvers.py): step by step equal to diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler, their warm-up and final orders, and sampling that is a pure function of the seed."""

import numpy as np
import pytest
import torch

from engine import diffusion, solvers
from engine.schedule import NoiseSchedule
from kernels.noise import noise_keys, randn
from kernels.registry import resolve_kernels

diffusers = pytest.importorskip("diffusers", reason="diffusers (the dev extra) is the peer the solvers are checked against")

SHAPE = (2, 1, 4, 4)
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def toy_model(seed: int = 0):
    """A fixed smooth nonlinear function of (x_t, t) standing in for a network, in float64."""
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.3

    def model(x, t):
        scale = 1 + t.to(torch.float64).view(-1, 1, 1, 1) / 1000
        return torch.tanh(x.flatten(1) @ weight).view_as(x) * scale

    return model


def peer_scheduler(solver: str, spacing: str, karras: bool, target: str, unipc_order: int, schedule_name: str):
    options = dict(num_train_timesteps=1000, beta_schedule=schedule_name, timestep_spacing=spacing,
                   use_karras_sigmas=karras, prediction_type=PREDICTION_TYPES[target])
    if solver == "unipc":
        return diffusers.UniPCMultistepScheduler(solver_order=unipc_order, **options)
    algorithm = "sde-dpmsolver++" if solver == "dpm++2m-sde" else "dpmsolver++"
    return diffusers.DPMSolverMultistepScheduler(solver_order=solvers.solver_order(solver), algorithm_type=algorithm,
                                                 **options)


CASES = [  # solver, steps, spacing, karras, target, unipc order, schedule
    ("dpm++2m", 10, "linspace", False, "eps", 2, "linear"),
    ("dpm++2m", 25, "trailing", False, "v", 2, "squaredcos_cap_v2"),
    ("dpm++2m", 12, "leading", True, "x0", 2, "linear"),
    ("dpm++3m", 10, "linspace", False, "eps", 2, "linear"),  # the lower-order second-to-last step (under 15)
    ("dpm++3m", 20, "trailing", False, "v", 2, "linear"),
    ("dpm++3m", 16, "linspace", True, "eps", 2, "squaredcos_cap_v2"),
    ("dpm++2m-sde", 10, "leading", False, "eps", 2, "linear"),
    ("dpm++2m-sde", 20, "trailing", True, "v", 2, "linear"),
    ("unipc", 10, "linspace", False, "eps", 2, "linear"),
    ("unipc", 10, "trailing", False, "x0", 3, "linear"),
    ("unipc", 20, "leading", False, "v", 3, "squaredcos_cap_v2"),
    ("unipc", 15, "trailing", True, "eps", 2, "linear"),
]


@pytest.mark.parametrize("solver,steps,spacing,karras,target,unipc_order,schedule_name", CASES,
                         ids=["-".join(map(str, case)) for case in CASES])
def test_every_step_equals_the_diffusers_scheduler(solver, steps, spacing, karras, target, unipc_order, schedule_name):
    schedule = NoiseSchedule.create(schedule_name, 1000)
    model, kernels = toy_model(), resolve_kernels({}, "cpu")
    peer = peer_scheduler(solver, spacing, karras, target, unipc_order, schedule_name)
    peer.alphas_cumprod = schedule.alphas_cumprod.clone()  # its own are float32 (Karras' ends come from them)
    peer.set_timesteps(steps)
    plan = solvers.solver_plan(schedule, solver, steps, spacing=spacing, karras=karras, target=target,
                               unipc_order=unipc_order)
    if karras and schedule_name == "squaredcos_cap_v2" and solver != "unipc":
        # diffusers' DPM skips rounding there and its int64 timesteps truncate; ours are the nearest (on purpose:
        # the network sees the noise level closest to the solver's). The steps below feed both our timesteps.
        assert np.abs(plan.timesteps - peer.timesteps.numpy()).max() <= 1
    else:
        assert np.array_equal(plan.timesteps, peer.timesteps.numpy())
    keys = noise_keys(3, torch.arange(SHAPE[0]))
    ours = randn(keys, torch.full((SHAPE[0],), 1000), 16, dtype=torch.float64).view(SHAPE)
    theirs = ours.clone()
    step = solvers.solver_step(model, kernels, solver, unipc_order=unipc_order, dtype=torch.float64)
    history = solvers.initial_history(solver, ours)
    for i, t in enumerate(plan.timesteps):
        t_batch = torch.full((SHAPE[0],), int(t))
        extra = {"variance_noise": randn(keys, t_batch, 16, dtype=torch.float64).view(SHAPE)} if "sde" in solver else {}
        theirs = peer.step(model(theirs, t_batch), peer.timesteps[i], theirs, **extra).prev_sample.double()
        ours, history = step(ours, t_batch, keys, plan.weights[i], history)
        # float32, not float64, agreement: diffusers rounds its sigmas to float32 and steps in float32
        error = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        assert error < 3e-6, f"step {i} (t = {t}): relative difference {error:.1e}"
    assert ours.abs().max() > 0.1


def test_orders_warm_up_from_first_and_end_first_order_at_the_data():
    assert solvers.step_orders("dpm++2m", 6) == (1, 2, 2, 2, 2, 1)
    assert solvers.step_orders("dpm++3m", 8) == (1, 2, 3, 3, 3, 3, 2, 1)  # under 15 steps: lower second-to-last
    assert solvers.step_orders("dpm++3m", 16)[-3:] == (3, 3, 1)
    assert solvers.step_orders("dpm++3m", 8, lower_order_final=False) == (1, 2, 3, 3, 3, 3, 3, 1)
    assert solvers.step_orders("unipc", 6, unipc_order=3) == (1, 2, 3, 3, 2, 1)
    assert solvers.step_orders("unipc", 6, unipc_order=3, lower_order_final=False) == (1, 2, 3, 3, 3, 1)


def test_the_last_step_returns_the_x0_prediction():
    plan = solvers.solver_plan(NoiseSchedule.create("linear", 1000), "dpm++2m", 5, target="eps")
    assert plan.sigmas[-1] == 0 and len(plan.sigmas) == 6
    x_t, x0, x0_prev, x0_prev2, noise = plan.weights[-1, 2:]
    assert (x_t, x0, x0_prev, x0_prev2, noise) == (0, 1, 0, 0, 0)
    assert solvers.solver_plan(NoiseSchedule.create("linear", 1000), "unipc").weights.shape == (solvers.DEFAULT_STEPS, 12)


@pytest.mark.parametrize("solver", ["dpm++2m-sde", "unipc"])
def test_images_do_not_depend_on_how_the_batch_is_split(solver):
    schedule, kernels, model = NoiseSchedule.create("linear", 1000), resolve_kernels({}, "cpu"), toy_model(1)
    options = dict(seed=5, sampler=solver, steps=8, dtype=torch.float64, target="eps", clip_denoised=True)
    whole = diffusion.sample(model, schedule, kernels, (4, 1, 4, 4), **options)
    halves = [diffusion.sample(model, schedule, kernels, (2, 1, 4, 4), first_index=first, **options) for first in (0, 2)]
    torch.testing.assert_close(torch.cat(halves), whole, rtol=0, atol=1e-12)
    assert whole.abs().max() <= 1.0 + 1e-9 or solver == "dpm++2m-sde"  # unipc ends on the clipped x0


def test_dynamic_thresholding_bounds_every_x0_the_solver_sees():
    schedule, kernels, model = NoiseSchedule.create("linear", 1000), resolve_kernels({}, "cpu"), toy_model(2)
    seen = []
    step = solvers.solver_step(lambda x, t: 5 * model(x, t), kernels, "dpm++2m", clip_denoised=True,
                               thresholding="dynamic", dynamic_thresholding_ratio=0.9, dtype=torch.float64,
                               on_step=lambda t, x, x0: seen.append(x0.abs().max().item()))
    plan = solvers.solver_plan(schedule, "dpm++2m", 6)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = solvers.solve(step, plan, x, noise_keys(0, torch.arange(2)), dtype=torch.float64)
    assert max(seen) > 1.5, "the unthresholded x0 overshoots (else the test proves nothing)"
    assert out.abs().max() <= 1.0 + 1e-9  # the last step returns the thresholded x0, within [-1, 1]
