"""Reference statistics: computed from an image source, saved, read back and checked against the network.

A statistics file (`.npz`, no pickles) holds `mu` and `sigma` (float64, the features' mean and
covariance, ddof=1), `num_images`, `features` (float32, a seeded random subset of at most
`max_features` feature rows, for KID), and which network computed them (file name and sha256
prefix), the images' shape and the source. Statistics of another network are refused. A file with
only mu and sigma gives FID, and KID is reported unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.atomic_files import atomic_write
from engine.config import ConfigError
from engine.data import DataError
from engine.data.image_sets import ImageInput, image_batches, open_images, read_npz
from engine.distributed import is_distributed
from engine.evaluate.errors import EvaluationError
from engine.evaluate.feature_network import (DEFAULT_BATCH_SIZE, SHA256_PREFIX, FeatureNetwork, device_of,
                                             image_features)
from kernels.registry import KernelError


STATS_FORMAT = 1
DEFAULT_MAX_FEATURES = 10_000


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
    device = device_of(feature_net, device)
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
    for _, features, shape in image_features(batches, feature_net, device, total=total, progress=progress,
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
                          feature_network_sha256=feature_net.sha256[:SHA256_PREFIX],
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
