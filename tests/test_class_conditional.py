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


def test_a_conditional_trainer_resumes_bit_for_bit_with_the_same_label_drops():
    """The drops come from (seed, step) like the flips: a trainer rebuilt from a checkpoint drops the same labels
    and continues the losses exactly; and the drops change the trajectory (they reach the model)."""
    import io

    from engine.trainer import build_trainer, step_inputs, train_step
    from test_trainer import CPU, small_config as trainer_config

    generator = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=generator),
                "label": torch.randint(0, 4, (8,), generator=generator), "skipped": 0} for _ in range(6)]
    # 32 channels then 64: at 16 (one channel per GroupNorm group) the norm would cancel the class embedding
    smaller = ("model.dropout=0.0", "model.base_channels=32", "model.attention_resolutions=[]", "model.num_classes=4")
    config = trainer_config(*smaller, "model.label_dropout=0.5")

    def run_steps(trainer, steps):
        return [float(train_step(trainer, step, lambda: batches[step]).loss) for step in steps]

    trainer = build_trainer(config, CPU)
    losses = run_steps(trainer, range(3))
    saved = io.BytesIO()
    torch.save(trainer.state_dict(), saved)
    losses += run_steps(trainer, range(3, 6))
    saved.seek(0)
    state = torch.load(saved, weights_only=True)
    resumed = build_trainer(config, CPU)
    resumed.load_state_dict(state, state["lr_schedule"], state["scaler"])
    drops = step_inputs(resumed, 4)[2]
    assert torch.equal(drops, step_inputs(trainer, 4)[2]) and 0 < int(drops.sum()) < 8
    assert run_steps(resumed, range(3, 6)) == losses[3:]
    never_dropped = run_steps(build_trainer(trainer_config(*smaller), CPU), range(6))
    # the same first loss (the residual branches start at zero), then other ones: the drops reach the model
    assert never_dropped[0] == losses[0] and never_dropped[-1] != losses[-1]


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


@pytest.mark.slow
def test_a_conditional_model_trained_on_the_shapes_draws_the_class_it_is_asked_for(tmp_path):
    """The issue's done-when, at the smallest size that shows it: a model that has learned 8 shapes (all four
    classes) from the CLI draws, for each class asked, images whose nearest training image is of that class;
    the same model unguided (scale 0: "no class") is at chance, so the class, not luck, decides."""
    from engine.data.prepare import prepare
    from engine.data.shapes import iter_shapes

    data, run_dir = tmp_path / "shapes8", tmp_path / "run"
    prepare("shapes", data, shard_size=8, num=8, image_size=16, channels=3, seed=0, progress=False)
    result = run("engine.train", "configs/tiny.yaml", f"data.path={data}", f"train.run_dir={run_dir}",
                 "model.channel_mult=[1,2]", "model.attention_resolutions=[]", "model.num_classes=4",
                 "model.label_dropout=0.2", "train.steps=150", "train.batch_size=32", "optim.lr=2e-3",
                 "optim.warmup_steps=20", "train.ema_decay=0.99", "train.sample_every=0", "train.log_every=50",
                 "train.checkpoint_every=150", "data.num_workers=0", "data.shuffle_buffer=64",
                 "sample.num_images=4", "sample.steps=4")  # the closing grid's: the preset's 64 x 100 took a fifth
    assert result.returncode == 0, result.stderr
    training = [(image, label) for _, image, label in iter_shapes(8, 16, 3, seed=0)]  # what prepare wrote
    training += [(image[:, ::-1], label) for image, label in training]  # and their flips, which training saw
    references = np.stack([image for image, _ in training]).astype(np.float32)
    reference_labels = np.array([label for _, label in training])
    assert sorted(set(reference_labels)) == [0, 1, 2, 3]
    accuracy = {}
    for scale in (2, 0):
        npz = tmp_path / f"guidance{scale}.npz"
        sampled = run("engine.sample", run_dir, "--num", 32, "--guidance", scale, "--npz", npz, "--out",
                      tmp_path / f"guidance{scale}.png", "sample.steps=20")
        assert sampled.returncode == 0, sampled.stderr
        images = np.load(npz)["arr_0"].astype(np.float32)
        asked = np.arange(len(images)) % 4  # every class in turn
        distances = ((images[:, None] - references[None]) ** 2).sum(axis=(2, 3, 4))
        nearest = reference_labels[distances.argmin(axis=1)]
        accuracy[scale] = [float((nearest[asked == label] == label).mean()) for label in range(4)]
    assert min(accuracy[2]) >= 0.75, accuracy  # 1.0 here for two training seeds
    assert np.mean(accuracy[0]) <= 0.6, accuracy  # chance: about 0.3
