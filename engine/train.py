"""Train a DDPM: `python -m engine.train CONFIG [section.key=value ...] [--dry-run]`.

Works the same under `torchrun --nproc_per_node N -m engine.train CONFIG`. Everything a run
writes goes into `train.run_dir`: the resolved config, metrics.jsonl, checkpoints, sample grids and
the loss curve. Re-running the same command resumes from the run's latest checkpoint.

The step itself never prints or calls `.item()`: statistics accumulate on the device and are read
once per `train.log_every` steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

import engine
from engine import diffusion
from engine.checkpoint import load_latest_checkpoint, save_checkpoint
from engine.config import Config, ConfigError, load_config
from engine.data import DataError, build_train_loader, random_flip_mask, read_manifest
from engine.distributed import DistributedContext, init_distributed, shutdown_distributed
from engine.ema import build_ema, update_ema
from engine.images import save_grid
from engine.metrics import MetricsLog, plot_loss_curve
from engine.progress import progress_bar, write
from engine.sample import generate, resolve_kernels_from_config
from engine.schedule import schedule_from_config
from engine.unet import build_unet, count_parameters
from kernels.noise import noise_keys
from kernels.registry import KernelError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config field")
    parser.add_argument("--dry-run", action="store_true", help="validate everything, print the resolved config, exit")
    return parser.parse_args(argv)


def check_data(config: Config) -> dict[str, Any]:
    """The prepared data set must exist and match the model's image size and channels."""
    manifest = read_manifest(config.data.path)
    for key in ("image_size", "channels"):
        if manifest[key] != getattr(config.data, key):
            raise ConfigError(f"data.{key} is {getattr(config.data, key)} but the data set in {config.data.path} "
                              f"has {key} {manifest[key]}; set data.{key}={manifest[key]}")
    return manifest


def dry_run(config: Config) -> int:
    print(config.to_yaml(), end="")
    model = build_unet(config, "cpu")
    parameters = count_parameters(model)
    print(f"# model: {parameters / 1e6:.1f}M parameters ({parameters:,}), attention backend {model.attention_backend}")
    requested = config.train.device
    on_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    # Names, plugins and dotted paths only: the conformance checks run when training starts, on its device.
    kernels = resolve_kernels_from_config(config, torch.device("cuda" if on_cuda else "cpu"), check=False)
    print(f"# kernels: {kernels.describe()}")
    manifest = check_data(config)
    print(f"# data: {manifest['num_samples']:,} images of {manifest['image_size']}x{manifest['image_size']}x"
          f"{manifest['channels']} in {len(manifest['shards'])} shards at {config.data.path}")
    print("# config is valid")
    return 0


