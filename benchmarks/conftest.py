"""Shared fixtures for the throughput benchmarks (`pytest benchmarks/ --benchmark-only`).

On CUDA the benchmarks use the `cifar` preset at batch 128 in bf16; on the CPU the `tiny` preset at
small batches, so that `make test` can run each once (`--benchmark-disable`) as a smoke test.
Compare ratios within one group of one run, never absolute CPU times.
"""

from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.schedule import NoiseSchedule, schedule_from_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture(scope="session")
def bench_config(device):
    preset = "cifar" if device.type == "cuda" else "tiny"
    return load_config(ROOT / "configs" / f"{preset}.yaml", ["model.dropout=0.0"])


@pytest.fixture(scope="session")
def batch_size(device) -> int:
    return 128 if device.type == "cuda" else 8


@pytest.fixture(scope="session")
def schedule(bench_config, device) -> NoiseSchedule:
    return schedule_from_config(bench_config.diffusion).to(device)


def synchronized(fn, device):
    """Wrap `fn` so each timed call waits for the GPU to finish."""
    if device.type != "cuda":
        return fn

    def run(*args, **kwargs):
        result = fn(*args, **kwargs)
        torch.cuda.synchronize()
        return result

    return run
