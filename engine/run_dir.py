"""A run directory: its layout, owned here (engine.train writes it; sample, export, plot and evaluate read
it), and the model of its latest checkpoint (`load_run`, which takes a diffusers folder as well)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from engine.checkpoint import CHECKPOINT_DIR, load_latest_checkpoint
from engine.config import MAX_SIGMA_REL, Config, ConfigError, config_from_dict
from engine.diffusers_format import config_with_diffusers, is_diffusers_folder, read_diffusers_folder
from engine.distributed import rank_and_world_size
from engine.ema import ema_name
from engine.post_hoc_ema import SNAPSHOT_DIR, parse_sigma_rel, synthesize
from engine.unet import build_unet


class RunDir:
    """Where everything of a run lives under `train.run_dir`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")  # the resolved config, written at every start
    checkpoints = property(lambda self: self.path / CHECKPOINT_DIR)  # engine.checkpoint's atomic files
    metrics = property(lambda self: self.path / "metrics.jsonl")  # one JSON record per log interval or evaluation
    tensorboard = property(lambda self: self.path / "tensorboard")  # with train.tensorboard
    samples = property(lambda self: self.path / "samples")  # a grid per train.sample_every steps
    final_samples = property(lambda self: self.path / "samples.png")  # the grid at the end of training
    loss_curve = property(lambda self: self.path / "loss.png")
    fid_reference = property(lambda self: self.path / "fid_reference.npz")  # eval.reference's statistics, cached
    sample_grid = property(lambda self: self.path / "sample_grid.png")  # engine.sample's default output
    post_hoc_ema = property(lambda self: self.path / SNAPSHOT_DIR)  # train.post_hoc_ema_sigma_rels' snapshots

# engine.sample's, engine.evaluate's and engine.export's --ema
EMA_HELP = ("one of the run's EMAs by name: ema_0.999 (train.ema_decay's or an extra decay's) or sigma_rel_0.05 (a "
            "post-hoc profile's); or a number, e.g. 0.08: the post-hoc EMA of that sigma_rel, synthesized from the "
            "run's snapshots (train.post_hoc_ema_sigma_rels)")


def load_run(run_dir: str | Path, device: torch.device, use_ema: bool | None = None,
             ema: str | None = None, checkpoint: tuple[dict, Path] | None = None) -> tuple[torch.nn.Module, Config, int]:
    """The model of a run's latest checkpoint, its config and step.

    EMA weights when `use_ema` is true; None follows the run's `sample.use_ema`. `ema` names one (see
    `checkpoint_weights`); None takes the run's `sample.ema` (by default train.ema_decay's). A checkpoint file (e.g.
    checkpoints/best.pt) works too, and so does a diffusers folder (pipeline or bare UNet): its weights,
    with its settings over the defaults, at step 0. `checkpoint`: `read_run_checkpoint`'s, read once for
    several EMAs of one run.
    """
    run_dir = Path(run_dir)
    if is_diffusers_folder(run_dir):  # e.g. engine.export's output, or a model saved by diffusers
        if use_ema is False or ema is not None:
            raise ConfigError(f"{run_dir} is a diffusers folder: it holds one set of weights (drop --raw and --ema)")
        found = read_diffusers_folder(run_dir)
        if found.diffusion is None:
            print(f"warning: {run_dir} has no scheduler config; sampling with the default diffusion settings "
                  f"({Config().diffusion})", file=sys.stderr)
        config = config_from_dict(config_with_diffusers(Config().to_dict(), found), where=str(run_dir))
        model = build_unet(config, device)
        model.load_state_dict(found.state_dict)
        return model, config, 0
    state, path = checkpoint or read_run_checkpoint(run_dir)
    config = config_from_dict(state["config"], where=str(path))
    model = build_unet(config, device)
    use_ema = config.sample.use_ema if use_ema is None else use_ema
    weights, step = checkpoint_weights(state, path, config, use_ema, chosen_ema(config, use_ema, ema))
    model.load_state_dict(weights)
    return model, config, step


def read_run_checkpoint(run_dir: str | Path) -> tuple[dict, Path]:
    """(state, path) of a run's latest checkpoint, or of one checkpoint file (e.g. RUN_DIR/checkpoints/best.pt)."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.suffix == ".pt":
        return torch.load(run_dir, map_location="cpu", weights_only=True), run_dir
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    if (loaded := load_latest_checkpoint(run_dir, map_location="cpu")) is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet; train first with python -m engine.train")
    return loaded


def chosen_ema(config: Config, use_ema: bool, ema: str | None) -> str | None:
    """The EMA asked for (--ema), else the run's `sample.ema` when EMA weights are used; None: train.ema_decay's."""
    if ema is not None or not use_ema:
        return ema
    return config.sample.ema or None


def weights_label(use_ema: bool, ema: str | None) -> str:
    """What the sample and export lines say of the weights: "raw", "EMA" or "EMA 0.1"."""
    return f"EMA {ema}" if ema else "EMA" if use_ema else "raw"


def checkpoint_weights(state: dict, path: Path, config: Config, use_ema: bool,
                       ema: str | None) -> tuple[dict[str, torch.Tensor], int]:
    """(weights, step) of a checkpoint read from `path`: the raw or the main EMA weights; with `ema`, an EMA by
    name (train.ema_decay's, an extra decay's, a post-hoc profile's), or a number: the post-hoc EMA of that
    sigma_rel, synthesized from the run's snapshots up to the checkpoint's step (at the latest one)."""
    step = int(state["step"])
    if ema is None:
        return ema_weights(state["ema"]) if use_ema else state["model"], step
    if (sigma_rel := parse_sigma_rel(ema)) is not None:
        folder = RunDir(path.parent.parent).post_hoc_ema  # the checkpoint is RUN_DIR/checkpoints/<name>.pt
        is_main = rank_and_world_size()[0] == 0
        try:
            weights, at, used = synthesize(folder, sigma_rel, step, progress=is_main)
        except ValueError as error:
            named = f" (an EMA decay goes by its name: --ema ema_{ema})" if sigma_rel >= MAX_SIGMA_REL else ""
            raise ConfigError(f"--ema {ema}: {error}{named}") from None
        profiles = ", ".join(f"{s:g}" for s in sorted({snapshot.sigma_rel for snapshot in used}))
        if is_main:
            print(f"post-hoc EMA sigma_rel {sigma_rel:g} at step {at}, synthesized from {len(used)} snapshots of "
                  f"sigma_rel {profiles} in {folder}", file=sys.stderr)
        return weights, at
    emas = {ema_name(config.train.ema_decay): state["ema"], **state.get("extra_emas", {}), **state.get("post_hoc_emas", {})}
    if ema not in emas:
        raise ConfigError(f"{path} has no EMA {ema!r}; it has {', '.join(emas)} (or give a sigma_rel, e.g. --ema 0.1, "
                          f"for a post-hoc EMA)")
    return ema_weights(emas[ema]), step


def ema_weights(ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's weights from an EMA's state (ema-pytorch keeps the averaged copy under "ema_model.")."""
    return {k.removeprefix("ema_model."): v for k, v in ema.items() if k.startswith("ema_model.")}
