"""Sample from a trained run: `python -m engine.sample RUN_DIR --num-images 64 --sampler ddpm|ddim|dpm++2m|unipc|... --steps N --out grid.png`.

Uses the EMA weights of the run's latest checkpoint by default (`--raw` for the trained weights),
is seeded and batched, and writes a grid PNG of the first images, optionally one PNG per image
(`--png-dir`) and an `.npz` of uint8 images (key `arr_0`, shape (N, H, W, C), as the
improved-diffusion evaluation scripts expect). It draws through `engine.sampling.Sampler`, the fast path:
the registry's fused update kernels, bf16 autocast and, on CUDA, the whole denoising step compiled into a
CUDA graph. Mistakes (options, settings, a run that cannot be read) are one line with exit status 2.

Under `torchrun --nproc_per_node K -m engine.sample ...` each rank draws its share of the image
indices and rank 0 writes the outputs, identical to one process's for the same seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from engine import cli, solvers
from engine.config import Config, ConfigError, apply_override, config_from_dict
from engine.diffusers_format import is_diffusers_folder
from engine.distributed import DistributedContext, gather_to_main, init_distributed, leaving_together
from engine.images import save_grid, save_image, to_uint8
from engine.run_dir import EMA_HELP, RunDir, chosen_ema, load_run, weights_label
from engine.sampling import Sampler, in_image_order
from engine.schedule import schedule_from_config
from kernels.registry import KernelError, resolve_kernels_from_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser("engine.sample", __doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory written by engine.train (or one of its checkpoints, e.g. "
                                        "RUN_DIR/checkpoints/best.pt), or a diffusers folder")
    parser.add_argument("overrides", nargs="*", metavar="sample.key=value",
                        help="any other sample setting, e.g. sample.timestep_spacing=trailing sample.thresholding=dynamic")
    # --num-images, not --num: torchrun's own parser takes --num for its --numa-binding
    parser.add_argument("--num-images", "--num", dest="num", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch and rank (default: sample.batch_size)")
    parser.add_argument("--sampler", choices=solvers.SAMPLERS, default=None,
                        help=f"default: the run's sample.sampler; {', '.join(solvers.SOLVERS)} are fast solvers "
                             f"(good at 10-25 steps)")
    parser.add_argument("--steps", type=int, default=None,
                        help="DDIM or solver steps (default: sample.steps, 20 for a solver); ddpm runs all timesteps")
    parser.add_argument("--karras", action=argparse.BooleanOptionalAction, default=None,
                        help="solvers: Karras et al.'s noise levels (default: sample.karras_sigmas)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--variance", choices=["fixed_large", "fixed_small"], default=None, help="DDPM variance")
    parser.add_argument("--class", dest="class_list", type=int, action="append", default=None, metavar="N",
                        help="class-conditional models: draw class N (repeatable; default: every class in turn)")
    parser.add_argument("--classes", type=class_list, default=None, metavar="0,1,2",
                        help="class-conditional models: draw these classes in turn (default: sample.classes, else all)")
    parser.add_argument("--guidance", type=float, default=None, metavar="S",
                        help="classifier-free guidance scale: 1 = conditional only, 0 = unconditional, e.g. 1.5-4 "
                             "for sharper, less varied images (default: sample.guidance)")
    parser.add_argument("--no-clip", action="store_true", help="do not clip the predicted x0 to [-1, 1]")
    parser.add_argument("--seed", type=int, default=None, help="default: the run's sample.seed")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--raw", action="store_true", help="use the trained weights instead of the EMA weights")
    weights.add_argument("--ema", metavar="NAME|SIGMA_REL", help=EMA_HELP)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=None,
                        help="autocast dtype of the network (default: sample.precision; auto = bf16 on CUDA)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the denoising step (CUDA graphs on CUDA); default: sample.compile (on CUDA only)")
    parser.add_argument("--out", default=None, help="grid PNG (default: RUN_DIR/sample_grid.png; ./sample_grid.png "
                                                    "for a diffusers folder)")
    parser.add_argument("--grid-size", type=int, default=64, help="images in the grid: the first N (default 64)")
    parser.add_argument("--png-dir", default=None, help="also write every image as DIR/<index>.png")
    parser.add_argument("--npz", default=None, help="also write the images as uint8 to this .npz")
    parser.add_argument("--kernel", action="append", default=[], metavar="OP=IMPL",
                        help="override the run's kernels choice for one op, e.g. posterior_step=pytorch; repeatable")
    return parser.parse_intermixed_args(argv)  # options anywhere among the overrides


def class_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class numbers separated by commas, e.g. 0,1,2, got {text!r}") from None


def sampling_config(config: Config, args: argparse.Namespace) -> Config:
    """The run's config with the command line's sampling options, through the same checks as config files."""
    sample = config.sample
    changes = {"sampler": args.sampler or sample.sampler, "eta": sample.eta if args.eta is None else args.eta,
               "variance": args.variance or sample.variance, "clip_denoised": sample.clip_denoised and not args.no_clip,
               "batch_size": args.batch_size or sample.batch_size, "num_images": args.num,
               "use_ema": sample.use_ema and not args.raw}
    changes["steps"] = args.steps if args.steps is not None else (sample.steps if changes["sampler"] != "ddpm" else None)
    if args.class_list or args.classes:
        changes["classes"] = (args.class_list or []) + (args.classes or [])
    for name, key in (("seed", "seed"), ("precision", "precision"), ("compile", "compile"), ("karras", "karras_sigmas"),
                      ("guidance", "guidance")):
        if getattr(args, name) is not None:
            changes[key] = getattr(args, name)
    raw = config.to_dict()
    raw["sample"].update(changes)
    for override in args.overrides:
        if not override.startswith("sample."):
            raise ConfigError(f"override {override!r}: only sample.* settings can change at sampling time")
        apply_override(raw, override, "command line")
    for choice in args.kernel:
        op, sep, name = choice.partition("=")
        if not sep:
            raise ConfigError(f"--kernel {choice!r}: expected OP=IMPL, e.g. posterior_step=pytorch")
        raw.setdefault("kernels", {})[op.strip()] = name.strip()  # runs from before kernels had none
    return config_from_dict(raw, where="command line")


def load_sampler(args: argparse.Namespace, device: torch.device) -> tuple[Sampler, int]:
    """The sampler of the run's model with the command line's settings, its kernels resolved and checked; and
    the checkpoint's step."""
    if args.num < 1 or args.grid_size < 0:
        raise ConfigError(f"--num-images must be at least 1 and --grid-size at least 0 (got {args.num}, {args.grid_size})")
    with cli.reading_inputs():
        model, config, step = load_run(args.run_dir, device, use_ema=False if args.raw else None, ema=args.ema)
        config = sampling_config(config, args)
        kernels = resolve_kernels_from_config(config, device)
    return Sampler(model, config, schedule_from_config(config.diffusion).to(device), kernels, device), step


