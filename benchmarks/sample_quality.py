"""Sample quality, this engine against diffusers, side by side in one run (issue 12).

    python -m benchmarks.sample_quality                     # the quick preset: 16x16 CIFAR-10, ~30 min on 2 cores
    python -m benchmarks.sample_quality --preset protocol   # issue 12's protocol: 32x32, 1,000 images (hours on a CPU)

The same small DDPM (ch 32, mult 1,2,2,2, two res blocks, attention at the top level, dropout 0.1;
linear betas, T = 1000, eps target; Adam 2e-4, 100 warmup steps, grad clip 1, batch 64 with flips)
is trained twice from the same seed on the same CIFAR-10 images: once by this engine
(`python -m engine.train configs/cifar.yaml` with those overrides) and once the way diffusers'
`train_unconditional` example does it (UNet2DModel, DDPMScheduler.add_noise, torch.randn noise,
MSE). Both are sampled with DDIM (eta 0): ours through `engine.sample`, theirs through
`DDIMPipeline`; then the swaps: each model through the other's sampler, and our sampler's options
(clipping conventions, dynamic thresholding, timestep spacing) one at a time. Raw weights, no EMA.

The quality measure needs no downloads: the Fréchet distance in the features of a small CIFAR-10
classifier that this script trains on the training split and caches (`--cache`, never committed),
against held-out images the diffusion models never see, plus the per-channel mean and std, the
fraction of saturated pixels and the high-frequency energy of the samples against the held-out
images'. Real held-out images against other real images score near 0 (the floor is printed).
Results go to OUT/quality.md, OUT/quality.json and a grid PNG per row. Needs the dev extra
(diffusers) and ../shared/data/cifar10-train.tar.gz (or --cifar).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-train.tar.gz"
DEFAULT_CACHE = Path.home() / ".cache" / "ddpm-engine" / "sample-quality"


@dataclasses.dataclass(frozen=True)
class Preset:
    image_size: int
    train_steps: int
    num_images: int  # generated per row
    batch_size: int = 64
    ddim_steps: int = 50
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    dropout: float = 0.1
    warmup_steps: int = 100
    lr: float = 2e-4
    train_images: int = 45000  # training images (at most those not held out)
    held_out: int = 5000  # images kept from every model (diffusion and classifier): the reference set
    every: int = 1  # use every k-th CIFAR-10 image (in file-name order, so the classes stay balanced)
    classifier_width: int = 64  # the feature network's channels (FeatureNet)

    def model_overrides(self) -> list[str]:
        top = self.image_size  # attention at the top level: 16x16 in the protocol, the top of a 16x16 model too
        attention = self.image_size // 2 if self.image_size > 16 else top
        return [f"model.base_channels={self.base_channels}", f"model.channel_mult={list(self.channel_mult)}",
                f"model.num_res_blocks={self.num_res_blocks}", f"model.attention_resolutions=[{attention}]",
                f"model.dropout={self.dropout}", f"data.image_size={self.image_size}"]


PRESETS = {
    "protocol": Preset(image_size=32, train_steps=1200, num_images=1000),
    "quick": Preset(image_size=16, train_steps=1200, num_images=500),
    # the guard test's size (tests/test_sample_quality.py): minutes on 2 cores
    "test": Preset(image_size=16, train_steps=100, num_images=100, batch_size=16, ddim_steps=20, base_channels=32,
                   channel_mult=(1, 2), num_res_blocks=1, train_images=8000, held_out=2000, every=5,
                   classifier_width=32),
}


# ----------------------------------------------------------------------------- data


def load_cifar(tar_path: Path, image_size: int, cache: Path, every: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Every `every`-th CIFAR-10 train image (N, H, W, 3) uint8 at `image_size` (box-downsampled) and the
    labels, cached as .npz."""
    cached = cache / f"cifar10-{image_size}-every{every}.npz"
    if cached.exists():
        with np.load(cached) as saved:
            return saved["images"], saved["labels"]
    with tarfile.open(tar_path) as archive:
        names = sorted(m.name for m in archive.getmembers() if m.isfile() and m.name.endswith((".jpg", ".png")))
    wanted = set(names[::every])
    decoded = {}
    with tarfile.open(tar_path, "r|*") as archive:  # one pass in the archive's order: a .gz cannot seek back cheaply
        for member in archive:
            if member.name in wanted:
                image = Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")
                if image.size != (image_size, image_size):
                    image = image.resize((image_size, image_size), Image.BOX)
                decoded[member.name] = np.asarray(image)
    classes = {folder: index for index, folder in enumerate(sorted({Path(name).parent.name for name in wanted}))}
    ordered = sorted(decoded)
    images = np.stack([decoded[name] for name in ordered])
    labels = np.asarray([classes[Path(name).parent.name] for name in ordered], dtype=np.int64)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(cached, images=images, labels=labels)
    return images, labels


