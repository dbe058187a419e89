"""Train a DDPM: `python -m engine.train CONFIG [section.key=value ...] [--dry-run]`.

Works the same under `torchrun --nproc_per_node N -m engine.train CONFIG`. Everything a run
writes goes into `train.run_dir`: the resolved config, metrics.jsonl, checkpoints, sample grids and
the loss curve. Re-running the same command resumes from the run's latest checkpoint.

The step itself never prints or calls `.item()`: statistics accumulate on the device and are read
once per `train.log_every` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

import engine
from engine import diffusion
from engine.checkpoint import CheckpointError, checkpoint_name, load_latest_checkpoint, save_checkpoint
from engine.config import Config, ConfigError, load_config
from engine.data import DataError, build_train_loader, load_device_cache, random_flip_mask, read_manifest
from engine.diffusers_format import init_state_dict
from engine.distributed import (DistributedContext, all_gather_objects, compute_dtype, init_distributed,
                                shutdown_distributed)
from engine.ema import build_ema, ema_state, load_ema_state, update_ema
from engine.evaluate import (EvaluationError, evaluate, inception_path, load_feature_network, load_reference,
                             save_reference)
from engine.evaluate import summary as evaluation_summary
from engine.images import make_grid, save_grid, to_uint8
from engine.metrics import MetricsLog, plot_loss_curve, tensorboard_writer_class
from engine.parallel import (compile_model, full_model_state, full_optimizer_state, full_tensor, gradient_sync,
                             load_full_model_state, load_full_optimizer_state, shard, wrap)
from engine.preemption import StopRequest, agreed_stop
from engine.progress import progress_bar, write
from engine.sample import generate, generate_batches, resolve_kernels_from_config, sampling_step
from engine.rng import restore_rng_state, rng_state
from engine.schedule import schedule_from_config
from engine.throughput import interval_metrics, model_flops_per_image, peak_bf16_flops, progress_fields
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


def check_extras(config: Config) -> dict[str, torch.Tensor] | None:
    """What optional settings need (packages, files) is there before any step is trained; returns the
    `train.init_from` weights, if any."""
    if config.train.tensorboard:
        tensorboard_writer_class()
    if config.eval.every:
        inception, _ = inception_path(config.eval.inception or None)
        if not inception.is_file():  # load_feature_network says the same, with where to get the file
            load_feature_network(inception)
        reference = config.eval.reference or config.data.path
        if not Path(reference).exists():
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
    source = Path(options.reference or config.data.path)
    cached = run_dir / "fid_reference.npz"
    if source.suffix != ".npz" and cached.is_file():
        source = cached
    log(f"evaluation: FID/KID every {options.every} steps on {options.num_images:,} images, reference {source}")
    reference = load_reference(source, feature_net, device=context.device, progress=context.is_main)
    if source.suffix != ".npz" and context.is_main:
        save_reference(reference, cached)
    sampling = dataclasses.replace(config.sample, sampler=options.sampler,
                                   steps=options.steps if options.sampler == "ddim" else None)
    eval_config = dataclasses.replace(config, sample=sampling)
    step_fn = sampling_step(model, eval_config, schedule, kernels, context.device)

    def evaluate_now(step: int) -> dict:
        started = time.perf_counter()
        batches = generate_batches(model, eval_config, schedule, kernels, num_images=options.num_images,
                                   batch_size=options.batch_size, seed=options.seed, device=context.device,
                                   rank=context.rank, world_size=context.world_size, step=step_fn)
        result = evaluate(batches, reference, feature_net, kid_subset_size=options.kid_subset_size,
                          device=context.device, seed=options.seed)
        seconds = time.perf_counter() - started
        log(f"step {step}: {evaluation_summary(result)}, {seconds:.0f} s")
        if metrics is not None:
            metrics.write({"step": step, "fid": result["fid"], "kid": result["kid"], "kid_std": result["kid_std"],
                           "eval_images": result["num_images"], "eval_seconds": seconds})
        return result

    return evaluate_now


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


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. only non-finite steps): one line naming the step (exit status 1)."""


def check_bad_fraction(skipped: int, delivered: int, cfg_data, step: int, progress) -> None:
    """Stop rather than train on a trickle of data: too many skipped samples is an error (this rank's counts)."""
    seen = skipped + delivered
    if seen >= 100 and skipped > cfg_data.max_bad_fraction * seen:
        progress.close()
        raise TrainingError(f"step {step}: {skipped} of the {seen} samples read from {cfg_data.path} could not be used "
                            f"({skipped / seen:.0%} > data.max_bad_fraction={cfg_data.max_bad_fraction}); the warnings "
                            f"above name the shards; prepare the data set again")


