"""Classifier-free guidance (issue 16): one forward of the doubled batch, combined before every sampler's
update kernel; the classes each image is drawn for; grids with one row per class."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from engine import diffusion
from engine.config import ConfigError, config_from_dict
from engine.images import class_rows
from engine.sampling import Sampler, image_classes
from engine.schedule import NoiseSchedule
from engine.unet import build_unet
from kernels.noise import noise_keys
from kernels.registry import resolve_kernels_from_config
from test_class_conditional import perturb, small_config

NUM_CLASSES = 3


class CountingModel(torch.nn.Module):
    """The UNet, recording the batch size of every forward."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.batches = unet, []

    def forward(self, x, t, class_labels=None):
        self.batches.append(len(x))
        return self.unet(x, t, class_labels)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = build_unet(small_config(num_classes=NUM_CLASSES), "cpu").eval()
    perturb(model)  # at init the output ignores the class
    with torch.no_grad():
        model.class_embed.weight.mul_(40)  # a class that matters, as after training
    return model


def inputs(batch: int = 4):
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, 16, 16, generator=generator), torch.tensor([5, 200, 600, 999][:batch]),
            torch.tensor([0, 1, 2, 1][:batch]))


@torch.no_grad()
def test_the_guided_output_is_u_plus_s_times_c_minus_u_from_one_forward_of_the_doubled_batch(unet):
    x, t, labels = inputs()
    conditional, unconditional = unet(x, t, labels), unet(x, t)  # no labels = "no class"
    for scale, batches in ((2.5, [8]), (1.0, [4]), (0.0, [4])):
        model = CountingModel(unet)
        guided = diffusion.classifier_free_guidance(model, scale, NUM_CLASSES)(x, t, labels)
        assert model.batches == batches, "one forward: of 2B when guided, of B at scales 1 and 0"
        torch.testing.assert_close(guided, unconditional + scale * (conditional - unconditional), rtol=1e-5, atol=1e-5)
    assert (conditional - unconditional).abs().max() > 1e-3, "the class must change the prediction"


def two_forwards(unet, scale: float):
    """The guided prediction the plain way, as a denoiser of (x, t, labels): two forwards of B."""
    def denoise(x, t, labels):
        conditional, unconditional = unet(x, t, labels), unet(x, t)
        return unconditional + scale * (conditional - unconditional)
    return denoise


@pytest.mark.parametrize("sampler,steps", [("ddpm", None), ("ddim", 5), ("dpm++2m", 5), ("unipc", 5)])
def test_every_sampler_is_guided_and_scales_one_and_zero_are_the_conditional_and_unconditional_models(unet, sampler,
                                                                                                     steps):
    schedule = NoiseSchedule.create("linear", 20).to(dtype=torch.float64)
    kernels = resolve_kernels_from_config(small_config(), "cpu")
    unet64 = copy.deepcopy(unet).double()
    labels = torch.tensor([2, 0, 1])

    def draw(model, class_labels=labels):
        return diffusion.sample(model, schedule, kernels, (3, 3, 16, 16), seed=4, sampler=sampler, steps=steps,
                                dtype=torch.float64, class_labels=class_labels)

    guided = {scale: draw(diffusion.classifier_free_guidance(unet64, scale, NUM_CLASSES)) for scale in (0.0, 1.0, 3.0)}
    torch.testing.assert_close(guided[1.0], draw(unet64), rtol=0, atol=0)  # the conditional model itself
    torch.testing.assert_close(guided[0.0], draw(unet64, None), rtol=0, atol=0)  # "no class" throughout
    torch.testing.assert_close(guided[3.0], draw(two_forwards(unet64, 3.0)), rtol=1e-10, atol=1e-10)
    assert (guided[3.0] - guided[1.0]).abs().max() > 1e-3 and (guided[1.0] - guided[0.0]).abs().max() > 1e-3


def test_images_are_drawn_for_every_class_in_turn_or_for_the_classes_asked():
    config = small_config(num_classes=4)
    assert image_classes(config, torch.arange(10)).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    asked = dataclasses.replace(config, sample=dataclasses.replace(config.sample, classes=[3, 1]))
    assert image_classes(asked, torch.arange(2, 7)).tolist() == [3, 1, 3, 1, 3]  # by image index, not batch
    assert image_classes(small_config(), torch.arange(4)) is None


def test_a_conditional_models_samples_depend_on_the_class_and_not_on_the_batching(unet):
    config = small_config(num_classes=NUM_CLASSES)
    config = dataclasses.replace(config, diffusion=dataclasses.replace(config.diffusion, num_timesteps=20),
                                 sample=dataclasses.replace(config.sample, sampler="ddim", steps=3, guidance=2.0))
    schedule, kernels = NoiseSchedule.create("linear", 20), resolve_kernels_from_config(config, "cpu")
    sampler = Sampler(unet, config, schedule, kernels, "cpu")
    whole = sampler.generate(6, 0, batch_size=6)
    torch.testing.assert_close(sampler.generate(6, 0, batch_size=4), whole)
    only_two = sampler.with_settings(classes=[2]).generate(6, 0, batch_size=6)
    torch.testing.assert_close(only_two[2::3], whole[2::3])  # the images of class 2 in both sets
    assert (only_two[0] - whole[0]).abs().max() > 1e-3


