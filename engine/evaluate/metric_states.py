"""torchmetrics' FID and KID, set up to take precomputed features and to hold a reference's statistics.

Imported only when images are evaluated: torchmetrics takes about a second to import, which every
command-line start (training, sampling, export) would otherwise pay.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from engine.distributed import rank_and_world_size, rank_slice
from engine.evaluate.reference import ReferenceStats


class OrderedKID(KernelInceptionDistance):
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


def metrics_holding_reference(stats: ReferenceStats, num_features: int, kid_subsets: int,
                              device: torch.device) -> tuple[FrechetInceptionDistance, OrderedKID]:
    """FID and KID metrics that take `num_features`-wide features and already hold this rank's part of `stats`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # KID's "saves all features in a buffer": that is the point
        fid = FrechetInceptionDistance(feature=_Precomputed(num_features)).to(device)
        kid = OrderedKID(feature=_Precomputed(num_features), subsets=kid_subsets).to(device)
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