def stream_start(header: dict | None, cfg_data, cfg_train, context: DistributedContext,
                 micro_batch: int) -> tuple[int, list[int] | None]:
    """(loader seed, per-worker start positions) for the streaming loader.

    A fresh run starts every worker's stream at 0. A resumed run with the same world size, worker
    count, micro-batch and seed continues each stream exactly where the checkpoint left it (the
    workers re-read and re-shuffle, without decoding, what they pass over). Otherwise the positions
    mean nothing to the new layout, and the stream starts afresh, seeded by the step, so a resume
    does not replay the first batches.
    """
    if header is None:
        return cfg_train.seed, None
    saved = header.get("data_position")
    layout = {"world_size": context.world_size, "num_workers": cfg_data.num_workers, "batch_size": micro_batch,
              "seed": cfg_train.seed}
    if saved and all(saved.get(key) == value for key, value in layout.items()):
        return cfg_train.seed, list(saved["positions"][context.rank])
    return step_seed(cfg_train.seed, header["step"]), None


def micro_batch_size(batch_size: int, world_size: int, accumulation: int) -> int:
    """Per-rank micro-batch: the global batch is a config value, independent of the world size."""
    if batch_size % (world_size * accumulation):
        raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the world size ({world_size}) x "
                          f"train.grad_accum_steps ({accumulation}); e.g. train.batch_size="
                          f"{-(-batch_size // (world_size * accumulation)) * world_size * accumulation}")
    return batch_size // (world_size * accumulation)


def step_seed(seed: int, step: int) -> int:
    """A seed of its own for every (run seed, step)."""
    return seed * 1_000_003 + step


