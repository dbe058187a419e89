"""Which implementation runs each op: built-in names, user kernels by dotted path or decorator.

An implementation is any callable with the op's positional signature (`op_spec(op).signature`,
also in each op module's docstring). The engine resolves the choice once, when the model is built, into a `Kernels` set;
nothing looks an implementation up per call.

    kernels: {q_sample: auto, posterior_step: my_package.my_module:my_function}

`auto` is Triton on CUDA and PyTorch elsewhere; `pytorch` and `triton` are the built-ins; a name
registered with `@register_kernel(op, name)` in a module listed under `kernels.plugins` works too.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from kernels.conformance import run_conformance
# defined in kernels/ops.py; engine/ and users import OPS, KernelError and op_spec from here
from kernels.ops import OPS, KernelError, describe, op_spec


@dataclass(frozen=True)
class Implementation:
    fn: Callable
    unavailable: Callable[[torch.device], str | None] = lambda device: None  # why it cannot run there


_registry: dict[str, dict[str, Implementation]] = {op: {} for op in OPS}


def register_kernel(op: str, name: str, *, unavailable: Callable[[torch.device], str | None] | None = None):
    """Decorator: make `fn` selectable as `kernels.<op>: <name>` (and in `python -m kernels.check`)."""
    if op not in OPS:
        raise KernelError(f"cannot register {name!r}: unknown op {op!r}; ops are {', '.join(OPS)}")

    if not name or name == "auto" or ":" in name:
        raise KernelError(f"cannot register {name!r} for {op}: 'auto' and names with ':' are reserved")

    def decorate(fn: Callable) -> Callable:
        existing = _registry[op].get(name)
        if existing is not None and describe(existing.fn) != describe(fn):  # re-importing a module is fine
            raise KernelError(f"kernels.{op}: {name!r} is already registered to {describe(existing.fn)}; "
                              f"choose another name for {describe(fn)}")
        _registry[op][name] = Implementation(fn, unavailable or (lambda device: None))
        return fn

    return decorate


def import_plugins(modules: list[str] | tuple[str, ...]) -> None:
    """Import the modules whose @register_kernel decorators add user kernels."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as error:  # any failure in user code becomes one line
            raise KernelError(f"kernels.plugins: cannot import {module!r}: {type(error).__name__}: {error}") from None


def load_implementation(op: str, choice: str, device: torch.device) -> tuple[str, Callable]:
    """(resolved name, callable) for `kernels.<op>: <choice>` on `device`, or a KernelError saying why not."""
    op_spec(op)  # importing the op's module registers the built-ins
    available = _registry[op]
    if choice == "auto":
        triton = available.get("triton")
        choice = "triton" if device.type == "cuda" and triton and not triton.unavailable(device) else "pytorch"
    if ":" in choice:
        return choice, _import_callable(op, choice)
    if choice not in available:
        known = ", ".join(["auto", *sorted(available)])
        raise KernelError(f"kernels.{op}: unknown implementation {choice!r}; choose one of {known}, "
                          f"or name your own as package.module:function")
    reason = available[choice].unavailable(device)
    if reason:
        raise KernelError(f"kernels.{op}: {choice!r} cannot run here: {reason}")
    return choice, available[choice].fn


def _import_callable(op: str, path: str) -> Callable:
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise KernelError(f"kernels.{op}: cannot import {module_name!r} for {path!r}: {type(error).__name__}: {error}") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise KernelError(f"kernels.{op}: {path!r}: module {module_name!r} has no function {attribute!r}")
    return fn


@dataclass(frozen=True)
class Kernels:
    """The implementation chosen for every op, resolved once; `names` records the choices.

    One field per op, spelled out for type checkers, in the order of `OPS` (tests/test_name_lists.py)."""

    q_sample: Callable
    q_sample_uint8: Callable
    noise_loss: Callable
    posterior_step: Callable
    ddim_step: Callable
    dpm_solver_step: Callable
    unipc_step: Callable
    names: dict[str, str]

    def describe(self) -> str:
        return ", ".join(f"{op}={self.names[op]}" for op in OPS)


def resolve_kernels(choices: Mapping[str, str] | None = None, device: torch.device | str = "cpu", *,
                    plugins: list[str] | tuple[str, ...] = (), check: bool = True) -> Kernels:
    """Resolve every op's choice (default `auto`) for `device`.

    With `check`, every implementation other than the PyTorch reference first passes the quick
    conformance check on `device`, so a broken kernel stops the run before its first step.
    """
    device = torch.device(device)
    choices = dict(choices or {})
    unknown = sorted(set(choices) - set(OPS))
    if unknown:
        raise KernelError(f"kernels: unknown op {unknown[0]!r}; ops are {', '.join(OPS)}")
    import_plugins(plugins)
    resolved: dict[str, Callable] = {}
    names: dict[str, str] = {}
    for op in OPS:
        names[op], resolved[op] = load_implementation(op, choices.get(op, "auto"), device)
        if check and names[op] != "pytorch":
            report = run_conformance(op, resolved[op], device, quick=True)
            if not report.passed:
                raise KernelError(f"kernels.{op}: {names[op]!r} failed its conformance check: {report.first_failure()}")
    return Kernels(**resolved, names=names)


def resolve_kernels_from_config(config, device: torch.device | str, check: bool | None = None) -> Kernels:
    """A run config's `kernels` section resolved for `device`, once; checked as `kernels.check` says unless
    `check` is given."""
    choices = {op: getattr(config.kernels, op) for op in OPS}
    return resolve_kernels(choices, device, plugins=config.kernels.plugins,
                           check=config.kernels.check if check is None else check)
