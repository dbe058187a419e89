"""The validation loss (issue 17, item 2): fixed timesteps, fixed noise, held-out images; the same weights give
the same number, any world size gives the same number, and it falls as a run trains."""

import json

import pytest
import torch

from engine import diffusion
from engine.checkpoint import BEST, best_score, list_checkpoints, save_best_checkpoint
from engine.data.prepare import prepare
from engine.trainer import build_trainer, train_step
from engine.validation import ValidationLoss, validation_record, validation_timesteps
from kernels.noise import noise_keys
from test_train_cli import run, train
from test_trainer import CPU, small_config


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Other shapes than shapes16's (another seed): 24 images."""
    out = tmp_path_factory.mktemp("held_out") / "shapes"
    prepare("shapes", out, shard_size=8, num=24, image_size=16, channels=3, seed=7, progress=False)
    return out


def test_the_timesteps_are_the_middles_of_equal_parts():
    assert validation_timesteps(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert validation_timesteps(50, 1) == [25]


def validation_config(held_out, *overrides):
    return small_config("model.channel_mult=[1]", "model.attention_resolutions=[]", "eval.val_every=1",
                        f"eval.val_data={held_out}", "eval.val_images=20", "eval.val_timesteps=3", "eval.batch_size=8",
                        *overrides)


def test_the_same_weights_give_the_same_loss_which_is_the_plain_loss_at_the_fixed_timesteps(held_out):
    trainer = build_trainer(validation_config(held_out), CPU)
    validation = ValidationLoss(trainer.config, CPU, trainer)
    assert validation.num_images == 20 and validation.timesteps == [8, 25, 41]
    first = validation.loss(trainer.model)
    assert validation.loss(trainer.model) == first  # bit for bit: no random draw anywhere
    images = validation.images
    t = torch.full((20,), 25)
    with torch.no_grad():
        plain = diffusion.training_loss(trainer.model.eval(), trainer.kernels, trainer.schedule, images,
                                        torch.zeros(20, dtype=torch.bool), t, noise_keys(1, torch.arange(20)),
                                        target="v").mean()
    assert first[25] == pytest.approx(float(plain), rel=1e-6)
    batch = {"image": images[:8], "skipped": 0}
    trainer.model.train()
    train_step(trainer, 0, lambda: batch)
    assert trainer.model.training, "validation leaves the model in the mode it found it in"
    after = validation.loss(trainer.model)
    assert after != first
    record = validation_record(5, after, first, {"ema_0.5": first})
    assert record["val_loss"] == pytest.approx(sum(after.values()) / 3) and record["val_loss_ema_t41"] == first[41]
    assert record["val_loss_ema_0.5"] == record["val_loss_ema"]


def test_two_ranks_each_with_every_other_image_sum_to_the_single_process_loss(held_out, monkeypatch):
    """Each rank evaluates every world_size-th image and the sums are all-reduced: here the reduction is
    replaced by adding the two ranks' results."""
    from engine.distributed import DistributedContext

    trainer = build_trainer(validation_config(held_out), CPU)
    single = ValidationLoss(trainer.config, CPU, trainer).loss(trainer.model)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor: None)
    parts = []
    for rank in (0, 1):
        context = DistributedContext(rank=rank, local_rank=rank, world_size=2, device=torch.device("cpu"))
        validation = ValidationLoss(trainer.config, context, trainer)
        assert len(validation.images) == 10
        parts.append(validation.loss(trainer.model))
    for t, value in single.items():
        assert parts[0][t] + parts[1][t] == pytest.approx(value, rel=1e-6)


