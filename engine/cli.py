"""What every command line of the engine shares: its parser, and one rule from errors to exit statuses.

The rule (`run`): a mistake in what the user gave (options, config, data, a model or input that does not fit:
the exceptions a command names as `mistakes`) is one line `error: ...` on stderr and exit status 2, as
argparse's own usage errors are; a fault while running (training diverged, a checkpoint that cannot be written:
its `faults`) is one line and status 1; anything else is a bug and keeps its traceback. Under torchrun every
rank meets the same mistake, so only rank 0 prints it; a fault may be one rank's, so each rank prints its own.
(kernels/check.py and kernels/ahead_of_time.py keep their own rule: kernels/ imports nothing from engine/.)
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

from engine import progress
from engine.config import ConfigError

USAGE_ERROR = 2  # a mistake in what was asked, as argparse exits
FAULT = 1  # what was asked could not be done


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (and the usual exit status 2)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def parser(module: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m MODULE`."""
    return OneLineParser(prog=f"python -m {module}", description=description)


def run(body: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, *,
        mistakes: tuple[type[BaseException], ...], faults: tuple[type[BaseException], ...] = (),
        label: str = "") -> int:
    """`body(args)` under the rule above: its exit status (0 when it returns None), 2 for a mistake, 1 for a
    fault. `label` starts the line (e.g. "evaluate" for "evaluate: error: ...")."""
    try:
        return body(args) or 0
    except mistakes as error:
        if int(os.environ.get("RANK", "0")) == 0:
            report(error, label)
        return USAGE_ERROR
    except faults as error:
        report(error, label)
        return FAULT


def report(error: BaseException, label: str = "") -> None:
    """The error as one line, e.g. load_state_dict's list of keys."""
    print(f"{label + ': ' if label else ''}error: {' '.join(str(error).split())}", file=sys.stderr)


@contextmanager
def reading_inputs() -> Iterator[None]:
    """RuntimeErrors while reading what the user named (weights that do not fit the model, an unreadable
    checkpoint, CUDA asked for where there is none) are mistakes in the input, not faults: a ConfigError."""
    try:
        yield
    except RuntimeError as error:
        raise ConfigError(str(error)) from error


@contextmanager
def one_line_warnings(label: str) -> Iterator[None]:
    """Python's warnings as one line each, `LABEL: warning: message`, without breaking a progress bar."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *where, **more: progress.write(f"{label}: warning: {message}")
        yield
