"""benchmarks.gpu_check, the one command for a GPU (issue 14): its CPU smoke mode end to end, and its time boxes."""

import json
import subprocess
import sys

import pytest

from benchmarks.gpu_check import Part, python, run_part
from test_train_cli import ROOT


@pytest.mark.slow
def test_the_smoke_mode_runs_every_part_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", out, "--smoke"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {name: part["status"] for name, part in results["parts"].items()} == dict.fromkeys(
        ["tests", "benchmarks", "training", "profile"], "passed")
    timed = {row["name"]: row for row in results["benchmarks"]}
    assert timed["test_train_step[eager-pytorch]"]["images_per_sec"] > 0
    assert timed["test_train_step[eager-pytorch]"]["vs_diffusers"] > 0  # the baseline ran in the same group
    assert timed["test_sampling_run[ddim-100-eager]"]["images_per_sec"] > 0
    assert results["training"]["steps"] == 6
    assert (out / "loss.png").stat().st_size and (out / "samples.png").stat().st_size
    shares = [kernel["share"] for kernel in results["profile"]["top_kernels"]]
    assert len(shares) == 10 and 0 < sum(shares) <= 1.0
    report = (out / "RESULTS.md").read_text()
    assert "| training | passed |" in report and "test_train_step_diffusers" in report


def test_a_part_that_overruns_its_box_is_stopped_and_the_next_one_runs(tmp_path):
    sleeper = Part("slow", 2.0, [(python("-c", "import time; time.sleep(60)"), 1.0)])
    quick = Part("quick", 30.0, [(python("-c", "print('done')"), 1.0)])
    first, second = run_part(sleeper, tmp_path), run_part(quick, tmp_path)
    assert first["status"] == "timed out" and first["seconds"] < 60  # stopped: the sleep alone takes 60 s
    assert second["status"] == "passed" and "done" in (tmp_path / second["log"]).read_text()
    failing = run_part(Part("bad", 30.0, [(python("-c", "raise SystemExit(3)"), 1.0)]), tmp_path)
    assert failing["status"] == "failed (exit 3)"


def test_only_the_command_a_box_ends_on_purpose_counts_a_stop_as_success(tmp_path):
    """Training's run is stopped on time and the next command goes on; a later command stopped by the box (the
    plot, the samples) is a time-out, not a pass with its output missing."""
    sleep, say = python("-c", "import time; time.sleep(60)"), python("-c", "print('after the stop')")
    part = Part("training", 4.0, [(sleep, 0.25), (say, 1.0), (sleep, 1.0)], stops_on_time=(0,))
    result = run_part(part, tmp_path)
    assert result["status"] == "timed out" and result["seconds"] < 60  # the sleeps were stopped, not waited for
    assert "after the stop" in (tmp_path / result["log"]).read_text()
