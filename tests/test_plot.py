"""`python -m engine.plot`: the pictures people look at instead of reading numbers."""

import numpy as np
import pytest
from PIL import Image

from engine import plot
from test_train_cli import losses, run, train


def test_schedule_chart_is_written_and_a_bad_schedule_is_one_line(tmp_path):
    result = run("engine.plot", "schedules", "--out", tmp_path / "s.png")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "s.png").size[0] > 400
    bad = run("engine.plot", "schedules", "--schedules", "linear", "quadratic", "--out", tmp_path / "b.png")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_noising_strip_goes_from_the_image_to_noise(shapes16):
    timesteps = [0, 500, 999]
    grid = plot.noising_strip(shapes16, timesteps, num_images=3)
    assert grid.shape == (3 * 18 + 2, 3 * 18 + 2, 3)  # 16-pixel tiles, 2-pixel padding
    tiles = [[grid[2 + 18 * row: 18 * row + 18, 2 + 18 * column: 18 * column + 18].astype(float) for column in range(3)]
             for row in range(3)]
    clean = plot.noising_strip(shapes16, [0], num_images=3)
    for row in range(3):
        # t = 0 keeps the image to within a level or two; by t = 999 the image is gone (noise is ~N(0, 1))
        assert np.abs(tiles[row][0] - clean[2 + 18 * row: 18 * row + 18, 2:18]).max() <= 3
        assert np.abs(tiles[row][2] - tiles[row][0]).mean() > 40


@pytest.mark.parametrize("sampler", ["ddim", "unipc"])  # the solvers' steps report x_0, DDIM's eps
def test_trajectory_and_loss_plots_of_a_run(tmp_path, shapes16, sampler):
    run_dir = tmp_path / "run"
    assert train(run_dir, shapes16, "train.steps=2", f"sample.sampler={sampler}", "sample.steps=5").returncode == 0
    assert sorted(losses(run_dir)) == [2]
    grid = plot.trajectory_grid(run_dir, num_images=2, num_frames=3)
    assert grid.shape == (4 * 18 + 2, 3 * 18 + 2, 3)  # rows x_t, x_0 for each of 2 images; 3 frames
    result = run("engine.plot", "trajectory", run_dir, "--images", 2, "--frames", 3, "--out", tmp_path / "t.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t.png").is_file()
    wrong = run("engine.plot", "trajectory", run_dir, "--guidance", 2)
    assert wrong.returncode == 2 and "sample.guidance needs a class-conditional model" in wrong.stderr
    result = run("engine.plot", "loss", run_dir, "--out", tmp_path / "l.png")
    assert result.returncode == 0 and (tmp_path / "l.png").is_file()
    missing = run("engine.plot", "loss", tmp_path / "nothing")
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_a_conditional_runs_trajectory_draws_each_image_for_its_class_guided(tmp_path, shapes16, monkeypatch):
    run_dir = tmp_path / "run"
    result = train(run_dir, shapes16, "train.steps=1", "model.num_classes=4", "model.label_dropout=0.5",
                   "sample.guidance=1.5")
    assert result.returncode == 0, result.stderr
    calls = []
    real_sample, real_guidance = plot.diffusion.sample, plot.diffusion.classifier_free_guidance
    monkeypatch.setattr(plot.diffusion, "classifier_free_guidance", lambda *args: calls.append(args[1:]) or real_guidance(*args))
    monkeypatch.setattr(plot.diffusion, "sample", lambda *args, **kwargs: calls.append(kwargs["class_labels"].tolist())
                        or real_sample(*args, **kwargs))
    grids = [plot.trajectory_grid(run_dir, num_images=5, num_frames=2, guidance=scale) for scale in (None, 0.0)]
    assert calls == [(1.5, 4), [0, 1, 2, 3, 0], (0.0, 4), [0, 1, 2, 3, 0]]  # the run's scale, then the one asked
    assert grids[0].shape == grids[1].shape == (10 * 18 + 2, 2 * 18 + 2, 3)
