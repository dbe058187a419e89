"""Sample from a trained run: `python -m engine.sample RUN_DIR --num-images 64 --sampler ddpm|ddim|dpm++2m|unipc|... --steps N --out grid.png`.

Uses the EMA weights of the run's latest checkpoint by default (`--raw` for the trained weights),
is seeded and batched, and writes a grid PNG of the first images, optionally one PNG per image
(`--png-dir`) and an `.npz` of uint8 images (key `arr_0`, shape (N, H, W, C), as the
improved-diffusion evaluation scripts expect). The fast path: the registry's fused update kernels,
bf16 autocast and, on CUDA, the whole denoising step compiled into a CUDA graph.

Under `torchrun --nproc_per_node K -m engine.sample ...` each rank draws its share of the image
indices and rank 0 writes the outputs, identical to one process's for the same seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule

from engine import diffusion, solvers
from engine.config import Config, ConfigError, apply_override, config_from_dict
from engine.diffusers_format import is_diffusers_folder
from engine.distributed import (all_gather_objects, compute_dtype, gather_to_main, init_distributed,
                                rank_and_world_size, shutdown_distributed)
from engine.images import class_rows, save_grid, save_image, to_uint8
from engine.progress import progress_bar
from engine.run_dir import EMA_HELP, RunDir, chosen_ema, load_run, weights_label
from engine.schedule import NoiseSchedule, schedule_from_config
from kernels.registry import KernelError, Kernels, resolve_kernels_from_config


def step_options(config: Config) -> dict:
    """`config.sample`'s settings as `diffusion.denoising_step`'s keywords (sampler and dtype apart)."""
    options = config.sample
    return dict(eta=options.eta, variance=options.variance, clip_denoised=options.clip_denoised,
                use_clipped_model_output=options.use_clipped_model_output, thresholding=options.thresholding,
                dynamic_thresholding_ratio=options.dynamic_thresholding_ratio, target=config.diffusion.target,
                sigma_data=config.diffusion.sigma_data, unipc_order=options.unipc_order)


def plan_options(config: Config) -> dict:
    """What `diffusion.sample` needs besides a prebuilt step: the solvers' noise levels and weights."""
    options = config.sample
    return dict(karras_sigmas=options.karras_sigmas, lower_order_final=options.lower_order_final,
                target=config.diffusion.target, sigma_data=config.diffusion.sigma_data, unipc_order=options.unipc_order)


