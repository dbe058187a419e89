"""Fused ops with a PyTorch reference and a Triton kernel each, behind one registry.

    q_sample.py        forward noising (float x0, or the loader's uint8 batch with flip and scaling)
    noise_loss.py      the training loss, recomputing the noise instead of storing it
    posterior_step.py  one DDPM ancestral update
    ddim_step.py       one DDIM update
    dpm_solver_step.py one multistep DPM-Solver++ update (2M, 3M, and the SDE variant)
    unipc_step.py      one UniPC corrector-predictor update
    noise.py           the in-kernel noise, specified in PyTorch (counter-based Philox)
    registry.py        choosing an implementation per op; users' kernels by dotted path or decorator
    check.py           the conformance check (`python -m kernels.check OP IMPL`)

Importing this package does not import Triton; the op modules do, when first resolved.
"""

from kernels.registry import OPS, KernelError, Kernels, register_kernel, resolve_kernels

__all__ = ["OPS", "KernelError", "Kernels", "register_kernel", "resolve_kernels"]
