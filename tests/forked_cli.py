"""`python -m MODULE ARGS` for the tests, in a fork of the test process when that is safe.

A fresh interpreter spends about three seconds of CPU importing torch and the engine before a CLI does
anything, and the suite starts a couple of hundred CLIs: most of its time on two cores. A fork of the test
process (which has imported them already) runs the module's `main(ARGS)` as `python -m` would, with its own
stdout, stderr, working directory, environment, warnings filters, signal handlers and exit code, and
returns what `subprocess.run(..., capture_output=True, text=True)` returns. `Started` does the same in the
background, for the tests that signal a run.

Forking is used only where the test process runs torch on one thread (`make test`'s pytest-xdist workers):
OpenMP's thread pool does not survive a fork. Elsewhere a fresh interpreter runs it (torchrun for ranks).
"""

from __future__ import annotations

import atexit
import functools
import importlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

import torch

# A fresh interpreter's warnings filters (CPython's defaults for a release build), in order
_DEFAULT_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                    ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                    ("ignore", ResourceWarning, "")]


def can_fork() -> bool:
    return hasattr(os, "fork") and torch.get_num_threads() == 1 and os.environ.get("OMP_NUM_THREADS") == "1"


def torchrun(ranks: int) -> list[str]:
    """The torchrun command before `-m module`: `python -m torch.distributed.run`, so the same interpreter whatever
    is on PATH; --standalone, a free port of its own, so that torchrun tests running at once do not collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]


def run_module(module: str, args: list, *, cwd, env: dict[str, str] | None = None, timeout: float,
               ranks: int = 0) -> subprocess.CompletedProcess:
    """`python -m module args` with `env` added to the environment; its exit status, stdout and stderr.

    ranks=N: as `torchrun --standalone --nproc_per_node N -m module args`, the ranks forked with the environment
    torchrun gives them (RANK, WORLD_SIZE, MASTER_ADDR, ...), their outputs rank by rank. The engine reads only
    that environment; torchrun's own part (the rendezvous, forwarding signals) keeps its tests that launch it."""
    args, env = [str(arg) for arg in args], env or {}
    command = [*(torchrun(ranks) if ranks else [sys.executable]), "-m", module, *args]
    if not can_fork():
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env})
    main = _main_of(module)
    port = _free_port() if ranks else None
    rank_envs = [{**env, **_torchrun_environment(rank, ranks, port)} for rank in range(ranks)] if ranks else [env]
    files = [(tempfile.TemporaryFile(), tempfile.TemporaryFile()) for _ in rank_envs]
    try:
        pids = [_fork(main, args, cwd, rank_env, out.fileno(), err.fileno())
                for rank_env, (out, err) in zip(rank_envs, files)]
        returncode = _wait(pids, timeout, command)
        return subprocess.CompletedProcess(command, returncode, *(_read(stream) for stream in zip(*files)))
    finally:
        for out, err in files:
            out.close()
            err.close()


class Started:
    """`python -m module args` running in the background, as `run_module` runs it (a fork where `can_fork()`, else a
    fresh interpreter), for the tests that signal a run; `pid`, `returncode`, `poll()`, `wait()`, `send_signal()`
    and `communicate()` as Popen's. Not for kill -9 (tests/test_train_cli.py's start_training_to_kill says why)."""

    def __init__(self, module: str, args: list, *, cwd, env: dict[str, str] | None = None):
        args, env = [str(arg) for arg in args], env or {}
        self._process, self._returncode = None, None
        self._files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        if can_fork():
            self.pid = _fork(_main_of(module), args, cwd, env, *(file.fileno() for file in self._files))
        else:
            self._process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env={**os.environ, **env},
                                             stdout=self._files[0], stderr=self._files[1])
            self.pid = self._process.pid

    @property
    def returncode(self) -> int | None:
        return self.poll()

    def poll(self) -> int | None:
        """The exit code once it has ended, else None."""
        if self._process is not None:
            return self._process.poll()
        if self._returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self._returncode = os.waitstatus_to_exitcode(status)
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"{self.pid}", timeout)
            time.sleep(0.01)
        return self.poll()

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Its stdout and stderr, once it has ended."""
        self.wait(timeout)
        out, err = (_read([file]) for file in self._files)
        for file in self._files:
            file.close()
        return out, err


def _main_of(module: str):
    """The module's `main`, imported here once (with what its runs import lazily) rather than in every child."""
    _import_what_every_run_imports()
    return importlib.import_module(module).main


