"""Export a run for other libraries: `python -m engine.export RUN_DIR --format diffusers OUT_DIR`.

Writes the run's latest checkpoint (EMA weights by default, `--raw` for the trained weights) as a
diffusers DDPMPipeline folder: `model_index.json`, `unet/` (UNet2DModel config and safetensors weights)
and `scheduler/` (DDPMScheduler config; for a run whose sample.sampler is a fast solver, the
DPMSolverMultistepScheduler or UniPCMultistepScheduler config that reproduces its samples), which
`DDPMPipeline.from_pretrained(OUT_DIR)` loads. diffusers itself is not needed to export. The folder appears whole or not at all; an existing non-empty OUT_DIR
is replaced only with `--overwrite`. Mistakes, and models diffusers cannot express, are one line with
exit status 2.
"""

from __future__ import annotations

import argparse
import sys

import torch

from engine import cli
from engine.config import ConfigError
from engine.diffusers_format import check_destination, write_diffusers_folder
from engine.run_dir import EMA_HELP, chosen_ema, load_run, weights_label

FORMATS = ("diffusers",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser("engine.export", __doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory written by engine.train")
    parser.add_argument("out_dir", help="the folder to write")
    parser.add_argument("--format", choices=FORMATS, default="diffusers", help="what to write (default diffusers)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--raw", action="store_true", help="export the trained weights instead of the EMA weights")
    weights.add_argument("--ema", metavar="NAME|SIGMA_REL", help=EMA_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    return parser.parse_args(argv)


def export(args: argparse.Namespace) -> None:
    with cli.reading_inputs():  # e.g. weights that do not fit the model
        check_destination(args.out_dir, args.overwrite)  # before reading a checkpoint for nothing
        # on the CPU: export only renames tensors, and the file must not depend on the machine
        model, config, step = load_run(args.run_dir, torch.device("cpu"), use_ema=not args.raw, ema=args.ema)
        out = write_diffusers_folder(args.out_dir, config, model.state_dict(), overwrite=args.overwrite)
    print(f"wrote {out} (diffusers DDPMPipeline, step {step}, "
          f"{weights_label(not args.raw, chosen_ema(config, not args.raw, args.ema))} weights)")


def main(argv: list[str] | None = None) -> int:
    return cli.run(export, parse_args(argv), mistakes=(ConfigError,))  # DiffusersFormatError is a ConfigError


if __name__ == "__main__":
    sys.exit(main())
