"""The fused kernels: conformance of every implementation, the noise spec, the ops' promises to each other,
custom-op and torch.compile support, the registry and the `python -m kernels.check` CLI.

Without a GPU the Triton kernels run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
which is slow: tensors stay small. With a CUDA device (no interpreter) the Triton tests run there.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from engine.schedule import NoiseSchedule
from kernels import noise
from kernels import noise_loss as noise_loss_module
from kernels import registry
from kernels.check import make_cases, run_conformance
from kernels.posterior_step import schedule_tables
from kernels.registry import OPS, KernelError, load_implementation, register_kernel, resolve_kernels
from kernels.triton_support import interpreting
from forked_cli import run_module

ROOT = Path(__file__).resolve().parents[1]
T = 1000
CPU = torch.device("cpu")
# Where the Triton kernels run: the CPU in the interpreter, else the GPU.
DEVICE = CPU if interpreting() else torch.device("cuda")
IMPLEMENTATIONS = ("pytorch", "triton")
PLUGINS = "tests.kernel_plugins"
MASK32 = 0xFFFFFFFF


def implementation(op: str, name: str):
    return load_implementation(op, name, DEVICE if name == "triton" else CPU)[1]


def device_of(name: str) -> torch.device:
    return DEVICE if name == "triton" else CPU


def tables(name: str = "linear", device: torch.device = CPU) -> NoiseSchedule:
    return NoiseSchedule.create(name, T).to(device, torch.float32)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


# ----------------------------------------------------------------------------- 1. conformance


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("op", OPS)
def test_every_implementation_passes_the_full_conformance_check(op, name):
    report = run_conformance(op, implementation(op, name), device_of(name))
    assert len(report.results) == len(make_cases(device_of(name))) + 1  # every case, plus the determinism case
    failures = [f"{result.label}: {result.detail}" for result in report.results if not result.passed]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- 2. the noise spec

SEED = 1234
ROWS, NUMEL = 8, 2048  # four groups of 8 samples: 65,536 draws in all
QUARTER = -(-NUMEL // 4)
BASE_T = torch.tensor([0, 1, 2, 99, 500, 997, 998, 999])
GROUPS = {  # (keys, t) per group; each differs from "base" in one way only
    "base": (noise.noise_keys(SEED, torch.arange(ROWS)), BASE_T),
    "next_t": (noise.noise_keys(SEED, torch.arange(ROWS)), (BASE_T + 1) % T),
    "next_seed": (noise.noise_keys(SEED + 1, torch.arange(ROWS)), BASE_T),
    "next_index": (noise.noise_keys(SEED, torch.arange(ROWS) + ROWS), BASE_T),
}


def draw(source: str, keys: torch.Tensor, t: torch.Tensor, numel: int) -> torch.Tensor:
    """Noise for (keys[b], t[b]), shaped (B, numel): from the spec, or from inside the Triton q_sample kernel."""
    if source == "spec":
        return noise.randn(keys, t, numel)
    # x_t = 0 * x0 + 1 * eps: the kernel's in-kernel noise, exactly
    zeros, ones = torch.zeros(T, device=DEVICE), torch.ones(T, device=DEVICE)
    x_t = implementation("q_sample", "triton")(torch.zeros(len(keys), numel, device=DEVICE), t.to(DEVICE),
                                               keys.to(DEVICE), zeros, ones)
    return x_t.cpu()


@functools.lru_cache(maxsize=None)
def grouped_draws(source: str) -> dict[str, torch.Tensor]:
    """All four groups in one call (one kernel launch for Triton), split back into groups."""
    keys = torch.cat([keys for keys, _ in GROUPS.values()])
    t = torch.cat([t for _, t in GROUPS.values()])
    return dict(zip(GROUPS, draw(source, keys, t, NUMEL).split(ROWS)))


SOURCES = ("spec", "triton")


def test_philox_matches_the_published_known_answer_and_plain_integer_arithmetic():
    # Random123's known-answer vector for Philox4x32-10 with a zero key and zero counter
    words = noise.philox4x32(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]))
    assert [word.item() for word in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]

    def philox_ints(key: int, c0: int, c1: int) -> list[int]:  # Python integers never overflow
        k0, k1, x = key & MASK32, (key >> 32) & MASK32, [c0 & MASK32, c1 & MASK32, 0, 0]
        for _ in range(10):
            p0, p1 = 0xD2511F53 * x[0], 0xCD9E8D57 * x[2]
            x = [(p1 >> 32) ^ x[1] ^ k0, p1 & MASK32, (p0 >> 32) ^ x[3] ^ k1, p0 & MASK32]
            k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
        return x

    g = torch.Generator().manual_seed(0)
    keys = torch.cat([torch.randint(-2**62, 2**62, (30,), generator=g), torch.tensor([-1, 2**63 - 1])])
    c0 = torch.cat([torch.randint(0, 2**32, (30,), generator=g), torch.tensor([2**32 - 1, 0])])
    c1 = torch.cat([torch.randint(0, T, (30,), generator=g), torch.tensor([T - 1, 2**32 - 1])])
    words = torch.stack(noise.philox4x32(keys, c0, c1), dim=1)
    expected = [philox_ints(k, a, b) for k, a, b in zip(keys.tolist(), c0.tolist(), c1.tolist())]
    assert words.tolist() == expected


def test_noise_keys_put_the_seed_in_the_high_word_and_reject_seeds_outside_31_bits():
    indices = torch.tensor([0, 5, 2**32 - 1])
    keys = noise.noise_keys(noise.MAX_SEED, indices)
    assert keys.dtype == torch.int64 and (keys > 0).all()
    assert ((keys >> 32) == noise.MAX_SEED).all() and ((keys & MASK32) == indices).all()
    assert torch.equal(noise.noise_keys(0, indices), indices)
    for seed in (-1, 2**31, 2**40):
        with pytest.raises(ValueError, match=r"noise seed must be in \[0, 2147483647\]"):
            noise.noise_keys(seed, indices)


@pytest.mark.parametrize("source", SOURCES)
def test_noise_is_standard_normal(source):
    x = torch.cat(list(grouped_draws(source).values())).double().flatten()
    n = x.numel()
    assert x.isfinite().all()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)  # 5 sigma
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((x**4).mean().item() - 3) < 5 * math.sqrt(96 / n)  # Var(x^4) = 105 - 9: a Gaussian's tails
    # Kolmogorov-Smirnov: the largest gap between the empirical and the normal CDF (1.95/sqrt(n): p = 0.001)
    cdf = torch.special.ndtr(x.sort().values)
    steps = torch.arange(n + 1, dtype=torch.float64) / n
    gap = torch.maximum((cdf - steps[:-1]).abs(), (cdf - steps[1:]).abs()).max().item()
    assert gap < 1.95 / math.sqrt(n)


@pytest.mark.parametrize("source", SOURCES)
def test_noise_is_a_pure_function_of_key_and_timestep(source):
    first = grouped_draws(source)["base"]
    keys, t = GROUPS["base"]
    # again, in another batch: other batch positions, other batch size
    again = draw(source, keys[[5, 0, 5]], t[[5, 0, 5]], NUMEL)
    assert torch.equal(again, first[[5, 0, 5]])


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("other", ["next_t", "next_seed", "next_index"])
def test_noise_for_another_timestep_seed_or_sample_is_uncorrelated(source, other):
    draws = grouped_draws(source)
    base, changed = draws["base"], draws[other]
    assert not torch.equal(base, changed)
    assert abs(corr(base, changed)) < 5 / math.sqrt(base.numel())
    # row by row too: each sample's noise against its changed counterpart (2,048 draws each)
    worst = max(abs(corr(a, b)) for a, b in zip(base, changed))
    assert worst < 5 / math.sqrt(NUMEL)


@pytest.mark.parametrize("source", SOURCES)
def test_neighbouring_noise_elements_are_uncorrelated(source):
    x = torch.cat(list(grouped_draws(source).values())).double()
    # lag 1: neighbours in memory; lag Q and 2Q: outputs of one Philox call (Box-Muller partners at lag Q)
    for lag in (1, QUARTER, 2 * QUARTER):
        a, b = x[:, :-lag], x[:, lag:]
        bound = 5 / math.sqrt(a.numel())
        assert abs(corr(a, b)) < bound, f"lag {lag}"
        assert abs(corr(a**2, b**2)) < bound, f"lag {lag}, squares"  # independent, not only uncorrelated


def test_the_samplers_x_T_has_no_spatial_or_cross_channel_structure():
    """x_T as the samplers draw it (t = T) in an image's layout: pixel neighbours, channels and the
    per-image colour means behave as independent normals (issue 12 suspected the noise; it is not that)."""
    keys = noise.noise_keys(SEED, torch.arange(256))
    x = noise.randn(keys, torch.full((256,), 1000), 3 * 32 * 32, dtype=torch.float64).view(256, 3, 32, 32)
    pairs = {"horizontal": (x[..., 1:], x[..., :-1]), "vertical": (x[..., 1:, :], x[..., :-1, :]),
             "channels 0-1": (x[:, 0], x[:, 1]), "channels 1-2": (x[:, 1], x[:, 2]), "channels 0-2": (x[:, 0], x[:, 2])}
    for name, (a, b) in pairs.items():
        assert abs(corr(a, b)) < 5 / math.sqrt(a.numel()), name
    means = x.mean((2, 3)).flatten()  # a colour cast per image would inflate their variance
    assert abs(means.var().item() * 1024 - 1) < 5 * math.sqrt(2 / means.numel())


@pytest.mark.parametrize("shape", [(3, 35), (2, 3, 5, 7), (1, 1), (2, 6)], ids=str)
def test_triton_noise_equals_the_spec_to_float32_rounding(shape):
    keys = noise.noise_keys(SEED, torch.arange(shape[0]) + 40)
    t = torch.tensor([999, 0, 123])[: shape[0]]
    numel = math.prod(shape[1:])
    oracle = noise.randn(keys, t, numel, dtype=torch.float64)
    got = draw("triton", keys, t, numel)
    float32_eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got.double(), oracle, rtol=4 * float32_eps, atol=4 * float32_eps)
    # the spec's own float32 path agrees to the same rounding
    torch.testing.assert_close(noise.randn(keys, t, numel).double(), oracle, rtol=4 * float32_eps, atol=4 * float32_eps)
    # and so does the big batch of the statistics tests (other keys, all timesteps' ends)
    for name, (group_keys, group_t) in GROUPS.items():
        oracle = noise.randn(group_keys, group_t, NUMEL, dtype=torch.float64)
        torch.testing.assert_close(grouped_draws("triton")[name].double(), oracle, rtol=4 * float32_eps,
                                   atol=4 * float32_eps, msg=name)


# ----------------------------------------------------------------------------- 3. q_sample_uint8


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_q_sample_uint8_equals_q_sample_on_the_flipped_scaled_batch(name):
    device = device_of(name)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (3, 2, 5, 7), generator=g, dtype=torch.uint8)  # odd width: a middle column
    flip = torch.tensor([True, False, True])
    t = torch.tensor([0, 500, 999])
    keys = noise.noise_keys(SEED, torch.tensor([7, 8, 9]))
    schedule = tables("cosine", device)
    coefficients = (schedule.sqrt_alphas_cumprod, schedule.sqrt_one_minus_alphas_cumprod)

    flipped = torch.where(flip[:, None, None, None], images.flip(-1), images)
    x0 = flipped.to(torch.float32) / 127.5 - 1.0
    assert x0.min() >= -1 and x0.max() <= 1 and not torch.equal(flipped, images)
    expected = implementation("q_sample", name)(x0.to(device), t.to(device), keys.to(device), *coefficients)
    got = implementation("q_sample_uint8", name)(images.to(device), flip.to(device), t.to(device), keys.to(device),
                                                 *coefficients, torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 4. the fused loss


@pytest.mark.parametrize("loss_name", IMPLEMENTATIONS)
@pytest.mark.parametrize("sample_name", IMPLEMENTATIONS)
def test_noise_loss_measures_against_exactly_the_noise_q_sample_added(sample_name, loss_name):
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    prediction = torch.randn(x0.shape, generator=g)
    t = torch.tensor([10, 400, 999])
    keys = noise.noise_keys(SEED, torch.tensor([100, 101, 102]))
    schedule = tables("linear")
    ones, zeros = torch.ones(T), torch.zeros(T)

    device = device_of(sample_name)
    x_t = implementation("q_sample", sample_name)(x0.to(device), t.to(device), keys.to(device),
                                                  schedule.sqrt_alphas_cumprod.to(device),
                                                  schedule.sqrt_one_minus_alphas_cumprod.to(device)).cpu()
    shape = (-1, 1, 1, 1)
    eps = ((x_t.double() - schedule.sqrt_alphas_cumprod.double()[t].view(shape) * x0.double())
           / schedule.sqrt_one_minus_alphas_cumprod.double()[t].view(shape))

    device = device_of(loss_name)
    loss_fn = implementation("noise_loss", loss_name)

    def loss(pred):
        return loss_fn(pred.to(device), t.to(device), keys.to(device), ones.to(device), zeros.to(device), None).cpu()

    expected = (prediction.double() - eps).square().mean(dim=(1, 2, 3))  # per sample
    torch.testing.assert_close(loss(prediction).double(), expected, rtol=1e-5, atol=0)
    # predicting the noise exactly gives (float32 rounding of) zero; any other noise would give about 1
    assert loss(eps.float()).abs().max().item() < 1e-9


TARGETS = ("eps", "v", "x0")


def loss_inputs(target: str, device: torch.device):
    g = torch.Generator().manual_seed(5)
    prediction = torch.randn(2, 3, 6, 5, generator=g)
    x0 = torch.rand(prediction.shape, generator=g) * 2 - 1
    schedule = tables("cosine")
    ones, zeros = torch.ones(T), torch.zeros(T)
    noise_coef, x0_coef = {"eps": (ones, zeros), "v": (schedule.sqrt_alphas_cumprod, -schedule.sqrt_one_minus_alphas_cumprod),
                           "x0": (zeros, ones)}[target]
    t = torch.tensor([3, 998])
    keys = noise.noise_keys(SEED, torch.tensor([11, 12]))
    args = (t, keys, noise_coef, x0_coef, None if target == "eps" else x0)
    return prediction.to(device), tuple(arg if arg is None else arg.to(device) for arg in args)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_noise_loss_gradient_matches_autograd_through_the_reference(name, target):
    def loss_and_grad(fn, device, dtype):
        prediction, args = loss_inputs(target, device)
        prediction = prediction.to(dtype).requires_grad_(True)
        loss = fn(prediction, *args)
        upstream = torch.tensor([1.5, -0.25], dtype=dtype, device=device)  # each sample's own upstream gradient
        (grad,) = torch.autograd.grad(loss, prediction, grad_outputs=upstream)
        return loss.detach().cpu(), grad.cpu()

    loss, grad = loss_and_grad(implementation("noise_loss", name), device_of(name), torch.float32)
    # plain autograd through the specification, in float64
    expected_loss, expected_grad = loss_and_grad(noise_loss_module.reference, CPU, torch.float64)
    assert grad.dtype == torch.float32 and grad.abs().max() > 0
    torch.testing.assert_close(loss.double(), expected_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target", TARGETS)
def test_pytorch_noise_loss_passes_float64_gradcheck(target):
    prediction, (t, keys, noise_coef, x0_coef, x0) = loss_inputs(target, CPU)
    prediction = prediction[:, :1, :3, :4].double().requires_grad_(True)
    x0 = None if x0 is None else x0[:, :1, :3, :4].double()
    noise_loss = implementation("noise_loss", "pytorch")
    assert torch.autograd.gradcheck(lambda pred: noise_loss(pred, t, keys, noise_coef.double(), x0_coef.double(), x0),
                                    (prediction,))


# ----------------------------------------------------------------------------- 5. torch.library.opcheck


OPCHECK_CASES = ("q_sample", "q_sample-non-contiguous", "q_sample_uint8-bfloat16", "noise_loss-eps", "noise_loss-v",
                 "noise_loss_backward-eps", "noise_loss_backward-v", "posterior_step", "posterior_step-clipped",
                 "ddim_step", "ddim_step-eta0-clipped", "dpm_solver_step-sde", "dpm_solver_step-clipped",
                 "unipc_step", "unipc_step-clipped")


def ddpm_ops():
    """torch.ops.ddpm, once the op modules (which register the custom ops) are imported."""
    for op in OPS:
        load_implementation(op, "triton", DEVICE)
    return torch.ops.ddpm


def opcheck_case(case: str) -> tuple:
    """(op, small inputs on DEVICE)."""
    ops = ddpm_ops()
    s = tables("linear", DEVICE)
    g = torch.Generator().manual_seed(6)

    def batch(shape=(2, 3, 4, 4)):
        return torch.randn(shape, generator=g).to(DEVICE)

    def weights(count):  # a solver step's weights (the ops take any)
        return torch.randn(count, generator=g).to(DEVICE)

    t, t_prev = torch.tensor([5, 999], device=DEVICE), torch.tensor([-1, 950], device=DEVICE)
    keys = noise.noise_keys(SEED, torch.tensor([0, 1])).to(DEVICE)
    ones, zeros = torch.ones(T, device=DEVICE), torch.zeros(T, device=DEVICE)
    v_coefs = (s.sqrt_alphas_cumprod, -s.sqrt_one_minus_alphas_cumprod)
    cases = {
        "q_sample": lambda: (ops.q_sample, (batch(), t, keys, s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod)),
        "q_sample-non-contiguous": lambda: (ops.q_sample, (batch((2, 3, 5, 4)).transpose(-1, -2), t, keys,
                                                           s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod)),
        "q_sample_uint8-bfloat16": lambda: (ops.q_sample_uint8, (
            torch.randint(0, 256, (2, 3, 4, 5), generator=g, dtype=torch.uint8).to(DEVICE),
            torch.tensor([True, False], device=DEVICE), t, keys, s.sqrt_alphas_cumprod,
            s.sqrt_one_minus_alphas_cumprod, torch.bfloat16)),
        "noise_loss-eps": lambda: (ops.noise_loss, (batch().requires_grad_(True), t, keys, ones, zeros, None)),
        "noise_loss-v": lambda: (ops.noise_loss, (batch().requires_grad_(True), t, keys, *v_coefs, batch())),
        "noise_loss_backward-eps": lambda: (ops.noise_loss_backward, (torch.tensor([1.5, -1.0], device=DEVICE), batch(), t, keys,
                                                                      ones, zeros, None)),
        "noise_loss_backward-v": lambda: (ops.noise_loss_backward, (torch.tensor([0.5, 2.0], device=DEVICE), batch(), t, keys,
                                                                    *v_coefs, batch())),
        "posterior_step": lambda: (ops.posterior_step, (batch(), batch(), t, keys, *schedule_tables(s, "fixed_large"),
                                                        False)),
        "posterior_step-clipped": lambda: (ops.posterior_step, (batch(), batch(), t, keys,
                                                                *schedule_tables(s, "fixed_small"), True)),
        "ddim_step": lambda: (ops.ddim_step, (batch(), batch(), t, t_prev, keys, s.alphas_cumprod, 0.5, False, False)),
        "ddim_step-eta0-clipped": lambda: (ops.ddim_step, (batch(), batch(), t, t_prev, keys, s.alphas_cumprod, 0.0, True, False)),
        "dpm_solver_step-sde": lambda: (ops.dpm_solver_step, (batch(), batch(), batch(), batch(), t, keys,
                                                              weights(7), 1, True, False)),
        "dpm_solver_step-clipped": lambda: (ops.dpm_solver_step, (batch(), batch(), batch(), batch(), t, keys,
                                                                  weights(7), 2, False, True)),
        "unipc_step": lambda: (ops.unipc_step, (*(batch() for _ in range(6)), weights(12), 3, False)),
        "unipc_step-clipped": lambda: (ops.unipc_step, (*(batch() for _ in range(6)), weights(12), 2, True)),
    }
    return cases[case]()


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_triton_custom_op_passes_opcheck(case):
    op, args = opcheck_case(case)
    # schema, autograd registration, the fake (meta) kernel against the real one, and AOT dispatch with dynamic shapes
    results = torch.library.opcheck(op, args)
    assert set(results) == {"test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"}
    assert all(result == "SUCCESS" for result in results.values()), results


# ----------------------------------------------------------------------------- 6. torch.compile


def ddpm_ops_in(graphs) -> set[str]:
    """The ddpm custom ops the captured graphs call (as opaque nodes, not traced into)."""
    names = set()
    for node in (node for graph in graphs for node in graph.graph.nodes):
        target = node.target.overloadpacket if isinstance(node.target, torch._ops.OpOverload) else node.target
        if isinstance(target, torch._ops.OpOverloadPacket) and target._qualified_op_name.startswith("ddpm::"):
            names.add(target._qualified_op_name.removeprefix("ddpm::"))
    return names


def test_compiled_training_step_matches_eager_without_graph_breaks():
    ops = ddpm_ops()
    torch._dynamo.reset()
    s = tables("cosine", DEVICE)
    ones, zeros = torch.ones(T, device=DEVICE), torch.zeros(T, device=DEVICE)
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 5).to(DEVICE)  # a stand-in for the UNet, acting on the last dim

    def train_step(images, flip, t, keys):
        x_t = ops.q_sample_uint8(images, flip, t, keys, s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod,
                                 torch.float32)
        return ops.noise_loss(model(x_t), t, keys, ones, zeros, None).mean()

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(train_step, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    g = torch.Generator().manual_seed(7)
    for step in range(2):  # new timesteps and keys: the same graph, no recompilation
        images = torch.randint(0, 256, (2, 3, 4, 5), generator=g, dtype=torch.uint8).to(DEVICE)
        flip = torch.tensor([True, False], device=DEVICE)
        t = torch.randint(0, T, (2,), generator=g).to(DEVICE)
        keys = noise.noise_keys(SEED, torch.tensor([2 * step, 2 * step + 1])).to(DEVICE)
        results = []
        for fn in (compiled, train_step):
            model.zero_grad()
            loss = fn(images, flip, t, keys)
            loss.backward()  # the compiled backward calls ddpm.noise_loss_backward
            results.append((loss.detach(), model.weight.grad.clone(), model.bias.grad.clone()))
        (loss_c, weight_c, bias_c), (loss_e, weight_e, bias_e) = results
        assert weight_e.abs().max() > 0
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight_c, weight_e, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bias_c, bias_e, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1
    assert ddpm_ops_in(counter.graphs) == {"q_sample_uint8", "noise_loss"}


def test_compiled_sampler_steps_match_eager_without_graph_breaks():
    ops = ddpm_ops()
    torch._dynamo.reset()
    s = tables("linear", DEVICE)
    posterior_tables = schedule_tables(s, "fixed_small")
    torch.manual_seed(1)
    model = torch.nn.Linear(4, 4).to(DEVICE)

    @torch.no_grad()
    def sample_steps(x, t, t_prev, keys):
        x = ops.posterior_step(x, model(x), t, keys, *posterior_tables, True)
        return ops.ddim_step(x, model(x), t_prev, t_prev - 50, keys, s.alphas_cumprod, 0.5, False, False)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(sample_steps, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(8)
    for step in range(2):
        x = torch.randn(2, 3, 4, 4, generator=g).to(DEVICE)
        t = torch.tensor([900 - step, 60], device=DEVICE)
        keys = noise.noise_keys(SEED, torch.tensor([2 * step, 2 * step + 1])).to(DEVICE)
        got, expected = compiled(x, t, t - 1, keys), sample_steps(x, t, t - 1, keys)
        assert got.isfinite().all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    assert ddpm_ops_in(counter.graphs) == {"posterior_step", "ddim_step"}


@pytest.mark.parametrize("solver", ["dpm++2m-sde", "unipc"])
def test_compiled_solver_steps_match_eager_without_graph_breaks(solver):
    from engine import solvers

    torch._dynamo.reset()
    kernels = resolve_kernels({op: "triton" for op in OPS}, DEVICE, check=False)
    torch.manual_seed(2)
    linear = torch.nn.Linear(4, 4).to(DEVICE)
    plan = solvers.solver_plan(tables("linear"), solver, 5, unipc_order=3)
    step = torch.no_grad()(solvers.solver_step(lambda x, t: linear(x), kernels, solver, clip_denoised=True, unipc_order=3))
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    keys = noise.noise_keys(SEED, torch.arange(2)).to(DEVICE)
    eager, graph = (x, solvers.initial_history(solver, x)), (x, solvers.initial_history(solver, x))
    weights = plan.weights.to(DEVICE, torch.float32)
    for i, t in enumerate(plan.timesteps):  # every step, warm-up and final orders included, replays one graph
        t = torch.full((2,), int(t), device=DEVICE)
        eager, graph = step(*eager[:1], t, keys, weights[i], eager[1]), compiled(*graph[:1], t, keys, weights[i], graph[1])
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    assert ddpm_ops_in(counter.graphs) == {"unipc_step" if solver == "unipc" else "dpm_solver_step"}


# ----------------------------------------------------------------------------- 7. the registry


def q_sample_inputs():
    g = torch.Generator().manual_seed(9)
    s = tables("linear")
    return (torch.randn(2, 3, 4, 4, generator=g), torch.tensor([0, 999]), noise.noise_keys(SEED, torch.arange(2)),
            s.sqrt_alphas_cumprod, s.sqrt_one_minus_alphas_cumprod)


def test_auto_resolves_to_pytorch_on_the_cpu():
    # even with the interpreter on: Triton is chosen automatically only on CUDA
    kernels = resolve_kernels({op: "auto" for op in OPS}, "cpu")
    assert kernels.names == {op: "pytorch" for op in OPS}
    assert all(getattr(kernels, op) is registry._registry[op]["pytorch"].fn for op in OPS)
    assert resolve_kernels(None, "cpu").names == kernels.names  # auto is the default


def test_auto_picks_triton_on_a_cuda_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read per call by kernels.triton_support.interpreting
    for op in OPS:  # resolution only: nothing runs on the (absent) GPU
        assert load_implementation(op, "auto", torch.device("cuda"))[0] == "triton"


def test_triton_everywhere_passes_the_start_up_check():
    kernels = resolve_kernels({op: "triton" for op in OPS}, DEVICE)
    assert kernels.names == {op: "triton" for op in OPS}
    assert "q_sample=triton" in kernels.describe()


def test_triton_off_cuda_without_the_interpreter_is_a_kernel_error_mentioning_cuda(monkeypatch):
    # The registry holds the function kernels.triton_support.triton_unavailable itself, so patching that name would
    # not reach it; it decides through interpreting(), which reads TRITON_INTERPRET on every call.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelError, match=r"^kernels\.posterior_step: 'triton' cannot run here: .*CUDA"):
        resolve_kernels({"posterior_step": "triton"}, "cpu")


def test_unknown_implementation_name_is_a_kernel_error_naming_op_and_name():
    with pytest.raises(KernelError, match=r"^kernels\.ddim_step: unknown implementation 'tritn'; choose one of auto, "):
        resolve_kernels({"ddim_step": "tritn"}, "cpu")


def test_unknown_op_in_choices_is_a_kernel_error():
    with pytest.raises(KernelError, match=r"^kernels: unknown op 'q_sampler'"):
        resolve_kernels({"q_sampler": "pytorch"}, "cpu")
    with pytest.raises(KernelError, match=r"unknown op 'q_sampler'"):
        register_kernel("q_sampler", "mine")


@pytest.mark.parametrize("path, message", [
    ("tests.no_such_module:q_sample", r"^kernels\.q_sample: cannot import 'tests\.no_such_module' .*ModuleNotFoundError"),
    (f"{PLUGINS}:no_such_function", r"^kernels\.q_sample: '.*:no_such_function': module .* has no function 'no_such_function'"),
    (f"{PLUGINS}:__doc__", r"^kernels\.q_sample: .* has no function '__doc__'"),  # there, but not callable
], ids=["missing-module", "missing-function", "not-callable"])
def test_dotted_path_to_nothing_callable_is_a_kernel_error_naming_the_op(path, message):
    with pytest.raises(KernelError, match=message):
        resolve_kernels({"q_sample": path}, "cpu")


def test_unimportable_plugin_module_is_a_kernel_error():
    with pytest.raises(KernelError, match=r"^kernels\.plugins: cannot import 'tests\.no_such_plugins'"):
        resolve_kernels({}, "cpu", plugins=["tests.no_such_plugins"])


def test_user_kernel_by_dotted_path_resolves_passes_its_check_and_runs():
    path = f"{PLUGINS}:q_sample_good"
    kernels = resolve_kernels({"q_sample": path}, "cpu")  # check=True: it passed the quick conformance check
    assert kernels.names["q_sample"] == path and kernels.names["noise_loss"] == "pytorch"
    inputs = q_sample_inputs()
    assert torch.equal(kernels.q_sample(*inputs), implementation("q_sample", "pytorch")(*inputs))


def test_registered_plugin_name_resolves_once_its_module_is_listed_under_plugins(monkeypatch):
    # a registry and module table as a fresh process has them: the plugin module not yet imported
    fresh = {op: {name: impl for name, impl in impls.items() if name in IMPLEMENTATIONS}
             for op, impls in registry._registry.items()}
    monkeypatch.setattr(registry, "_registry", fresh)
    monkeypatch.delitem(sys.modules, PLUGINS, raising=False)
    with pytest.raises(KernelError, match="unknown implementation 'plugin_good'"):
        resolve_kernels({"q_sample": "plugin_good"}, "cpu")
    kernels = resolve_kernels({"q_sample": "plugin_good"}, "cpu", plugins=[PLUGINS])
    assert kernels.names["q_sample"] == "plugin_good"
    inputs = q_sample_inputs()
    assert torch.equal(kernels.q_sample(*inputs), implementation("q_sample", "pytorch")(*inputs))


def test_start_up_check_rejects_a_user_kernel_that_returns_wrong_values():
    path = f"{PLUGINS}:q_sample_wrong_noise"
    with pytest.raises(KernelError, match=rf"^kernels\.q_sample: '{path}' failed its conformance check: .*max error"):
        resolve_kernels({"q_sample": path}, "cpu")
    assert resolve_kernels({"q_sample": path}, "cpu", check=False).names["q_sample"] == path  # check: false skips it


@pytest.mark.parametrize("path, message", [
    (f"{PLUGINS}:q_sample_crash", "crashed: RuntimeError: plugin kernel exploded"),
    (f"{PLUGINS}:q_sample_too_few_parameters", "wrong signature"),
])
def test_start_up_check_rejects_crashing_and_wrong_signature_kernels(path, message):
    with pytest.raises(KernelError, match=rf"^kernels\.q_sample: '{path}' failed its conformance check: .*{message}"):
        resolve_kernels({"q_sample": path}, "cpu")


# ----------------------------------------------------------------------------- 8. the check CLI


def check_cli(*args: str) -> subprocess.CompletedProcess:
    return run_module("kernels.check", [*args, "--device", "cpu"], cwd=ROOT, env={"PYTHONPATH": str(ROOT)}, timeout=900)


def case_lines(stdout: str) -> list[str]:
    return [line.strip() for line in stdout.splitlines() if line.strip().startswith(("PASS", "FAIL"))]


def test_check_cli_passes_a_conforming_kernel_by_dotted_path():
    result = check_cli("q_sample", f"{PLUGINS}:q_sample_good", "--quick")
    assert result.returncode == 0, result.stderr
    lines = case_lines(result.stdout)
    assert len(lines) == len(make_cases(CPU, quick=True)) + 1 and all(line.startswith("PASS") for line in lines)
    assert "3/3 passed: conforms" in result.stdout


def test_check_cli_full_run_of_a_registered_plugin_name_passes_every_case():
    result = check_cli("q_sample", "plugin_good", "--plugin", PLUGINS)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = case_lines(result.stdout)
    cases = len(make_cases(CPU)) + 1
    assert len(lines) == cases and all(line.startswith("PASS") for line in lines)
    assert "q_sample / plugin_good on cpu:" in result.stdout and f"{cases}/{cases} passed: conforms" in result.stdout


def test_check_cli_fails_a_kernel_that_returns_wrong_values():
    result = check_cli("q_sample", "plugin_wrong", "--plugin", PLUGINS, "--quick")
    assert result.returncode == 1
    failed = [line for line in case_lines(result.stdout) if line.startswith("FAIL")]
    assert failed and all("max error" in line for line in failed)
    assert "DOES NOT CONFORM" in result.stdout


def test_check_cli_reports_a_crashing_kernel_as_failed_cases_without_a_traceback():
    result = check_cli("q_sample", f"{PLUGINS}:q_sample_crash", "--quick")
    assert result.returncode == 1
    lines = case_lines(result.stdout)
    assert lines and all(line.startswith("FAIL") and "crashed: RuntimeError: plugin kernel exploded" in line
                         for line in lines)
    assert "DOES NOT CONFORM" in result.stdout and "Traceback" not in result.stdout + result.stderr


def test_check_cli_gives_a_crash_one_line_per_case():
    result = check_cli("q_sample", f"{PLUGINS}:q_sample_crash", "--quick")
    assert "second line of the message" not in result.stdout


def test_check_cli_reports_a_wrong_signature():
    result = check_cli("q_sample", f"{PLUGINS}:q_sample_too_few_parameters", "--quick")
    assert result.returncode == 1
    assert [line.split(":")[0] for line in case_lines(result.stdout)] == ["FAIL  signature"]
    assert "wrong signature: expected q_sample(x0, t, noise_keys, sqrt_alphas_cumprod" in result.stdout
    assert "DOES NOT CONFORM" in result.stdout


@pytest.mark.parametrize("args, message", [
    (("q_sampler", "pytorch"), "error: unknown op 'q_sampler'"),
    (("q_sample", "tritn"), "error: kernels.q_sample: unknown implementation 'tritn'"),
    (("q_sample", "tests.no_such_module:fn"), "error: kernels.q_sample: cannot import 'tests.no_such_module'"),
    (("q_sample", "pytorch", "--plugin", "tests.no_such_plugins"), "error: kernels.plugins: cannot import"),
], ids=["unknown-op", "unknown-implementation", "missing-module", "missing-plugin"])
def test_check_cli_exits_2_with_one_line_when_the_op_or_implementation_cannot_be_loaded(args, message):
    result = check_cli(*args, "--quick")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1


def test_triton_kernels_clamp_out_of_range_timesteps_instead_of_reading_out_of_bounds():
    """A host-side range check would sync every call, so the kernels clamp t into the tables instead."""
    table = torch.linspace(0.1, 1.0, 10, device=DEVICE)
    x_t = implementation("q_sample", "triton")(torch.ones(2, 1, 2, 2, device=DEVICE), torch.tensor([-5, 50], device=DEVICE),
                                               torch.tensor([1, 2], device=DEVICE), table, torch.zeros_like(table))
    torch.testing.assert_close(x_t.flatten(1)[:, 0].cpu(), torch.tensor([0.1, 1.0]))


def test_registering_a_taken_or_reserved_name_is_a_kernel_error():
    load_implementation("q_sample", "pytorch", CPU)  # the built-ins are registered
    with pytest.raises(KernelError, match="already registered to kernels.q_sample:reference"):
        register_kernel("q_sample", "pytorch")(lambda *args: None)
    for reserved in ("auto", "my.module:function"):
        with pytest.raises(KernelError, match="reserved"):
            register_kernel("q_sample", reserved)
