"""Where a rank's streaming loader is in its data: a checkpoint part, for exact resumes.

The checkpoint keeps it under "data_position", with the layout the positions hold for (world size, loader
workers, micro-batch, seed): under another layout they mean nothing, and the stream starts afresh.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class StreamPosition:
    """What `build_train_loader` resumes from: its `seed`, each of this rank's workers' position (samples taken
    from its stream: `start`) and the worker whose batch is due next (`first_worker`: the DataLoader takes
    the workers' batches in turn)."""

    seed: int
    positions: list[int]
    next_worker: int = 0

    @classmethod
    def fresh(cls, seed: int, num_workers: int) -> StreamPosition:
        return cls(seed, [0] * max(num_workers, 1))

    def advance(self, batch: dict) -> None:
        """After each batch taken: a streamed batch names its worker and that worker's position."""
        if "position" in batch:
            self.positions[batch["worker"]] = int(batch["position"])
            self.next_worker = (batch["worker"] + 1) % len(self.positions)

    def restart(self, seed: int) -> None:
        """A fresh stream of another seed (a resume whose positions are lost: one of the step's own, so that it
        does not replay the first batches)."""
        self.seed, self.positions, self.next_worker = seed, [0] * len(self.positions), 0

    def state_dict(self) -> dict:
        # the seed too: after a restart it is the step's, not train.seed, and a later resume must go on with it
        return {"seed": self.seed, "positions": list(self.positions), "next_worker": self.next_worker}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state.get("seed", self.seed))  # checkpoints from before seeds were saved: train.seed's
        self.positions, self.next_worker = [int(p) for p in state["positions"]], int(state["next_worker"])


def stream_layout(world_size: int, num_workers: int, batch_size: int, seed: int) -> dict[str, int]:
    """What the positions hold for: a resume under the same layout continues each stream exactly."""
    return {"world_size": world_size, "num_workers": num_workers, "batch_size": batch_size, "seed": seed}


def data_position(layout: dict[str, int], states: list[dict]) -> dict:
    """The checkpoint's "data_position": the layout, and the ranks' positions, next workers and stream seeds (in rank
    order)."""
    return {**layout, "positions": [state["positions"] for state in states],
            "next_workers": [state["next_worker"] for state in states], "seeds": [state["seed"] for state in states]}


def rank_position(saved: dict | None, layout: dict[str, int], rank: int) -> dict | None:
    """`rank`'s StreamPosition state in a checkpoint's "data_position", or None when there is none for `layout`."""
    if not saved or any(saved.get(key) != value for key, value in layout.items()):
        return None
    # checkpoints from before next_workers was recorded: worker 0 (exact when the step ended a round)
    next_workers = saved.get("next_workers") or [0] * layout["world_size"]
    seed = {"seed": saved["seeds"][rank]} if "seeds" in saved else {}  # before seeds were recorded: train.seed's
    return {**seed, "positions": saved["positions"][rank], "next_worker": next_workers[rank]}
