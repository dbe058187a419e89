"""What a run leaves for people to read and look at: metrics JSONL, loss curve, sample grids, EMA."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from engine.ema import build_ema, update_ema
from engine.images import make_grid, save_grid, to_uint8
from engine.metrics_log import MetricsLog, read_metrics
from engine.plot import plot_loss_curve


def test_metrics_log_appends_and_drops_steps_past_a_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    with open(path, "a") as f:
        f.write('{"step": 40, "lo')  # a line cut off by a kill
    MetricsLog(path, resume_step=20).close()
    assert [r["step"] for r in read_metrics(path)] == [10, 20]


def _tensorboard_events(folder):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(folder))
    events.Reload()
    return events


def test_metrics_mirror_to_tensorboard_and_a_resume_purges_later_steps(tmp_path):
    pytest.importorskip("tensorboard")
    log = MetricsLog(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step, "note": "text is not a scalar", "finite": True})
    log.add_image("samples", np.full((8, 12, 3), 200, np.uint8), 30)
    log.close()
    events = _tensorboard_events(tmp_path / "tb")
    assert events.Tags()["scalars"] == ["loss"] and events.Tags()["images"] == ["samples"]
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss")] == [(10, 0.1), (20, 0.05), (30, 0.0333)]
    assert (events.Images("samples")[0].width, events.Images("samples")[0].height) == (12, 8)
    resumed = MetricsLog(tmp_path / "metrics.jsonl", resume_step=20, tensorboard_dir=tmp_path / "tb")
    resumed.write({"step": 30, "loss": 0.5})
    resumed.close()
    assert [(e.step, e.value) for e in _tensorboard_events(tmp_path / "tb").Scalars("loss")][-1] == (30, 0.5)
    assert [e.step for e in _tensorboard_events(tmp_path / "tb").Scalars("loss")] == [10, 20, 30]


def test_a_run_mirrors_its_metrics_and_grid_to_wandb_offline_and_a_resume_continues_the_same_run(tmp_path, shapes16,
                                                                                                  monkeypatch):
    """W&B without a network (WANDB_MODE=offline): the run's files under RUN_DIR/wandb hold the logged values
    (the offline .wandb file is W&B's record stream) and the final grid; the resumed run has the same id."""
    pytest.importorskip("wandb")
    from test_train_cli import losses, train

    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    for steps in (2, 4):
        result = train(run_dir, shapes16, f"train.steps={steps}", "train.wandb=true", "train.log_every=2")
        assert result.returncode == 0, result.stderr
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(folder.name.endswith(run_id) for folder in runs)
    for folder, step in zip(runs, (2, 4)):
        stream = next(folder.glob("run-*.wandb")).read_bytes()
        assert json.dumps(losses(run_dir)[step]).encode() in stream and b"grad_norm" in stream
        assert list((folder / "files" / "media" / "images").glob(f"samples_{step}_*.png"))  # the final grid


def test_loss_curve_is_a_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1)}) + "\n" for s in range(100)))
    png = plot_loss_curve(path, tmp_path / "loss.png")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 300


def test_the_loss_curve_draws_the_loss_by_noise_level(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", lambda axis, *a, **k: drawn.extend(
        line.get_label() for line in axis.get_lines()))
    levels = {"loss_t0_249": 0.1, "loss_t250_499": 0.05, "loss_t500_749": float("nan"), "loss_t750_999": 0.01}
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1), **levels}) + "\n" for s in range(10)))
    plot_loss_curve(path, tmp_path / "loss.png")
    # NaN-only levels (no samples there) are left out; the others in order of t
    assert drawn == ["loss", "t in [0, 249]", "t in [250, 499]", "t in [750, 999]"]


def test_to_uint8_maps_minus_one_to_zero_and_one_to_255():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    assert to_uint8(images).reshape(-1).tolist() == [0, 128, 255, 255]


def test_grid_places_every_image(tmp_path):
    images = np.stack([np.full((4, 4, 3), i * 10, np.uint8) for i in range(6)])
    grid = make_grid(images, columns=3, padding=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 10 and grid[6, 11, 0] == 50
    path = save_grid(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png")
    with Image.open(path) as image:
        assert image.mode == "L" and image.width >= 8 * 2 * 8  # small images are enlarged


def test_ema_follows_the_fixed_decay_from_the_first_step():
    model = torch.nn.Linear(4, 4)
    ema = build_ema(model, decay=0.9)
    start = ema.ema_model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, 0)
    torch.testing.assert_close(ema.ema_model.weight, 0.9 * start + 0.1 * model.weight.detach())
    assert ema.ema_model.weight.dtype == torch.float32


def test_the_ema_warmup_follows_ema_pytorch_without_reading_the_device():
    """update_ema's warmup is ema-pytorch's own update() (copy at step 0, then its decay schedule), computed
    from the trainer's step on the host: no `.item()` (aten::_local_scalar_dense) in any step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    ours, theirs = build_ema(model, decay=0.999), build_ema(model, decay=0.999)
    for step in range(6):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            update_ema(ours, step, warmup=True)
        assert not [e for e in profile.events() if e.name == "aten::_local_scalar_dense"], "a host sync"
        theirs.update()
        torch.testing.assert_close(ours.ema_model.weight, theirs.ema_model.weight, rtol=1e-6, atol=1e-7)
        assert int(ours.step) == int(theirs.step) and bool(ours.initted) == bool(theirs.initted)
