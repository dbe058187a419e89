"""Train a DDPM: `python -m engine.train CONFIG [section.key=value ...] [--dry-run]`.

Works the same under `torchrun --nproc_per_node N -m engine.train CONFIG`. Everything a run
writes goes into `train.run_dir`: the resolved config, metrics.jsonl, checkpoints, sample grids and
the loss curve. Re-running the same command resumes from the run's latest checkpoint.

The loop reads top to bottom in `TrainingRun.run`: `engine.trainer.train_step` (which never prints or
calls `.item()`: statistics accumulate on the device and are read once per `train.log_every` steps), then
one `maintenance()` call (log, checkpoint, the agreed stop, samples, evaluation).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from engine import memory
from engine.checkpoint import BEST, CheckpointError, TrainingCheckpoint, checkpoint_name
from engine.config import Config, ConfigError, load_config
from engine.data import DataError, build_train_loader, load_device_cache, read_manifest
from engine.data.remote import is_url
from engine.diffusers_format import init_state_dict
from engine.diffusion import untrained_start_warning
from engine.data.stream_position import StreamPosition
from engine.distributed import DistributedContext, init_distributed, shutdown_distributed
from engine.evaluate import (EvaluationError, evaluate, inception_path, load_feature_network, load_reference,
                             save_reference)
from engine.evaluate import summary as evaluation_summary
from engine.images import make_grid, save_grid, to_uint8
from engine.lr_schedule import describe as describe_lr
from engine.metrics_log import MetricsLog, start_wandb, tensorboard_writer_class, wandb_module
from engine.plot import plot_loss_curve
from engine.post_hoc_ema import post_hoc_name, remove_snapshots_after, save_snapshots
from engine.preemption import StopRequest, agreed_stop
from engine.progress import progress_bar, write
from engine.rng import Generators
from engine.run_dir import RunDir
from engine.sample import evaluation_config, generate, generate_batches, grid_images, sampling_step
from engine.throughput import (interval_metrics, model_flops_per_image, peak_bf16_flops, progress_fields,
                               small_micro_batch_warning)
from engine.trainer import IntervalStats, TrainState, build_trainer, noise_level_names, train_step
from engine.unet import build_unet, count_parameters
from engine.validation import ValidationLoss, training_shards, validation_record
from kernels.registry import KernelError, resolve_kernels_from_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.train", description=__doc__.splitlines()[0])
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


def build_evaluation(config: Config, run_dir: Path, model: torch.nn.Module, schedule, kernels,
                     context: DistributedContext, log, metrics: MetricsLog | None):
    """`evaluate_now(step)`: FID and KID of `model` (the one `sample.use_ema` picks) against `eval.reference`,
    on `eval.num_images` images shared by the ranks, logged to the metrics (and TensorBoard).

    The feature network and the reference statistics are loaded once, here. A reference that is a data set
    is read once per run: its statistics are cached as RUN_DIR/fid_reference.npz.
    """
    options = config.eval
    if not options.every:
        return None
    feature_net = load_feature_network(options.inception or None, context.device)
    source = options.reference or config.data.path
    source = source if is_url(source) else Path(source)  # a Path would fold a URL's // into /
    cached, is_statistics = RunDir(run_dir).fid_reference, str(source).endswith(".npz")
    if not is_statistics and cached.is_file():
        source = cached
    log(f"evaluation: FID/KID every {options.every} steps on {options.num_images:,} images, reference {source}")
    reference = load_reference(source, feature_net, device=context.device, progress=context.is_main)
    if not is_statistics and context.is_main:
        save_reference(reference, cached)
    eval_config = evaluation_config(config)
    step_fn = sampling_step(model, eval_config, schedule, kernels, context.device)

    def evaluate_now(step: int) -> dict:
        started = time.perf_counter()
        batches = generate_batches(model, eval_config, schedule, kernels, num_images=options.num_images,
                                   batch_size=options.batch_size, seed=options.seed, device=context.device,
                                   rank=context.rank, world_size=context.world_size, step=step_fn)
        result = evaluate(batches, reference, feature_net, kid_subset_size=options.kid_subset_size,
                          device=context.device, seed=options.seed)
        seconds = time.perf_counter() - started
        guided = f" at guidance {eval_config.sample.guidance:g}" if config.model.num_classes else ""
        log(f"step {step}: {evaluation_summary(result)}{guided}, {seconds:.0f} s")
        if metrics is not None:
            metrics.write({"step": step, "fid": result["fid"], "kid": result["kid"], "kid_std": result["kid_std"],
                           "eval_images": result["num_images"], "eval_seconds": seconds,
                           **({"eval_guidance": eval_config.sample.guidance} if config.model.num_classes else {})})
        return result

    return evaluate_now


def train(config: Config) -> dict[str, Any]:
    """Run (or resume) training to `train.steps`; returns a summary of the run."""
    context = init_distributed(config.train.device)
    try:
        return TrainingRun(config, context).run()
    finally:
        shutdown_distributed()


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. only non-finite steps): one line naming the step (exit status 1)."""


