"""The DDPM UNet: the paper's parameter count, shapes, conditioning, backends and a single compiled graph."""

import dataclasses

import pytest
import torch

from engine import attention as attention_module
from engine.config import Config
from engine.unet import UNet, build_unet, count_parameters

SMALL = dict(image_size=28, in_channels=1, out_channels=1, base_channels=32, channel_mult=(1, 2, 2),
             num_res_blocks=2, attention_resolutions=(14, 7))
TINY = dict(image_size=8, in_channels=3, out_channels=3, base_channels=32, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(4,), dropout=0.0)


def _perturbed(model: UNet, seed: int = 0) -> UNet:
    """The reference zero-inits every residual branch and the output conv, so a fresh model outputs 0
    whatever its input; nudge all weights so that the tests see a function of x and t."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.05)
    return model.eval()


def _inputs(config: dict, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], config["image_size"], config["image_size"], generator=g)
    return x, torch.randint(0, 1000, (batch,), generator=g)


def test_cifar10_preset_has_the_papers_35_7m_parameters():
    model = UNet(image_size=32, in_channels=3, out_channels=3, base_channels=128, channel_mult=(1, 2, 2, 2),
                 num_res_blocks=2, attention_resolutions=(16,), dropout=0.1)
    assert round(count_parameters(model) / 1e6, 1) == 35.7
    assert model.downsample_factor == 8


def test_fresh_model_outputs_zero_like_the_reference():
    torch.manual_seed(0)
    model = UNet(**SMALL).eval()
    x, t = _inputs(SMALL)
    assert torch.count_nonzero(model(x, t)) == 0


def test_output_has_the_input_shape_and_eval_is_deterministic():
    torch.manual_seed(0)
    model = _perturbed(UNet(**SMALL))
    x, t = _inputs(SMALL)
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == x.shape
        assert out.abs().sum() > 0
        assert torch.equal(model(x, t), out)


def test_float_and_integer_timesteps_agree():
    torch.manual_seed(0)
    model = _perturbed(UNet(**TINY))
    x, t = _inputs(TINY)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t.float()), model(x, t))


def test_output_depends_on_the_timestep():
    torch.manual_seed(0)
    model = _perturbed(UNet(**SMALL))
    x, _ = _inputs(SMALL, batch=1)
    with torch.no_grad():
        outputs = [model(x, torch.tensor([t])) for t in (0, 1, 500, 999)]
    for i in range(len(outputs)):
        for j in range(i + 1, len(outputs)):
            assert (outputs[i] - outputs[j]).abs().max() > 1e-4, (i, j)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = _perturbed(UNet(**TINY)).train()
    x, t = _inputs(TINY)
    model(x, t).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


@pytest.mark.parametrize("image_size", [30, 27])
def test_image_size_must_be_divisible_by_the_downsampling_factor(image_size):
    with pytest.raises(ValueError, match=rf"image_size \({image_size}\).*4"):
        UNet(**{**SMALL, "image_size": image_size, "attention_resolutions": ()})


def test_attention_resolution_that_never_occurs_is_rejected():
    with pytest.raises(ValueError, match="16"):
        UNet(**{**SMALL, "attention_resolutions": (16,)})


@pytest.mark.parametrize("num_heads", [1, 4])
def test_math_and_sdpa_unets_agree(num_heads):
    torch.manual_seed(0)
    sdpa = _perturbed(UNet(**SMALL, num_heads=num_heads, attention_backend="sdpa"))
    math = UNet(**SMALL, num_heads=num_heads, attention_backend="math").eval()
    math.load_state_dict(sdpa.state_dict())
    x, t = _inputs(SMALL)
    with torch.no_grad():
        torch.testing.assert_close(math(x, t), sdpa(x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_heads, channels_last", [(1, False), (4, True)])
def test_attention_takes_the_fused_sdpa_kernel_forward_and_backward(num_heads, channels_last):
    """PyTorch's fused attention kernels (flash, memory-efficient, cuDNN) take only inputs whose features lie
    contiguous and otherwise fall back, silently, to the unfused math path. Allowed flash alone (which also
    runs on the CPU), scaled_dot_product_attention raises instead of falling back."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = _perturbed(UNet(**SMALL, num_heads=num_heads)).train()
    x, t = _inputs(SMALL)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        model(x, t).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers has no CPU kernels")
def test_xformers_and_sdpa_cifar_unets_agree_in_bf16_on_cuda():
    """The real model, single-head with head dimension 256 at 16x16 as the DDPM reference."""
    pytest.importorskip("xformers")
    config = Config()  # the cifar architecture
    torch.manual_seed(0)
    sdpa = build_unet(config, "cuda").eval()
    xformers = build_unet(dataclasses.replace(config, model=dataclasses.replace(config.model, attention_backend="xformers")),
                          "cuda").eval()
    assert xformers.attention_backend == "xformers"
    xformers.load_state_dict(_perturbed(sdpa).state_dict())
    x = torch.randn(8, 3, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (8,), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(xformers(x, t).float(), sdpa(x, t).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_forward_has_no_graph_breaks(num_classes):
    torch.manual_seed(0)
    model = UNet(**TINY, num_heads=2, num_classes=num_classes).eval()
    x, t = _inputs(TINY)
    labels = torch.tensor([2, 3]) if num_classes else None  # 3: "no class"
    explanation = torch._dynamo.explain(model)(x, t, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_xformers_unet_on_cpu_falls_back_to_sdpa():
    attention_module._warn_once.cache_clear()  # another test may already have warned
    with pytest.warns(UserWarning, match="'xformers'.*'sdpa'"):
        model = UNet(**TINY, attention_backend="xformers", device="cpu")
    assert model.attention_backend == "sdpa"
    assert all(block.backend == "sdpa" for block in model.modules() if hasattr(block, "backend"))


def test_build_unet_follows_the_config():
    config = Config()
    config.data.image_size, config.data.channels = 16, 1
    config.model.base_channels, config.model.channel_mult, config.model.attention_resolutions = 32, [1, 2], [8]
    model = build_unet(config, "cpu")
    x, t = _inputs({"in_channels": 1, "image_size": 16})
    assert model(x, t).shape == x.shape
    assert count_parameters(model) == count_parameters(
        UNet(image_size=16, in_channels=1, out_channels=1, base_channels=32, channel_mult=(1, 2),
             attention_resolutions=(8,)))
