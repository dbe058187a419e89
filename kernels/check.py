"""The conformance check from the command line (the cases are kernels/conformance.py's).

    python -m kernels.check q_sample my_package.my_module:my_function
    python -m kernels.check posterior_step triton
    python -m kernels.check all triton --plugin my_package.kernels

Every output is compared with the op's PyTorch reference evaluated in float64 on the same inputs, over
random shapes, dtypes, timesteps, noise keys and layouts; the output's shape, dtype and determinism,
and that the inputs are left unchanged, are checked too. Exit status: 0 all passed, 1 a case failed,
2 the op or implementation could not be loaded.

On a machine without a CUDA device the Triton kernels run in Triton's interpreter (this command
sets TRITON_INTERPRET=1 before Triton is imported), which is slow but exact.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from kernels.conformance import make_cases, run_conformance
from kernels.registry import OPS, KernelError, import_plugins, load_implementation

__all__ = ["main", "make_cases", "run_conformance"]  # the cases stay importable from here, as before the split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("op", help=f"one of {', '.join(OPS)}, or all")
    parser.add_argument("implementation", help="pytorch, triton, a registered name, or package.module:function")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (its @register_kernel decorators add names); repeatable")
    parser.add_argument("--quick", action="store_true", help="two small float32 cases (the start-up check)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter here
    ops = OPS if args.op == "all" else (args.op,)
    failed = False
    try:
        import_plugins(args.plugin)
        for op in ops:
            name, fn = load_implementation(op, args.implementation, device)
            report = run_conformance(op, fn, device, quick=args.quick)
            print(f"{op} / {name} on {device}:")
            for result in report.results:
                print(f"  {'PASS' if result.passed else 'FAIL'}  {result.label}: {result.detail}")
            passed = sum(result.passed for result in report.results)
            print(f"  {passed}/{len(report.results)} passed: {'conforms' if report.passed else 'DOES NOT CONFORM'}")
            failed |= not report.passed
    except KernelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
