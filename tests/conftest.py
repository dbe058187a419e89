"""Test-wide setup: Triton kernels run in Triton's CPU interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test module.
"""

import os
import shutil

if not (os.environ.get("CUDA_VISIBLE_DEVICES", "x") and shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (`make test` runs three workers on two cores) one thread per worker and per CLI it starts:
# OpenMP threads oversubscribing the cores spin against each other and run many times slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Inductor trusts the CPU's flags for its SIMD instruction sets instead of building and loading a probe program for
# each in every new process (about 1.5 s per compiling process, 15 s with the empty cache CI starts with).
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
# Inductor compiles in the compiling process, without its pool of compile workers: a CLI forked from a worker whose
# test compiled before (tests/forked_cli.py) inherits the pool without the thread that reads its results, and its
# own compile then waits forever (seen: the compiled sampling test, then the compiled two-rank run, in one worker).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


import pytest  # noqa: E402 (after TRITON_INTERPRET, which must come first)


def pytest_addoption(parser):
    parser.addoption("--regenerate-golden", action="store_true",
                     help="rewrite tests/golden/*.json (test_golden.py, test_ahead_of_time.py) instead of "
                          "comparing with them")


def pytest_configure(config):
    import torch
    import torch._inductor.config

    if os.environ.get("PYTEST_XDIST_WORKER"):  # in case torch was imported before OMP_NUM_THREADS was set
        torch.set_num_threads(1)
    # Scalar C++ kernels when a test compiles on the CPU (here and in the CLIs it forks): they compile about a fifth
    # faster than vectorised ones. The tests hold our graphs to eager (no graph breaks, the same numbers);
    # vectorising them is Inductor's own concern, and on a GPU the kernels are Triton's anyway.
    torch._inductor.config.cpp.simdlen = 0
    torch._inductor.config.compile_threads = 1  # read from the environment above unless torch came in earlier


@pytest.fixture(scope="module")
def shapes16(tmp_path_factory):
    """A small procedural data set: 64 16x16 RGB shapes in 4 shards (the end-to-end tests train on it)."""
    from engine.data.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "shapes16"
    prepare("shapes", out, shard_size=16, num=64, image_size=16, channels=3, seed=0, progress=False)
    return out


def pytest_collection_modifyitems(items):
    """The slow end-to-end tests first (a stable sort keeps the rest in collection order): `make test` runs two
    pytest-xdist workers, and a long test handed out last would make the suite's tail."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
