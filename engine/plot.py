"""Pictures of a diffusion: `python -m engine.plot WHAT ...`, each a PNG.

    schedules   sqrt(abar_t) (solid) and sqrt(1 - abar_t) (dashed) against t, several schedules on one chart
    loss        the loss curve of a run's metrics.jsonl
    noising     data images noised at several timesteps: a row per image, a column per t
    trajectory  while a run's model samples: x_t (odd rows) and its predicted x_0 (even rows) at chosen steps
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import cli, diffusion, solvers
from engine.config import ConfigError
from engine.data import DataError, build_train_loader, read_manifest
from engine.images import make_grid, save_image, to_uint8
from engine.metrics_log import read_metrics
from engine.run_dir import RunDir
from engine.sampling import Sampler, with_sample
from engine.schedule import NoiseSchedule
from kernels.noise import noise_keys, randn_like
from kernels.q_sample import images_to_unit_range

NOISE_LEVEL_FIELD = re.compile(r"loss_t(\d+)_(\d+)")  # engine.trainer.noise_level_names


def plot_schedules(names: list[str], num_timesteps: int, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    t = np.arange(num_timesteps)
    for name in names:
        schedule = NoiseSchedule.create(name, num_timesteps)
        line, = axes.plot(t, schedule.sqrt_alphas_cumprod.numpy(), label=f"{name}: sqrt(abar_t)")
        axes.plot(t, schedule.sqrt_one_minus_alphas_cumprod.numpy(), "--", color=line.get_color(),
                  label=f"{name}: sqrt(1 - abar_t)")
    axes.set(xlabel="t", ylabel="coefficient", title=f"noise schedules, T = {num_timesteps}")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return out


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path, title: str = "training loss") -> Path:
    """Loss against step on a log scale, with a moving average to see the trend through the noise."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    everything = read_metrics(metrics_path)
    records = [r for r in everything if "loss" in r and "step" in r]
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(steps, losses, color="tab:blue", alpha=0.4, linewidth=1, label="loss")
    plot_noise_levels(axis, records)
    plot_validation(axis, everything)
    window = max(1, len(losses) // 20)
    if window > 1:
        smoothed = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                    for i in range(len(losses))]
        axis.plot(steps, smoothed, color="tab:blue", linewidth=2, label=f"moving average ({window})")
    if losses and min(losses) > 0:
        axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("MSE loss")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    figure.savefig(png_path)
    plt.close(figure)
    return png_path


def plot_validation(axis, records: list[dict[str, Any]]) -> None:
    """The validation loss (fixed timesteps and noise on held-out images) of the raw and EMA weights, as markers."""
    for name, colour, label in (("val_loss", "tab:red", "validation (raw)"), ("val_loss_ema", "tab:orange", "validation (EMA)")):
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        if points:
            axis.plot(*zip(*points), color=colour, marker="o", markersize=3, linewidth=1.2, label=label)


def plot_noise_levels(axis, records: list[dict[str, Any]]) -> None:
    """The loss per quarter of the timestep range (the loss_tA_B fields) as thin lines, least noise darkest."""
    import matplotlib.pyplot as plt

    levels = {name: match.groups() for record in records for name in record
              if (match := NOISE_LEVEL_FIELD.fullmatch(name))}  # name -> (first t, last t)
    names = sorted(levels, key=lambda name: int(levels[name][0]))
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(names), 1)))
    for colour, name in zip(colours, names):
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float)) and math.isfinite(r[name])]
        if points:
            low, high = levels[name]
            axis.plot(*zip(*points), color=colour, linewidth=0.8, alpha=0.8, label=f"t in [{low}, {high}]")


def noising_strip(data: str | Path, timesteps: list[int], *, num_images: int = 4, schedule: str = "linear",
                  num_timesteps: int = 1000, seed: int = 0) -> np.ndarray:
    """uint8 (H', W', C) grid: the first `num_images` images of a prepared set, noised at each t (eq. 4)."""
    manifest = read_manifest(data)
    loader = build_train_loader(data, batch_size=num_images, image_size=manifest["image_size"],
                                channels=manifest["channels"], num_workers=0, shuffle_buffer=0, resample=False)
    images = next(iter(loader))["image"][:num_images]
    x0 = images_to_unit_range(images, torch.zeros(len(images), dtype=torch.bool), torch.float32)
    noise_schedule = NoiseSchedule.create(schedule, num_timesteps).to("cpu", torch.float32)
    keys = noise_keys(seed, torch.arange(len(images)))
    columns = []
    for step in timesteps:
        t = torch.full((len(images),), step)
        columns.append(diffusion.q_sample(noise_schedule, x0, t, randn_like(x0, keys, t)))
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # image-major: a row per image
    return make_grid(to_uint8(tiles), columns=len(timesteps))


