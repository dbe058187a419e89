"""Preemption: SIGTERM or SIGINT finishes the step, writes a checkpoint and exits 0; a second one exits at once."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from engine.checkpoint import load_latest_checkpoint
from forked_cli import Started
from test_train_cli import ROOT, SMALL, losses, train


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_the_current_step_and_the_same_command_resumes(tmp_path, shapes16, sig):
    run_dir = tmp_path / "run"
    args = ["configs/tiny.yaml", *SMALL, f"data.path={shapes16}", f"train.run_dir={run_dir}", "train.steps=100000",
            "train.log_every=1", "train.checkpoint_every=100000"]
    process = Started("engine.train", args, cwd=ROOT, env={"PYTHONWARNINGS": "ignore::UserWarning"})
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    assert f"stopped by {signal.Signals(sig).name}" in stderr
    state, path = load_latest_checkpoint(run_dir)
    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert state["step"] == logged[-1] >= 3 and path.name == f"step-{state['step']:08d}.pt"
    # The same command, now with a budget, resumes at that step.
    resumed = train(run_dir, shapes16, f"train.steps={state['step'] + 2}", "train.log_every=1")
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {state['step']}" in resumed.stderr
    assert max(losses(run_dir)) == state["step"] + 2


def test_a_second_signal_exits_at_once(tmp_path):
    script = ("import time\nfrom engine.preemption import StopRequest\nrequest = StopRequest()\n"
              "print('ready', flush=True)\ntime.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert process.poll() is None  # the first signal only asks: the program goes on
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=300)  # a hang guard; the status says the signal, not the sleep's end, stopped it
    assert process.returncode == 128 + signal.SIGTERM
    assert "exiting now, without a checkpoint" in process.stderr.read() + process.stdout.read()
