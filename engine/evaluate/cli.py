"""FID and KID of generated images against a reference set, with the FID Inception network.

    python -m engine.evaluate SAMPLES --reference REF [--inception PATH] [--batch-size N]
                              [--device auto|cpu|cuda] [--json OUT.json] [--num-images N]
                              [--kid-subset-size N] [--kid-subsets N] [--seed S]
    python -m engine.evaluate --save-reference OUT.npz --reference SOURCE [--reference-num N]
                              [--max-features N]
    python -m engine.evaluate --run RUN_DIR --reference REF [--guidance 1,1.5,2,3] [--raw | --ema 0.05,0.1]
                              [...]

With `--run`, the images are drawn from a trained run (its latest checkpoint, EMA weights unless
`--raw`) as training's evaluation draws them: `eval.sampler`, `eval.steps`, `eval.seed`,
`eval.num_images` (or `--num-images`), every class in turn for a class-conditional model. With
`--guidance` a list of scales, one set is drawn and evaluated per scale and the best FID is reported;
so with `--ema` a list of EMAs, e.g. post-hoc lengths (sigma_rel) to choose the EMA after training.

SAMPLES is an `.npz` of uint8 images (key `arr_0`, (N, H, W, C), as `engine.sample --npz` writes
it) or a folder of image files (any layout). REF is a statistics file written by
`--save-reference`, a pytorch-fid / ADM-style `.npz` with `mu` and `sigma`, or any image source:
an `.npz` of images, a data set prepared by `engine.data.prepare` (a folder with manifest.json),
an image folder, a .tar/.tar.gz of one, or the CIFAR-10 python archive (engine.data.image_sets reads
them all). Computing statistics from a source reads all of its images once; save them with
`--save-reference` to do that only once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from engine import cli
from engine.atomic_files import atomic_write
from engine.config import ConfigError
from engine.data import DataError
from engine.data.image_sets import open_images
from engine.diffusers_format import is_diffusers_folder
from engine.distributed import init_distributed, is_distributed, leaving_together, rank_and_world_size, rank_slice
from engine.evaluate.errors import EvaluationError
from engine.evaluate.feature_network import (DEFAULT_BATCH_SIZE, DEFAULT_INCEPTION, INCEPTION_ENV, FeatureNetwork,
                                             load_feature_network)
from engine.evaluate.fid import DEFAULT_KID_SUBSET_SIZE, DEFAULT_KID_SUBSETS, evaluate, summary
from engine.evaluate.reference import DEFAULT_MAX_FEATURES, ReferenceStats, load_reference, save_reference
from engine.progress import write as progress_write
from engine.run_dir import EMA_HELP, load_run, read_run_checkpoint
from engine.sampling import Sampler
from engine.schedule import schedule_from_config
from kernels.registry import KernelError, resolve_kernels_from_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser("engine.evaluate", __doc__.splitlines()[0])
    parser.add_argument("samples", nargs="?", help="generated images: an .npz (arr_0, (N, H, W, C) uint8) or an "
                                                   "image folder")
    parser.add_argument("--reference", required=True,
                        help="a statistics .npz (--save-reference, or mu/sigma from pytorch-fid / ADM), or images: "
                             "a prepared data set, an image folder, a .tar/.tar.gz of one, the CIFAR-10 python "
                             "archive, an .npz")
    parser.add_argument("--run", metavar="RUN_DIR", help="draw the images from this run (or diffusers folder) instead")
    parser.add_argument("--guidance", type=_scales, metavar="1,1.5,2",
                        help="with --run: classifier-free guidance scales to evaluate, the best reported "
                             "(default: eval.guidance, else sample.guidance)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--raw", action="store_true", help="with --run: the trained weights instead of the EMA")
    weights.add_argument("--ema", metavar="NAME|SIGMA_REL", type=_ema_choices,
                         help=f"with --run: {EMA_HELP}; several, separated by commas (e.g. 0.05,0.1,0.15), are each "
                              f"evaluated and the best reported")
    parser.add_argument("--save-reference", metavar="OUT.npz", help="write the reference statistics to OUT.npz")
    parser.add_argument("--inception", metavar="PATH",
                        help=f"inception-2015-12-05.pt (default: ${INCEPTION_ENV}, else {DEFAULT_INCEPTION})")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per feature batch ({DEFAULT_BATCH_SIZE})")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (auto)")
    parser.add_argument("--json", metavar="OUT.json", help="also write the results as JSON")
    # --num-images, not --num: torchrun's own parser takes --num for its --numa-binding
    parser.add_argument("--num-images", "--num", dest="num", type=int, help="evaluate only the first N samples")
    parser.add_argument("--reference-num", type=int, help="compute the reference from its first N images only")
    parser.add_argument("--max-features", type=int, default=DEFAULT_MAX_FEATURES,
                        help=f"reference feature rows kept for KID ({DEFAULT_MAX_FEATURES})")
    parser.add_argument("--kid-subset-size", type=int, default=DEFAULT_KID_SUBSET_SIZE,
                        help=f"images per KID subset ({DEFAULT_KID_SUBSET_SIZE})")
    parser.add_argument("--kid-subsets", type=int, default=DEFAULT_KID_SUBSETS,
                        help=f"KID subsets ({DEFAULT_KID_SUBSETS})")
    parser.add_argument("--seed", type=int, default=0, help="KID subsets and the reference feature subset (0)")
    args = parser.parse_args(argv)
    if args.samples is None and args.save_reference is None and args.run is None:
        parser.error("give SAMPLES to evaluate, or --run RUN_DIR, or --save-reference OUT.npz")
    if args.samples is not None and args.run is not None:
        parser.error("give SAMPLES or --run RUN_DIR, not both")
    if (args.guidance or args.raw or args.ema) and args.run is None:
        parser.error("--guidance, --raw and --ema draw images from a run: add --run RUN_DIR")
    return args


def _ema_choices(text: str) -> list[str]:
    choices = [part.strip() for part in text.split(",") if part.strip()]
    if not choices:
        raise argparse.ArgumentTypeError(f"expected EMA names or sigma_rels separated by commas, got {text!r}")
    return choices


def _scales(text: str) -> list[float]:
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        scales = []
    if not scales or min(scales) < 0:
        raise argparse.ArgumentTypeError(f"expected guidance scales >= 0 separated by commas, got {text!r}")
    return scales


def _run(args: argparse.Namespace, is_main: bool, device: torch.device) -> None:
    net = load_feature_network(args.inception, device)
    stats = load_reference(args.reference, net, num=args.reference_num, max_features=args.max_features,
                           seed=args.seed, batch_size=args.batch_size, device=device, progress=is_main)
    if args.save_reference:
        if is_main:
            save_reference(stats, args.save_reference)
            kept = 0 if stats.features is None else len(stats.features)
            print(f"wrote {args.save_reference}: statistics of {stats.num_images} images from {stats.source} "
                  f"({net.num_features} features, {kept} rows kept for KID, {net.identity})")
        if is_distributed():
            dist.barrier()
    if args.run is not None:
        _evaluate_run(args, stats, net, is_main, device)
    if args.samples is None:
        return
    images = open_images(args.samples, num=args.num)
    share = rank_slice(images.total)
    result = evaluate(images.read(args.batch_size, share), stats, net, kid_subset_size=args.kid_subset_size,
                      kid_subsets=args.kid_subsets, batch_size=args.batch_size, device=device, seed=args.seed,
                      total=len(share), progress=is_main)
    if not is_main:
        return
    for note in result["notes"]:
        progress_write(f"evaluate: note: {note}")
    print(summary(result))
    if args.json:
        _write_json(args, {**result, "samples": str(args.samples)}, net)


def _write_json(args: argparse.Namespace, record: dict, net: FeatureNetwork) -> None:
    record = {**record, "reference": str(args.reference), "feature_network": net.identity,
              "world_size": rank_and_world_size()[1]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(Path(args.json), lambda file: file.write((json.dumps(record, indent=1) + "\n").encode()))


def _evaluate_run(args: argparse.Namespace, stats: ReferenceStats, net: FeatureNetwork, is_main: bool,
                  device: torch.device) -> None:
    """FID/KID of images drawn from a run for each EMA asked for (--ema 0.05,0.1,0.15: EDM2's sweep of post-hoc
    lengths) at each guidance scale (one set each, shared by the ranks); the lines and JSON name the best."""
    # several EMAs of one run: its checkpoint read once (a diffusers folder holds one set of weights)
    checkpoint = read_run_checkpoint(args.run) if len(args.ema or []) > 1 and not is_diffusers_folder(args.run) else None
    results, kernels = [], None
    for ema in args.ema or [None]:
        model, config, step = load_run(args.run, device, use_ema=False if args.raw else None, ema=ema,
                                       checkpoint=checkpoint)
        if args.guidance and not config.model.num_classes:
            raise EvaluationError(f"--guidance needs a class-conditional model; {args.run} is unconditional")
        kernels = kernels or resolve_kernels_from_config(config, device)  # checked once: the same for every EMA
        sampler = Sampler(model, config, schedule_from_config(config.diffusion).to(device), kernels, device)
        results += _evaluate_sampler(args, sampler, {"ema": ema, "step": step}, stats, net, is_main)
    best = min(results, key=lambda result: result["fid"])
    if is_main and len(results) > 1:
        print(f"best: {_label(best)}, FID {best['fid']:.2f}")
    if is_main and args.json:
        _write_json(args, {"run": str(args.run), "step": results[-1]["step"], "best": best, "results": results}, net)


def _evaluate_sampler(args: argparse.Namespace, sampler: Sampler, weights: dict, stats: ReferenceStats,
                      net: FeatureNetwork, is_main: bool) -> list[dict]:
    """One result per guidance scale of the sampler's model, whose `weights` ({"ema": the EMA asked for or None,
    "step": the checkpoint's}) each result records."""
    config = sampler.config
    rank, world_size = rank_and_world_size()
    results = []
    for scale in args.guidance or [None]:
        evaluation = sampler.for_evaluation(scale)
        batches = evaluation.batches(args.num or config.eval.num_images, config.eval.seed, config.eval.batch_size,
                                     rank=rank, world_size=world_size, progress=is_main)
        result = evaluate(batches, stats, net, kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                          batch_size=args.batch_size, device=sampler.device, seed=args.seed)
        results.append({**result, **weights,
                        "guidance": evaluation.settings.guidance if config.model.num_classes else None})
        if is_main:
            label = _label(results[-1])
            print(f"{label + ': ' if label else ''}{summary(result)} ({evaluation.settings.sampler}, "
                  f"step {weights['step']})")
    return results


def _label(result: dict) -> str:
    """"ema 0.1, guidance 2": what a result's images were drawn with, where it was chosen."""
    parts = ([f"ema {result['ema']}"] if result["ema"] is not None else []) + \
        ([f"guidance {result['guidance']:g}"] if result["guidance"] is not None else [])
    return ", ".join(parts)


def _evaluate_command(args: argparse.Namespace) -> None:
    joined_here = not is_distributed()  # a caller's process group is the caller's to end
    with cli.one_line_warnings("evaluate"):
        with cli.reading_inputs():  # e.g. --device cuda without CUDA
            context = init_distributed(args.device, setting="--device")
        with leaving_together() if joined_here else contextlib.nullcontext():
            _run(args, context.is_main, context.device)


def main(argv: list[str] | None = None) -> int:
    return cli.run(_evaluate_command, parse_args(argv), mistakes=(EvaluationError, DataError, ConfigError, KernelError),
                   label="evaluate")
