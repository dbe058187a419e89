"""One training run, top to bottom: `TrainingRun` sets up the trainer, the training state (restored from the
run's latest checkpoint: engine.checkpoint.TrainingCheckpoint) and the data stream, then loops: a step
(`engine.trainer.train_step`, which never prints or calls `.item()`), then the maintenance concerns that are due
(engine.maintenance: log, post-hoc EMA snapshots, checkpoint, the agreed stop, sample grids, FID, validation).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from engine.checkpoint import TrainingCheckpoint, checkpoint_name
from engine.config import Config
from engine.data import build_train_loader, load_device_cache
from engine.data.remote import is_url
from engine.data.stream_position import StreamPosition
from engine.diffusion import untrained_start_warning
from engine.distributed import DistributedContext
from engine.evaluate import evaluate, load_feature_network, load_reference, save_reference
from engine.evaluate import summary as evaluation_summary
from engine.images import make_grid, save_grid, to_uint8
from engine.lr_schedule import describe as describe_lr
from engine.maintenance import (BestCheckpoint, Checkpoints, Concern, Evaluation, LogInterval, PostHocSnapshots,
                                SampleGrids, StopOnRequest, Validation)
from engine.metrics_log import MetricsLog, start_wandb
from engine.plot import plot_loss_curve
from engine.progress import progress_bar, write
from engine.rng import Generators
from engine.run_dir import RunDir
from engine.sampling import Sampler
from engine.throughput import model_flops_per_image, peak_bf16_flops, small_micro_batch_warning
from engine.trainer import IntervalStats, Trainer, TrainState, build_trainer, train_step
from engine.unet import count_parameters
from engine.validation import ValidationLoss, training_shards


class TrainingRun:
    """One invocation of the training loop: the trainer and the training state (a checkpoint's parts), this rank's
    data stream, and the maintenance concerns asked after every step."""

    def __init__(self, config: Config, context: DistributedContext, manifest: dict[str, Any],
                 initial_weights: dict[str, torch.Tensor] | None = None):
        cfg_train, steps = config.train, config.train.steps
        self.config, self.context, self.layout = config, context, RunDir(cfg_train.run_dir)
        self.log = write if context.is_main else (lambda message: None)
        if context.is_main:
            self.layout.path.mkdir(parents=True, exist_ok=True)
            self.layout.config.write_text(config.to_yaml())
        self.trainer = build_trainer(config, context, initial_weights)
        if initial_weights is not None:
            self.log(f"starting from the weights in {cfg_train.init_from}")
        # The training state, restored from the run's latest checkpoint if there is one (the generators: in `run`).
        self.state, self.stream = TrainState(), StreamPosition.fresh(cfg_train.seed, config.data.num_workers)
        self.checkpoint = TrainingCheckpoint(config, context, self.trainer, counters=self.state,
                                             generators=Generators(context.device, cfg_train.seed, context.rank),
                                             stream=self.stream, log=self.log)
        self.resumed_from = self.checkpoint.resume()  # the checkpoint's header; None for a fresh run
        self.batches = open_data(config, context, self.trainer.micro_batch, self.state, self.stream, self.log)
        self.metrics = MetricsLog(
            self.layout.metrics, resume_step=self.state.step,
            tensorboard_dir=self.layout.tensorboard if cfg_train.tensorboard else None,
            wandb_run=start_wandb(cfg_train, self.layout.path, config.to_dict()) if cfg_train.wandb else None,
        ) if context.is_main else None
        # What runs between steps, built once: the sampler (compiled once), FID's network and reference, the held-out
        # images; the progress bar last, after the setup's own lines and bars.
        sampler_model = self.trainer.ema.ema_model if config.sample.use_ema else self.trainer.model
        self.sampler = Sampler(sampler_model, config, self.trainer.schedule, self.trainer.kernels, context.device)
        flops = model_flops_per_image(config)  # counted once, on the meta device
        peak = peak_bf16_flops(context.device) if self.trainer.dtype == torch.bfloat16 else None
        post_hoc = PostHocSnapshots(self.layout.post_hoc_ema, self.trainer.post_hoc_emas,
                                    cfg_train.post_hoc_ema_every or cfg_train.checkpoint_every, steps, context.is_main)
        post_hoc.remove_after(self.state.step, self.log)
        describe(self.log, config, context, self.trainer, manifest, self.state.step, (flops, peak), post_hoc)
        evaluate_now = build_evaluation(self.layout.path, self.sampler, context, self.log, self.metrics)
        validation_loss = ValidationLoss(config, context, self.trainer) if config.eval.val_every else None
        best = BestCheckpoint(cfg_train.keep_best, self.checkpoint, self.log)
        self.interval = IntervalStats(context.device)
        self.stop = StopOnRequest(self.checkpoint, context)
        self.progress = progress_bar(total=steps, initial=self.state.step, desc="train", disable=not context.is_main)
        validation = Validation(validation_loss, self.trainer, self.metrics, self.progress, config.eval.val_every,
                                steps, best)
        validation.describe(self.log)
        # asked in this order after every step (engine.maintenance)
        self.concerns: list[Concern] = [
            LogInterval(config, context, self.trainer, self.state, self.interval, self.metrics, self.progress, flops,
                        peak),
            post_hoc, Checkpoints(self.checkpoint, cfg_train.checkpoint_every, steps), self.stop,
            SampleGrids(self.write_samples, cfg_train.sample_every, steps),
            Evaluation(evaluate_now, config.eval.every, steps, best), validation]

    # ------------------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        config, context, state = self.config, self.context, self.state
        sync_check, first_step = config.train.sync_check and context.device.type == "cuda", state.step
        self.trainer.train_model.train()
        if self.resumed_from is not None:  # last thing before the first step: setting up draws from them too
            self.checkpoint.load_generators(self.resumed_from)
        self.interval.restart()
        while state.step < config.train.steps:
            # after the first step (autotuning, lazy init) nothing inside a step may wait for the device
            with sync_debug_mode("error" if sync_check and state.step > first_step else None):
                stats = train_step(self.trainer, state.step, self.next_batch)
            self.interval.add(stats)
            state.step += 1
            self.progress.update(1)
            if self.maintenance(state.step):
                break
        self.progress.close()
        self.stop.close()
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

    def maintenance(self, step: int) -> bool:
        """The concerns due after `step`, in order; True (the agreed stop) ends the loop. Their seconds are kept out
        of the interval's training time (a log restarts the interval: what came before it is not the new one's)."""
        started = time.perf_counter()
        try:
            for concern in self.concerns:
                if concern.due(step) and concern.run(step):
                    return True
            return False
        finally:
            self.interval.maintenance_seconds += time.perf_counter() - max(started, self.interval.started)

    def write_samples(self, name: str) -> Path | None:
        """Every rank draws its share of the images (a sharded model's forward is a collective anyway); rank 0
        writes the grid."""
        options = self.config.sample
        images = self.sampler.generate(options.num_images, options.seed, options.batch_size)
        if not self.context.is_main:
            return None
        images, columns = self.sampler.grid_images(to_uint8(images), len(images))  # one row per class, if any
        if self.metrics is not None:
            self.metrics.add_image("samples", make_grid(images, columns), self.state.step)
        return save_grid(images, self.layout.samples / name, columns)

    def finish(self) -> dict[str, Any]:
        """The summary; after a full run also the final grid and the loss curve."""
        state, layout, stopped_by = self.state, self.layout, self.stop.stopped_by
        summary: dict[str, Any] = {"run_dir": str(layout.path), "step": state.step,
                                   "skipped_samples": state.skipped_samples, "nonfinite_steps": state.nonfinite_steps}
        if stopped_by is not None:
            if self.metrics is not None:
                self.metrics.close()
            self.log(f"stopped by {stopped_by} at step {state.step}; checkpoint "
                     f"{layout.checkpoints / checkpoint_name(state.step)}; run the same command to resume")
            return {**summary, "stopped_by": stopped_by}
        grid = self.write_samples(f"step-{state.step:08d}.png")
        if self.context.is_main:
            if self.metrics is not None:
                self.metrics.close()
            layout.final_samples.write_bytes(grid.read_bytes())
            curve = plot_loss_curve(layout.metrics, layout.loss_curve, title=f"training loss ({layout.path.name})")
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


def describe(log, config: Config, context: DistributedContext, trainer: Trainer, manifest: dict[str, Any], step: int,
             flops: tuple[float, float | None], post_hoc: PostHocSnapshots) -> None:
    """What is trained, on what, how, at what cost per image ((FLOPs per image, peak FLOP/s per device))."""
    cfg_train, (flops_per_image, peak_flops) = config.train, flops
    if step >= cfg_train.steps:
        log(f"{cfg_train.run_dir} has already trained {step} of train.steps={cfg_train.steps}; raise train.steps "
            f"to continue")
    parallel = cfg_train.parallel if context.is_distributed else "single process"
    images = sum(shard["num_samples"] for shard in manifest["shards"][training_shards(config) or slice(None)])
    log(f"training {count_parameters(trainer.model) / 1e6:.1f}M parameters on {context.world_size} x "
        f"{context.device} ({parallel}, {str(trainer.dtype).removeprefix('torch.')}"
        f"{', compiled' if cfg_train.compile else ''}), {images:,} images, global batch "
        f"{cfg_train.batch_size} = {context.world_size} ranks x {cfg_train.grad_accum_steps} micro-batches "
        f"x {trainer.micro_batch}")
    log(describe_lr(config))
    for warning in (small_micro_batch_warning(config, context.device.type, context.world_size),
                    untrained_start_warning(config.diffusion, trainer.schedule)):
        if warning is not None:
            log(f"warning: {warning}")
    log(f"kernels: {trainer.kernels.describe()}; model: {flops_per_image / 1e9:.1f} GFLOP per image per training "
        f"step" + (f", peak {peak_flops / 1e12:.0f} TFLOP/s bf16 per device" if peak_flops else ""))
    post_hoc.describe(log, trainer.model)


def build_evaluation(run_dir: Path, sampler: Sampler, context: DistributedContext, log,
                     metrics: MetricsLog | None):
    """`evaluate_now(step)`: FID and KID of the sampler's model (the one `sample.use_ema` picks) against
    `eval.reference`, on `eval.num_images` images shared by the ranks, logged to the metrics (and TensorBoard).

    The feature network and the reference statistics are loaded once, here. A reference that is a data set
    is read once per run: its statistics are cached as RUN_DIR/fid_reference.npz.
    """
    config = sampler.config
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
    evaluation = sampler.for_evaluation()  # its step is compiled once and reused by every evaluation

    def evaluate_now(step: int) -> dict:
        started = time.perf_counter()
        batches = evaluation.batches(options.num_images, options.seed, options.batch_size, rank=context.rank,
                                     world_size=context.world_size)
        result = evaluate(batches, reference, feature_net, kid_subset_size=options.kid_subset_size,
                          device=context.device, seed=options.seed)
        seconds = time.perf_counter() - started
        guided = f" at guidance {evaluation.settings.guidance:g}" if config.model.num_classes else ""
        log(f"step {step}: {evaluation_summary(result)}{guided}, {seconds:.0f} s")
        if metrics is not None:
            metrics.write({"step": step, "fid": result["fid"], "kid": result["kid"], "kid_std": result["kid_std"],
                           "eval_images": result["num_images"], "eval_seconds": seconds,
                           **({"eval_guidance": evaluation.settings.guidance} if config.model.num_classes else {})})
        return result

    return evaluate_now


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
