"""The random number generators a training process owns, saved and restored per rank.

Timesteps, flips and noise come from counters (seed, step, sample index) and need no saved state;
what does is everything drawn from the global generators: dropout masks (torch, on the CPU and on
the GPU) and anything Python's or numpy's global generator feeds. Each rank saves its own states;
a run resumed with the same world size restores them exactly, and with another world size each rank
reseeds from (seed, rank, step) instead, since rank r of the new run was nobody's rank r before.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch


def step_seed(seed: int, step: int) -> int:
    """A seed of its own for every (run seed, step)."""
    return seed * 1_000_003 + step


@dataclasses.dataclass
class Generators:
    """This process's global generators (Python's, numpy's, torch's on the CPU and on `device`): a checkpoint part
    of each rank."""

    device: torch.device
    seed: int  # train.seed, for `reseed`
    rank: int

    def state_dict(self) -> dict:
        """The states, in types a weights-only checkpoint load accepts."""
        kind, keys, position, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), position, has_gauss, cached),
                 "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(tuple(tuple(part) if isinstance(part, list) else part for part in state["python"]))
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def reseed(self, step: int) -> None:
        """Seeds of this rank's own from (seed, rank, step), for a resume without this rank's saved states."""
        derived = int(np.random.SeedSequence([self.seed, self.rank, step]).generate_state(1)[0])
        random.seed(derived), np.random.seed(derived), torch.manual_seed(derived)
