"""Shared fixtures for the throughput benchmarks (`pytest benchmarks/ --benchmark-only`).

On CUDA the benchmarks use the `cifar` preset at batch 128 in bf16; on the CPU the `tiny` preset at
small batches, so that `make test` can run each once (`--benchmark-disable`) as a smoke test.
Compare ratios within one group of one run, never absolute CPU times.
"""

import os
from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.diffusers_format import DiffusersFormatError, diffusers_unet_config
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
    """128 on CUDA, 8 on the CPU; BENCH_BATCH_SIZE overrides both (benchmarks.gpu_check runs 128 and 256)."""
    return int(os.environ.get("BENCH_BATCH_SIZE") or (128 if device.type == "cuda" else 8))


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


def skip_compiling_on_the_cpu(device, why: str) -> None:
    """A compiled variant runs on the CPU only with BENCH_COMPILE=1: Inductor's C++ builds take minutes there."""
    if device.type == "cpu" and not os.environ.get("BENCH_COMPILE"):
        pytest.skip(f"set BENCH_COMPILE=1 to compile on the CPU ({why})")


def diffusers_unet(config) -> torch.nn.Module:
    """diffusers' UNet2DModel laid out as engine.unet's UNet for `config` (engine.diffusers_format's mapping;
    for configs/cifar.yaml, the layout of google/ddpm-cifar10-32): the same blocks, widths and parameters."""
    diffusers = pytest.importorskip("diffusers")
    try:
        return diffusers.UNet2DModel.from_config(diffusers_unet_config(config))
    except DiffusersFormatError as error:
        pytest.skip(f"UNet2DModel cannot express this preset: {error}")


def pytest_terminal_summary(terminalreporter, config):
    """Ours against the diffusers baseline of the same group and run, as a ratio of medians."""
    session = getattr(config, "_benchmarksession", None)
    runs = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None) is not None]
    lines = []
    for baseline in (b for b in runs if b.extra_info.get("baseline")):
        key = baseline.extra_info["baseline"]
        for ours in (b for b in runs if b.group == baseline.group and b.extra_info.get("compare") == key):
            ratio = baseline.stats.median / ours.stats.median
            lines.append(f"{ours.name}: {ratio:.2f}x the throughput of {baseline.name}")
    if lines:
        terminalreporter.section("ours vs diffusers (same run)")
        for line in lines:
            terminalreporter.write_line(line)