def trajectory_grid(run_dir: str | Path, *, num_images: int = 4, num_frames: int = 6, device: str = "cpu",
                    seed: int = 0, guidance: float | None = None) -> np.ndarray:
    """uint8 grid of x_t and predicted x_0 at `num_frames` evenly spaced steps of the run's sampler; a
    class-conditional model draws image i for class i mod num_classes, guided by `guidance` (default:
    the run's sample.guidance)."""
    from engine.distributed import choose_device
    from engine.run_dir import load_run
    from engine.schedule import schedule_from_config
    from kernels.registry import resolve_kernels_from_config

    with cli.reading_inputs():  # --device cuda where there is none
        torch_device = choose_device(device, setting="--device")
    model, config, _ = load_run(run_dir, torch_device)
    if guidance is not None:  # checked as the config checks it: >= 0, and only for a class-conditional model
        config = with_sample(config, "--guidance", guidance=guidance)
    schedule = schedule_from_config(config.diffusion).to(torch_device)
    kernels = resolve_kernels_from_config(config, torch_device)
    options = config.sample
    solver = options.sampler in solvers.SOLVERS
    if solver:
        timesteps, _ = solvers.noise_levels(schedule, options.steps or solvers.DEFAULT_STEPS, options.timestep_spacing,
                                            options.karras_sigmas)
        steps = sorted(int(t) for t in timesteps)
    elif options.sampler == "ddim":
        steps = diffusion.ddim_timesteps(schedule.num_timesteps, options.steps or schedule.num_timesteps,
                                         options.timestep_spacing)
    else:
        steps = list(range(schedule.num_timesteps))
    wanted = {steps[round(i)] for i in np.linspace(len(steps) - 1, 0, num_frames)}
    frames: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(step: int, x_t: torch.Tensor, prediction: torch.Tensor) -> None:
        """The solvers' steps see x_0, DDPM's and DDIM's eps."""
        if step in wanted:
            t = torch.full((x_t.shape[0],), step, device=x_t.device)
            x0 = prediction if solver else diffusion.predict_x0_from_eps(schedule, x_t, t, prediction)
            frames[step] = (x_t.clamp(-1, 1).cpu(), x0.clamp(-1, 1).cpu())

    Sampler(model, config, schedule, kernels, torch_device, on_step=record).generate(num_images, seed, num_images)
    order = sorted(frames, reverse=True)  # from noise to data
    rows = []
    for image in range(num_images):
        rows.append(torch.stack([frames[step][0][image] for step in order]))
        rows.append(torch.stack([frames[step][1][image] for step in order]))
    return make_grid(to_uint8(torch.cat(rows)), columns=len(order))


def _save(grid: np.ndarray, out: str | Path) -> Path:
    """Small images enlarged (nearest neighbour) until the grid is about 512 pixels wide."""
    return save_image(grid, out, scale=max(1, 512 // grid.shape[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser("engine.plot", __doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="what", required=True)
    schedules = commands.add_parser("schedules", help="schedule curves")
    schedules.add_argument("--schedules", nargs="+", default=["linear", "cosine", "scaled_linear"])
    schedules.add_argument("--timesteps", type=int, default=1000)
    schedules.add_argument("--out", default="schedules.png")
    loss = commands.add_parser("loss", help="a run's loss curve")
    loss.add_argument("run_dir")
    loss.add_argument("--out", default=None, help="default: RUN_DIR/loss.png")
    noising = commands.add_parser("noising", help="data images noised at several timesteps")
    noising.add_argument("data", help="a prepared data set")
    noising.add_argument("--timesteps", default="0,50,100,250,500,750,999")
    noising.add_argument("--images", type=int, default=4)
    noising.add_argument("--schedule", default="linear")
    noising.add_argument("--out", default="noising.png")
    trajectory = commands.add_parser("trajectory", help="x_t and predicted x_0 while sampling")
    trajectory.add_argument("run_dir")
    trajectory.add_argument("--images", type=int, default=4)
    trajectory.add_argument("--frames", type=int, default=6)
    trajectory.add_argument("--device", default="auto")
    trajectory.add_argument("--guidance", type=float, default=None,
                            help="a class-conditional run's guidance scale (default: its sample.guidance)")
    trajectory.add_argument("--out", default=None, help="default: RUN_DIR/trajectory.png")
    return parser.parse_args(argv)


def plot(args: argparse.Namespace) -> None:
    """The picture the command names, written where it says."""
    if args.what == "schedules":
        out = plot_schedules(args.schedules, args.timesteps, args.out)
    elif args.what == "loss":
        metrics = RunDir(args.run_dir).metrics
        if not metrics.is_file():
            raise ConfigError(f"{metrics} does not exist; train first with python -m engine.train")
        out = plot_loss_curve(metrics, args.out or RunDir(args.run_dir).loss_curve)
    elif args.what == "noising":
        timesteps = [int(step) for step in args.timesteps.split(",")]
        grid = noising_strip(args.data, timesteps, num_images=args.images, schedule=args.schedule)
        out = _save(grid, args.out)
    else:
        grid = trajectory_grid(args.run_dir, num_images=args.images, num_frames=args.frames, device=args.device,
                               guidance=args.guidance)
        out = _save(grid, args.out or Path(args.run_dir) / "trajectory.png")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    # ValueError: a schedule or timestep list that does not parse; IndexError: a timestep past the schedule's end
    return cli.run(plot, parse_args(argv), mistakes=(ConfigError, DataError, ValueError, IndexError))


if __name__ == "__main__":
    sys.exit(main())
