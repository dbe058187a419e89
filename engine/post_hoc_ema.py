"""Post-hoc EMA (Karras et al. 2024, EDM2): the EMA length chosen after training.

During training, `train.post_hoc_ema_sigma_rels` power-function EMAs (EDM2 keeps sigma_rel 0.05 and 0.10)
are averaged like the other EMAs, and snapshots of them are written every `train.post_hoc_ema_every` steps
to RUN_DIR/post_hoc_ema/sigma_rel_<s>/step-<n>.pt. Afterwards, `--ema SIGMA_REL` synthesizes the EMA of any
other length as the least-squares combination of the snapshots (EDM2's algorithm 3).

The maths is ema-pytorch's (`sigma_rel_to_gamma`, `solve_weights`). Its `KarrasEMA.update` reads its step
with `.item()` every update (a host sync), and its `PostHocEMA.synthesize_ema_model` combines every snapshot
in the folder, later steps included; so the decay is computed here from the step the trainer knows, the
update is the plain EMA's multi-tensor lerp, and synthesis takes the snapshots up to the step it is asked for.

The decay of the update after n steps, (1 - 1/n)^(gamma + 1), makes the EMA after n steps exactly the
average of the weights under EDM2's profile (gamma + 1) t^gamma / n^(gamma + 1) on [0, n], each step's
weights standing for the interval (k - 1, k]; that is the profile the synthesis fits.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from ema_pytorch.post_hoc_ema import sigma_rel_to_gamma, solve_weights

from engine.atomic_files import atomic_write, remove_stale_temporaries
from engine.checkpoint import CheckpointError, checkpoint_name, checkpoint_step
from engine.config import MAX_SIGMA_REL
from engine.parallel import full_model_state
from engine.progress import progress_bar

SNAPSHOT_DIR = "post_hoc_ema"
_FOLDER = re.compile(r"^sigma_rel_([0-9.e+-]+)$")


def post_hoc_name(sigma_rel: float) -> str:
    """The name a tracked profile goes by in checkpoints, metrics and on the command line (sigma_rel_0.05)."""
    return f"sigma_rel_{sigma_rel:g}"


def parse_sigma_rel(text: str) -> float | None:
    """`--ema 0.08` asks for a synthesized EMA: the number, or None for a name (ema_0.999, sigma_rel_0.05)."""
    try:
        return float(text)
    except ValueError:
        return None


@functools.cache
def power_gamma(sigma_rel: float) -> float:
    """EDM2's exponent gamma of the profile t^gamma whose relative standard deviation is `sigma_rel`."""
    if not 0.0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel}")
    return sigma_rel_to_gamma(sigma_rel)


def power_decay(sigma_rel: float, step: int) -> float:
    """The decay of the update after training step `step` (0-based): (1 - 1/n)^(gamma + 1), n = step + 1
    (0 at the first step: the EMA starts as a copy of the weights)."""
    return (1.0 - 1.0 / (step + 1)) ** (power_gamma(sigma_rel) + 1.0)


def update_post_hoc_emas(emas: dict[float, object], step: int) -> None:
    """One update of each power-function EMA (ema-pytorch EMAs by sigma_rel) after step `step`; no host sync."""
    for sigma_rel, ema in emas.items():
        ema.update_moving_average(ema.ema_model, ema.model, current_decay=power_decay(sigma_rel, step))


@dataclass(frozen=True)
class Snapshot:
    sigma_rel: float
    step: int
    path: Path


def snapshot_path(folder: Path, sigma_rel: float, step: int) -> Path:
    return Path(folder) / post_hoc_name(sigma_rel) / checkpoint_name(step)  # named as the checkpoints are


def save_snapshots(folder: Path, emas: dict[float, object], step: int, is_main: bool) -> None:
    """Each profile's full weights after `step` steps, written atomically by rank 0 (every rank gathers)."""
    for sigma_rel, ema in emas.items():
        weights = full_model_state(ema.ema_model)
        if not is_main:
            continue
        path = snapshot_path(folder, sigma_rel, step)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda file: torch.save(weights, file))
        except OSError as error:
            raise CheckpointError(f"cannot write the post-hoc EMA snapshot {path}: {error.strerror or error}; the "
                                  f"earlier snapshots are intact") from None
        remove_stale_temporaries(path.parent)


def list_snapshots(folder: Path) -> list[Snapshot]:
    """The complete snapshots under `folder`, by step then sigma_rel."""
    found = []
    for profile in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if profile.is_dir() and (name := _FOLDER.match(profile.name)):
            found += [Snapshot(float(name.group(1)), step, file) for file in profile.iterdir()
                      if (step := checkpoint_step(file.name)) is not None]
    return sorted(found, key=lambda snapshot: (snapshot.step, snapshot.sigma_rel))


def remove_snapshots_after(folder: Path, step: int) -> int:
    """A resume from `step` deletes the snapshots a killed run wrote after it (the resumed run writes them
    again); returns how many."""
    later = [snapshot for snapshot in list_snapshots(folder) if snapshot.step > step]
    for snapshot in later:
        snapshot.path.unlink(missing_ok=True)
    return len(later)


def synthesis_weights(snapshots: list[Snapshot], sigma_rel: float, step: int) -> list[float]:
    """The least-squares weights of `snapshots` whose combination has the profile of `sigma_rel` at `step`."""
    as_tensor = functools.partial(torch.tensor, dtype=torch.float64)
    weights = solve_weights(as_tensor([s.step for s in snapshots]), as_tensor([power_gamma(s.sigma_rel) for s in snapshots]),
                            as_tensor([step]), as_tensor([power_gamma(sigma_rel)]))
    return weights.squeeze(-1).tolist()


def synthesize(folder: Path, sigma_rel: float, step: int,
               progress: bool = False) -> tuple[dict[str, torch.Tensor], int, list[Snapshot]]:
    """(weights, the step they are for, the snapshots used): the EMA of `sigma_rel` at the latest snapshot
    step at or before `step`, from the snapshots up to it (a bar with `progress`: each is one weight copy to
    read). Raises ValueError when there are none."""
    power_gamma(sigma_rel)  # checks the range
    snapshots = [snapshot for snapshot in list_snapshots(folder) if snapshot.step <= step]
    if not snapshots:
        raise ValueError(f"{folder} holds no post-hoc EMA snapshots up to step {step}: train with "
                         f"train.post_hoc_ema_sigma_rels set (e.g. [0.05,0.1])")
    at = snapshots[-1].step
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    weighted = zip(snapshots, synthesis_weights(snapshots, sigma_rel, at))
    for snapshot, weight in progress_bar(weighted, total=len(snapshots), desc="post-hoc EMA", disable=not progress):
        for name, value in torch.load(snapshot.path, map_location="cpu", weights_only=True).items():
            dtypes[name] = value.dtype
            if name in total:  # summed in float64: the weights are large and of both signs
                total[name].add_(value.double(), alpha=weight)
            else:
                total[name] = value.double() * weight
    return {name: value.to(dtypes[name]) for name, value in total.items()}, at, snapshots