def test_a_run_logs_a_falling_validation_loss_plots_it_and_keeps_the_best_checkpoint(tmp_path, shapes16, held_out):
    run_dir = tmp_path / "run"
    options = ["optim.lr=2e-3", "optim.warmup_steps=0", "eval.val_every=12", f"eval.val_data={held_out}",
               "eval.val_timesteps=4", "train.log_every=12", "train.keep_best=val_loss_ema", "train.extra_ema_decays=[0.5]",
               "train.post_hoc_ema_sigma_rels=[0.05,0.2]", "train.post_hoc_ema_every=12"]
    result = train(run_dir, shapes16, "train.steps=24", *options)
    assert result.returncode == 0, result.stderr
    assert "validation: the loss every 12 steps on 24 held-out images" in result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validation = {r["step"]: r for r in records if "val_loss" in r}
    assert sorted(validation) == [12, 24]
    assert {f"val_loss_ema_t{t}" for t in validation_timesteps(50, 4)} | {"val_loss_ema_0.5", "val_loss_sigma_rel_0.05",
                                                                         "val_loss_sigma_rel_0.2"} <= set(validation[24])
    assert "post-hoc EMA: sigma_rel 0.05, 0.2, snapshotted every 12 steps" in result.stderr
    assert validation[24]["val_loss"] < validation[12]["val_loss"]
    assert (run_dir / "loss.png").is_file()
    # the best by val_loss_ema, beside the newest checkpoints, with its score; engine.sample takes it
    best_step = min(validation, key=lambda step: validation[step]["val_loss_ema"])
    assert best_score(run_dir) == {"metric": "val_loss_ema", "value": validation[best_step]["val_loss_ema"],
                                   "step": best_step}
    assert f"best val_loss_ema {validation[best_step]['val_loss_ema']:.6g}" in result.stderr
    assert all(path.name != BEST for path in list_checkpoints(run_dir))
    sampled = run("engine.sample", run_dir / "checkpoints" / BEST, "--num", 2, "--npz", tmp_path / "best.npz")
    assert sampled.returncode == 0, sampled.stderr
    assert (run_dir / "sample_grid_best.png").is_file()
    # a resumed run keeps an old best that its new scores do not beat
    state = torch.load(run_dir / "checkpoints" / BEST, weights_only=True)
    save_best_checkpoint(run_dir, state, {"metric": "val_loss_ema", "value": -1.0, "step": 3})
    again = train(run_dir, shapes16, "train.steps=36", *options)
    assert again.returncode == 0, again.stderr
    assert best_score(run_dir)["value"] == -1.0 and "best val_loss_ema" not in again.stderr


@pytest.mark.parametrize("overrides,message", [(["eval.val_every=5"], "eval.val_data must name a prepared"),
                                               (["eval.val_every=5", "eval.val_timesteps=0"], "eval.val_timesteps"),
                                               (["train.keep_best=fid"], "fid needs FID during training"),
                                               (["train.keep_best=val_loss"], "val_loss needs the validation loss")])
def test_validation_settings_are_checked(overrides, message, held_out):
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        small_config(*overrides, *([f"eval.val_data={held_out}"] if "timesteps" in message else []))


def test_a_held_out_set_of_another_size_is_one_clear_line(tmp_path, shapes16):
    other = tmp_path / "other"
    prepare("shapes", other, shard_size=8, num=8, image_size=8, channels=3, seed=7, progress=False)
    result = train(tmp_path / "run", shapes16, "eval.val_every=5", f"eval.val_data={other}", "--dry-run")
    assert result.returncode == 2 and "has image_size 8 but the training data set has 16" in result.stderr


def test_val_shards_hold_out_the_last_shards_of_the_training_set_which_training_never_reads(held_out):
    """eval.val_shards=1 of held_out's 3 shards of 8: validation gets the last 8 images, the device cache and the
    streamed loader the other 16 (every image once between them)."""
    from engine.config import ConfigError
    from engine.data import build_train_loader, load_device_cache
    from engine.train import check_data
    from engine.validation import training_shards

    config = small_config("model.channel_mult=[1]", "model.attention_resolutions=[]", f"data.path={held_out}",
                          "eval.val_every=1", "eval.val_shards=1", "eval.val_timesteps=1")
    validation = ValidationLoss(config, CPU, build_trainer(config, CPU))
    assert validation.num_images == 8 and validation.source == f"the last 1 shards of {held_out}"
    options = {"image_size": 16, "channels": 3, "num_workers": 0}
    rows = lambda images: {bytes(image.flatten().tolist()) for image in images}  # noqa: E731
    everything = rows(load_device_cache(held_out, device="cpu", **options).images)
    cached = rows(load_device_cache(held_out, device="cpu", shard_slice=training_shards(config), **options).images)
    assert len(cached) == 16 and not cached & rows(validation.images) and cached | rows(validation.images) == everything
    stream = iter(build_train_loader(held_out, batch_size=8, shard_slice=training_shards(config), **options))
    assert set().union(*(rows(next(stream)["image"]) for _ in range(6))) <= cached  # three passes: never held out
    check_data(config)
    with pytest.raises(ConfigError, match="eval.val_shards is 3 but the data set in .* has 3 shards"):
        check_data(small_config(f"data.path={held_out}", "eval.val_every=1", "eval.val_shards=3"))
    with pytest.raises(ConfigError, match="eval.val_shards holds out part of data.path: set it or eval.val_data"):
        small_config(f"eval.val_data={held_out}", "eval.val_shards=1")
