"""Sampling as a library: a `Sampler` draws seeded images of a model with a config's sample settings.

Training (sample grids, FID), `engine.evaluate --run`, `engine.plot trajectory`, the `engine.sample` command
line and the benchmarks all draw through it. The fast path: the registry's fused update kernels, bf16 autocast
and, on CUDA, the whole denoising step compiled into a CUDA graph, built once per sampler and replayed by
every batch of every call.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterator

import numpy as np
import torch

from engine import diffusion
from engine.config import Config, SampleConfig, config_from_dict
from engine.distributed import all_gather_objects, compute_dtype, rank_and_world_size
from engine.images import class_rows
from engine.parallel import is_sharded
from engine.progress import progress_bar
from engine.schedule import NoiseSchedule
from kernels.registry import Kernels

OnStep = Callable[[int, torch.Tensor, torch.Tensor], None]  # (t, x_t, eps or x0): `diffusion.denoising_step`'s hook


def sampling_plan(config: Config) -> diffusion.SamplingPlan:
    """`config.sample`'s timesteps and noise levels, and the diffusion target the network's output is read as."""
    options = config.sample
    return diffusion.SamplingPlan(sampler=options.sampler, steps=options.steps,
                                  timestep_spacing=options.timestep_spacing, karras_sigmas=options.karras_sigmas,
                                  lower_order_final=options.lower_order_final, target=config.diffusion.target,
                                  sigma_data=config.diffusion.sigma_data, unipc_order=options.unipc_order)


def step_options(config: Config) -> dict:
    """`config.sample`'s settings as `diffusion.denoising_step`'s keywords, besides the plan's."""
    options = config.sample
    return dict(eta=options.eta, variance=options.variance, clip_denoised=options.clip_denoised,
                use_clipped_model_output=options.use_clipped_model_output, thresholding=options.thresholding,
                dynamic_thresholding_ratio=options.dynamic_thresholding_ratio)


def with_sample(config: Config, where: str, **changes) -> Config:
    """`config` with these sample settings, through the config's checks (e.g. guidance needs a conditional
    model); `where` names them in an error."""
    raw = config.to_dict()
    raw["sample"].update(changes)
    return config_from_dict(raw, where=where)


def in_image_order(shares: list[list[tuple[int, Any]]]) -> list[Any]:
    """The ranks' (first image index, batch) pairs, as `batches` yields them and gathered, as one list of batches in
    image order: ranks take batches in turn, so the order does not depend on the world size."""
    batches = dict(pair for share in shares for pair in share)
    return [batches[start] for start in sorted(batches)]


