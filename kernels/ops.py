"""The fused ops: their names, the module that specifies each, and what a specification holds.

`OPS` is the one list of op names. The `Kernels` set (kernels/registry.py) and the config's `kernels`
section (engine/config.py) spell the names out as typed fields; tests/test_name_lists.py holds them
to this list. Nothing here imports an op module until its specification is asked for.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

# op -> the module holding its PyTorch reference, its Triton kernel and its `SPECS`, in report order
OP_MODULES = {"q_sample": "kernels.q_sample", "q_sample_uint8": "kernels.q_sample", "noise_loss": "kernels.noise_loss",
              "posterior_step": "kernels.posterior_step", "ddim_step": "kernels.ddim_step",
              "dpm_solver_step": "kernels.dpm_solver_step", "unipc_step": "kernels.unipc_step"}
OPS = tuple(OP_MODULES)


class KernelError(ValueError):
    """A kernel choice that cannot be used: names the op and the implementation (exit status 2)."""


@dataclass(frozen=True)
class OpSpec:
    """What an op is: its positional signature, its PyTorch reference, and how the check calls it."""

    signature: str
    reference: Callable
    make_args: Callable  # conformance case -> positional arguments
    evaluate: Callable | None = None  # (fn, args) -> named outputs; default {"output": fn(*args)}


def op_spec(op: str) -> OpSpec:
    """The op's specification, from the module that also holds its Triton kernel (imported on first use)."""
    if op not in OPS:
        raise KernelError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    return importlib.import_module(OP_MODULES[op]).SPECS[op]


def describe(fn) -> str:
    """module:qualname for a function, as a user would name it; repr for anything else."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    return f"{module}:{name}" if module and name else repr(fn)
