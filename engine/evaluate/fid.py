"""FID and KID of generated images against reference statistics, under torch.distributed as well.

The metric maths is torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance), set up in
`engine.evaluate.metric_states`.

Under torch.distributed (torchrun), `evaluate` is collective: every rank passes its own images
(possibly none) and receives the global FID and KID; torchmetrics gathers the metric states over
the process group (gloo or NCCL). Give rank r the contiguous block `rank_slice(N, r, world)` of
images 0..N-1 and the numbers equal a single process's on all N (KID's random subsets included).
The CLI does that itself when started with torchrun.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from torch import Tensor

from engine.data.image_sets import ImageInput, image_batches
from engine.distributed import all_gather_objects
from engine.evaluate.errors import EvaluationError
from engine.evaluate.feature_network import DEFAULT_BATCH_SIZE, FeatureNetwork, device_of, image_features
from engine.evaluate.reference import ReferenceStats, load_reference

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from engine.evaluate.metric_states import OrderedKID


DEFAULT_KID_SUBSET_SIZE = 1000  # the KID paper's and clean-fid's choice
DEFAULT_KID_SUBSETS = 100


def evaluate(images: ImageInput, reference: ReferenceStats | str | Path, feature_net: FeatureNetwork, *,
             kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE, kid_subsets: int = DEFAULT_KID_SUBSETS,
             batch_size: int = DEFAULT_BATCH_SIZE, device: torch.device | str | None = None, seed: int = 0,
             total: int | None = None, progress: bool = False) -> dict:
    """FID and KID of `images` against `reference`.

    `images`: one uint8 numpy (N, H, W, C) array, a torch (N, C, H, W) uint8 tensor or float tensor
    in [-1, 1] (see `engine.data.image_sets.as_uint8_images`), or an iterable of such batches or of
    (index of the batch's first image, batch) pairs, as `engine.sampling.Sampler.batches` yields them
    (streamed: nothing but the features is kept). With indices, KID's subsets do not depend on
    which rank had which images; without, ranks should hold contiguous blocks in rank order
    (`rank_slice`).

    `reference`: ReferenceStats, a statistics file or an image source (see `load_reference`).
    `total` only sizes the progress bar. KID draws `kid_subsets` random subsets of
    `kid_subset_size` (clamped to the numbers available, with a note) from a generator seeded with
    `seed`; the global generator is left as it was.

    Returns {"fid", "kid", "kid_std", "num_images", "num_reference", "kid_subset_size", "notes"}:
    kid, kid_std and kid_subset_size are None when KID is unavailable (a note says why);
    num_reference is None when a mu/sigma-only file does not say. Under torch.distributed this is
    collective: every rank calls it with its own images (possibly none) and gets the global numbers.
    """
    device = device_of(feature_net, device)
    feature_net.to(device)
    if kid_subset_size < 1 or kid_subsets < 1:
        raise EvaluationError(f"KID needs a subset size and a number of subsets of at least 1, not "
                              f"{kid_subset_size} and {kid_subsets}")
    stats = load_reference(reference, feature_net, batch_size=batch_size, device=device, progress=progress)
    notes = list(stats.notes)
    dim = feature_net.num_features
    # torchmetrics takes about a second to import: only runs that evaluate pay it
    from engine.evaluate.metric_states import metrics_holding_reference

    fid, kid = metrics_holding_reference(stats, dim, kid_subsets, device)
    features = image_features(image_batches(images, batch_size), feature_net, device, total=total, progress=progress,
                              desc="evaluate")
    count, shapes, runs = _add_generated(fid, kid, features, dim, device)
    num_images, shapes = _gather_generated(kid, count, shapes, runs, device)
    if num_images < 2:
        raise EvaluationError(f"FID needs at least 2 generated images, got {num_images}")
    if stats.image_shape and shapes and shapes != {tuple(stats.image_shape)}:
        shown = ", ".join("x".join(map(str, s)) for s in sorted(shapes))
        notes.append(f"the images are {shown} (C x H x W), the reference's {'x'.join(map(str, stats.image_shape))}")
    if num_images < dim:
        notes.append(f"FID from {num_images} images (fewer than the {dim} feature dimensions) is biased upwards; "
                     "compare FIDs only at equal image counts (10k or 50k are usual)")
    result = {"fid": float(fid.compute()), "kid": None, "kid_std": None, "num_images": num_images,
              "num_reference": stats.num_images, "kid_subset_size": None, "notes": notes}
    result.update(_kid(kid, stats, num_images, kid_subset_size, seed, notes))
    return result


def _add_generated(fid: FrechetInceptionDistance, kid: OrderedKID,
                   features: Iterable[tuple[int | None, Tensor, tuple[int, ...]]], dim: int,
                   device: torch.device) -> tuple[int, set[tuple[int, ...]], list[tuple[int | None, int]]]:
    """Feeds this rank's generated features to both metrics; returns their count, the images'
    (C, H, W) shapes, and (first index or None, count) per batch."""
    local, shapes, runs = 0, set(), []
    for first, batch_features, shape in features:
        fid.update(batch_features.double(), real=False)  # float64 features: FID comes back in float64
        kid.update(batch_features, real=False)
        runs.append((first, len(batch_features)))
        local += len(batch_features)
        shapes.add(shape)
    if local == 0:  # a rank without images still takes part in the gathers
        empty = torch.zeros(0, dim, dtype=torch.float32, device=device)
        fid.update(empty.double(), real=False)
        kid.update(empty, real=False)
    return local, shapes, runs


def _gather_generated(kid: OrderedKID, local: int, shapes: set[tuple[int, ...]], runs: list[tuple[int | None, int]],
                      device: torch.device) -> tuple[int, set[tuple[int, ...]]]:
    """The number of generated images and their shapes over all ranks; when every batch came with
    its index, KID will take the gathered features in image-index order."""
    # One tensor per rank: torchmetrics gathers a list state element by element, so ranks holding
    # different numbers of batches would issue different numbers of collectives and hang.
    kid.fake_features = [torch.cat(kid.fake_features)]
    gathered = all_gather_objects((local, sorted(shapes), runs))
    num_images = sum(count for count, _, _ in gathered)
    all_shapes = {tuple(shape) for _, rank_shapes, _ in gathered for shape in rank_shapes}
    all_runs = [run for _, _, rank_runs in gathered for run in rank_runs]
    if all_runs and all(first is not None for first, _ in all_runs):  # indexed batches: KID in index order
        indices = np.concatenate([np.arange(first, first + count) for first, count in all_runs])
        kid.fake_order = torch.from_numpy(np.argsort(indices, kind="stable")).to(device)
    return num_images, all_shapes


def _kid(kid: OrderedKID, stats: ReferenceStats, num_images: int, kid_subset_size: int, seed: int,
         notes: list[str]) -> dict:
    """{"kid", "kid_std", "kid_subset_size"}, or {} with a note saying why KID is unavailable."""
    num_reference_features = 0 if stats.features is None else len(stats.features)
    subset = min(kid_subset_size, num_images, num_reference_features)
    if stats.features is None:
        notes.append(f"KID is not available: {stats.source} holds only mu and sigma, no reference features; "
                     "compute the reference with --save-reference to have both")
        return {}
    if subset < 2:
        notes.append(f"KID is not available: it needs subsets of at least 2 images ({num_images} generated, "
                     f"{num_reference_features} reference features)")
        return {}
    if subset < kid_subset_size:
        notes.append(f"KID subset size {kid_subset_size} clamped to {subset} ({num_images} generated images, "
                     f"{num_reference_features} reference features)")
    kid.subset_size = subset
    # KID draws its subsets from the global CPU generator: seed it, then restore it (torch.manual_seed
    # would also reseed the CUDA generators, which fork_rng(devices=[]) does not restore)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"kid": float(kid_mean), "kid_std": float(kid_std), "kid_subset_size": subset}


def summary(result: dict) -> str:
    """One line: `FID 12.34  KID 0.0123 ± 0.0004 (N images vs M reference)`."""
    kid = "n/a" if result["kid"] is None else f"{result['kid']:.4f} ± {result['kid_std']:.4f}"
    reference = "reference statistics" if result["num_reference"] is None else f"{result['num_reference']} reference"
    return f"FID {result['fid']:.2f}  KID {kid} ({result['num_images']} images vs {reference})"