def test_a_grid_has_one_row_per_class_as_long_as_the_rarest_class():
    images = np.arange(10)[:, None, None, None] * np.ones((1, 2, 2, 1), np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    grid, columns = class_rows(images, labels, limit=64)
    assert columns == 3 and grid[:, 0, 0, 0].tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    grid, columns = class_rows(images, labels, limit=7)
    assert columns == 2 and grid[:, 0, 0, 0].tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("model,sample,message", [
    ({}, {"guidance": 2.0}, "sample.guidance needs a class-conditional model"),
    ({"num_classes": 4}, {"guidance": -1.0}, "sample.guidance must be >= 0"),
    ({"num_classes": 4}, {"classes": [4]}, r"sample.classes must be classes in \[0, model.num_classes=4\)"),
    ({}, {"classes": [0]}, "sample.classes needs a class-conditional model")])
def test_guidance_and_class_settings_are_checked(model, sample, message):
    raw = small_config(**model).to_dict()
    raw["sample"].update(sample)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw, where="test")


@pytest.mark.parametrize("sampler,steps", [("ddim", 3), ("unipc", 3), ("ddpm", None)])
def test_guided_sampling_with_the_triton_kernels_draws_what_the_pytorch_reference_draws(unet, sampler, steps):
    """The guided prediction feeds the registry's update kernels: Triton's (in the interpreter here) and the
    PyTorch reference's give the same images."""
    from kernels.registry import OPS, resolve_kernels

    schedule = NoiseSchedule.create("linear", 20)
    guided = diffusion.classifier_free_guidance(unet, 2.5, NUM_CLASSES)
    kernels = [resolve_kernels(dict.fromkeys(OPS, choice), "cpu", check=False) for choice in ("pytorch", "triton")]
    assert {kernels[1].names[op] for op in ("ddim_step", "unipc_step", "posterior_step")} == {"triton"}
    images = [diffusion.sample(guided, schedule, chosen, (2, 3, 16, 16), seed=5, sampler=sampler, steps=steps,
                               class_labels=torch.tensor([1, 0])) for chosen in kernels]
    assert images[0].isfinite().all() and images[0].std() > 0.1
    torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-4)


class ToyConditional(torch.nn.Module):
    """A stand-in for the UNet that depends on x, t and the class: compiling it takes seconds, not minutes."""

    def __init__(self):
        super().__init__()
        self.conv, self.embed = torch.nn.Conv2d(3, 3, 1), torch.nn.Embedding(NUM_CLASSES + 1, 3)

    def forward(self, x, t, class_labels=None):
        return self.conv(x) * (t.float() / 20)[:, None, None, None] + self.embed(class_labels)[:, :, None, None]


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_the_guided_step_compiles_into_one_graph_with_the_labels_as_an_input(sampler):
    """fullgraph=True raises on a graph break: the doubled batch, the combination and the update kernel trace as
    one graph, and new labels (another class, another batch of images) replay it without recompiling."""
    from torch._dynamo.testing import CompileCounter

    from engine import solvers

    torch._dynamo.reset()
    torch.manual_seed(0)
    schedule = NoiseSchedule.create("linear", 20)
    kernels = resolve_kernels_from_config(small_config(), "cpu", check=False)
    guided = diffusion.classifier_free_guidance(ToyConditional(), 2.5, NUM_CLASSES)
    step = torch.no_grad()(diffusion.denoising_step(guided, schedule, kernels, sampler=sampler))
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=False)
    x, t = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([15, 15])
    keys = noise_keys(0, torch.arange(2))
    if sampler in solvers.SOLVERS:
        history = solvers.initial_history(sampler, x)
        weights = solvers.solver_plan(schedule, sampler, 5).weights[0].float()
        arguments = lambda labels: (x, t, keys, weights, history, labels)  # noqa: E731
    else:
        arguments = lambda labels: (x, t, t - 5, keys, labels)  # noqa: E731
    images = []
    for labels in (torch.tensor([0, 2]), torch.tensor([1, 1])):
        result = compiled(*arguments(labels))
        torch.testing.assert_close(result, step(*arguments(labels)), rtol=1e-5, atol=1e-5)
        images.append(result[0] if isinstance(result, tuple) else result)  # a solver's step returns its history too
    assert counter.frame_count == 1
    assert (images[0] - images[1]).abs().max() > 1e-3  # the labels reached the compiled graph