def split(images: np.ndarray, labels: np.ndarray, held_out: int, seed: int = 0):
    """A fixed held-out set of `held_out` images; the rest train the models."""
    order = np.random.default_rng(seed).permutation(len(images))
    held, rest = order[:held_out], order[held_out:]
    return (images[rest], labels[rest]), (images[held], labels[held])


def write_engine_data(images: np.ndarray, labels: np.ndarray, out: Path) -> Path:
    """The training images as the engine reads them: an image folder, prepared as array shards."""
    from engine.data.prepare import prepare

    if (out / "manifest.json").exists():
        return out
    folder = out.with_name(out.name + "-folder")
    for index, (image, label) in enumerate(zip(images, labels)):
        path = folder / f"class{label}" / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    prepare(folder, out, shard_size=5000, shard_format="array", seed=0, progress=False)
    return out


def to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- the quality measure


class FeatureNet(torch.nn.Module):
    """A small CIFAR-10 classifier; its pooled penultimate activations are the features."""

    def __init__(self, width: int = 64):
        super().__init__()

        def block(cin: int, cout: int) -> list[torch.nn.Module]:
            return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.GroupNorm(8, cout), torch.nn.SiLU()]

        self.body = torch.nn.Sequential(*block(3, width), *block(width, width), torch.nn.AvgPool2d(2),
                                        *block(width, 2 * width), *block(2 * width, 2 * width), torch.nn.AvgPool2d(2),
                                        *block(2 * width, 2 * width), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.head = torch.nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, images: np.ndarray, batch: int = 500) -> torch.Tensor:
        self.eval()
        return torch.cat([self.body(to_unit_range(images[i:i + batch])) for i in range(0, len(images), batch)]).double()


