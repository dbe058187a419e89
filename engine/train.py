"""Train a DDPM: `python -m engine.train CONFIG [section.key=value ...] [--dry-run]`.

Works the same under `torchrun --nproc_per_node N -m engine.train CONFIG`. Everything a run
writes goes into `train.run_dir`: the resolved config, metrics.jsonl, checkpoints, sample grids and
the loss curve. Re-running the same command resumes from the run's latest checkpoint.

Here: the command line, the checks made before anything is trained, the dry run and the entry point. The run
itself is `engine.training_run.TrainingRun`: its loop reads top to bottom, `engine.trainer.train_step` (which
never prints or calls `.item()`: statistics accumulate on the device and are read once per `train.log_every`
steps), then the maintenance concerns that are due (engine.maintenance).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from engine import cli, memory
from engine.checkpoint import CheckpointError
from engine.config import Config, ConfigError, load_config
from engine.data import DataError, read_manifest
from engine.data.remote import is_url
from engine.diffusers_format import init_state_dict
from engine.distributed import init_distributed, launched_world_size, leaving_together
from engine.evaluate import EvaluationError, inception_path, load_feature_network
from engine.lr_schedule import describe as describe_lr
from engine.maintenance import TrainingError
from engine.metrics_log import tensorboard_writer_class, wandb_module
from engine.trainer import build_trainer, train_step  # noqa: F401 (the trainer and the step a run trains with)
from engine.trainer import micro_batch_size
from engine.training_run import TrainingRun
from engine.unet import build_unet, count_parameters
from kernels.registry import KernelError, resolve_kernels_from_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser("engine.train", __doc__.splitlines()[0])
    parser.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override any config field")
    parser.add_argument("--dry-run", action="store_true", help="validate everything, print the resolved config, exit")
    return parser.parse_intermixed_args(argv)  # options anywhere among the overrides, as users type them


def check_data(config: Config) -> dict[str, Any]:
    """The prepared data set must exist and match the model's image size, channels and (for a class-conditional
    model) number of classes."""
    manifest = read_manifest(config.data.path)
    for key in ("image_size", "channels"):
        if manifest[key] != getattr(config.data, key):
            raise ConfigError(f"data.{key} is {getattr(config.data, key)} but the data set in {config.data.path} "
                              f"has {key} {manifest[key]}; set data.{key}={manifest[key]}")
    classes = len(manifest["classes"])
    if config.model.num_classes and config.model.num_classes != classes:
        raise ConfigError(f"model.num_classes is {config.model.num_classes} but the data set in {config.data.path} "
                          f"has {classes} classes ({', '.join(manifest['classes'][:5])}"
                          f"{', ...' if classes > 5 else ''}); set model.num_classes={classes}")
    if config.eval.val_shards:  # held out of the training set: some must remain to train on
        shards = len(manifest["shards"])
        if config.eval.val_shards >= shards:
            raise ConfigError(f"eval.val_shards is {config.eval.val_shards} but the data set in {config.data.path} has "
                              f"{shards} shards: some must remain for training (prepare it with a smaller --shard-size)")
    elif config.eval.val_every:  # held-out images of the same kind (and, for a conditional model, classes)
        held_out = read_manifest(config.eval.val_data)
        for key in ("image_size", "channels", *(("classes",) if config.model.num_classes else ())):
            if held_out[key] != (expected := manifest[key]):
                raise ConfigError(f"eval.val_data {config.eval.val_data} has {key} {held_out[key]} but the training "
                                  f"data set has {expected}")
    return manifest


def check_extras(config: Config) -> dict[str, torch.Tensor] | None:
    """What optional settings need (packages, files) is there before any step is trained; returns the
    `train.init_from` weights, if any."""
    if config.train.tensorboard:
        tensorboard_writer_class()
    if config.train.wandb:
        wandb_module()
    if config.eval.every:
        inception, _ = inception_path(config.eval.inception or None)
        if not inception.is_file():  # load_feature_network says the same, with where to get the file
            load_feature_network(inception)
        reference = config.eval.reference or config.data.path
        if is_url(reference):  # a data set at a URL: its manifest must be there (DataError naming the URL)
            read_manifest(reference)
        elif not Path(reference).exists():
            raise ConfigError(f"eval.reference: {reference} does not exist (a statistics .npz from "
                              f"python -m engine.evaluate --save-reference, or a data set)")
    if config.train.init_from:
        return init_state_dict(config.train.init_from, config)
    return None


def dry_run(config: Config) -> int:
    print(config.to_yaml(), end="")
    model = build_unet(config, "cpu")
    parameters = count_parameters(model)
    print(f"# model: {parameters / 1e6:.1f}M parameters ({parameters:,}), attention backend {model.attention_backend}")
    print(f"# {describe_lr(config)}")
    estimate = memory.estimate_memory(config)
    for line in memory.describe(estimate, memory.per_gpu_batch(config), config.model.activation_checkpointing):
        print(f"# {line}")
    requested = config.train.device
    on_cuda = requested.startswith("cuda") or (requested == "auto" and torch.cuda.is_available())
    # Names, plugins and dotted paths only: the conformance checks run when training starts, on its device.
    kernels = resolve_kernels_from_config(config, torch.device("cuda" if on_cuda else "cpu"), check=False)
    print(f"# kernels: {kernels.describe()}")
    manifest = check_data(config)
    check_extras(config)
    print(f"# data: {manifest['num_samples']:,} images of {manifest['image_size']}x{manifest['image_size']}x"
          f"{manifest['channels']} in {len(manifest['shards'])} shards at {config.data.path}")
    print("# config is valid")
    return 0


def train(config: Config) -> dict[str, Any]:
    """Run (or resume) training to `train.steps`; returns a summary of the run."""
    # a batch that does not split is said before the process group exists: a rank that leaves while another is still
    # joining it makes gloo fail there (connectFullMesh) instead of the one line
    micro_batch_size(config.train.batch_size, launched_world_size(), config.train.grad_accum_steps)
    with cli.reading_inputs():  # train.device=cuda where there is none
        context = init_distributed(config.train.device)
    with leaving_together():
        manifest = check_data(config)
        initial_weights = check_extras(config)
        return TrainingRun(config, context, manifest, initial_weights).run()


def train_command(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    if args.dry_run:
        return dry_run(config)
    train(config)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run(train_command, parse_args(argv), mistakes=(ConfigError, DataError, KernelError, EvaluationError),
                   faults=(TrainingError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
