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

The metric maths is torchmetrics' (FrechetInceptionDistance, KernelInceptionDistance). The
features come from the TensorFlow Inception-v3 graph of 2015-12-05 that FID is defined with, as
NVIDIA's TorchScript file `inception-2015-12-05.pt` (INCEPTION_URL). Nothing is downloaded: the
file is taken from `--inception PATH`, else $DDPM_INCEPTION, else DEFAULT_INCEPTION. The network
takes uint8 images of any size and resizes them itself; each image's features are computed once
and fed to both metrics.

A statistics file (`.npz`, no pickles) holds `mu` and `sigma` (float64, the features' mean and
covariance, ddof=1), `num_images`, `features` (float32, a seeded random subset of at most
`max_features` feature rows, for KID), and which network computed them (file name and sha256
prefix), the images' shape and the source. Statistics of another network are refused. A file with
only mu and sigma gives FID, and KID is reported unavailable.

Under torch.distributed (torchrun), `evaluate` is collective: every rank passes its own images
(possibly none) and receives the global FID and KID; torchmetrics gathers the metric states over
the process group (gloo or NCCL). Give rank r the contiguous block `rank_slice(N, r, world)` of
images 0..N-1 and the numbers equal a single process's on all N (KID's random subsets included).
The CLI does that itself when started with torchrun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from engine.atomic_files import atomic_write
from engine.config import Config, ConfigError
from engine.data import DataError
from engine.data.image_sets import ImageInput, image_batches, open_images, read_npz
from engine.diffusers_format import is_diffusers_folder
from engine.distributed import (all_gather_objects, init_distributed, is_distributed, rank_and_world_size,
                                shutdown_distributed)
from engine.progress import progress_bar
from engine.progress import write as progress_write
from engine.run_dir import EMA_HELP, load_run, read_run_checkpoint
from engine.sample import evaluation_config, generate_batches
from engine.schedule import schedule_from_config
from kernels.registry import KernelError, resolve_kernels_from_config

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "DDPM_INCEPTION"
DEFAULT_INCEPTION = Path("~/.cache/ddpm-engine/inception-2015-12-05.pt")
STATS_FORMAT = 1
DEFAULT_BATCH_SIZE = 100
DEFAULT_MAX_FEATURES = 10_000
DEFAULT_KID_SUBSET_SIZE = 1000  # the KID paper's and clean-fid's choice
DEFAULT_KID_SUBSETS = 100
_SHA256_PREFIX = 16  # hex digits kept to tell feature networks apart


class EvaluationError(ValueError):
    """A problem with the evaluation's inputs, reported to the user as one line (exit status 2)."""


# ----------------------------------------------------------------------------- feature network


