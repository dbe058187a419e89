"""The random number generators a training process owns, saved and restored per rank.

Timesteps, flips and noise come from counters (seed, step, sample index) and need no saved state;
what does is everything drawn from the global generators: dropout masks (torch, on the CPU and on
the GPU) and anything Python's or numpy's global generator feeds. Each rank saves its own states;
a run resumed with the same world size restores them exactly, and with another world size each rank
reseeds from (seed, rank, step) instead, since rank r of the new run was nobody's rank r before.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(device: torch.device) -> dict:
    """This process's generator states, in types a weights-only checkpoint load accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), position, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(states: list[dict] | None, rank: int, world_size: int, device: torch.device, seed: int,
                      step: int) -> bool:
    """Restore this rank's saved states if the world size matches; else reseed. True when restored."""
    if states and len(states) == world_size:
        state = states[rank]
        random.setstate(tuple(tuple(part) if isinstance(part, list) else part for part in state["python"]))
        kind, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        return True
    derived = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(derived), np.random.seed(derived), torch.manual_seed(derived)
    return False
