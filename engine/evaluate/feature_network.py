"""The FID feature network, and images through it as features.

The features come from the TensorFlow Inception-v3 graph of 2015-12-05 that FID is defined with, as
NVIDIA's TorchScript file `inception-2015-12-05.pt` (INCEPTION_URL). Nothing is downloaded: the
file is taken from `--inception PATH`, else $DDPM_INCEPTION, else DEFAULT_INCEPTION. The network
takes uint8 images of any size and resizes them itself; each image's features are computed once
and fed to both metrics.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from engine.evaluate.errors import EvaluationError
from engine.progress import progress_bar


INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "DDPM_INCEPTION"
DEFAULT_INCEPTION = Path("~/.cache/ddpm-engine/inception-2015-12-05.pt")
DEFAULT_BATCH_SIZE = 100
SHA256_PREFIX = 16  # hex digits kept to tell feature networks apart


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
        return f"{self.name} (sha256 {self.sha256[:SHA256_PREFIX]})"


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


def device_of(module: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def image_features(batches: Iterable[tuple[int | None, Tensor]], feature_net: FeatureNetwork, device: torch.device,
                   *, total: int | None, progress: bool,
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
