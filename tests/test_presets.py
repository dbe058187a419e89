"""The 64 and 256 px presets (issue 27): their source models' exact parameter counts, a few training steps, and the
memory estimate `--dry-run` prints (engine/memory.py), held to what a real CPU forward keeps."""

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.profiler import ProfilerActivity, profile

from engine.config import load_config
from engine.data.shapes import make_shape_image
from engine.distributed import DistributedContext
from engine.memory import GIB, activation_bytes, estimate_memory, per_gpu_batch, saved_bytes
from engine.trainer import build_trainer, train_step
from engine.unet import UNet, build_unet, count_parameters
from test_train_cli import ROOT

CPU = DistributedContext(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
SMALL = dict(image_size=16, in_channels=3, out_channels=3, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
             attention_resolutions=(8,), dropout=0.3)


def preset(name, *overrides):
    return load_config(ROOT / "configs" / f"{name}.yaml", list(overrides))


@pytest.mark.parametrize("name, parameters", [("ddpm-256", 113_673_219), ("celeba64", 78_700_803)])
def test_each_preset_has_its_source_models_exact_parameter_count(name, parameters):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        assert count_parameters(build_unet(preset(name), "meta")) == parameters


@pytest.mark.parametrize("name, base_channels, steps", [("celeba64", 16, 2), ("ddpm-256", 8, 1)])
def test_each_preset_trains_at_batch_2_on_shapes_of_its_size(name, base_channels, steps):
    """At reduced width, model.base_channels 16 (celeba64) and 8 (ddpm-256), and one step at 256 px: full width
    takes minutes a step on 2 cores. The preset's depth, multipliers, attention, image size and recipe otherwise."""
    config = preset(name, f"model.base_channels={base_channels}", "train.batch_size=2", "data.path=unused")
    torch.manual_seed(0)
    trainer = build_trainer(config, CPU)
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(make_shape_image(rng, config.data.image_size, 3)[0].copy()).permute(2, 0, 1)
                          for _ in range(2)])
    start = [p.detach().clone() for p in trainer.model.parameters()]
    for step in range(steps):
        stats = train_step(trainer, step, lambda: {"image": images, "skipped": 0})
        assert bool(stats.finite) and torch.isfinite(stats.loss), step
    assert any(not torch.equal(p, s) for p, s in zip(trainer.model.parameters(), start))


def test_checkpointing_keeps_less_per_image_and_the_256_preset_needs_it_at_batch_64_on_80_gb():
    estimate = estimate_memory(preset("ddpm-256"))
    per_image = {mode: activations.per_image for mode, activations in estimate.activations.items()}
    assert per_image["all"] < per_image["resblocks"] < 0.5 * per_image["none"], per_image
    assert estimate.state_bytes == 4 * 113_673_219 * 5  # fp32 weights, gradients, 2 Adam moments, 1 EMA
    assert estimate.total_bytes("resblocks", 64) < 80 * GIB < estimate.total_bytes("none", 64)
    assert estimate.largest_batch("none", 80) >= 8  # the paper's 8 per TPU core fits an 80 GB card as it is


def test_the_activation_bytes_grow_linearly_with_the_batch_and_cuda_keeps_groupnorm_in_float32():
    torch.manual_seed(0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = UNet(**SMALL)
        held = {batch: activation_bytes(model, batch, 16, 3, torch.bfloat16, "cuda") for batch in (1, 2, 5)}
        cpu_policy = activation_bytes(model, 2, 16, 3, torch.bfloat16, "cpu")
    for mode in ("none", "resblocks", "all"):
        assert held[5][mode] - held[1][mode] == 4 * (held[2][mode] - held[1][mode]), mode
    assert held[2]["none"] > 1.2 * cpu_policy["none"]  # fp32 norm inputs and SiLU inputs, where the CPU keeps bf16


def kept_by_a_real_forward(model, inputs, dtype) -> int:
    """Bytes a real CPU forward leaves allocated (the profiler's allocation counts), less its output."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(*inputs)
    allocated = sum(event.cpu_memory_usage for event in profiler.events() if event.cpu_parent is None)
    return allocated - out.untyped_storage().nbytes()


@pytest.mark.parametrize("mode, dtype", [("none", torch.float32), ("all", torch.bfloat16)])
def test_the_fake_measurement_agrees_with_the_memory_a_real_cpu_forward_keeps(mode, dtype):
    torch.manual_seed(0)
    model = UNet(**SMALL, activation_checkpointing=mode)
    real = kept_by_a_real_forward(model, (torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,))), dtype)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake, _ = saved_bytes(model, (torch.randn(4, 3, 16, 16), torch.randint(0, 1000, (4,))), dtype, "cpu")
    assert fake == pytest.approx(real, rel=0.1)


def test_the_per_gpu_batch_divides_by_the_world_size_and_the_accumulation(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert per_gpu_batch(preset("ddpm-256", "train.grad_accum_steps=2")) == 4


def test_the_dry_run_prints_the_memory_table_labelled_as_an_estimate(shapes16, capsys):
    from engine.train import dry_run

    assert dry_run(preset("tiny", f"data.path={shapes16}")) == 0
    printed = capsys.readouterr().out
    assert "estimated: activations measured on the CPU with fake tensors" in printed
    assert "extrapolated linearly" in printed and "most images per GPU in 24/40/80 GB" in printed
    assert all(f"#   {mode}" in printed for mode in ("none *", "resblocks", "all"))
