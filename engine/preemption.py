"""Stopping on request: SIGTERM (what schedulers and preemptible machines send) or SIGINT (Ctrl-C).

The first signal lets the current step finish; the training loop then writes a checkpoint and exits
with status 0, so re-running the same command resumes exactly there. Under torchrun every rank gets
the signal (torchrun forwards it) and the ranks agree on the step to stop after. A second signal
exits at once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import torch
import torch.distributed as dist

from engine.progress import write

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers; `requested` names the first signal received (None until then)."""

    def __init__(self, announce: bool = True):
        self.requested: str | None = None
        self.announce = announce
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # the second signal: no more waiting
            write(f"received {name} again: exiting now, without a checkpoint")
            os._exit(128 + signum)
        self.requested = name
        if self.announce:
            write(f"received {name}: finishing this step, then writing a checkpoint ({name} again exits at once)")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def agreed_stop(request: StopRequest, group: dist.ProcessGroup | None) -> bool:
    """Whether any rank has been asked to stop. A host-side (gloo) collective: no device sync."""
    wanted = torch.tensor([int(request.requested is not None)])
    if group is not None:
        dist.all_reduce(wanted, op=dist.ReduceOp.MAX, group=group)
    return bool(wanted.item())
