"""Fused ops with a PyTorch reference and a Triton kernel each, behind one registry.

    q_sample.py        forward noising (float x0, or the loader's uint8 batch with flip and scaling)
    noise_loss.py      the training loss, recomputing the noise instead of storing it
    posterior_step.py  one DDPM ancestral update
    ddim_step.py       one DDIM update
    dpm_solver_step.py one multistep DPM-Solver++ update (2M, 3M, and the SDE variant)
    unipc_step.py      one UniPC corrector-predictor update
    noise.py           the in-kernel noise, specified in PyTorch (counter-based Philox)
    ops.py             the op names (`OPS`, the one list), the module and specification of each
    registry.py        choosing an implementation per op; users' kernels by dotted path or decorator
    conformance.py     the conformance check's cases and verdicts, on schedule_tables.py's coefficients
    check.py           the conformance check from the command line (`python -m kernels.check OP IMPL`)

Nothing here imports engine/ (tests/test_module_boundaries.py). Importing this package does not
import Triton; the op modules do, when first resolved.
"""

from kernels.ops import OPS, KernelError
from kernels.registry import Kernels, register_kernel, resolve_kernels

__all__ = ["OPS", "KernelError", "Kernels", "register_kernel", "resolve_kernels"]
