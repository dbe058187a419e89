"""Sample from a trained run: `python -m engine.sample RUN_DIR --num 64 --sampler ddpm|ddim --steps N --out grid.png`.

Uses the EMA weights of the run's latest checkpoint by default (`--raw` for the trained weights),
is seeded, batched, and writes a grid PNG and optionally an `.npz` of uint8 images (key `arr_0`,
shape (N, H, W, C), as the improved-diffusion evaluation scripts expect).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from engine import diffusion
from engine.checkpoint import load_latest_checkpoint
from engine.config import Config, ConfigError, config_from_dict
from engine.distributed import choose_device
from engine.images import save_grid, to_uint8
from engine.progress import progress_bar
from engine.schedule import NoiseSchedule, schedule_from_config
from engine.unet import build_unet
from kernels.registry import OPS as KERNEL_OPS
from kernels.registry import KernelError, Kernels, resolve_kernels


def resolve_kernels_from_config(config: Config, device: torch.device, check: bool | None = None) -> Kernels:
    """The run's kernel choices resolved for `device`, once; checked as `kernels.check` says unless `check` is given."""
    choices = {op: getattr(config.kernels, op) for op in KERNEL_OPS}
    return resolve_kernels(choices, device, plugins=config.kernels.plugins,
                           check=config.kernels.check if check is None else check)


@torch.no_grad()
def generate(model: torch.nn.Module, config: Config, schedule: NoiseSchedule, kernels: Kernels, *, num_images: int,
             batch_size: int, seed: int, device: torch.device | str, progress: bool = False) -> torch.Tensor:
    """`num_images` samples in [-1, 1] on the CPU, drawn with the settings of `config.sample`.

    Image i is keyed by (seed, i): the same seed gives the same images whatever the batch size.
    """
    options = config.sample
    device = torch.device(device)
    shape = (config.data.channels, config.data.image_size, config.data.image_size)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    was_training = model.training
    model.eval()
    batches = []
    starts = range(0, num_images, batch_size)
    for start in progress_bar(starts, desc="sampling", unit="batch", disable=not progress or len(starts) < 2):
        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with autocast:
                return model(x, t)

        images = diffusion.sample(denoise, schedule, kernels, (min(batch_size, num_images - start), *shape), seed=seed,
                                  first_index=start, sampler=options.sampler, steps=options.steps, eta=options.eta,
                                  variance=options.variance, clip_denoised=options.clip_denoised,
                                  target=config.diffusion.target, device=device, progress=progress)
        batches.append(images.float().clamp(-1, 1).cpu())
    model.train(was_training)
    return torch.cat(batches)


def load_run(run_dir: str | Path, device: torch.device, use_ema: bool | None = None) -> tuple[torch.nn.Module, Config, int]:
    """The model of a run's latest checkpoint, its config and step.

    EMA weights when `use_ema` is true; None follows the run's `sample.use_ema`.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    loaded = load_latest_checkpoint(run_dir, map_location="cpu")
    if loaded is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; train first with python -m engine.train")
    state, path = loaded
    config = config_from_dict(state["config"], where=str(path))
    model = build_unet(config, device)
    if use_ema is None:
        use_ema = config.sample.use_ema
    if use_ema:  # ema-pytorch keeps the averaged copy under "ema_model."
        weights = {k.removeprefix("ema_model."): v for k, v in state["ema"].items() if k.startswith("ema_model.")}
    else:
        weights = state["model"]
    model.load_state_dict(weights)
    return model, config, int(state["step"])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.sample", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory written by engine.train")
    parser.add_argument("--num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: sample.batch_size)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim"], default=None, help="default: the run's sample.sampler")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (ddpm always runs all timesteps)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--variance", choices=["fixed_large", "fixed_small"], default=None, help="DDPM variance")
    parser.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    parser.add_argument("--seed", type=int, default=None, help="default: the run's sample.seed")
    parser.add_argument("--raw", action="store_true", help="use the trained weights instead of the EMA weights")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--out", default=None, help="grid PNG (default: RUN_DIR/sample_grid.png)")
    parser.add_argument("--npz", default=None, help="also write the images as uint8 to this .npz")
    parser.add_argument("--kernel", action="append", default=[], metavar="OP=IMPL",
                        help="override the run's kernels choice for one op, e.g. posterior_step=pytorch; repeatable")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = choose_device(args.device)
        model, config, step = load_run(args.run_dir, device, use_ema=False if args.raw else None)
        sample = config.sample
        changes = {"sampler": args.sampler or sample.sampler, "eta": sample.eta if args.eta is None else args.eta,
                   "variance": args.variance or sample.variance, "clip_denoised": sample.clip_denoised and not args.no_clip,
                   "batch_size": args.batch_size or sample.batch_size, "num_images": args.num}
        changes["steps"] = args.steps if args.steps is not None else (sample.steps if changes["sampler"] == "ddim" else None)
        if args.seed is not None:
            changes["seed"] = args.seed
        raw = config.to_dict()
        raw["sample"].update(changes)
        for choice in args.kernel:
            op, sep, name = choice.partition("=")
            if not sep:
                raise ConfigError(f"--kernel {choice!r}: expected OP=IMPL, e.g. posterior_step=pytorch")
            raw.setdefault("kernels", {})[op.strip()] = name.strip()  # runs from before kernels had none
        config = config_from_dict(raw, where="command line")  # the same checks as the config files
        kernels = resolve_kernels_from_config(config, device)
    except (ConfigError, KernelError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    schedule = schedule_from_config(config.diffusion).to(device)
    images = generate(model, config, schedule, kernels, num_images=args.num, batch_size=config.sample.batch_size,
                      seed=config.sample.seed, device=device, progress=True)
    out = Path(args.out) if args.out else Path(args.run_dir) / "sample_grid.png"
    save_grid(images, out)
    print(f"wrote {out} ({args.num} images, {config.sample.sampler}, step {step}, "
          f"{'EMA' if config.sample.use_ema and not args.raw else 'raw'} weights)")
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, arr_0=to_uint8(images))
        print(f"wrote {args.npz}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
