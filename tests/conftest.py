"""Test-wide setup: Triton kernels run in Triton's CPU interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test module.
"""

import os
import shutil

if not (os.environ.get("CUDA_VISIBLE_DEVICES", "x") and shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402 (after TRITON_INTERPRET, which must come first)


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    """A small procedural data set: 64 16x16 RGB shapes in 4 shards (the end-to-end tests train on it)."""
    from engine.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "shapes16"
    prepare("shapes", out, shard_size=16, num=64, image_size=16, channels=3, seed=0, progress=False)
    return out
