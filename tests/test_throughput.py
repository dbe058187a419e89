"""Throughput accounting: the UNet's counted FLOPs, the GPU peak table, MFU and the interval metrics."""

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import throughput
from engine.config import load_config
from engine.throughput import (count_flops_per_image, interval_metrics, mfu, model_flops_per_image,
                               peak_bf16_flops, peak_bf16_flops_for_name, progress_fields)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# The project notes' figures for the DDPM CIFAR-10 UNet, per 32x32 image. They leave out attention's two
# matmuls (q k^T and weights v): counted on the CPU, where SDPA runs a fused kernel FlopCounterMode has
# no formula for.
NOTES_FORWARD_FLOPS = 12.1e9
NOTES_TRAINING_FLOPS = 36.3e9
# Those two matmuls, 2 x 2 L^2 C FLOPs per attention block over L positions of C channels: five blocks at
# 16x16 (two down, three up) with C = 256, and the middle block's at 4x4.
ATTENTION_FORWARD_FLOPS = 5 * 4 * (16 * 16) ** 2 * 256 + 4 * (4 * 4) ** 2 * 256


@pytest.fixture(scope="module")
def cifar_config():
    return load_config(CONFIGS / "cifar.yaml")


@pytest.fixture(scope="module")
def tiny_config():
    return load_config(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def cifar_flops(cifar_config):
    return {"forward": model_flops_per_image(cifar_config, backward=False),
            "training": model_flops_per_image(cifar_config)}


def test_cifar_unet_forward_costs_the_notes_12_1_gflop_plus_attention(cifar_flops):
    without_attention = cifar_flops["forward"] - ATTENTION_FORWARD_FLOPS
    assert without_attention == pytest.approx(NOTES_FORWARD_FLOPS, rel=0.02)
    assert cifar_flops["forward"] == pytest.approx(12.44e9, rel=0.001)


def test_cifar_unet_training_step_costs_the_notes_36_3_gflop_plus_attention(cifar_flops):
    # backward = two matmuls per forward matmul (input and weight gradients), attention's included
    without_attention = cifar_flops["training"] - 3 * ATTENTION_FORWARD_FLOPS
    assert without_attention == pytest.approx(NOTES_TRAINING_FLOPS, rel=0.02)
    assert cifar_flops["training"] == pytest.approx(37.32e9, rel=0.001)
    # a shade under 3x: the first conv computes no input gradient (x_t needs none)
    assert 2.99 < cifar_flops["training"] / cifar_flops["forward"] < 3.0


def test_flops_per_image_do_not_depend_on_batch_size(tiny_config):
    one = model_flops_per_image(tiny_config, batch_size=1)
    assert one > 0
    for batch_size in (2, 5):
        assert model_flops_per_image(tiny_config, batch_size=batch_size) == pytest.approx(one, rel=1e-12)


class _SelfAttention(nn.Module):
    """Only an SDPA call: its FLOPs are exactly the closed form's."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x, timesteps):
        # (B, 1 head, H*W, C), contiguous: the layout for which the CPU picks its fused kernel
        tokens = (x.flatten(2).transpose(1, 2)[:, None] * self.scale).contiguous()
        return F.scaled_dot_product_attention(tokens, tokens, tokens)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_sdpa_attention_is_counted_on_meta_and_on_real_cpu_tensors(device):
    channels, size = 8, 6
    model = _SelfAttention().to(device)
    length = size * size
    forward = 4 * length**2 * channels  # q k^T and weights v, 2 L^2 C each
    assert count_flops_per_image(model, (channels, size, size), backward=False) == forward
    assert count_flops_per_image(model, (channels, size, size)) == 3 * forward


def test_counting_runs_on_meta_with_any_attention_backend_and_warns_nothing(tiny_config):
    # xformers has no meta (or CPU) kernels: counting must not fall back with a warning, nor count differently
    xformers = load_config(CONFIGS / "tiny.yaml", ["model.attention_backend=xformers"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_flops_per_image(xformers) == model_flops_per_image(tiny_config)


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L40S", 362), ("NVIDIA L4", 121),
    ("NVIDIA GeForce RTX 4090", 165),
    ("NVIDIA H100 NVL", None), ("NVIDIA H200 NVL", None),  # lower clocks, no verified figure: unknown
    ("NVIDIA L40", None),  # not an L4
    ("NVIDIA GeForce RTX 3090", None), ("Tesla T4", None),
])
def test_peak_bf16_flops_are_looked_up_from_the_device_name(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    expected = None if tflops is None else tflops * 1e12
    assert peak_bf16_flops("cuda") == expected
    assert peak_bf16_flops_for_name(name) == expected


def test_cpu_has_no_peak_and_no_peak_memory(monkeypatch):
    def no_gpu(*args, **kwargs):
        raise AssertionError("asked CUDA about a CPU")

    monkeypatch.setattr(torch.cuda, "get_device_name", no_gpu)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", no_gpu)
    assert peak_bf16_flops("cpu") is None
    assert throughput.peak_memory_gb("cpu") is None


def test_mfu_is_achieved_model_flops_over_the_peak_of_all_devices():
    # 37.3 GFLOP x 10,000 images/s = 373 TFLOP/s achieved; one H100 SXM peaks at 989
    assert mfu(37.3e9, 10_000, 1, 989e12) == pytest.approx(373 / 989)
    # eight times the devices for eight times the throughput: the same utilisation
    assert mfu(37.3e9, 80_000, 8, 989e12) == pytest.approx(373 / 989)
    assert mfu(37.3e9, 10_000, 2, 989e12) == pytest.approx(373 / 989 / 2)


def test_interval_metrics_for_a_synthetic_interval(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3_500_000_000)
    metrics = interval_metrics(steps=100, images=12_800, seconds=4.0, data_wait_seconds=1.0, world_size=2,
                               flops_per_image=37.3e9, peak_flops_per_device=989e12, device="cuda")
    assert metrics == {
        "images_per_sec": pytest.approx(3200.0),
        "step_time_sec": pytest.approx(0.04),
        "data_wait_fraction": pytest.approx(0.25),
        "peak_memory_gb": pytest.approx(3.5),
        "mfu": pytest.approx(37.3e9 * 3200 / (2 * 989e12)),
    }
    assert progress_fields(metrics) == {"img_s": "3200", "wait": "25%", "mfu": "6.0%", "mem": "3.5G"}


def test_interval_metrics_leave_unknowns_as_none_on_a_cpu():
    metrics = interval_metrics(steps=10, images=80, seconds=2.0, data_wait_seconds=2.5, world_size=1,
                               flops_per_image=0.4e9, peak_flops_per_device=None, device="cpu")
    assert metrics["images_per_sec"] == pytest.approx(40.0)
    assert metrics["step_time_sec"] == pytest.approx(0.2)
    assert metrics["data_wait_fraction"] == 1.0  # clock jitter can make the wait exceed the interval
    assert metrics["peak_memory_gb"] is None and metrics["mfu"] is None
    assert progress_fields(metrics) == {"img_s": "40", "wait": "100%"}


@pytest.mark.parametrize("steps, seconds", [(0, 1.0), (5, 0.0)])
def test_an_empty_interval_is_an_error(steps, seconds):
    with pytest.raises(ValueError, match="steps > 0 and seconds > 0"):
        interval_metrics(steps=steps, images=0, seconds=seconds, data_wait_seconds=0.0, world_size=1,
                         flops_per_image=1.0, peak_flops_per_device=None, device="cpu")
