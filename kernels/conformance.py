"""The conformance check every implementation of an op must pass, ours and users' alike.

Each case calls the implementation on random shapes, dtypes (float32, bfloat16, float16), per-sample
timesteps and noise keys, some with non-contiguous inputs, and compares every output with the op's
PyTorch reference evaluated in float64 on the same inputs (the in-kernel noise is specified by
`kernels.noise`, so it is part of what is compared). It also checks the output's shape and dtype,
that the inputs are left unchanged, and that the same inputs give bit-identical outputs. A crash or
a wrong signature is a failed case with a verdict, not a traceback. `python -m kernels.check` runs it
from the command line; the registry runs its quick form at start-up.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from kernels.ops import describe, op_spec
from kernels.schedule_tables import cosine_betas, linear_betas, schedule_tables

# Largest error allowed against the float64 reference, relative to the output's largest magnitude.
# float32 leaves room for float32 log/cos in the noise and for cancellation in x0 = (x_t - s eps) / a;
# half precision, for rounding the output.
TOLERANCE = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(2, 3, 8, 8), (3, 1, 5, 7), (1, 2, 3, 4, 5), (5, 7), (2, 3, 32, 32)]
QUICK_SHAPES = [(2, 3, 4, 4), (3, 1, 5, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUM_TIMESTEPS = 1000
# The cases' schedules: the paper's linear betas, and cosine, whose abar_T (about 2e-9) makes 1 / sqrt(abar_t)
# pass 2e4 and whose capped last beta makes 1 / sqrt(alpha_t) 31.6: they test the ops' cancellation in
# x0 = (x_t - s eps) / a and the posterior step's largest coefficients
SCHEDULE_BETAS = {"linear": linear_betas, "cosine": cosine_betas}


@dataclass
class Case:
    """One set of inputs. Ops draw their tensors from it in a fixed order, so cases are reproducible."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    contiguous: bool
    schedule_name: str
    device: torch.device
    generator: torch.Generator = field(repr=False)

    def __post_init__(self):
        betas = SCHEDULE_BETAS[self.schedule_name](NUM_TIMESTEPS)
        self.schedule = schedule_tables(betas).to(self.device, torch.float32)
        batch = self.shape[0]
        t = torch.randint(0, NUM_TIMESTEPS, (batch,), generator=self.generator)
        t[0] = NUM_TIMESTEPS - 1 if self.index % 2 else 0  # both ends of the chain appear
        if batch > 1:
            t[-1] = 0 if self.index % 2 else NUM_TIMESTEPS - 1
        self.t = t.to(self.device)
        stride = torch.randint(1, 100, (batch,), generator=self.generator)
        self.t_prev = (t - stride).clamp_min(-1).to(self.device)  # -1: the last DDIM step, to the data
        self.noise_keys = torch.randint(-2**62, 2**62, (batch,), generator=self.generator).to(self.device)

    @property
    def label(self) -> str:
        layout = "" if self.contiguous else " non-contiguous"
        return f"{str(self.dtype).removeprefix('torch.')} {tuple(self.shape)} {self.schedule_name}{layout}"

    def option(self, *choices):
        """An op-specific option (clipping, variance, eta...), cycled over the cases."""
        return choices[self.index % len(choices)]

    def batch(self, scale: float = 1.0) -> torch.Tensor:
        """A floating batch of the case's shape and dtype; non-contiguous when the case says so."""
        if self.contiguous:
            values = torch.randn(self.shape, generator=self.generator)
        else:  # the same shape, seen through a transpose of the last two dims (or a stride-2 slice)
            if len(self.shape) > 2:
                values = torch.randn(*self.shape[:-2], self.shape[-1], self.shape[-2], generator=self.generator).transpose(-1, -2)
            else:
                values = torch.randn(self.shape[0], 2 * self.shape[1], generator=self.generator)[:, ::2]
        return (values * scale).to(self.device, self.dtype)

    def weights(self, count: int) -> torch.Tensor:
        """A solver step's weights (the ops take any): `count` floats in [-1.5, 1.5), float32 on the device."""
        values = torch.rand(count, generator=self.generator, dtype=torch.float64) * 3 - 1.5
        return values.to(self.device, torch.float32)

    def images(self) -> torch.Tensor:
        return torch.randint(0, 256, self.shape, generator=self.generator, dtype=torch.uint8).to(self.device)

    def flip(self) -> torch.Tensor:
        return (torch.rand(self.shape[0], generator=self.generator) < 0.5).to(self.device)


def make_cases(device: torch.device, quick: bool = False, seed: int = 0) -> list[Case]:
    generator = torch.Generator().manual_seed(seed)
    if quick:
        plan = [(shape, torch.float32, index % 2 == 1) for index, shape in enumerate(QUICK_SHAPES)]
    else:
        plan = [(shape, dtype, False) for shape in SHAPES for dtype in DTYPES]
        plan += [(shape, torch.float32, True) for shape in SHAPES[:4]] + [(SHAPES[0], torch.bfloat16, True)]
    return [Case(index, shape, dtype, not non_contiguous, tuple(SCHEDULE_BETAS)[index % 2], device, generator)
            for index, (shape, dtype, non_contiguous) in enumerate(plan)]


