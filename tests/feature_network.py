"""A stand-in for the FID Inception network, for tests: no download, a few milliseconds per batch.

`make_feature_network(path, seed)` writes a seeded, randomly initialised conv net as a TorchScript
file with the calling convention of NVIDIA's `inception-2015-12-05.pt`:

    net(images, return_features=True) -> float32 (N, num_features)

`images` are uint8 (N, 3, H, W) of any size (resized inside, as the Inception resizes to 299). The
file is loaded through the same code as the real network (`engine.evaluate.load_feature_network`).
Different seeds give different files, hence different sha256s: "another feature network".
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_FEATURES = 64


class StandInFeatureNetwork(nn.Module):
    def __init__(self, num_features: int = NUM_FEATURES, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.features = nn.Linear(32 * 2 * 2 + 32, num_features)
        self.logits = nn.Linear(num_features, num_classes)

    def forward(self, x: Tensor, return_features: bool = True) -> Tensor:
        # uint8 in, like the Inception; three channels only, so callers must convert gray and RGBA
        h = F.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        h = F.relu(self.conv2(F.relu(self.conv1(h))))
        # where the responses are, and how strong they are: the energy makes noise and blur show
        pooled = F.adaptive_avg_pool2d(h, 2).flatten(1)
        energy = h.square().mean(dim=(2, 3)).sqrt()
        features = 10 * self.features(torch.cat([pooled, energy], dim=1))  # FIDs of order 0.1-10, not 1e-3
        if return_features:
            return features
        return self.logits(features)


def make_feature_network(path: str | Path, seed: int = 0, num_features: int = NUM_FEATURES) -> Path:
    """Write the stand-in, initialised from `seed`, as a TorchScript file at `path`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's generator
        torch.manual_seed(seed)
        net = StandInFeatureNetwork(num_features).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, and still what the file is
        torch.jit.script(net).save(str(path))
    return path