def warmup_then_constant(warmup_steps: int):
    """The DDPM learning-rate schedule: linear warmup, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def train(config: Config) -> dict[str, Any]:
    """Run (or resume) training to `train.steps`; returns a summary of the run."""
    context = init_distributed(config.train.device)
    try:
        return _train(config, context)
    finally:
        shutdown_distributed()


def _train(config: Config, context: DistributedContext) -> dict[str, Any]:
    cfg_train, cfg_data = config.train, config.data
    device, is_main = context.device, context.is_main
    log = write if is_main else (lambda message: None)

    if cfg_train.batch_size % context.world_size:
        raise ConfigError(f"train.batch_size ({cfg_train.batch_size}) must be divisible by the world size "
                          f"({context.world_size})")
    local_batch = cfg_train.batch_size // context.world_size
    manifest = check_data(config)
    run_dir = Path(cfg_train.run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml())

    torch.manual_seed(cfg_train.seed + context.rank)
    schedule = schedule_from_config(config.diffusion).to(device)
    model = build_unet(config, device)
    kernels = resolve_kernels_from_config(config, device)  # once, before any step; a broken kernel stops here
    loss_coefficients = diffusion.loss_coefficients(schedule, config.diffusion.target)
    # Sample n of the run has noise key (seed, n): this rank's share of step s is s * batch + offset + [0, local).
    rank_sample_offsets = context.rank * local_batch + torch.arange(local_batch, device=device)
    ema = build_ema(model, cfg_train.ema_decay)
    optimizer_class = torch.optim.AdamW if config.optim.name == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                                eps=config.optim.eps, weight_decay=config.optim.weight_decay,
                                foreach=True)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(config.optim.warmup_steps))
    # One generator for timesteps and flips, distinct per rank (the noise comes from counters).
    generator = torch.Generator(device=device).manual_seed((cfg_train.seed << 16) + context.rank)

    step = 0
    resumed = load_latest_checkpoint(run_dir, map_location=device)
    if resumed is not None:
        state, path = resumed
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        if "generator" in state and context.rank < len(state["generator"]):
            generator.set_state(state["generator"][context.rank].cpu())
        step = int(state["step"])
        log(f"resumed from {path} at step {step}")
    if step >= cfg_train.steps:
        log(f"{run_dir} has already trained {step} of train.steps={cfg_train.steps}; raise train.steps to continue")

    train_model: torch.nn.Module = model
    if context.is_distributed:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg_train.compile:
        train_model = torch.compile(train_model)
    use_bf16 = cfg_train.precision == "bf16" or (cfg_train.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    loader = build_train_loader(cfg_data.path, batch_size=local_batch, image_size=cfg_data.image_size,
                                channels=cfg_data.channels, num_workers=cfg_data.num_workers,
                                shuffle_buffer=cfg_data.shuffle_buffer,
                                # a resumed run continues with a fresh stream, not the first batches again
                                seed=cfg_train.seed * 1_000_003 + step,
                                resample=True, rank=context.rank, world_size=context.world_size)
    batches = iter(loader)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step) if is_main else None
    log(f"training {count_parameters(model) / 1e6:.1f}M parameters on {context.world_size} x {device} "
        f"({'bf16' if use_bf16 else 'fp32'}), {manifest['num_samples']:,} images, global batch {cfg_train.batch_size}")
    log(f"kernels: {kernels.describe()}")

    def snapshot() -> dict[str, Any]:
        generators = [generator.get_state()]
        if context.is_distributed:
            generators = [None] * context.world_size
            torch.distributed.all_gather_object(generators, generator.get_state())
        return {"step": step, "model": model.state_dict(), "ema": ema.state_dict(),
                "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                "generator": generators, "kernels": kernels.names, "config": config.to_dict(),
                "engine_version": engine.__version__}

    def write_samples(name: str) -> Path:
        images = generate(ema.ema_model if config.sample.use_ema else model, config, schedule, kernels,
                          num_images=config.sample.num_images,
                          batch_size=config.sample.batch_size, seed=config.sample.seed, device=device)
        return save_grid(images, run_dir / "samples" / name)

    # Device-side running sums, read once per log interval.
    loss_sum = torch.zeros((), device=device)
    grad_norm_sum = torch.zeros((), device=device)
    interval_steps, data_wait, skipped_total = 0, 0.0, 0
    interval_start = time.perf_counter()
    saved_step = step
    max_grad_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")  # inf: measure only
    progress = progress_bar(total=cfg_train.steps, initial=step, desc="train", disable=not is_main)
    train_model.train()
    while step < cfg_train.steps:
        wait_start = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - wait_start
        skipped_total += int(batch["skipped"])

        images = batch["image"].to(device, non_blocking=True)
        flip = (random_flip_mask(local_batch, generator=generator, device=device) if cfg_data.random_flip
                else torch.zeros(local_batch, dtype=torch.bool, device=device))
        t = diffusion.sample_timesteps(local_batch, schedule.num_timesteps, config.diffusion.timestep_sampling,
                                       generator=generator, device=device)
        keys = noise_keys(cfg_train.seed, rank_sample_offsets + step * cfg_train.batch_size)
        with autocast:
            loss = diffusion.training_loss(train_model, kernels, schedule, images, flip, t, keys,
                                           target=config.diffusion.target, coefficients=loss_coefficients)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True)
        optimizer.step()
        lr_schedule.step()
        update_ema(ema, cfg_train.ema_warmup)
        loss_sum += loss.detach()
        grad_norm_sum += grad_norm.detach()
        interval_steps += 1
        step += 1
        progress.update(1)

        if step % cfg_train.log_every == 0 or step == cfg_train.steps:
            stats = torch.stack([loss_sum, grad_norm_sum]) / interval_steps
            if context.is_distributed:
                torch.distributed.all_reduce(stats)
                stats /= context.world_size
            mean_loss, mean_grad_norm = stats.tolist()  # the one host sync of the interval
            elapsed = time.perf_counter() - interval_start
            record = {"step": step, "loss": mean_loss, "lr": lr_schedule.get_last_lr()[0],
                      "grad_norm": mean_grad_norm,
                      "images_per_sec": interval_steps * cfg_train.batch_size / elapsed,
                      "data_wait_fraction": min(1.0, data_wait / elapsed), "skipped_samples": skipped_total,
                      "time": time.time()}
            if metrics is not None:
                metrics.write(record)
            progress.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['images_per_sec']:.0f}")
            loss_sum.zero_(), grad_norm_sum.zero_()
            interval_steps, data_wait, interval_start = 0, 0.0, time.perf_counter()

        if step % cfg_train.checkpoint_every == 0 or step == cfg_train.steps:
            state = snapshot()
            if is_main:
                save_checkpoint(run_dir, step, state, keep=cfg_train.keep_checkpoints)
            saved_step = step
        if is_main and cfg_train.sample_every and step % cfg_train.sample_every == 0 and step < cfg_train.steps:
            write_samples(f"step-{step:08d}.png")
    progress.close()

    summary: dict[str, Any] = {"run_dir": str(run_dir), "step": step, "skipped_samples": skipped_total}
    if is_main:
        if metrics is not None:
            metrics.close()
        grid = write_samples(f"step-{step:08d}.png")
        (run_dir / "samples.png").write_bytes(grid.read_bytes())
        curve = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"training loss ({run_dir.name})")
        summary.update(samples=str(run_dir / "samples.png"), loss_curve=str(curve))
        log(f"done at step {step} (checkpoint at step {saved_step}); samples: {run_dir / 'samples.png'}; "
            f"loss curve: {curve}; skipped samples: {skipped_total}")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(config)
        train(config)
    except (ConfigError, DataError, KernelError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
