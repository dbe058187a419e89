"""Class-conditional models (issue 16, first part): the class embedding, label dropout from the step's
counters, the data set's class count checked, and diffusers' UNet2DModel with num_class_embeds."""

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import Config, ConfigError, config_from_dict
from engine.trainer import class_labels
from engine.unet import build_unet
from test_train_cli import run, train


def small_config(**model) -> Config:
    raw = Config().to_dict()
    raw["model"].update(base_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8],
                        dropout=0.0, **model)
    raw["data"].update(image_size=16, channels=3)
    return config_from_dict(raw, where="test")


def perturb(model: torch.nn.Module) -> None:
    """Random weights everywhere: at init the residual branches' last convs and conv_out are zero (the
    reference's), so the timestep and class embeddings could not change the output."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


def test_the_class_embedding_conditions_the_prediction_and_the_last_row_means_no_class():
    torch.manual_seed(0)
    unconditional = build_unet(small_config(), "cpu").eval()
    torch.manual_seed(0)
    model = build_unet(small_config(num_classes=4), "cpu").eval()
    assert set(model.state_dict()) - set(unconditional.state_dict()) == {"class_embed.weight"}
    assert model.class_embed.weight.shape[0] == 5  # four classes and "no class"
    # created last: every other layer starts as the unconditional model's
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in unconditional.state_dict().items())
    perturb(model)
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([10, 900])
    with torch.no_grad():
        by_class = [model(x, t, torch.full((2,), label)) for label in range(5)]
        torch.testing.assert_close(model(x, t), by_class[4], rtol=0, atol=0)  # no labels = "no class"
    assert all((by_class[i] - by_class[j]).abs().max() > 1e-4 for i in range(5) for j in range(i))  # rounding: 1e-7


def test_dropped_labels_become_the_no_class_index():
    class Trainer:
        config, device = small_config(num_classes=4, label_dropout=0.5), torch.device("cpu")

    batch = {"label": torch.tensor([0, 1, 2, 3])}
    drop = torch.tensor([True, False, True, False])
    assert class_labels(Trainer, batch, drop).tolist() == [4, 1, 4, 3]
    assert class_labels(Trainer, batch, None).tolist() == [0, 1, 2, 3]
    Trainer.config = small_config()
    assert class_labels(Trainer, batch, drop) is None  # an unconditional model takes no labels


@pytest.mark.parametrize("model,message", [({"label_dropout": 0.1}, "needs a class-conditional model"),
                                           ({"num_classes": 4, "label_dropout": 1.0}, "must be in [0, 1)"),
                                           ({"num_classes": -1}, "must be >= 0")])
def test_class_settings_are_checked(model, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        small_config(**model)


def test_a_conditional_model_trains_with_label_dropout_and_the_class_count_is_checked(tmp_path, shapes16):
    wrong = train(tmp_path / "wrong", shapes16, "train.steps=1", "model.num_classes=10", "--dry-run")
    assert wrong.returncode == 2
    assert "model.num_classes is 10 but the data set" in wrong.stderr and "set model.num_classes=4" in wrong.stderr
    result = train(tmp_path / "run", shapes16, "train.steps=2", "model.num_classes=4", "model.label_dropout=0.5")
    assert result.returncode == 0, result.stderr
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    state = torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
    assert state["config"]["model"]["num_classes"] == 4
    embedding = next(v for k, v in state["model"].items() if k.endswith("class_embed.weight"))
    assert embedding.shape[0] == 5
    _sample_classes_with_guidance(tmp_path, tmp_path / "run")


def _sample_classes_with_guidance(tmp_path, run_dir):
    """engine.sample --classes/--class/--guidance: a grid of one row per class, and the same images of a class
    whichever other classes are drawn beside it."""
    grid, npz = tmp_path / "grid.png", tmp_path / "s.npz"
    result = run("engine.sample", run_dir, "--num", 6, "--classes", "1,3", "--guidance", 2, "--out", grid,
                 "--npz", npz, "sample.steps=3")
    assert result.returncode == 0, result.stderr
    assert "classes [1, 3], guidance 2" in result.stdout
    with Image.open(grid) as image:  # 2 rows of 3 16-pixel images, padding 2, enlarged 16 times
        assert image.size == ((3 * 18 + 2) * 16, (2 * 18 + 2) * 16)
    both = np.load(npz)["arr_0"]
    result = run("engine.sample", run_dir, "--num", 2, "--class", 1, "--guidance", 2, "--out", grid,
                 "--npz", npz, "sample.steps=3")
    assert result.returncode == 0, result.stderr
    assert np.array_equal(np.load(npz)["arr_0"][0], both[0])  # image 0 is of class 1 in both runs
    wrong = run("engine.sample", run_dir, "--class", 4)
    assert wrong.returncode == 2 and "sample.classes must be classes in [0, model.num_classes=4)" in wrong.stderr


def test_diffusers_unet_with_num_class_embeds_predicts_as_ours_for_every_class():
    diffusers = pytest.importorskip("diffusers")
    from engine.diffusers_format import diffusers_to_unet, unet_to_diffusers

    config = small_config(num_classes=3)
    torch.manual_seed(0)
    ours = build_unet(config, "cpu").eval()
    perturb(ours)
    unet_config, weights = unet_to_diffusers(ours.state_dict(), config)
    assert unet_config["num_class_embeds"] == 4 and unet_config["class_embed_type"] is None
    theirs = diffusers.UNet2DModel.from_config(unet_config)
    theirs.load_state_dict(weights)
    x, t = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([1, 100, 500, 999])
    labels = torch.tensor([0, 1, 2, 3])  # 3: "no class"
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(x, t, class_labels=labels).sample, ours(x, t, labels),
                                   rtol=1e-5, atol=1e-5)
    model_fields, _, state_dict = diffusers_to_unet(unet_config, weights)  # and back
    assert model_fields["num_classes"] == 3
    assert all(torch.equal(state_dict[key], value) for key, value in ours.state_dict().items())