def feature_net(train: tuple[np.ndarray, np.ndarray], held: tuple[np.ndarray, np.ndarray], cache: Path,
                epochs: int = 3, width: int = 64) -> tuple[FeatureNet, float]:
    """The classifier trained on the training split (seeded, a few epochs), cached; and its held-out accuracy."""
    images, labels = train
    tag = hashlib.sha256(images[:64].tobytes() + str((images.shape, epochs)).encode()).hexdigest()[:12]
    path = cache / f"classifier-{images.shape[1]}-{tag}{'' if width == 64 else f'-w{width}'}.pt"
    torch.manual_seed(0)  # the initial weights too: the features, and so every FD, depend on them
    net = FeatureNet(width)
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
        order_rng = np.random.default_rng(0)
        steps = epochs * len(images) // 128
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
        net.train()
        for step in range(steps):
            batch = order_rng.integers(0, len(images), 128)
            x = to_unit_range(images[batch])
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)
            loss = F.cross_entropy(net(x), torch.from_numpy(labels[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), path)
    net.eval()
    with torch.no_grad():
        logits = torch.cat([net(to_unit_range(held[0][i:i + 500])) for i in range(0, len(held[0]), 500)])
    return net, float((logits.argmax(1).numpy() == held[1]).mean())


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def high_frequency_energy(images: np.ndarray) -> float:
    """Share of the (mean-removed) spectral energy above half the Nyquist frequency, averaged over images."""
    x = torch.from_numpy(images).double().permute(0, 3, 1, 2) / 255.0
    power = torch.fft.fft2(x - x.mean((2, 3), keepdim=True)).abs().square()
    f = torch.fft.fftfreq(images.shape[1], dtype=torch.float64).abs()
    high = (f[:, None].maximum(f[None, :]) > 0.25).double()
    return float(((power * high).sum((1, 2, 3)) / power.sum((1, 2, 3)).clamp_min(1e-12)).mean())


def image_statistics(images: np.ndarray) -> dict:
    x = images.astype(np.float64) / 255.0
    return {"mean": [round(float(v), 3) for v in x.mean((0, 1, 2))], "std": [round(float(v), 3) for v in x.std((0, 1, 2))],
            "saturated": round(float(((images == 0) | (images == 255)).mean()), 4),
            "high_freq": round(high_frequency_energy(images), 4)}


class QualityMeasure:
    """Scores uint8 images against the held-out set: FD in the classifier's features, plus image statistics."""

    def __init__(self, net: FeatureNet, reference: np.ndarray):
        self.net, self.reference = net, net.features(reference)
        self.reference_stats = image_statistics(reference)

    def __call__(self, images: np.ndarray) -> dict:
        return {"fd": round(frechet_distance(self.net.features(images), self.reference), 3), **image_statistics(images)}


# ----------------------------------------------------------------------------- training, both ways


def launch(module: str, args: list[str], env: dict[str, str] | None = None,
           log: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` from the repository root in a fresh interpreter: its output appended to `log` as it
    comes (a training's progress can be followed there), or else captured. The tests pass a fork instead."""
    command = [sys.executable, "-m", module, *args]
    if log is None:
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    with open(log, "a") as stream:
        return subprocess.run(command, cwd=ROOT, env=env, stdout=stream, stderr=subprocess.STDOUT)


def engine_train_args(preset: Preset, data: Path, run_dir: Path, seed: int) -> list[str]:
    """The engine's own CLI, `configs/cifar.yaml` with the protocol's overrides."""
    steps = preset.train_steps
    return ["configs/cifar.yaml", *preset.model_overrides(),
            f"data.path={data}", f"train.run_dir={run_dir}", f"train.steps={steps}",
            f"train.batch_size={preset.batch_size}", f"optim.lr={preset.lr}", f"optim.warmup_steps={preset.warmup_steps}",
            f"train.seed={seed}", "train.device=cpu", "train.log_every=100", f"train.checkpoint_every={steps}",
            "train.sample_every=0", "sample.sampler=ddim", "sample.steps=10", "sample.num_images=16",
            "sample.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=5000"]


def train_ours(preset: Preset, data: Path, run_dir: Path, seed: int, launch=launch) -> Path:
    """Trains (or, when the run is complete, only reopens) with `python -m engine.train`."""
    result = launch("engine.train", engine_train_args(preset, data, run_dir, seed))
    if result.returncode != 0:
        raise RuntimeError(f"engine.train failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return run_dir


def diffusers_unet(preset: Preset):
    """diffusers' UNet2DModel with the protocol's architecture (engine.diffusers_format's mapping of it)."""
    import diffusers

    from engine.config import load_config
    from engine.diffusers_format import diffusers_unet_config

    config = load_config(ROOT / "configs" / "cifar.yaml", preset.model_overrides())
    return diffusers.UNet2DModel.from_config(diffusers_unet_config(config))


def diffusers_scheduler():
    """The scheduler `train_unconditional` trains with: DDPMScheduler's defaults but the linear betas."""
    import diffusers

    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


def train_diffusers_way(model: torch.nn.Module, preset: Preset, images: np.ndarray, seed: int) -> torch.nn.Module:
    """The `train_unconditional` loop at the protocol's settings: add_noise, torch.randn noise, MSE, Adam."""
    scheduler = diffusers_scheduler()
    torch.manual_seed(seed)
    order = np.random.default_rng(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=preset.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / preset.warmup_steps))
    model.train()
    for _ in range(preset.train_steps):
        x0 = to_unit_range(images[order.integers(0, len(images), preset.batch_size)])
        x0 = torch.where(torch.rand(len(x0), 1, 1, 1) < 0.5, x0.flip(3), x0)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),))
        prediction = model(scheduler.add_noise(x0, noise, t), t)
        loss = F.mse_loss(getattr(prediction, "sample", prediction), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
    return model.eval()


# ----------------------------------------------------------------------------- sampling, both ways


def sample_engine(model_dir: Path, preset: Preset, out: Path, *options: str) -> np.ndarray:
    """`python -m engine.sample MODEL_DIR ...` in this process: a run (raw weights) or a diffusers folder."""
    from engine.sample import main

    npz = out.with_suffix(".npz")
    raw = [] if (model_dir / "model_index.json").exists() or (model_dir / "unet").exists() else ["--raw"]
    argv = [str(model_dir), *raw, "--sampler", "ddim", "--steps", str(preset.ddim_steps), "--eta", "0",
            "--num-images", str(preset.num_images), "--batch-size", "250", "--seed", "0", "--device", "cpu",
            "--precision", "fp32", "--no-compile", "--out", str(out), "--npz", str(npz), *options]
    if main(argv) != 0:
        raise RuntimeError(f"engine.sample {' '.join(argv)} failed")
    with np.load(npz) as saved:
        return saved["arr_0"]


@torch.no_grad()
def sample_diffusers(unet, preset: Preset, out: Path, use_clipped_model_output: bool = False) -> np.ndarray:
    """DDIMPipeline with the DDIM scheduler made from the training scheduler's config, as users do."""
    import diffusers

    from engine.images import save_grid

    scheduler = diffusers.DDIMScheduler.from_config(diffusers_scheduler().config)
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    batches = []
    for start in range(0, preset.num_images, 250):
        images = pipeline(batch_size=min(250, preset.num_images - start), eta=0.0,
                          generator=torch.Generator().manual_seed(start), num_inference_steps=preset.ddim_steps,
                          use_clipped_model_output=use_clipped_model_output, output_type="np").images
        batches.append((images * 255).round().astype(np.uint8))  # as diffusers' numpy_to_pil
    images = np.concatenate(batches)
    save_grid(images[:64], out)
    return images


# ----------------------------------------------------------------------------- where the samplers part


@torch.no_grad()
def step_by_step(run_dir: Path, images: int = 2) -> dict:
    """The same weights and x_T through our denoising step and diffusers' schedulers, step by step.

    DDIM (leading spacing, both eps conventions, diffusers told the same) and DDPM ancestral
    (fixed_large and fixed_small, our formula fed diffusers' own noise): the largest |difference|
    of x_t over the trajectory and the first step where it exceeds 1e-4 (None: they never part).
    """
    import diffusers

    from engine import diffusion
    from engine.diffusers_format import unet_to_diffusers
    from engine.run_dir import load_run
    from engine.schedule import schedule_from_config
    from kernels.noise import noise_keys, randn
    from kernels.registry import resolve_kernels_from_config

    model, config, _ = load_run(run_dir, torch.device("cpu"), use_ema=False)
    model.eval()
    unet_config, weights = unet_to_diffusers(model.state_dict(), config)
    theirs = diffusers.UNet2DModel.from_config(unet_config)
    theirs.load_state_dict(weights)
    theirs.eval()
    schedule = schedule_from_config(config.diffusion).to("cpu")
    kernels = resolve_kernels_from_config(config, torch.device("cpu"), check=False)
    shape = (images, config.data.channels, config.data.image_size, config.data.image_size)
    keys = noise_keys(0, torch.arange(images))
    x_end = randn(keys, torch.full((images,), schedule.num_timesteps), shape[1] * shape[2] * shape[3]).view(shape)
    report = {}
    for clipped in (False, True):
        scheduler = diffusers.DDIMScheduler.from_config(diffusers_scheduler().config)
        scheduler.set_timesteps(50)
        step = diffusion.denoising_step(model, schedule, kernels, sampler="ddim", use_clipped_model_output=clipped)
        pairs = diffusion.sampling_timesteps(schedule.num_timesteps, "ddim", 50, "leading")
        ours, x_theirs, gaps = x_end.clone(), x_end.clone(), []
        for (t, t_prev), timestep in zip(pairs, scheduler.timesteps):
            assert t == int(timestep), "leading spacing: the same timesteps as diffusers"
            ours = step(ours, torch.full((images,), t), torch.full((images,), t_prev), keys)
            eps = theirs(x_theirs, timestep).sample
            x_theirs = scheduler.step(eps, timestep, x_theirs, eta=0.0, use_clipped_model_output=clipped).prev_sample
            gaps.append(float((ours - x_theirs).abs().max()))
        report[f"ddim, use_clipped_model_output={clipped}"] = _parting(gaps, [t for t, _ in pairs])
    for variance in ("fixed_large", "fixed_small"):
        scheduler = diffusers.DDPMScheduler.from_config(diffusers_scheduler().config, variance_type=variance)
        scheduler.set_timesteps(schedule.num_timesteps)
        ours, x_theirs, gaps = x_end.clone(), x_end.clone(), []
        for t in range(schedule.num_timesteps - 1, -1, -1):
            generator = torch.Generator().manual_seed(t)
            z = torch.randn(shape, generator=torch.Generator().manual_seed(t))  # the noise diffusers draws below
            batch_t = torch.full((images,), t)
            ours = diffusion.posterior_step(schedule, ours, batch_t, model(ours, batch_t), z, variance=variance,
                                            clip_denoised=True)
            x_theirs = scheduler.step(theirs(x_theirs, t).sample, t, x_theirs, generator=generator).prev_sample
            gaps.append(float((ours - x_theirs).abs().max()))
        report[f"ddpm, {variance}"] = _parting(gaps, list(range(schedule.num_timesteps - 1, -1, -1)))
    return report


def _parting(gaps: list[float], timesteps: list[int], tolerance: float = 1e-4) -> dict:
    first = next((t for t, gap in zip(timesteps, gaps) if gap > tolerance), None)
    return {"max_abs_difference": max(gaps), "final_abs_difference": gaps[-1], "first_step_apart": first}


# ----------------------------------------------------------------------------- the run


def sampling_rows(ours: Path, theirs_dir: Path, theirs, exported, preset: Preset, out: Path) -> dict:
    """Every (model, sampler) row of the table: label -> uint8 images."""
    spacing = "sample.timestep_spacing=linspace"  # the engine's default, also for the diffusers folder
    engine = lambda model_dir, name, *options: sample_engine(model_dir, preset, out / f"{name}.png", *options)
    return {
        "diffusers model, diffusers DDIM": lambda: sample_diffusers(theirs, preset, out / "theirs-theirs.png"),
        "ours model, engine.sample before (eps from clipped x0)": lambda: engine(
            ours, "ours-before", "sample.use_clipped_model_output=true"),
        "ours model, engine.sample now (network's eps)": lambda: engine(ours, "ours-now"),
        "ours model, diffusers DDIM": lambda: sample_diffusers(exported, preset, out / "ours-theirs.png"),
        "ours model, diffusers DDIM use_clipped_model_output": lambda: sample_diffusers(
            exported, preset, out / "ours-theirs-clipped.png", use_clipped_model_output=True),
        "ours model, ours, no clipping": lambda: engine(ours, "ours-noclip", "--no-clip"),
        "ours model, ours, dynamic thresholding": lambda: engine(ours, "ours-dynamic", "sample.thresholding=dynamic"),
        "ours model, ours, dynamic thresholding, eps from clipped x0": lambda: engine(
            ours, "ours-dynamic-clipped", "sample.thresholding=dynamic", "sample.use_clipped_model_output=true"),
        "ours model, ours, leading spacing (diffusers')": lambda: engine(
            ours, "ours-leading", "sample.timestep_spacing=leading"),
        "ours model, ours, trailing spacing": lambda: engine(ours, "ours-trailing", "sample.timestep_spacing=trailing"),
        "diffusers model, engine.sample now": lambda: engine(theirs_dir, "theirs-ours", spacing),
        "diffusers model, engine.sample before (eps from clipped x0)": lambda: engine(
            theirs_dir, "theirs-ours-before", spacing, "sample.use_clipped_model_output=true"),
    }


def prepare_models(preset: Preset, train: tuple[np.ndarray, np.ndarray], out: Path, cache: Path, seed: int,
                   launch=launch):
    """Both models trained from `seed` (reused when already in OUT), ours exported for diffusers."""
    import diffusers

    from engine.export import main as export

    tag = f"{preset.image_size}px-{len(train[0])}"
    data = write_engine_data(*train, cache / f"engine-data-{tag}")
    started = time.perf_counter()
    ours = train_ours(preset, data, out / f"ours-seed{seed}", seed, launch)
    seconds = {"ours": time.perf_counter() - started}
    theirs_dir = out / f"diffusers-seed{seed}"
    if not (theirs_dir / "model_index.json").exists():
        started = time.perf_counter()
        torch.manual_seed(seed)  # its initial weights from the seed too, as train.seed seeds ours
        unet = train_diffusers_way(diffusers_unet(preset), preset, train[0], seed)
        seconds["diffusers"] = time.perf_counter() - started
        diffusers.DDPMPipeline(unet=unet, scheduler=diffusers_scheduler()).save_pretrained(theirs_dir)
    theirs = diffusers.UNet2DModel.from_pretrained(theirs_dir / "unet").eval()
    exported_dir = out / f"ours-seed{seed}-diffusers"
    if export([str(ours), "--format", "diffusers", str(exported_dir), "--raw", "--overwrite"]) != 0:
        raise RuntimeError(f"engine.export {ours} failed")
    exported = diffusers.UNet2DModel.from_pretrained(exported_dir / "unet").eval()
    return ours, theirs_dir, theirs, exported, seconds


def run(preset: Preset, cifar: Path, out: Path, cache: Path, seed: int = 0, rows: list[str] | None = None,
        compare: bool = True, launch=launch) -> dict:
    """Trains both models, samples every row (or the `rows` named) and scores them; returns the results. `launch`
    runs engine.train (`launch`'s signature)."""
    train, held = split(*load_cifar(cifar, preset.image_size, cache, preset.every), preset.held_out)
    train = (train[0][:preset.train_images], train[1][:preset.train_images])
    net, accuracy = feature_net(train, held, cache, width=preset.classifier_width)
    measure = QualityMeasure(net, held[0])
    out.mkdir(parents=True, exist_ok=True)
    ours, theirs_dir, theirs, exported, seconds = prepare_models(preset, train, out, cache, seed, launch)
    results = {"preset": dataclasses.asdict(preset), "seed": seed, "classifier_accuracy": round(accuracy, 3),
               "train_seconds": seconds, "held_out": measure.reference_stats,
               "real_floor": measure(train[0][:preset.num_images]), "rows": {}}
    table = sampling_rows(ours, theirs_dir, theirs, exported, preset, out)
    unknown = set(rows or []) - set(table)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; the rows are: {list(table)}")
    for label, draw in table.items():
        if rows is None or label in rows:
            results["rows"][label] = measure(draw())
            print(f"{label}: {results['rows'][label]}", flush=True)
    if compare:
        results["step_by_step"] = step_by_step(ours)
    return results


def markdown(results: dict) -> str:
    preset = results["preset"]
    lines = [f"Preset {preset['image_size']}x{preset['image_size']}, {preset['train_steps']} steps, batch "
             f"{preset['batch_size']}, {preset['num_images']} images per row, DDIM {preset['ddim_steps']} steps eta 0, "
             f"seed {results['seed']}; classifier held-out accuracy {results['classifier_accuracy']}.", "",
             "| model, sampler | FD (lower is better) | channel mean | channel std | saturated | high-freq |",
             "| --- | --- | --- | --- | --- | --- |"]
    held, floor = results["held_out"], results["real_floor"]
    lines.append(f"| held-out images (reference) | 0 | {held['mean']} | {held['std']} | {held['saturated']} | "
                 f"{held['high_freq']} |")
    lines.append(f"| real training images (floor) | {floor['fd']} | {floor['mean']} | {floor['std']} | "
                 f"{floor['saturated']} | {floor['high_freq']} |")
    for label, row in results["rows"].items():
        lines.append(f"| {label} | {row['fd']} | {row['mean']} | {row['std']} | {row['saturated']} | {row['high_freq']} |")
    for label, parting in results.get("step_by_step", {}).items():
        lines.append(f"\nStep by step, same weights and x_T, {label}: max |x ours - x diffusers| "
                     f"{parting['max_abs_difference']:.2e}, first step apart: {parting['first_step_apart']}")
    return "\n".join(lines) + "\n"


def cifar_missing(path: Path) -> bool:
    """True, with the one-line error, when the CIFAR-10 archive is not at `path`."""
    if path.exists():
        return False
    print(f"error: {path} not found (pass --cifar PATH to the CIFAR-10 image-folder tar.gz)", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sample_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--cifar", type=Path, default=DEFAULT_CIFAR, help="the CIFAR-10 image-folder tar(.gz)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/sample-quality-PRESET")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downsampled data, the classifier")
    parser.add_argument("--seed", type=int, default=0, help="training seed of both models")
    parser.add_argument("--rows", nargs="+", default=None, metavar="LABEL",
                        help="only these rows of the table (their labels, quoted), e.g. for the protocol's size")
    parser.add_argument("--num-images", type=int, default=None, help="images per row (default: the preset's)")
    parser.add_argument("--train-steps", type=int, default=None, help="training steps of both models (a longer budget)")
    parser.add_argument("--no-step-by-step", action="store_true", help="skip the step-by-step comparison")
    args = parser.parse_args(argv)
    if cifar_missing(args.cifar):
        return 2
    out = args.out or ROOT / "runs" / f"sample-quality-{args.preset}"
    preset = PRESETS[args.preset]
    if args.num_images:
        preset = dataclasses.replace(preset, num_images=args.num_images)
    if args.train_steps:
        preset = dataclasses.replace(preset, train_steps=args.train_steps)
    results = run(preset, args.cifar, out, args.cache, seed=args.seed, rows=args.rows, compare=not args.no_step_by_step)
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    (out / "quality.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
