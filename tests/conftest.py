"""Test-wide setup: Triton kernels run in Triton's CPU interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test module.
"""

import os
import shutil

if not (os.environ.get("CUDA_VISIBLE_DEVICES", "x") and shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")