def sampling_step(model: torch.nn.Module, config: Config, schedule: NoiseSchedule, kernels: Kernels,
                  device: torch.device | str) -> diffusion.Step:
    """The denoising step of `config.sample`'s settings: network + update kernel, under bf16 autocast where
    `sample.precision` says, compiled where `sample.compile` says (on CUDA in "reduce-overhead" mode, so
    the step is one CUDA-graph replay instead of hundreds of kernel launches from Python).

    A class-conditional model is guided by `sample.guidance` (one forward of the doubled batch where it is
    not 0 or 1). Build it once and pass it to `generate` for every call: the compiled graph is reused as long as the
    model object (whose weights may change in place) and the batch shape stay the same.
    """
    options, device = config.sample, torch.device(device)
    dtype = compute_dtype(options.precision, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def network(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        with autocast:
            return diffusion.predict(model, x, t, class_labels)

    num_classes = config.model.num_classes
    denoise = diffusion.classifier_free_guidance(network, options.guidance, num_classes) if num_classes else network
    step = diffusion.denoising_step(denoise, schedule, kernels, sampler=options.sampler, **step_options(config))
    # By default on CUDA only, and not for an FSDP-sharded model, whose forward all-gathers (no CUDA graph).
    compile_step = options.compile if options.compile is not None else (
        device.type == "cuda" and not isinstance(model, FSDPModule))
    if not compile_step:
        return step
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    compiled = torch.compile(step, mode=mode, dynamic=False)
    if device.type != "cuda":
        return compiled

    def replay(*args):
        torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: the last output may be reused
        # own the results (the sample, and a solver's history): the next replay overwrites the graph's buffers
        return torch.utils._pytree.tree_map(torch.clone, compiled(*args))

    return replay


def image_classes(config: Config, indices: torch.Tensor) -> torch.Tensor | None:
    """The class of each image index: image i is of class `sample.classes[i % len]` (by default every class
    in turn, so any number of images is balanced to within one per class); None for an unconditional model."""
    num_classes = config.model.num_classes
    if not num_classes:
        return None
    classes = torch.tensor(config.sample.classes or range(num_classes), device=indices.device)
    return classes[indices % len(classes)]


def evaluation_config(config: Config, guidance: float | None = None) -> Config:
    """The config whose sample section draws evaluation images: `eval`'s sampler, steps and guidance (or
    `guidance`), every class in turn (a class-balanced set, whatever `sample.classes` says)."""
    options = config.eval
    guidance = next(scale for scale in (guidance, options.guidance, config.sample.guidance) if scale is not None)
    return with_sample(config, "evaluation", sampler=options.sampler, guidance=guidance, classes=[],
                       steps=options.steps if options.sampler != "ddpm" else None)


def with_sample(config: Config, where: str, **changes) -> Config:
    """`config` with these sample settings, through the config's checks (e.g. guidance needs a conditional
    model); `where` names them in an error."""
    raw = config.to_dict()
    raw["sample"].update(changes)
    return config_from_dict(raw, where=where)


def batch_starts(num_images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """First image index of each batch this rank draws.

    Batches are dealt to ranks in turn; every rank gets the same number (starts past `num_images` are
    padding batches, drawn and dropped), because a sharded model's forward is a collective.
    """
    batches = -(-num_images // batch_size)
    rounds = -(-batches // world_size)
    return [(rank + turn * world_size) * batch_size for turn in range(rounds)]


@torch.no_grad()
def generate_batches(model: torch.nn.Module, config: Config, schedule: NoiseSchedule, kernels: Kernels, *,
                     num_images: int, batch_size: int, seed: int, device: torch.device | str, rank: int = 0,
                     world_size: int = 1, step: diffusion.Step | None = None,
                     progress: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """This rank's share of images 0 .. num_images-1 of `seed`: (first index, images in [-1, 1] on the CPU).

    Image i is keyed by (seed, i), and a class-conditional model's is of class `image_classes`, so the images do not depend on the batch size or the number of
    ranks. Every batch has the same shape (the last one is padded with images past the end and cut),
    so a compiled step is traced once. `step` defaults to `sampling_step(...)` for this call.
    """
    options, device = config.sample, torch.device(device)
    shape = (config.data.channels, config.data.image_size, config.data.image_size)
    batch_size = min(batch_size, -(-num_images // world_size))  # no padding work for a handful of images
    step = step or sampling_step(model, config, schedule, kernels, device)
    starts = batch_starts(num_images, batch_size, rank, world_size)
    was_training = model.training
    model.eval()
    try:
        bar = progress_bar(starts, desc="sampling", unit="batch", disable=not progress or len(starts) < 2)
        for start in bar:
            labels = image_classes(config, torch.arange(start, start + batch_size, device=device))
            images = diffusion.sample(None, schedule, kernels, (batch_size, *shape), seed=seed, first_index=start,
                                      sampler=options.sampler, steps=options.steps,
                                      timestep_spacing=options.timestep_spacing, device=device,
                                      progress=progress, step=step, class_labels=labels, **plan_options(config))
            kept = images[:max(0, min(batch_size, num_images - start))]
            if len(kept):
                yield start, kept.float().clamp(-1, 1).cpu()
    finally:
        model.train(was_training)


def generate(model: torch.nn.Module, config: Config, schedule: NoiseSchedule, kernels: Kernels, *, num_images: int,
             batch_size: int, seed: int, device: torch.device | str, step: diffusion.Step | None = None,
             progress: bool = False) -> torch.Tensor:
    """Images 0 .. num_images-1 of `seed` in [-1, 1] on the CPU, on every rank.

    Under torch.distributed every rank draws its share (`generate_batches`) and the shares are gathered.
    """
    rank, world_size = rank_and_world_size()
    mine = list(generate_batches(model, config, schedule, kernels, num_images=num_images, batch_size=batch_size,
                                 seed=seed, device=device, rank=rank, world_size=world_size, step=step,
                                 progress=progress and rank == 0))
    batches = dict(pair for share in all_gather_objects(mine) for pair in share)
    return torch.cat([batches[start] for start in sorted(batches)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.sample", description=__doc__.splitlines()[0])
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


def grid_images(config: Config, images: np.ndarray, limit: int) -> tuple[np.ndarray, int | None]:
    """The images of a grid and its row length: the first `limit`, or for a class-conditional model one row
    per class."""
    labels = image_classes(config, torch.arange(len(images)))
    if labels is None:
        return images[:limit], None
    return class_rows(images, labels.numpy(), limit)


def write_outputs(args: argparse.Namespace, config: Config, images: np.ndarray) -> None:
    """Rank 0's files: the grid, and the .npz if asked for (every rank has written its own PNGs)."""
    if is_diffusers_folder(args.run_dir):
        default_out = "sample_grid.png"
    elif Path(args.run_dir).suffix == ".pt":  # RUN_DIR/checkpoints/best.pt: the grid beside the run's others
        default_out = Path(args.run_dir).parents[1] / f"sample_grid_{Path(args.run_dir).stem}.png"
    else:
        default_out = RunDir(args.run_dir).sample_grid
    out = Path(args.out or default_out)
    if args.grid_size:
        grid, columns = grid_images(config, images, args.grid_size)
        save_grid(grid, out, columns)
        print(f"wrote {out}")
    if args.png_dir:
        print(f"wrote {len(images)} PNGs to {args.png_dir}")
    if args.npz:
        Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.npz, arr_0=images)
        print(f"wrote {args.npz}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    context = init_distributed(args.device)
    try:
        if args.num < 1 or args.grid_size < 0:
            raise ConfigError(f"--num-images must be at least 1 and --grid-size at least 0 (got {args.num}, {args.grid_size})")
        model, config, step = load_run(args.run_dir, context.device, use_ema=False if args.raw else None, ema=args.ema)
        config = sampling_config(config, args)
        kernels = resolve_kernels_from_config(config, context.device)
    except (ConfigError, KernelError, RuntimeError) as error:
        if context.is_main:
            print(f"error: {error}", file=sys.stderr)
        shutdown_distributed()
        return 2
    options, device = config.sample, context.device
    schedule = schedule_from_config(config.diffusion).to(device)
    png_dir = Path(args.png_dir) if args.png_dir else None
    digits = max(6, len(str(args.num - 1)))
    started = time.perf_counter()
    mine = []
    for start, images in generate_batches(model, config, schedule, kernels, num_images=args.num,
                                          batch_size=options.batch_size, seed=options.seed, device=device,
                                          rank=context.rank, world_size=context.world_size, progress=context.is_main):
        images = to_uint8(images)
        mine.append((start, images))
        for offset, image in enumerate(images if png_dir else []):  # every rank writes its own images
            save_image(image, png_dir / f"{start + offset:0{digits}d}.png")
    shares = gather_to_main(mine)
    if context.is_main:
        batches = dict(pair for share in shares for pair in share)
        images = np.concatenate([batches[start] for start in sorted(batches)])
        seconds = time.perf_counter() - started
        guided = f", classes {options.classes or 'all'}, guidance {options.guidance:g}" if config.model.num_classes else ""
        print(f"sampled {len(images)} images in {seconds:.1f} s ({len(images) / seconds:.2f} images/s) on "
              f"{context.world_size} x {device.type}, {options.sampler}{guided}, step {step}, "
              f"{weights_label(options.use_ema, chosen_ema(config, options.use_ema, args.ema))} weights")
        write_outputs(args, config, images)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