class FeatureNetwork(nn.Module):
    """A TorchScript feature network called as `net(uint8 images, return_features=True)`, wrapped to
    take uint8 (N, C, H, W) images with C = 1 (repeated to RGB), 3, or 4 (alpha dropped) and give
    float32 (N, num_features). `name` and `sha256` identify the file; torchmetrics reads
    `num_features`, so the wrapper also works as `FrechetInceptionDistance(feature=net)`."""

    def __init__(self, net: nn.Module, *, num_features: int, name: str, sha256: str):
        super().__init__()
        self.net, self.num_features, self.name, self.sha256 = net, num_features, name, sha256

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3, 4):
            raise EvaluationError(f"the feature network takes uint8 (N, C, H, W) images with C = 1, 3 or 4, "
                                  f"not {images.dtype} {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] == 4:
            images = images[:, :3]
        features = self.net(images.contiguous(), return_features=True)
        return features.reshape(len(images), -1).float()

    @property
    def identity(self) -> str:
        return f"{self.name} (sha256 {self.sha256[:_SHA256_PREFIX]})"


def inception_path(path: str | Path | None = None) -> tuple[Path, str]:
    """Where the feature network file should be, and what said so: `path` (config or --inception),
    else $DDPM_INCEPTION, else DEFAULT_INCEPTION."""
    if path:
        return Path(path).expanduser(), "given by --inception or the config"
    if os.environ.get(INCEPTION_ENV):
        return Path(os.environ[INCEPTION_ENV]).expanduser(), f"from ${INCEPTION_ENV}"
    return DEFAULT_INCEPTION.expanduser(), "the default location"


def _sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def load_feature_network(path: str | Path | None = None, device: torch.device | str = "cpu") -> FeatureNetwork:
    """The FID Inception (or a stand-in with its calling convention) from `path` (see
    `inception_path`), in eval mode on `device`. Raises EvaluationError naming the path and the
    download address when the file is missing."""
    file, how = inception_path(path)
    if not file.is_file():
        raise EvaluationError(f"the FID Inception network is not at {file} ({how}); download {INCEPTION_URL} and put "
                              f"it there, or pass --inception PATH or set {INCEPTION_ENV}=PATH (no network access is "
                              "needed after that)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: deprecated, and the file's format
            net = torch.jit.load(str(file), map_location="cpu")
        net.eval()
        for parameter in net.parameters():  # (ScriptModules lack requires_grad_)
            parameter.requires_grad_(False)
        with torch.no_grad():  # the feature count, from a tiny image (the Inception resizes it to 299 itself)
            probe = net(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), return_features=True)
    except Exception as exn:  # TorchScript raises RuntimeError, zipfile errors, ... for a wrong or broken file
        raise EvaluationError(f"cannot use {file} as the FID feature network ({how}): "
                              f"{str(exn).strip().splitlines()[0] if str(exn).strip() else type(exn).__name__}; "
                              f"expected the TorchScript file {INCEPTION_URL}") from exn
    wrapped = FeatureNetwork(net, num_features=int(probe.reshape(1, -1).shape[1]), name=file.name, sha256=_sha256(file))
    return wrapped.to(device)


def _device_of(module: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def _features(batches: Iterable[tuple[int | None, Tensor]], feature_net: FeatureNetwork, device: torch.device, *,
              total: int | None, progress: bool,
              desc: str) -> Iterator[tuple[int | None, Tensor, tuple[int, ...]]]:
    """(first index, float32 (B, D) features on `device`, the batch's (C, H, W)) per non-empty batch."""
    with progress_bar(total=total, unit="img", desc=desc, disable=not progress) as bar:
        for first, batch in batches:
            if len(batch) == 0:
                continue
            # fp32 even when the caller (a training step) runs under autocast: the statistics are fp32's
            with torch.autocast(device.type, enabled=False):
                features = feature_net(batch.to(device, non_blocking=True))
            bar.update(len(batch))
            yield first, features, tuple(batch.shape[1:])


# ----------------------------------------------------------------------------- reference statistics


@dataclass
class ReferenceStats:
    """Feature statistics of a reference set: mean `mu` and covariance `sigma` (float64, ddof=1) of
    `num_images` images (None when a mu/sigma-only file does not say), and `features` (float32,
    a seeded random subset of the rows, for KID; None when unavailable)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None
    features: np.ndarray | None = None
    feature_network: str | None = None  # file name
    feature_network_sha256: str | None = None  # prefix
    image_shape: tuple[int, ...] | None = None  # (C, H, W) when all images share it
    source: str = ""
    notes: list[str] = field(default_factory=list)


def _reservoir_add(reservoir: np.ndarray, kept: int, seen: int, rows: np.ndarray, rng: np.random.Generator) -> int:
    """Adds `rows` (the stream's rows seen..seen+len-1) to a uniform random sample of at most
    len(reservoir) rows (Algorithm R); returns how many reservoir slots are filled."""
    capacity = len(reservoir)
    fill = min(max(capacity - kept, 0), len(rows))
    reservoir[kept:kept + fill] = rows[:fill]
    if fill < len(rows):
        indices = np.arange(seen + fill, seen + len(rows))
        slots = rng.integers(0, indices + 1)  # row i replaces a slot with probability capacity / (i + 1)
        for row, slot in zip(rows[fill:], slots):
            if slot < capacity:
                reservoir[slot] = row
    return kept + fill


def reference_statistics(source: str | Path | ImageInput, feature_net: FeatureNetwork, *, num: int | None = None,
                         max_features: int = DEFAULT_MAX_FEATURES, seed: int = 0,
                         batch_size: int = DEFAULT_BATCH_SIZE, device: torch.device | str | None = None,
                         progress: bool = False) -> ReferenceStats:
    """Statistics of every image of `source` (see `engine.data.image_sets.open_images`, or images as
    `evaluate` takes them), read once in a fixed order, without shuffling or flips. `features` keeps
    a seeded uniform random subset of at most `max_features` feature rows (all of them when there
    are fewer)."""
    device = _device_of(feature_net, device)
    feature_net.to(device)
    if isinstance(source, (str, Path)):
        images = open_images(source, num=num)
        batches = ((None, batch) for batch in images.read(batch_size, None))
        total, where = images.total, images.where
    else:
        batches, total, where = image_batches(source, batch_size), None, "images in memory"
    dim = feature_net.num_features
    total_sum = torch.zeros(dim, dtype=torch.float64, device=device)
    outer_sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    reservoir = np.zeros((max(max_features, 0), dim), np.float32)
    rng = np.random.default_rng(seed)
    count = kept = 0
    shapes: set[tuple[int, ...]] = set()
    for _, features, shape in _features(batches, feature_net, device, total=total, progress=progress,
                                        desc="reference"):
        if num is not None and count >= num:
            break
        features = features[:None if num is None else num - count]
        wide = features.double()  # the sums in float64, as torchmetrics accumulates them
        total_sum += wide.sum(dim=0)
        outer_sum += wide.T @ wide
        kept = _reservoir_add(reservoir, kept, count, features.cpu().numpy(), rng)
        count += len(features)
        shapes.add(shape)
    if count < 2:
        raise EvaluationError(f"{where} gave {count} images; reference statistics need at least 2")
    mu = total_sum / count
    sigma = (outer_sum - count * torch.outer(mu, mu)) / (count - 1)  # torchmetrics' covariance formula
    return ReferenceStats(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), num_images=count,
                          features=reservoir[:kept] if kept else None, feature_network=feature_net.name,
                          feature_network_sha256=feature_net.sha256[:_SHA256_PREFIX],
                          image_shape=next(iter(shapes)) if len(shapes) == 1 else None, source=str(where))


def save_reference(stats: ReferenceStats, path: str | Path) -> Path:
    """Writes `stats` as an `.npz` statistics file (atomically; no pickles)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise EvaluationError(f"a statistics file must end in .npz (np.savez would add it): {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"format": np.int64(STATS_FORMAT), "mu": stats.mu.astype(np.float64),
              "sigma": stats.sigma.astype(np.float64), "num_images": np.int64(stats.num_images or 0),
              "feature_network": np.str_(stats.feature_network or ""),
              "feature_network_sha256": np.str_(stats.feature_network_sha256 or ""),
              "image_shape": np.asarray(stats.image_shape or (), dtype=np.int64), "source": np.str_(stats.source)}
    if stats.features is not None:
        arrays["features"] = stats.features.astype(np.float32)
    atomic_write(path, lambda file: np.savez(file, **arrays))
    return path


_STATS_KEYS = {"format", "mu", "sigma", "num_images", "features", "feature_network", "feature_network_sha256",
               "image_shape", "source"}


def _text(arrays: dict[str, np.ndarray], key: str) -> str | None:
    return str(arrays[key]) or None if key in arrays else None


def read_reference(path: str | Path) -> ReferenceStats:
    """A statistics file: ours (--save-reference) or any `.npz` with `mu` and `sigma` (pytorch-fid,
    ADM's reference batches); `features`, when present, enable KID."""
    path = Path(path)
    names, arrays = read_npz(path, _STATS_KEYS)
    if "mu" not in arrays or "sigma" not in arrays:
        raise EvaluationError(f"{path} is not a statistics file (it holds {', '.join(names) or 'nothing'}; "
                              "expected mu and sigma)")
    if int(arrays.get("format", STATS_FORMAT)) > STATS_FORMAT:
        raise EvaluationError(f"{path} is a format-{int(arrays['format'])} statistics file; this version reads "
                              f"format {STATS_FORMAT}: compute it again with --save-reference")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise EvaluationError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance")
    features = arrays.get("features")
    if features is not None and (features.ndim != 2 or features.shape[1] != len(mu) or len(features) == 0):
        raise EvaluationError(f"{path}: features {features.shape} do not match mu {mu.shape}")
    num_images = int(arrays["num_images"]) if "num_images" in arrays and int(arrays["num_images"]) > 0 else None
    shape = tuple(int(v) for v in arrays["image_shape"]) if "image_shape" in arrays else ()
    return ReferenceStats(mu=mu, sigma=sigma, num_images=num_images,
                          features=None if features is None else features.astype(np.float32),
                          feature_network=_text(arrays, "feature_network"),
                          feature_network_sha256=_text(arrays, "feature_network_sha256"),
                          image_shape=shape or None, source=_text(arrays, "source") or str(path))


def check_reference(stats: ReferenceStats, feature_net: FeatureNetwork, where: str = "the reference") -> None:
    """Refuses statistics of another feature network (by sha256) or of another feature width; adds a
    note when the statistics do not say which network computed them."""
    if stats.mu.shape != (feature_net.num_features,):
        raise EvaluationError(f"{where} holds {len(stats.mu)}-dimensional statistics, but the feature network "
                              f"{feature_net.identity} gives {feature_net.num_features} features")
    if stats.feature_network_sha256 is None:
        note = (f"{where} does not say which feature network computed it (pytorch-fid / ADM style); "
                f"it is assumed to be {feature_net.name}")
        if note not in stats.notes:
            stats.notes.append(note)
    elif not feature_net.sha256.startswith(stats.feature_network_sha256):
        raise EvaluationError(f"{where} was computed with the feature network {stats.feature_network} (sha256 "
                              f"{stats.feature_network_sha256}), but this evaluation uses {feature_net.identity}; "
                              "compute the reference again with `python -m engine.evaluate --save-reference OUT.npz "
                              "--reference SOURCE`")


def _is_stats_file(reference: str | Path) -> bool:
    path = Path(reference)
    return path.suffix.lower() == ".npz" and path.is_file() and "mu" in read_npz(path, set())[0]


def _load_reference_here(reference: str | Path, feature_net: FeatureNetwork, **options) -> ReferenceStats:
    if _is_stats_file(reference):
        stats = read_reference(reference)
    else:
        stats = reference_statistics(reference, feature_net, **options)
    check_reference(stats, feature_net, where=str(reference))
    return stats


def load_reference(reference: str | Path | ReferenceStats, feature_net: FeatureNetwork, *, num: int | None = None,
                   max_features: int = DEFAULT_MAX_FEATURES, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                   device: torch.device | str | None = None, progress: bool = False) -> ReferenceStats:
    """Reference statistics from a statistics file (checked against `feature_net`) or computed from
    an image source (see `reference_statistics` for the options). Under torch.distributed rank 0
    alone reads or computes them and sends them to the others (every rank must call this)."""
    if isinstance(reference, ReferenceStats):
        check_reference(reference, feature_net)
        return reference
    options = {"num": num, "max_features": max_features, "seed": seed, "batch_size": batch_size, "device": device,
               "progress": progress}
    if not is_distributed():
        return _load_reference_here(reference, feature_net, **options)
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", vars(_load_reference_here(reference, feature_net, **options)))
        except (EvaluationError, DataError, ConfigError, KernelError) as exn:
            box[0] = ("error", str(exn))  # the other ranks must hear of it, or they would wait forever
    dist.broadcast_object_list(box, src=0)  # plain data: the class may live in __main__ under `python -m`
    status, value = box[0]
    if status == "error":
        raise EvaluationError(value)
    stats = ReferenceStats(**value)
    check_reference(stats, feature_net, where=str(reference))
    return stats


# ----------------------------------------------------------------------------- evaluation


class _OrderedKID(KernelInceptionDistance):
    """KID whose gathered generated features are put back into image-index order before the subsets
    are drawn: torchmetrics concatenates them in rank order, so ranks dealt batches in turn would
    otherwise draw other subsets than a single process does."""

    fake_order: Tensor | None = None

    def compute(self) -> tuple[Tensor, Tensor]:
        if self.fake_order is not None:
            self.fake_features = [torch.cat(self.fake_features)[self.fake_order]]
        return super().compute()


class _Precomputed(nn.Module):
    """The metrics' 'feature network' when they are given features: each image's features are
    computed once (by the real network) and fed to both FID and KID."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def rank_slice(num_images: int, rank: int | None = None, world_size: int | None = None) -> range:
    """Rank `rank`'s contiguous share of images 0..num_images-1 (the current process's by default)."""
    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    return range(num_images * rank // world_size, num_images * (rank + 1) // world_size)


def _fid_reference_states(stats: ReferenceStats, device: torch.device) -> dict[str, Tensor]:
    """torchmetrics' FID 'real' states that reproduce mu and sigma exactly. Its compute takes
    mean = sum / n and cov = (cov_sum - n mean mean^T) / (n - 1); inverted: sum = n mu,
    cov_sum = (n - 1) sigma + n mu mu^T. Any n >= 2 gives the same mu and sigma, so a file
    without a count uses 2."""
    n = stats.num_images or 2
    mu = torch.from_numpy(stats.mu).to(device, torch.float64)
    sigma = torch.from_numpy(stats.sigma).to(device, torch.float64)
    return {"real_features_sum": n * mu, "real_features_cov_sum": (n - 1) * sigma + n * torch.outer(mu, mu),
            "real_features_num_samples": torch.tensor(n, dtype=torch.long, device=device)}


def _metrics(stats: ReferenceStats, num_features: int, kid_subsets: int, device: torch.device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # KID's "saves all features in a buffer": that is the point
        fid = FrechetInceptionDistance(feature=_Precomputed(num_features)).to(device)
        kid = _OrderedKID(feature=_Precomputed(num_features), subsets=kid_subsets).to(device)
    # torchmetrics sums the FID states over ranks and concatenates KID's: rank 0 alone holds the
    # reference for FID, and each rank a contiguous share of the reference features for KID.
    rank, world_size = rank_and_world_size()
    if rank == 0:
        for name, value in _fid_reference_states(stats, device).items():
            setattr(fid, name, value)
    if stats.features is not None:
        share = rank_slice(len(stats.features), rank, world_size)
        kid.real_features = [torch.from_numpy(np.ascontiguousarray(stats.features[share.start:share.stop])).to(device)]
    return fid, kid


def evaluate(images: ImageInput, reference: ReferenceStats | str | Path, feature_net: FeatureNetwork, *,
             kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE, kid_subsets: int = DEFAULT_KID_SUBSETS,
             batch_size: int = DEFAULT_BATCH_SIZE, device: torch.device | str | None = None, seed: int = 0,
             total: int | None = None, progress: bool = False) -> dict:
    """FID and KID of `images` against `reference`.

    `images`: one uint8 numpy (N, H, W, C) array, a torch (N, C, H, W) uint8 tensor or float tensor
    in [-1, 1] (see `engine.data.image_sets.as_uint8_images`), or an iterable of such batches or of
    (index of the batch's first image, batch) pairs, as `engine.sample.generate_batches` yields them
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
    device = _device_of(feature_net, device)
    feature_net.to(device)
    if kid_subset_size < 1 or kid_subsets < 1:
        raise EvaluationError(f"KID needs a subset size and a number of subsets of at least 1, not "
                              f"{kid_subset_size} and {kid_subsets}")
    stats = load_reference(reference, feature_net, batch_size=batch_size, device=device, progress=progress)
    notes = list(stats.notes)
    dim = feature_net.num_features
    fid, kid = _metrics(stats, dim, kid_subsets, device)
    features = _features(image_batches(images, batch_size), feature_net, device, total=total, progress=progress,
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


def _add_generated(fid: FrechetInceptionDistance, kid: _OrderedKID,
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


def _gather_generated(kid: _OrderedKID, local: int, shapes: set[tuple[int, ...]], runs: list[tuple[int | None, int]],
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


def _kid(kid: _OrderedKID, stats: ReferenceStats, num_images: int, kid_subset_size: int, seed: int,
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


# ----------------------------------------------------------------------------- command line


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m engine.evaluate", description=__doc__.splitlines()[0])
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


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    progress_write(f"evaluate: warning: {message}")


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
        results += _evaluate_model(args, model, config, step, kernels, stats, net, is_main, device, ema)
    best = min(results, key=lambda result: result["fid"])
    if is_main and len(results) > 1:
        print(f"best: {_label(best)}, FID {best['fid']:.2f}")
    if is_main and args.json:
        _write_json(args, {"run": str(args.run), "step": results[-1]["step"], "best": best, "results": results}, net)


def _evaluate_model(args: argparse.Namespace, model: torch.nn.Module, config: Config, step: int, kernels,
                    stats: ReferenceStats, net: FeatureNetwork, is_main: bool, device: torch.device,
                    ema: str | None) -> list[dict]:
    """One result per guidance scale of `model` (weights `ema`, None for the default choice)."""
    schedule = schedule_from_config(config.diffusion).to(device)
    rank, world_size = rank_and_world_size()
    results = []
    for scale in args.guidance or [None]:
        sampling = evaluation_config(config, scale)
        batches = generate_batches(model, sampling, schedule, kernels, num_images=args.num or config.eval.num_images,
                                   batch_size=config.eval.batch_size, seed=config.eval.seed, device=device, rank=rank,
                                   world_size=world_size, progress=is_main)
        result = evaluate(batches, stats, net, kid_subset_size=args.kid_subset_size, kid_subsets=args.kid_subsets,
                          batch_size=args.batch_size, device=device, seed=args.seed)
        results.append({**result, "ema": ema, "step": step,
                        "guidance": sampling.sample.guidance if config.model.num_classes else None})
        if is_main:
            label = _label(results[-1])
            print(f"{label + ': ' if label else ''}{summary(result)} ({sampling.sample.sampler}, step {step})")
    return results


def _label(result: dict) -> str:
    """"ema 0.1, guidance 2": what a result's images were drawn with, where it was chosen."""
    parts = ([f"ema {result['ema']}"] if result["ema"] is not None else []) + \
        ([f"guidance {result['guidance']:g}"] if result["guidance"] is not None else [])
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    joined_here = not is_distributed()  # a caller's process group is the caller's to end
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            context = init_distributed(args.device)
        except RuntimeError as exn:  # e.g. --device cuda without CUDA
            print(f"evaluate: error: {exn}", file=sys.stderr)
            return 2
        try:
            _run(args, context.is_main, context.device)
        except (EvaluationError, DataError, ConfigError, KernelError) as exn:
            print(f"evaluate: error: {exn}".replace("\n", " "), file=sys.stderr)
            return 2
        finally:
            if joined_here:
                shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