def _train(config: Config, context: DistributedContext) -> dict[str, Any]:
    cfg_train, cfg_data = config.train, config.data
    device, is_main = context.device, context.is_main
    log = write if is_main else (lambda message: None)

    accumulation = cfg_train.grad_accum_steps
    micro_batch = micro_batch_size(cfg_train.batch_size, context.world_size, accumulation)
    manifest = check_data(config)
    initial_weights = check_extras(config)
    run_dir = Path(cfg_train.run_dir)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml())

    dtype = compute_dtype(cfg_train.precision, device)
    schedule = schedule_from_config(config.diffusion).to(device)
    parallel = cfg_train.parallel if context.is_distributed else "single process"
    torch.manual_seed(cfg_train.seed)  # the same initial weights on every rank (FSDP shards them as they are)
    model = build_unet(config, device)
    if initial_weights is not None:  # before the EMA copies the model and FSDP shards it; a resume overwrites them
        model.load_state_dict(initial_weights)
        log(f"starting from the weights in {cfg_train.init_from}")
    ema_model = build_unet(config, device) if parallel == "fsdp" else None  # FSDP: an EMA of each rank's shard
    if cfg_train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = wrap(model, context, cfg_train.parallel, dtype)
    if ema_model is not None:
        shard(ema_model, dtype).load_state_dict(model.state_dict())
    torch.manual_seed(cfg_train.seed + context.rank)  # dropout differs between ranks
    ema = build_ema(model, cfg_train.ema_decay, ema_model=ema_model)  # before compiling: the copy samples eagerly
    if cfg_train.compile:
        compile_model(model, cfg_train.compile_mode, cfg_train.compile_scope)
    kernels = resolve_kernels_from_config(config, device)  # once, before any step; a broken kernel stops here
    flops_per_image = model_flops_per_image(config)  # counted once, on the meta device
    peak_flops = peak_bf16_flops(device) if dtype == torch.bfloat16 else None  # the table holds bf16 peaks
    loss_coefficients = diffusion.loss_coefficients(schedule, config.diffusion.target)
    optimizer_class = torch.optim.AdamW if config.optim.name == "adamw" else torch.optim.Adam
    # Fused Adam (one kernel for all parameters; it can also skip a step on the device, see below);
    # foreach for sharded (DTensor) parameters.
    fused = parallel != "fsdp"
    implementation = {"fused": True, "foreach": None} if fused else {"fused": None, "foreach": True}
    optimizer = optimizer_class(model.parameters(), lr=config.optim.lr, betas=tuple(config.optim.betas),
                                eps=config.optim.eps, weight_decay=config.optim.weight_decay, **implementation)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_constant(config.optim.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # fp16 only: bf16 needs no scaling
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    generator = torch.Generator(device=device)

    step = 0
    resumed = load_latest_checkpoint(run_dir, map_location="cpu") if is_main else None
    header = None  # what every rank needs besides the tensors: small enough to broadcast as objects
    if resumed is not None:
        header = {"step": int(resumed[0]["step"]), "path": str(resumed[1]), "scaler": resumed[0].get("scaler"),
                  "lr_schedule": resumed[0]["lr_schedule"], "rng": resumed[0].get("rng"),
                  "data_position": resumed[0].get("data_position")}
    if context.is_distributed:  # rank 0 reads the checkpoint; the others receive it (no shared disk needed)
        shared = [header]
        torch.distributed.broadcast_object_list(shared, src=0)
        header = shared[0]
    if header is not None:
        state = resumed[0] if resumed else {}
        load_full_model_state(model, state.get("model"), context)
        load_ema_state(ema, state.get("ema"), context)
        load_full_optimizer_state(model, optimizer, state.get("optimizer"), context)
        for group in optimizer.param_groups:  # the saved groups carry the writer's implementation choice
            group.update(implementation)
        lr_schedule.load_state_dict(header["lr_schedule"])
        if header["scaler"]:
            scaler.load_state_dict(header["scaler"])
        step = header["step"]
        log(f"resumed from {header['path']} at step {step}")
    if step >= cfg_train.steps:
        log(f"{run_dir} has already trained {step} of train.steps={cfg_train.steps}; raise train.steps to continue")

    start = None  # the streaming loader's per-worker positions to resume at
    if cfg_data.cache == "device":  # read once; then batches are drawn on the device, no DataLoader
        cache = load_device_cache(cfg_data.path, image_size=cfg_data.image_size, channels=cfg_data.channels,
                                  device=device, rank=context.rank, world_size=context.world_size,
                                  num_workers=cfg_data.num_workers)
        log(f"data: {cache.describe()} (rank 0)")
        batches = cache.batches(micro_batch, seed=cfg_train.seed, start_batch=step * accumulation)
    else:
        loader_seed, start = stream_start(header, cfg_data, cfg_train, context, micro_batch)
        if header is not None and start is None:
            log("the data stream starts afresh (seeded by the step): the checkpoint's stream positions are for "
                "another world size, worker count or batch size")
        batches = iter(build_train_loader(
            cfg_data.path, batch_size=micro_batch, image_size=cfg_data.image_size, channels=cfg_data.channels,
            num_workers=cfg_data.num_workers, shuffle_buffer=cfg_data.shuffle_buffer, seed=loader_seed, start=start,
            resample=True, rank=context.rank, world_size=context.world_size, pin_memory=device.type == "cuda"))
    # Samples each of this rank's loader workers has taken from its stream, for exact resumes.
    stream_positions = list(start) if start else [0] * max(cfg_data.num_workers, 1)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=step,
                         tensorboard_dir=run_dir / "tensorboard" if cfg_train.tensorboard else None) if is_main else None
    log(f"training {count_parameters(model) / 1e6:.1f}M parameters on {context.world_size} x {device} ({parallel}, "
        f"{str(dtype).removeprefix('torch.')}{', compiled' if cfg_train.compile else ''}), {manifest['num_samples']:,} "
        f"images, global batch {cfg_train.batch_size} = {context.world_size} ranks x {accumulation} micro-batches "
        f"x {micro_batch}")
    log(f"kernels: {kernels.describe()}; model: {flops_per_image / 1e9:.1f} GFLOP per image per training step"
        + (f", peak {peak_flops / 1e12:.0f} TFLOP/s bf16 per device" if peak_flops else ""))

    def snapshot() -> dict[str, Any]:
        """Every rank takes part (FSDP gathers shards); rank 0 ends up with the full tensors."""
        return {"step": step, "model": full_model_state(model), "ema": ema_state(ema),
                "optimizer": full_optimizer_state(model, optimizer), "lr_schedule": lr_schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None, "kernels": kernels.names,
                "rng": all_gather_objects(rng_state(device)),
                "data_position": {"world_size": context.world_size, "num_workers": cfg_data.num_workers,
                                  "batch_size": micro_batch, "seed": cfg_train.seed,
                                  "positions": all_gather_objects(stream_positions)},
                "config": config.to_dict(), "engine_version": engine.__version__}

    def checkpoint() -> int:
        """Every rank gathers; rank 0 writes. Returns the step saved."""
        state = snapshot()
        if is_main:
            save_checkpoint(run_dir, step, state, keep=cfg_train.keep_checkpoints)
        return step

    sampler_model = ema.ema_model if config.sample.use_ema else model
    sampler_step = sampling_step(sampler_model, config, schedule, kernels, device)  # built (and compiled) once

    def write_samples(name: str) -> Path | None:
        """Every rank draws its share of the images (a sharded model's forward is a collective anyway); rank 0
        writes the grid."""
        images = generate(sampler_model, config, schedule, kernels, num_images=config.sample.num_images,
                          batch_size=config.sample.batch_size, seed=config.sample.seed, device=device,
                          step=sampler_step)
        if not is_main:
            return None
        images = to_uint8(images)  # once, for the PNG and TensorBoard
        if metrics is not None:
            metrics.add_image("samples", make_grid(images), step)
        return save_grid(images, run_dir / "samples" / name)

    evaluate_now = build_evaluation(config, run_dir, sampler_model, schedule, kernels, context, log, metrics)

    sync_check, first_step = cfg_train.sync_check and device.type == "cuda", step
    # Device-side running sums, read once per log interval.
    loss_sum = torch.zeros((), device=device)
    grad_norm_sum = torch.zeros((), device=device)
    finite_steps = torch.zeros((), device=device, dtype=torch.long)
    nonfinite_streak = torch.zeros((), device=device, dtype=torch.long)  # consecutive non-finite steps
    nonfinite_total = 0
    interval_steps, data_wait, skipped_total = 0, 0.0, cache.skipped if cfg_data.cache == "device" else 0
    interval_start = time.perf_counter()
    saved_step = step
    max_grad_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")  # inf: measure only
    rank_offset = context.rank * micro_batch
    sample_offsets = torch.arange(micro_batch, device=device)
    # Stop requests (SIGTERM, SIGINT) are agreed between ranks over a host-side group every
    # `stop_check_every` steps (every step in one process, where checking is free).
    stop_request = StopRequest(announce=is_main)
    control_group = torch.distributed.new_group(backend="gloo") if context.is_distributed else None
    stop_check_every = 10 if context.is_distributed else 1
    stopped_by = None
    progress = progress_bar(total=cfg_train.steps, initial=step, desc="train", disable=not is_main)
    train_model.train()
    # Last thing before the first step: setting up the data draws from the global generators too.
    if header is not None and not restore_rng_state(header["rng"], context.rank, context.world_size, device,
                                                    cfg_train.seed, step):
        log("the checkpoint holds no generator states for this world size: dropout's generators are reseeded "
            "from (seed, rank, step)")
    while step < cfg_train.steps:
        if sync_check and step > first_step:  # after the first step (autotuning, lazy init) nothing may wait
            torch.cuda.set_sync_debug_mode("error")
        # Timesteps and flips of step s come from (seed, s) and are drawn for the whole global batch on
        # every rank, which takes its slice: independent of the world size and of resumes.
        generator.manual_seed(step_seed(cfg_train.seed, step))
        t_global = diffusion.sample_timesteps(cfg_train.batch_size, schedule.num_timesteps,
                                              config.diffusion.timestep_sampling, generator=generator, device=device)
        flip_global = (random_flip_mask(cfg_train.batch_size, generator=generator, device=device) if cfg_data.random_flip
                       else torch.zeros(cfg_train.batch_size, dtype=torch.bool, device=device))
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), device=device)
        for micro in range(accumulation):
            wait_start = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - wait_start
            skipped_total += int(batch["skipped"])
            if "position" in batch:
                stream_positions[batch["worker"]] = int(batch["position"])
            # Global sample index: step, then micro-batch, then rank; it keys the noise of each sample.
            first = micro * context.world_size * micro_batch + rank_offset
            index = slice(first, first + micro_batch)
            keys = noise_keys(cfg_train.seed, sample_offsets + (step * cfg_train.batch_size + first))
            with gradient_sync(train_model, enabled=micro == accumulation - 1):  # all-reduce on the last only
                with autocast:
                    loss = diffusion.training_loss(train_model, kernels, schedule,
                                                   batch["image"].to(device, non_blocking=True), flip_global[index],
                                                   t_global[index], keys, target=config.diffusion.target,
                                                   coefficients=loss_coefficients)
                scaler.scale(loss / accumulation).backward()
            step_loss += loss.detach() / accumulation
        scaler.unscale_(optimizer)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm, foreach=True))
        # A NaN/inf loss or gradient skips the update (and so the EMA's move) and is counted, never applied.
        finite = torch.isfinite(grad_norm) & torch.isfinite(step_loss)
        if scaler.is_enabled():
            scaler.step(optimizer)  # fp16: the scaler skips non-finite steps itself (reading found_inf: a sync)
        elif fused:
            optimizer.found_inf = (~finite).float()  # fused Adam skips on the device: no sync
            optimizer.step()
        elif bool(finite):  # sharded parameters: decided on the host (one sync per step on a GPU)
            optimizer.step()
        scaler.update()
        lr_schedule.step()
        update_ema(ema, cfg_train.ema_warmup)
        loss_sum += torch.where(finite, step_loss, 0.0)
        grad_norm_sum += torch.where(finite, grad_norm.detach(), 0.0)
        finite_steps += finite
        nonfinite_streak = torch.where(finite, 0, nonfinite_streak + 1)
        interval_steps += 1
        step += 1
        if sync_check:
            torch.cuda.set_sync_debug_mode("default")
        progress.update(1)

        if step % cfg_train.log_every == 0 or step == cfg_train.steps:
            stats = torch.stack([loss_sum, grad_norm_sum, finite_steps.float(), nonfinite_streak.float()])
            if context.is_distributed:
                torch.distributed.all_reduce(stats)
                stats /= context.world_size
            loss_total, grad_norm_total, finite_count, streak = stats.tolist()  # the one host sync of the interval
            # means over the finite steps (NaN when there were none)
            mean_loss, mean_grad_norm = ((loss_total / finite_count, grad_norm_total / finite_count) if finite_count
                                         else (float("nan"), float("nan")))
            nonfinite_total += interval_steps - round(finite_count)
            elapsed = time.perf_counter() - interval_start
            record = {"step": step, "loss": mean_loss, "lr": lr_schedule.get_last_lr()[0],
                      "grad_norm": mean_grad_norm, "skipped_samples": skipped_total,
                      "nonfinite_steps": interval_steps - round(finite_count), "time": time.time(),
                      **interval_metrics(steps=interval_steps, images=interval_steps * cfg_train.batch_size,
                                         seconds=elapsed, data_wait_seconds=data_wait, world_size=context.world_size,
                                         flops_per_image=flops_per_image, peak_flops_per_device=peak_flops,
                                         device=device)}
            if metrics is not None:
                metrics.write(record)
            progress.set_postfix(loss=f"{mean_loss:.4f}", **progress_fields(record))
            loss_sum.zero_(), grad_norm_sum.zero_(), finite_steps.zero_()
            interval_steps, data_wait, interval_start = 0, 0.0, time.perf_counter()
            check_bad_fraction(skipped_total, step * cfg_train.batch_size // context.world_size, cfg_data,
                               step, progress)
            if streak >= cfg_train.max_nonfinite_steps:
                progress.close()
                raise TrainingError(
                    f"step {step}: the last {round(streak)} steps had a non-finite loss or gradient "
                    f"(train.max_nonfinite_steps={cfg_train.max_nonfinite_steps}); none was applied, so the "
                    f"checkpoints hold the weights of step {step - round(streak)}; lower optim.lr or check the data")

        if step % cfg_train.checkpoint_every == 0 or step == cfg_train.steps:
            saved_step = checkpoint()
        if step % stop_check_every == 0 and agreed_stop(stop_request, control_group):
            stopped_by = stop_request.requested or "another rank's stop request"
            if saved_step != step:
                saved_step = checkpoint()
            break
        if cfg_train.sample_every and step % cfg_train.sample_every == 0 \
                and step < cfg_train.steps:
            write_samples(f"step-{step:08d}.png")
        if config.eval.every and (step % config.eval.every == 0 or step == cfg_train.steps):
            evaluate_now(step)
    progress.close()
    stop_request.restore()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "step": step, "skipped_samples": skipped_total,
                               "nonfinite_steps": nonfinite_total}
    if stopped_by is not None:
        if metrics is not None:
            metrics.close()
        log(f"stopped by {stopped_by} at step {step}; checkpoint {run_dir / 'checkpoints' / checkpoint_name(step)}; "
            f"run the same command to resume")
        return {**summary, "stopped_by": stopped_by}

    grid = write_samples(f"step-{step:08d}.png")
    if is_main:
        if metrics is not None:
            metrics.close()
        (run_dir / "samples.png").write_bytes(grid.read_bytes())
        curve = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss.png", title=f"training loss ({run_dir.name})")
        summary.update(samples=str(run_dir / "samples.png"), loss_curve=str(curve))
        log(f"done at step {step} (checkpoint at step {saved_step}); samples: {run_dir / 'samples.png'}; "
            f"loss curve: {curve}; skipped samples: {skipped_total}; skipped non-finite steps: {nonfinite_total}")
    return summary


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
