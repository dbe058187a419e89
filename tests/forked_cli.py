"""`python -m MODULE ARGS` for the tests, in a fork of the test process when that is safe.

A fresh interpreter spends about three seconds of CPU importing torch and the engine before a CLI does
anything, and the suite starts a couple of hundred CLIs: most of its time on two cores. A fork of the test
process (which has imported them already) runs the module's `main(ARGS)` as `python -m` would, with its own
stdout, stderr, working directory, environment, warnings filters, signal handlers and exit code, and
returns what `subprocess.run(..., capture_output=True, text=True)` returns.

Forking is used only where the test process runs torch on one thread (`make test`'s pytest-xdist workers):
OpenMP's thread pool does not survive a fork. Elsewhere, and for torchrun, a fresh interpreter runs it.
"""

from __future__ import annotations

import atexit
import importlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

# A fresh interpreter's warnings filters (CPython's defaults for a release build), in order
_DEFAULT_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                    ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                    ("ignore", ResourceWarning, "")]


def can_fork() -> bool:
    return hasattr(os, "fork") and torch.get_num_threads() == 1 and os.environ.get("OMP_NUM_THREADS") == "1"


def run_module(module: str, args: list, *, cwd, env: dict[str, str] | None = None,
               timeout: float) -> subprocess.CompletedProcess:
    """`python -m module args` with `env` added to the environment; its exit status, stdout and stderr."""
    args, env = [str(arg) for arg in args], env or {}
    command = [sys.executable, "-m", module, *args]
    if not can_fork():
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **env})
    main = importlib.import_module(module).main  # imported here, once, rather than in every child
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _run_in_child(main, args, cwd, env, out.fileno(), err.fileno())  # never returns
        returncode = _wait(pid, timeout, command)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, returncode, out.read().decode(errors="replace"),
                                           err.read().decode(errors="replace"))


def _wait(pid: int, timeout: float, command: list[str]) -> int:
    deadline, finished = time.monotonic() + timeout, False
    try:
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                finished = True
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.02)
        raise subprocess.TimeoutExpired(command, timeout)
    finally:
        if not finished:  # timed out, or the test was interrupted: the child must not outlive it
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
