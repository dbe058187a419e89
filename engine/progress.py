"""Progress bars (tqdm) that redraw live in a terminal and print a line only every 30 s in logs."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(iterable=None, **options) -> tqdm:
    if not sys.stderr.isatty():  # CI logs and redirected output would otherwise get a line per update
        options.setdefault("mininterval", 30.0)
    options.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **options)


def write(message: str) -> None:
    """Print a line (to stderr) without breaking a live progress bar."""
    tqdm.write(message, file=sys.stderr)