def check_bad_fraction(skipped: int, delivered: int, cfg_data, step: int, progress) -> None:
    """Stop rather than train on a trickle of data: too many skipped samples is an error (this rank's counts,
    both over the same span: every step since the run began, resumes included)."""
    seen = skipped + delivered
    if seen >= 100 and skipped > cfg_data.max_bad_fraction * seen:
        progress.close()
        raise TrainingError(f"step {step}: {skipped} of the {seen} samples read from {cfg_data.path} could not be used "
                            f"({skipped / seen:.0%} > data.max_bad_fraction={cfg_data.max_bad_fraction}); the warnings "
                            f"above name the shards; prepare the data set again")


class TrainingRun:
    """One invocation of the training loop: the trainer and its state, the data stream, and the maintenance
    (logs, checkpoints, the agreed stop, sample grids, evaluation) between steps."""

    def __init__(self, config: Config, context: DistributedContext):
        self.config, self.context = config, context
        self.log = write if context.is_main else (lambda message: None)
        manifest = check_data(config)
        initial_weights = check_extras(config)
        self.run_dir, self.layout = Path(config.train.run_dir), RunDir(config.train.run_dir)
        if context.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.layout.config.write_text(config.to_yaml())
        self.trainer = build_trainer(config, context, initial_weights)
        self.post_hoc_every = config.train.post_hoc_ema_every or config.train.checkpoint_every
        if initial_weights is not None:
            self.log(f"starting from the weights in {config.train.init_from}")
        self.flops_per_image = model_flops_per_image(config)  # counted once, on the meta device
        self.peak_flops = peak_bf16_flops(context.device) if self.trainer.dtype == torch.bfloat16 else None
        self.header = self.resume()
        self.batches = open_data(config, context, self.trainer.micro_batch, self.state, self.stream, self.log)
        self.metrics = MetricsLog(
            self.layout.metrics, resume_step=self.state.step,
            tensorboard_dir=self.layout.tensorboard if config.train.tensorboard else None,
            wandb_run=start_wandb(config.train, self.run_dir, config.to_dict()) if config.train.wandb else None,
        ) if context.is_main else None
        self.describe(manifest)
        self.setup_maintenance()

    def resume(self) -> dict | None:
        """The training state: restored from the latest checkpoint, if there is one (all but the generators: in
        `run`); returns its header."""
        config, context = self.config, self.context
        self.state, self.stream = TrainState(), StreamPosition.fresh(config.train.seed, config.data.num_workers)
        self.checkpoint = TrainingCheckpoint(config, context, self.trainer, counters=self.state,
                                             generators=Generators(context.device, config.train.seed, context.rank),
                                             stream=self.stream, log=self.log)
        header = self.checkpoint.resume()
        if self.context.is_main and (removed := remove_snapshots_after(self.layout.post_hoc_ema, self.state.step)):
            self.log(f"removed {removed} post-hoc EMA snapshots after step {self.state.step}, from before the "
                     f"restart (this run writes them again)")
        if self.state.step >= config.train.steps:
            self.log(f"{self.run_dir} has already trained {self.state.step} of train.steps={config.train.steps}; "
                     f"raise train.steps to continue")
        return header

    def describe(self, manifest: dict) -> None:
        config, context, trainer = self.config, self.context, self.trainer
        cfg_train = config.train
        parallel = cfg_train.parallel if context.is_distributed else "single process"
        images = sum(shard["num_samples"] for shard in manifest["shards"][training_shards(config) or slice(None)])
        self.log(f"training {count_parameters(trainer.model) / 1e6:.1f}M parameters on {context.world_size} x "
                 f"{context.device} ({parallel}, {str(trainer.dtype).removeprefix('torch.')}"
                 f"{', compiled' if cfg_train.compile else ''}), {images:,} images, global batch "
                 f"{cfg_train.batch_size} = {context.world_size} ranks x {cfg_train.grad_accum_steps} micro-batches "
                 f"x {trainer.micro_batch}")
        self.log(describe_lr(config))
        for warning in (small_micro_batch_warning(config, context.device.type, context.world_size),
                        untrained_start_warning(config.diffusion, trainer.schedule)):
            if warning is not None:
                self.log(f"warning: {warning}")
        self.log(f"kernels: {trainer.kernels.describe()}; model: {self.flops_per_image / 1e9:.1f} GFLOP per image per "
                 f"training step" + (f", peak {self.peak_flops / 1e12:.0f} TFLOP/s bf16 per device"
                                     if self.peak_flops else ""))
        if trainer.post_hoc_emas:
            megabytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**20
            snapshots = len(trainer.post_hoc_emas) * -(-cfg_train.steps // self.post_hoc_every)
            self.log(f"post-hoc EMA: sigma_rel {', '.join(f'{s:g}' for s in trainer.post_hoc_emas)}, snapshotted every "
                     f"{self.post_hoc_every} steps to {self.layout.post_hoc_ema} ({megabytes:.0f} MiB each, "
                     f"{snapshots * megabytes / 1024:.1f} GiB by step {cfg_train.steps}); --ema SIGMA_REL synthesizes "
                     f"any length")

    def setup_maintenance(self) -> None:
        """What runs between steps, built once: the sampler (compiled once), evaluation, stop requests."""
        config, context, trainer = self.config, self.context, self.trainer
        self.sampler_model = trainer.ema.ema_model if config.sample.use_ema else trainer.model
        self.sampler_step = sampling_step(self.sampler_model, config, trainer.schedule, trainer.kernels,
                                          context.device)
        self.evaluate_now = build_evaluation(config, self.run_dir, self.sampler_model, trainer.schedule,
                                             trainer.kernels, context, self.log, self.metrics)
        self.validation = ValidationLoss(config, context, trainer) if config.eval.val_every else None
        # the best score so far (best.pt's, read by rank 0), so that a resumed run keeps a better old best
        self.best = self.checkpoint.read_best_score() if config.train.keep_best != "none" else None
        if self.validation is not None:
            self.log(f"validation: the loss every {config.eval.val_every} steps on {self.validation.num_images:,} "
                     f"held-out images of {self.validation.source} at t = {self.validation.timesteps}")
        self.interval = IntervalStats(context.device)
        self.stopped_by = None
        # Stop requests (SIGTERM, SIGINT) are agreed between ranks over a host-side group every
        # `stop_check_every` steps (every step in one process, where checking is free).
        self.stop_request = StopRequest(announce=context.is_main)
        self.control_group = torch.distributed.new_group(backend="gloo") if context.is_distributed else None
        self.stop_check_every = 10 if context.is_distributed else 1
        self.progress = progress_bar(total=config.train.steps, initial=self.state.step, desc="train",
                                     disable=not context.is_main)

    # ------------------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        config, context, state = self.config, self.context, self.state
        sync_check, first_step = config.train.sync_check and context.device.type == "cuda", state.step
        self.trainer.train_model.train()
        # Last thing before the first step: setting up the data draws from the global generators too.
        if self.header is not None:
            self.checkpoint.load_generators(self.header)
        self.interval.restart()
        while state.step < config.train.steps:
            # after the first step (autotuning, lazy init) nothing inside a step may wait for the device
            with sync_debug_mode("error" if sync_check and state.step > first_step else None):
                stats = train_step(self.trainer, state.step, self.next_batch)
            self.interval.add(stats)
            state.step += 1
            self.progress.update(1)
            if self.maintenance():
                break
        self.progress.close()
        self.stop_request.restore()
        return self.finish()

    def next_batch(self) -> dict:
        """The next micro-batch, its wait and the data counters accounted for."""
        started = time.perf_counter()
        batch = next(self.batches)
        self.interval.data_wait += time.perf_counter() - started
        self.state.skipped_samples += int(batch["skipped"])
        self.state.delivered_samples += self.trainer.micro_batch
        self.stream.advance(batch)
        return batch

    def maintenance(self) -> bool:
        """Everything between two steps, in order: log, checkpoint, the agreed stop, samples, evaluation.
        Its seconds are kept out of the interval's training time. Returns True to stop the loop."""
        cfg_train, step = self.config.train, self.state.step
        last = step == cfg_train.steps
        started = time.perf_counter()
        if step % cfg_train.log_every == 0 or last:
            self.log_interval()
            started = time.perf_counter()  # the interval restarted in log_interval
        try:
            if self.trainer.post_hoc_emas and (step % self.post_hoc_every == 0 or last):  # before the checkpoint:
                save_snapshots(self.layout.post_hoc_ema, self.trainer.post_hoc_emas, step, self.context.is_main)
            if step % cfg_train.checkpoint_every == 0 or last:  # a resume from it never lacks its snapshots
                self.checkpoint.save()
            if step % self.stop_check_every == 0 and agreed_stop(self.stop_request, self.control_group):
                self.stopped_by = self.stop_request.requested or "another rank's stop request"
                if self.checkpoint.saved_step != step:
                    self.checkpoint.save()
                return True
            if cfg_train.sample_every and step % cfg_train.sample_every == 0 and not last:
                self.write_samples(f"step-{step:08d}.png")
            if self.config.eval.every and (step % self.config.eval.every == 0 or last):
                self.keep_if_best(self.evaluate_now(step))
            if self.validation is not None and (step % self.config.eval.val_every == 0 or last):
                self.keep_if_best(self.validate(step))
        finally:
            self.interval.maintenance_seconds += time.perf_counter() - started
        return False

    def validate(self, step: int) -> dict[str, float]:
        """The validation loss of the raw and the EMA weights (every rank takes part) to the metrics."""
        loss, trainer = self.validation.loss, self.trainer
        others = {**trainer.extra_emas, **{post_hoc_name(s): ema for s, ema in trainer.post_hoc_emas.items()}}
        record = validation_record(step, loss(trainer.model), loss(trainer.ema.ema_model),
                                   {name: loss(ema.ema_model) for name, ema in others.items()})
        if self.metrics is not None:
            self.metrics.write(record)
        self.progress.set_postfix(val=f"{record['val_loss']:.4f}", val_ema=f"{record['val_loss_ema']:.4f}")
        return record

    def log_interval(self) -> None:
        """The interval's means (one host sync) to metrics.jsonl and the progress bar; then the checks on them."""
        config, context, state, interval = self.config, self.context, self.state, self.interval
        reduced = interval.reduce(context)
        state.nonfinite_steps += reduced["nonfinite_steps"]
        record = {"step": state.step, "loss": reduced["loss"], "lr": float(self.trainer.lr_schedule.get_last_lr()[0]),
                  "grad_norm": reduced["grad_norm"], "skipped_samples": state.skipped_samples,
                  "nonfinite_steps": reduced["nonfinite_steps"], "time": time.time(),
                  "maintenance_seconds": interval.maintenance_seconds,
                  **dict(zip(noise_level_names(self.trainer.schedule.num_timesteps), reduced["loss_by_level"])),
                  **interval_metrics(steps=interval.steps, images=interval.steps * config.train.batch_size,
                                     seconds=interval.training_seconds(), data_wait_seconds=interval.data_wait,
                                     world_size=context.world_size, flops_per_image=self.flops_per_image,
                                     peak_flops_per_device=self.peak_flops, device=context.device)}
        if self.metrics is not None:
            self.metrics.write(record)
        self.progress.set_postfix(loss=f"{reduced['loss']:.4f}", **progress_fields(record))
        interval.restart()
        check_bad_fraction(state.skipped_samples, state.delivered_samples, config.data, state.step, self.progress)
        streak, limit = reduced["nonfinite_streak"], config.train.max_nonfinite_steps
        if streak >= limit:
            self.progress.close()
            raise TrainingError(
                f"step {state.step}: the last {streak} steps had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={limit}); none was applied, so the checkpoints hold the weights of "
                f"step {state.step - streak}; lower optim.lr or check the data")

    def keep_if_best(self, scores: dict[str, float]) -> None:
        """With train.keep_best, a score below the best so far (the same on every rank: the measures are
        reduced) writes best.pt."""
        metric = self.config.train.keep_best
        if metric not in scores or not math.isfinite(value := scores[metric]):
            return
        if self.best is not None and self.best["metric"] == metric and value >= self.best["value"]:
            return
        previous = f" (was {self.best['value']:.6g} at step {self.best['step']})" if self.best else ""
        self.best = {"metric": metric, "value": value, "step": self.state.step}
        self.checkpoint.save_best(self.best)
        self.log(f"step {self.state.step}: best {metric} {value:.6g}{previous}: "
                 f"{self.layout.checkpoints / BEST}")

    def write_samples(self, name: str) -> Path | None:
        """Every rank draws its share of the images (a sharded model's forward is a collective anyway); rank 0
        writes the grid."""
        config, trainer = self.config, self.trainer
        images = generate(self.sampler_model, config, trainer.schedule, trainer.kernels,
                          num_images=config.sample.num_images, batch_size=config.sample.batch_size,
                          seed=config.sample.seed, device=self.context.device, step=self.sampler_step)
        if not self.context.is_main:
            return None
        images, columns = grid_images(config, to_uint8(images), len(images))  # one row per class, if any
        if self.metrics is not None:
            self.metrics.add_image("samples", make_grid(images, columns), self.state.step)
        return save_grid(images, self.layout.samples / name, columns)

    def finish(self) -> dict[str, Any]:
        """The summary; after a full run also the final grid and the loss curve."""
        state, run_dir, layout = self.state, self.run_dir, self.layout
        summary: dict[str, Any] = {"run_dir": str(run_dir), "step": state.step,
                                   "skipped_samples": state.skipped_samples, "nonfinite_steps": state.nonfinite_steps}
        if self.stopped_by is not None:
            if self.metrics is not None:
                self.metrics.close()
            self.log(f"stopped by {self.stopped_by} at step {state.step}; checkpoint "
                     f"{layout.checkpoints / checkpoint_name(state.step)}; run the same command to resume")
            return {**summary, "stopped_by": self.stopped_by}
        grid = self.write_samples(f"step-{state.step:08d}.png")
        if self.context.is_main:
            if self.metrics is not None:
                self.metrics.close()
            layout.final_samples.write_bytes(grid.read_bytes())
            curve = plot_loss_curve(layout.metrics, layout.loss_curve, title=f"training loss ({run_dir.name})")
            summary.update(samples=str(layout.final_samples), loss_curve=str(curve))
            self.log(f"done at step {state.step} (checkpoint at step {self.checkpoint.saved_step}); samples: "
                     f"{layout.final_samples}; loss curve: {curve}; skipped samples: {state.skipped_samples}; "
                     f"skipped non-finite steps: {state.nonfinite_steps}")
        return summary


def open_data(config: Config, context: DistributedContext, micro_batch: int, state: TrainState,
              stream: StreamPosition, log) -> Iterator[dict]:
    """This rank's micro-batches: from the device cache (resumed by the step), or streamed from `stream`."""
    cfg_data, cfg_train = config.data, config.train
    if cfg_data.cache == "device":  # read once; then batches are drawn on the device, no DataLoader
        cache = load_device_cache(cfg_data.path, image_size=cfg_data.image_size, channels=cfg_data.channels,
                                  shard_slice=training_shards(config),
                                  device=context.device, rank=context.rank, world_size=context.world_size,
                                  num_workers=cfg_data.num_workers, cache_dir=cfg_data.cache_dir)
        log(f"data: {cache.describe()} (rank 0)")
        state.skipped_samples = cache.skipped  # the set's unreadable samples, counted once per load
        return cache.batches(micro_batch, seed=cfg_train.seed, start_batch=state.step * cfg_train.grad_accum_steps)
    return iter(build_train_loader(
        cfg_data.path, batch_size=micro_batch, image_size=cfg_data.image_size, channels=cfg_data.channels,
        num_workers=cfg_data.num_workers, shuffle_buffer=cfg_data.shuffle_buffer, seed=stream.seed,
        start=stream.positions, resample=True, rank=context.rank, world_size=context.world_size,
        pin_memory=context.device.type == "cuda", shard_slice=training_shards(config),
        cache_dir=cfg_data.cache_dir, first_worker=stream.next_worker))


@contextmanager
def sync_debug_mode(mode: str | None) -> Iterator[None]:
    """CUDA's sync debug mode for the duration (train.sync_check: "error" makes any host sync raise)."""
    if mode is None:
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(config)
        train(config)
    except (ConfigError, DataError, KernelError, EvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
