"""The tests' fork-based CLI runner (tests/forked_cli.py) keeps each run apart from the test process."""

import os

import pytest
from tqdm.auto import tqdm

import forked_cli


@pytest.mark.skipif(not forked_cli.can_fork(), reason="runs a fresh interpreter here, which shares no lock")
def test_a_run_killed_while_it_held_the_progress_bar_lock_stalls_no_later_run(tmp_path):
    """tqdm keeps one multiprocessing write lock for a process and its forks (a semaphore in shared memory). A fork
    that ends holding it, as a run killed -9 while drawing a bar does, leaves it held for all of them: the next
    forked run must still draw its bar (prepare's) and finish."""
    lock = tqdm.get_lock()  # made before the forks, as the test process's first bar makes it
    holder = os.fork()
    if holder == 0:
        lock.acquire()
        os._exit(0)  # never released
    os.waitpid(holder, 0)
    try:
        result = forked_cli.run_module("engine.data.prepare", ["shapes", tmp_path / "shapes", "--num", "4",
                                                               "--image-size", "8", "--shard-size", "4"],
                                       cwd=tmp_path, timeout=120)
    finally:
        forked_cli._own_progress_bar_lock()  # this process's is held for ever now: a new one for the next tests
    assert result.returncode == 0, result.stderr
    assert "prepare shapes" in result.stderr  # the bar was drawn, under a lock of its own