def batch_starts(num_images: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """First image index of each batch this rank draws.

    Batches are dealt to ranks in turn; every rank gets the same number (starts past `num_images` are
    padding batches, drawn and dropped), because a sharded model's forward is a collective.
    """
    batches = -(-num_images // batch_size)
    rounds = -(-batches // world_size)
    return [(rank + turn * world_size) * batch_size for turn in range(rounds)]


def image_classes(config: Config, indices: torch.Tensor) -> torch.Tensor | None:
    """The class of each image index: image i is of class `sample.classes[i % len]` (by default every class
    in turn, so any number of images is balanced to within one per class); None for an unconditional model."""
    num_classes = config.model.num_classes
    if not num_classes:
        return None
    classes = torch.tensor(config.sample.classes or range(num_classes), device=indices.device)
    return classes[indices % len(classes)]


class Sampler:
    """Images of `model` drawn with `config.sample`'s settings (the run's diffusion target, image shape and
    classes), on `device` with the resolved `kernels`.

    Build it once and draw from it as often as needed: the denoising step (`step`) is built at the first draw
    and reused, so its compiled graph is replayed as long as the model object (whose weights may change in
    place) and the batch shape stay the same. `on_step(t, x_t, prediction)` sees every step (plots use it); the
    step then runs eager. A sampler with other settings comes from `with_settings` or `for_evaluation`.
    """

    def __init__(self, model: torch.nn.Module, config: Config, schedule: NoiseSchedule, kernels: Kernels,
                 device: torch.device | str, *, on_step: OnStep | None = None):
        self.model, self.config, self.schedule, self.kernels = model, config, schedule, kernels
        self.device, self.on_step = torch.device(device), on_step
        self.plan = sampling_plan(config)
        self._step: diffusion.Step | None = None

    @property
    def settings(self) -> SampleConfig:
        """The config's sample section: what this sampler draws with."""
        return self.config.sample

    def with_settings(self, where: str = "the sampler's settings", **changes) -> Sampler:
        """A sampler of the same model with these sample settings changed (checked as a config file's are;
        `where` names them in an error), and a step of its own."""
        return Sampler(self.model, with_sample(self.config, where, **changes), self.schedule, self.kernels,
                       self.device, on_step=self.on_step)

    def for_evaluation(self, guidance: float | None = None) -> Sampler:
        """The sampler of evaluation images: `eval`'s sampler, steps and guidance (or `guidance`), every class in
        turn (a class-balanced set, whatever `sample.classes` says)."""
        options = self.config.eval
        guidance = next(scale for scale in (guidance, options.guidance, self.settings.guidance) if scale is not None)
        return self.with_settings("evaluation", sampler=options.sampler, guidance=guidance, classes=[],
                                  steps=options.steps if options.sampler != "ddpm" else None)

    @property
    def step(self) -> diffusion.Step:
        """The denoising step of these settings, built at the first call: network + update kernel, under bf16
        autocast where `sample.precision` says, compiled where `sample.compile` says (on CUDA in
        "reduce-overhead" mode, so the step is one CUDA-graph replay instead of hundreds of kernel launches)."""
        if self._step is None:
            step = diffusion.denoising_step(self._denoiser(), self.schedule, self.kernels, **self.plan.step_keywords(),
                                            **step_options(self.config), on_step=self.on_step)
            self._step = self._compiled(step) if self._compiles() else step
        return self._step

    def _denoiser(self) -> diffusion.Denoiser:
        """The network under the precision's autocast; a class-conditional model guided by `sample.guidance` (one
        forward of the doubled batch where it is not 0 or 1)."""
        model, device = self.model, self.device
        dtype = compute_dtype(self.settings.precision, device)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

        def network(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
            with autocast:
                return diffusion.predict(model, x, t, class_labels)

        num_classes = self.config.model.num_classes
        return diffusion.classifier_free_guidance(network, self.settings.guidance, num_classes) if num_classes else network

    def _compiles(self) -> bool:
        """`sample.compile`; by default on CUDA only, and not for an FSDP-sharded model, whose forward all-gathers
        (no CUDA graph), nor with an `on_step` hook, which a graph cannot call."""
        if self.on_step is not None:
            return False
        if self.settings.compile is not None:
            return self.settings.compile
        return self.device.type == "cuda" and not is_sharded(self.model)

    def _compiled(self, step: diffusion.Step) -> diffusion.Step:
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        compiled = torch.compile(step, mode=mode, dynamic=False)
        if self.device.type != "cuda":
            return compiled

        def replay(*args):
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: the last output may be reused
            # own the results (the sample, and a solver's history): the next replay overwrites the graph's buffers
            return torch.utils._pytree.tree_map(torch.clone, compiled(*args))

        return replay

    def image_classes(self, indices: torch.Tensor) -> torch.Tensor | None:
        return image_classes(self.config, indices)

    def grid_images(self, images: np.ndarray, limit: int) -> tuple[np.ndarray, int | None]:
        """The images of a grid of images 0, 1, ... and its row length: the first `limit`, or for a
        class-conditional model one row per class."""
        labels = self.image_classes(torch.arange(len(images)))
        if labels is None:
            return images[:limit], None
        return class_rows(images, labels.numpy(), limit)

    @torch.no_grad()
    def batches(self, num_images: int, seed: int, batch_size: int | None = None, *, rank: int = 0,
                world_size: int = 1, progress: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
        """This rank's share of images 0 .. num_images-1 of `seed`: (first index, images in [-1, 1] on the CPU).

        Image i is keyed by (seed, i), and a class-conditional model's is of class `image_classes`, so the images
        do not depend on the batch size (default `sample.batch_size`) or the number of ranks. Every batch has the
        same shape (the last one is padded with images past the end and cut), so a compiled step is traced once.
        """
        shape = (self.config.data.channels, self.config.data.image_size, self.config.data.image_size)
        batch_size = min(batch_size or self.settings.batch_size, -(-num_images // world_size))  # no padding work
        starts = batch_starts(num_images, batch_size, rank, world_size)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in progress_bar(starts, desc="sampling", unit="batch", disable=not progress or len(starts) < 2):
                labels = self.image_classes(torch.arange(start, start + batch_size, device=self.device))
                images = diffusion.sample(None, self.schedule, self.kernels, (batch_size, *shape), seed=seed,
                                          first_index=start, plan=self.plan, device=self.device, progress=progress,
                                          step=self.step, class_labels=labels)
                kept = images[:max(0, min(batch_size, num_images - start))]
                if len(kept):
                    yield start, kept.float().clamp(-1, 1).cpu()
        finally:
            self.model.train(was_training)

    def generate(self, num_images: int, seed: int, batch_size: int | None = None, *,
                 progress: bool = False) -> torch.Tensor:
        """Images 0 .. num_images-1 of `seed` in [-1, 1] on the CPU, on every rank.

        Under torch.distributed every rank draws its share (`batches`) and the shares are gathered.
        """
        rank, world_size = rank_and_world_size()
        mine = list(self.batches(num_images, seed, batch_size, rank=rank, world_size=world_size,
                                 progress=progress and rank == 0))
        return torch.cat(in_image_order(all_gather_objects(mine)))
