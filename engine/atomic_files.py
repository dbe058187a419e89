"""Files and folders that appear whole or not at all.

Both are written under a temporary name beside their destination (so that the rename stays on one
file system) and renamed into place when complete: a crash, a kill or a full disk leaves the old
version, never a half-written one. Temporary names start with a dot and hold `.tmp-<pid>`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

_TEMPORARY = ".tmp-"


def _fsync_dir(path: Path) -> None:
    """Makes a rename inside `path` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it over `path`.
    When `write` raises, `path` is left as it was and the temporary file is removed."""
    tmp = path.with_name(f".{path.name}{_TEMPORARY}{os.getpid()}")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(folder: Path) -> None:
    """Deletes the temporary files in `folder` that other (killed) processes left half-written."""
    for stale in folder.glob(f".*{_TEMPORARY}*"):
        if stale.is_file() and not stale.name.endswith(f"{_TEMPORARY}{os.getpid()}"):
            stale.unlink(missing_ok=True)


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `out` to write into; when the block ends normally it
    takes the place of `out` (created with its parents if absent; an existing `out` is kept until
    the new folder is in, then deleted). When the block raises, `out` is left as it was. Either
    way the temporary folder is gone afterwards."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # unique even for two writers in one process
    tmp = out.parent / f".{out.name}{_TEMPORARY}{tag}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.exists():  # set the old folder aside, put the new one in place, then delete the old
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