def draw(args: argparse.Namespace, sampler: Sampler, context: DistributedContext) -> np.ndarray | None:
    """This rank's share of the images as uint8 (each rank writes its own PNGs), gathered on rank 0 (None on the
    others)."""
    png_dir = Path(args.png_dir) if args.png_dir else None
    digits = max(6, len(str(args.num - 1)))
    mine = []
    for start, images in sampler.batches(args.num, sampler.settings.seed, rank=context.rank,
                                         world_size=context.world_size, progress=context.is_main):
        images = to_uint8(images)
        mine.append((start, images))
        for offset, image in enumerate(images if png_dir else []):
            save_image(image, png_dir / f"{start + offset:0{digits}d}.png")
    shares = gather_to_main(mine)
    if shares is None:
        return None
    return np.concatenate(in_image_order(shares))


def write_outputs(args: argparse.Namespace, sampler: Sampler, images: np.ndarray) -> None:
    """Rank 0's files: the grid, and the .npz if asked for (every rank has written its own PNGs)."""
    if is_diffusers_folder(args.run_dir):
        default_out = "sample_grid.png"
    elif Path(args.run_dir).suffix == ".pt":  # RUN_DIR/checkpoints/best.pt: the grid beside the run's others
        default_out = Path(args.run_dir).parents[1] / f"sample_grid_{Path(args.run_dir).stem}.png"
    else:
        default_out = RunDir(args.run_dir).sample_grid
    out = Path(args.out or default_out)
    if args.grid_size:
        grid, columns = sampler.grid_images(images, args.grid_size)
        save_grid(grid, out, columns)
        print(f"wrote {out}")
    if args.png_dir:
        print(f"wrote {len(images)} PNGs to {args.png_dir}")
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, arr_0=images)
        print(f"wrote {args.npz}")


def sample_from_run(args: argparse.Namespace) -> None:
    """The command: every rank draws its share, rank 0 reports and writes the files."""
    with cli.reading_inputs():  # e.g. --device cuda where there is none
        context = init_distributed(args.device, setting="--device")
    with leaving_together():
        sampler, step = load_sampler(args, context.device)
        started = time.perf_counter()
        images = draw(args, sampler, context)
        if images is None:
            return
        seconds, options = time.perf_counter() - started, sampler.settings
        guided = f", classes {options.classes or 'all'}, guidance {options.guidance:g}" if sampler.config.model.num_classes else ""
        print(f"sampled {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.2f} images/s) on "
              f"{context.world_size} x {context.device.type}, {options.sampler}{guided}, step {step}, "
              f"{weights_label(options.use_ema, chosen_ema(sampler.config, options.use_ema, args.ema))} weights")
        write_outputs(args, sampler, images)


def main(argv: list[str] | None = None) -> int:
    return cli.run(sample_from_run, parse_args(argv), mistakes=(ConfigError, KernelError))


if __name__ == "__main__":
    sys.exit(main())