@dataclass
class CaseResult:
    label: str
    passed: bool
    detail: str


@dataclass
class Report:
    op: str
    implementation: str
    results: list[CaseResult]

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)

    def first_failure(self) -> str:
        failed = next(result for result in self.results if not result.passed)
        return f"{failed.label}: {failed.detail}"


def _evaluate(spec, fn, args) -> dict[str, torch.Tensor]:
    if spec.evaluate is not None:
        return spec.evaluate(fn, args)
    return {"output": fn(*args)}


def _float64(args: tuple) -> tuple:
    def convert(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value.to(torch.float64)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return torch.float64
        return value

    return tuple(convert(value) for value in args)


def _clone(args: tuple) -> tuple:
    return tuple(value.clone() if isinstance(value, torch.Tensor) else value for value in args)


def _crash_verdict(error: Exception) -> str:
    """One line for a kernel that raised: the exception's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"crashed: {type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _signature_problem(spec, fn) -> str | None:
    """Why `fn` cannot be called with the op's positional arguments, or None (also when it cannot tell)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    count = len(inspect.signature(spec.reference).parameters)
    try:
        signature.bind(*range(count))
    except TypeError as error:
        return f"wrong signature: expected {spec.signature}; {describe(fn)} has {signature} ({error})"
    return None


def _compare(name: str, got, expected: torch.Tensor, native: torch.Tensor) -> tuple[bool, str]:
    if not isinstance(got, torch.Tensor):
        return False, f"{name}: returned {type(got).__name__}, expected a tensor"
    if tuple(got.shape) != tuple(native.shape) or got.dtype != native.dtype:
        return False, (f"{name}: returned {str(got.dtype).removeprefix('torch.')} {tuple(got.shape)}, "
                       f"expected {str(native.dtype).removeprefix('torch.')} {tuple(native.shape)}")
    if got.device != native.device:
        return False, f"{name}: returned a tensor on {got.device}, expected {native.device}"
    tolerance = TOLERANCE[got.dtype]
    if not got.numel():
        return True, f"{name}: empty, as expected"
    scale = max(expected.abs().max().item(), 1e-30)
    worst = ((got.double() - expected).abs().max().item() / scale)
    worst = float("inf") if worst != worst else worst  # NaN fails
    verdict = f"{name} max error {worst:.1e} (tolerance {tolerance:.0e})"
    return worst <= tolerance, verdict


def run_case(spec, fn, case: Case) -> CaseResult:
    args = spec.make_args(case)
    before = _clone(args)
    try:
        outputs = _evaluate(spec, fn, args)
    except Exception as error:  # the verdict for a kernel that crashes
        return CaseResult(case.label, False, _crash_verdict(error))
    expected = _evaluate(spec, spec.reference, _float64(before))
    native = _evaluate(spec, spec.reference, _clone(before))
    details = []
    passed = True
    for name in native:
        ok, detail = _compare(name, outputs.get(name), expected[name], native[name])
        passed &= ok
        details.append(detail)
    for position, (old, new) in enumerate(zip(before, args)):
        if isinstance(old, torch.Tensor) and not torch.equal(old, new.detach()):
            passed = False
            details.append(f"modified its input argument {position}")
    return CaseResult(case.label, passed, "; ".join(details))


def run_conformance(op: str, fn, device: torch.device | str, *, quick: bool = False) -> Report:
    """Run `fn` as an implementation of `op` through every case; never raises for a faulty kernel."""
    device = torch.device(device)
    spec = op_spec(op)
    problem = _signature_problem(spec, fn)
    if problem:
        return Report(op, describe(fn), [CaseResult("signature", False, problem)])
    cases = make_cases(device, quick)
    results = [run_case(spec, fn, case) for case in cases]
    results.append(_determinism(spec, fn, cases[0]))
    return Report(op, describe(fn), results)


def _determinism(spec, fn, case: Case) -> CaseResult:
    label = f"{case.label} twice"
    case = Case(case.index, case.shape, case.dtype, case.contiguous, case.schedule_name, case.device,
                torch.Generator().manual_seed(1))
    args = spec.make_args(case)
    try:
        first, second = _evaluate(spec, fn, _clone(args)), _evaluate(spec, fn, _clone(args))
    except Exception as error:
        return CaseResult(label, False, _crash_verdict(error))
    same = all(isinstance(first[name], torch.Tensor) and torch.equal(first[name], second[name]) for name in first)
    return CaseResult(label, same, "same inputs, bit-identical outputs" if same else "same inputs gave different outputs")