def _fork(main, args: list[str], cwd, env: dict[str, str], out: int, err: int) -> int:
    """A child that runs `main(args)` as `python -m` would, its output to the `out` and `err` descriptors."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _run_in_child(main, args, cwd, env, out, err)  # never returns
    return pid


@functools.cache
def _import_what_every_run_imports() -> None:
    """What the CLIs import only when first used, imported once here rather than in each child: matplotlib for
    the loss curve a run ends with, torch._dynamo for the first optimizer (about a second of CPU each per child)."""
    import matplotlib

    matplotlib.use("Agg")  # as engine.plot sets it
    importlib.import_module("matplotlib.pyplot")
    importlib.import_module("torch._dynamo")


def launch(module: str, args: list[str], env: dict[str, str] | None = None, log=None) -> subprocess.CompletedProcess:
    """The benchmarks' `launch` (benchmarks/sample_quality.py) by `run_module`, from the repository root: its output
    appended to `log` when one is given."""
    result = run_module(module, args, cwd=Path(__file__).resolve().parents[1], env=env, timeout=900)
    if log is not None:
        with open(log, "a") as stream:
            stream.write(result.stdout + result.stderr)
    return result


def _torchrun_environment(rank: int, ranks: int, port: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _read(files) -> str:
    """The outputs of the ranks, rank 0's first."""
    texts = []
    for file in files:
        file.seek(0)
        texts.append(file.read().decode(errors="replace"))
    return "".join(texts)


def _wait(pids: list[int], timeout: float, command: list[str]) -> int:
    """The first failing exit status, else 0. A failed rank stops the others, as torchrun does: they would wait
    for it in a collective."""
    deadline, running, returncode = time.monotonic() + timeout, list(pids), 0
    try:
        while running and not returncode:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(command, timeout)
            for pid in list(running):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    running.remove(pid)
                    returncode = returncode or os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        return returncode
    finally:
        for pid in running:  # a rank failed or timed out, or the test was interrupted: none may outlive it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _run_in_child(main, args: list[str], cwd, env: dict[str, str], out: int, err: int) -> None:
    code = 1
    try:
        atexit._clear()  # the test process's exit handlers are not the CLI's
        os.dup2(out, 1)
        os.dup2(err, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", write_through=True,
                                      errors="backslashreplace")
        os.chdir(cwd)
        os.environ.update(env)
        _fresh_interpreter_state()
        code = main(args)
        code = 0 if code is None else code
    except SystemExit as exit:  # argparse's exit 2, or sys.exit(...) inside: as the interpreter treats it
        if exit.code is None or isinstance(exit.code, int):
            code = exit.code or 0
        else:
            print(exit.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _fresh_interpreter_state() -> None:
    """Undo what pytest set in the test process: its warnings capture and filters, its signal handlers."""
    importlib.reload(warnings)  # back to printing warnings (pytest records them)
    warnings.resetwarnings()
    for action, category, module in reversed(_DEFAULT_FILTERS):
        warnings.filterwarnings(action, category=category, module=module)
    for option in filter(None, os.environ.get("PYTHONWARNINGS", "").split(",")):
        warnings._setoption(option)  # as the interpreter reads PYTHONWARNINGS at start
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_DFL)
    _own_progress_bar_lock()


def _own_progress_bar_lock() -> None:
    """A tqdm write lock of this process's own (each forked run's). tqdm keeps one multiprocessing lock for a process
    and its forks (a semaphore in shared memory): a fork killed -9 while it held it (drawing a bar) would leave it
    held, and every later fork, and the test process, would wait on it for ever."""
    from tqdm.std import TqdmDefaultWriteLock, tqdm

    if "mp_lock" in vars(TqdmDefaultWriteLock):
        del TqdmDefaultWriteLock.mp_lock  # the next instance makes its own
    TqdmDefaultWriteLock.th_lock = threading.RLock()  # one a parent's thread held at the fork would never be released
    classes = [tqdm]
    for cls in classes:  # tqdm.auto's class keeps its own when its first bar came before any of tqdm's
        classes.extend(cls.__subclasses__())
        if "_lock" in vars(cls):
            del cls._lock
    tqdm.set_lock(TqdmDefaultWriteLock())
