"""End to end: the training and sampling CLIs, as a user runs them, on small procedural data sets."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import engine.train
from engine import diffusion
from engine.checkpoint import list_checkpoints, load_latest_checkpoint
from engine.data.prepare import prepare
from engine.schedule import NoiseSchedule
from engine.unet import UNet
from forked_cli import run_module, torchrun

ROOT = Path(__file__).resolve().parents[1]
# A model and run small enough for seconds on 2 cores; every other setting comes from the preset.
SMALL = ["model.base_channels=16", "model.channel_mult=[1,2]", "model.attention_resolutions=[8]",
         "data.image_size=16", "diffusion.num_timesteps=50", "train.batch_size=8", "train.log_every=2",
         "train.checkpoint_every=3", "train.sample_every=0", "sample.num_images=4", "sample.batch_size=4",
         "sample.sampler=ddim", "sample.steps=4", "data.num_workers=0", "data.shuffle_buffer=16"]
# One resolution level, attention included: the smallest UNet with every kind of block, for the tests that compile
# it (a cold Inductor compile costs about a second per generated kernel, and SMALL's two levels double them)
ONE_LEVEL = ["model.channel_mult=[1]", "model.attention_resolutions=[16]"]

# Issue 26's recipe options all at once (what configs/cifar-fast.yaml combines), for the tests that hold every
# option to DDP/FSDP, gradient accumulation, compile and exact resume
RECIPE_OPTIONS = ["diffusion.target=edm", "diffusion.sigma_data=0.5", "diffusion.timestep_sampling=lognormal",
                  "diffusion.loss_weighting=min_snr", "optim.lr_schedule=inverse_sqrt", "optim.lr_ref_steps=3",
                  "optim.warmup_steps=2", "optim.lr_scaling=sqrt", "optim.reference_batch_size=32",
                  "optim.betas=[0.9,0.99]"]


def run(module, *args, timeout=900, launcher=None, ranks=0):  # a hang guard, far above a loaded machine
    """`python -m module args` (in a fork of this process where that is safe: tests/forked_cli.py), as `ranks`
    torchrun ranks if given, or `launcher`'s command (e.g. torchrun itself) in a fresh interpreter."""
    quiet = {"PYTHONWARNINGS": "ignore::UserWarning"}
    if launcher is None:
        return run_module(module, args, cwd=ROOT, env=quiet, timeout=timeout, ranks=ranks)
    command = [*launcher, module, *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **quiet})


def train(run_dir, data, *overrides, launcher=None, ranks=0):
    return run("engine.train", "configs/tiny.yaml", *SMALL, f"data.path={data}", f"train.run_dir={run_dir}",
               *overrides, launcher=launcher, ranks=ranks)


def losses(run_dir):
    return losses_in((Path(run_dir) / "metrics.jsonl").read_text())


def losses_in(text: str) -> dict:
    records = map(json.loads, text.splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}  # evaluation records have no loss


def last_logged_step(metrics: Path) -> int:
    """The last step a live run's metrics.jsonl holds in full: its last line may be half written as it is read."""
    text = metrics.read_text() if metrics.is_file() else ""
    return max(losses_in(text[:text.rfind("\n") + 1]), default=0)


def test_a_tiny_batch_is_overfit():
    """The model, loss and optimizer can fit data: the loss on fixed (t, noise) falls well below its start."""
    torch.manual_seed(0)
    schedule = NoiseSchedule.create("linear", 100).to("cpu")
    model = UNet(image_size=8, in_channels=3, out_channels=3, base_channels=16, channel_mult=[1, 2],
                 num_res_blocks=1, attention_resolutions=[4], dropout=0.0)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t, noise = torch.tensor([10, 30, 60, 90]), torch.randn(4, 3, 8, 8)

    def fixed_loss():
        return torch.nn.functional.mse_loss(model(diffusion.q_sample(schedule, x0, t, noise), t), noise)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = fixed_loss().item()
    for _ in range(150):
        optimizer.zero_grad()
        fixed_loss().backward()
        optimizer.step()
    assert fixed_loss().item() < 0.1 * start


def test_train_writes_the_run_directory_and_the_same_command_resumes(tmp_path, shapes16):
    run_dir = tmp_path / "run"
    first = train(run_dir, shapes16, "train.steps=6", "data.num_workers=1")
    assert first.returncode == 0, first.stderr
    for name in ("config.yaml", "metrics.jsonl", "samples.png", "loss.png", "checkpoints/latest",
                 "checkpoints/step-00000006.pt", "samples/step-00000006.png"):
        assert (run_dir / name).is_file(), name
    assert sorted(losses(run_dir)) == [2, 4, 6]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "images_per_sec", "data_wait_fraction", "skipped_samples",
                           "step_time_sec", "peak_memory_gb", "mfu"}
    assert 0 <= record["data_wait_fraction"] <= 1 and record["images_per_sec"] > 0
    levels = [name for name in record if name.startswith("loss_t")]  # the loss by quarter of the timestep range
    assert len(levels) == 4 and any(record[name] > 0 for name in levels)
    with Image.open(run_dir / "samples.png") as grid:
        assert grid.width >= 2 * 16
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 6

    second = train(run_dir, shapes16, "train.steps=10", "data.num_workers=1")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "step-00000006.pt" in second.stderr
    assert sorted(losses(run_dir)) == [2, 4, 6, 8, 10]
    state = torch.load(run_dir / "checkpoints" / "step-00000010.pt", weights_only=True)
    assert state["step"] == 10 and state["config"]["train"]["steps"] == 10
    assert set(state) >= {"model", "ema", "optimizer", "lr_schedule", "kernels", "engine_version"}


def test_torchrun_with_one_process_trains_the_same_as_python_m(tmp_path, shapes16):
    plain = train(tmp_path / "plain", shapes16, "train.steps=4")
    assert plain.returncode == 0, plain.stderr
    launched = train(tmp_path / "torchrun", shapes16, "train.steps=4", launcher=[*torchrun(1), "-m"])
    assert launched.returncode == 0, launched.stderr
    assert losses(tmp_path / "plain") == pytest.approx(losses(tmp_path / "torchrun"), rel=1e-5)


@pytest.mark.parametrize("preset, size, channels, expected", [
    ("cifar", 32, 3, "35.7M parameters"), ("cifar-fast", 32, 3, "35.7M parameters"), ("tiny", 16, 3, "1.1M parameters"),
    ("mnist", 28, 1, "parameters"), ("celeba64", 64, 3, "78.7M parameters (78,700,803)"),
    ("ddpm-256", 256, 3, "113.7M parameters (113,673,219)")])
def test_dry_run_validates_each_preset_and_prints_the_parameter_count(tmp_path, capsys, preset, size, channels,
                                                                      expected):
    """engine.train's main in this process (a launch per preset cost seconds each); the command line itself is
    launched once, with the cifar preset."""
    data = tmp_path / "data"
    prepare("shapes", data, shard_size=8, num=8, image_size=size, channels=channels, progress=False)
    # the option among the overrides, as users type it
    argv = [f"configs/{preset}.yaml", f"data.path={data}", "--dry-run", f"train.run_dir={tmp_path / 'run'}"]
    if preset == "cifar":
        result = run("engine.train", *argv)
        returncode, stdout, stderr = result.returncode, result.stdout, result.stderr
    else:
        returncode = engine.train.main([str(ROOT / argv[0]), *argv[1:]])
        stdout, stderr = capsys.readouterr()
    assert returncode == 0, stderr
    assert expected in stdout and "config is valid" in stdout
    assert f"image_size: {size}" in stdout and "8 images" in stdout
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_missing_or_mismatched_data_is_one_clear_line(tmp_path, shapes16):
    missing = run("engine.train", "configs/tiny.yaml", f"data.path={tmp_path / 'nowhere'}", "--dry-run")
    assert missing.returncode == 2 and "engine.data.prepare" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    mismatch = run("engine.train", "configs/tiny.yaml", f"data.path={shapes16}", "data.image_size=32", "--dry-run")
    assert mismatch.returncode == 2 and "data.image_size is 32" in mismatch.stderr and "Traceback" not in mismatch.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the mistake is asking for CUDA where there is none")
def test_cuda_asked_for_on_a_machine_without_it_is_one_clear_line(tmp_path, shapes16, capsys):
    returncode = engine.train.main([str(ROOT / "configs/tiny.yaml"), f"data.path={shapes16}", "train.device=cuda",
                                    f"train.run_dir={tmp_path / 'run'}"])
    stderr = capsys.readouterr().err
    assert returncode == 2 and "train.device is 'cuda' but CUDA is not available" in stderr, stderr
    assert "Traceback" not in stderr and not (tmp_path / "run").exists()


def test_sample_cli_writes_a_grid_and_uint8_npz_with_ema_or_raw_weights(tmp_path, shapes16):
    run_dir = tmp_path / "run"
    assert train(run_dir, shapes16, "train.steps=3").returncode == 0
    drawn = {}
    for sampler, steps in (("ddim", ["--steps", 3]), ("ddpm", [])):
        result = run("engine.sample", run_dir, "--num", 5, "--batch-size", 2, "--sampler", sampler, *steps,
                     "--out", tmp_path / "g.png", "--npz", tmp_path / "s.npz", "--seed", 3)
        assert result.returncode == 0, result.stderr
        images = drawn[sampler] = np.load(tmp_path / "s.npz")["arr_0"]
        assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
        assert (tmp_path / "g.png").is_file()
    again = run("engine.sample", run_dir, "--num", 5, "--batch-size", 2, "--sampler", "ddpm", "--seed", 3,
                "--out", tmp_path / "g2.png", "--npz", tmp_path / "s2.npz")
    assert np.array_equal(np.load(tmp_path / "s2.npz")["arr_0"], images), "sampling must be seeded"
    raw = run("engine.sample", run_dir, "--num", 5, "--batch-size", 2, "--sampler", "ddpm", "--seed", 3, "--raw",
              "--out", tmp_path / "g3.png", "--npz", tmp_path / "s3.npz")
    assert raw.returncode == 0 and "raw weights" in raw.stdout and again.returncode == 0
    # Image i is keyed by (seed, i): another batch size and the Triton update kernel (interpreted here, so DDIM's
    # 3 steps rather than DDPM's 50; tests/test_kernels.py holds every kernel to its reference) give the same
    # images, up to float rounding at the uint8 boundary.
    fused = run("engine.sample", run_dir, "--num", 5, "--batch-size", 5, "--sampler", "ddim", "--steps", 3, "--seed", 3,
                "--kernel", "ddim_step=triton", "--out", tmp_path / "g4.png", "--npz", tmp_path / "s4.npz")
    assert fused.returncode == 0, fused.stderr
    difference = np.abs(np.load(tmp_path / "s4.npz")["arr_0"].astype(int) - drawn["ddim"].astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01
    unknown = run("engine.sample", run_dir, "--kernel", "posterior_step=no_such_kernel")
    assert unknown.returncode == 2 and "kernels.posterior_step" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1


def test_sample_cli_errors_are_one_line(tmp_path):
    result = run("engine.sample", tmp_path / "no-run")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_triton_kernels_train_to_the_same_losses_as_the_pytorch_ones(tmp_path, shapes16):
    """Noise comes from counters, so swapping the implementation changes nothing but float rounding.

    The Triton kernels run in the interpreter here (TRITON_INTERPRET=1 from conftest, inherited).
    """
    from kernels import OPS

    runs = {}
    for impl in ("pytorch", "triton"):
        result = train(tmp_path / impl, shapes16, "train.steps=4", "train.checkpoint_every=4",
                       *[f"kernels.{op}={impl}" for op in OPS])
        assert result.returncode == 0, result.stderr
        runs[impl] = losses(tmp_path / impl)
        state, _ = load_latest_checkpoint(tmp_path / impl)
        assert state["kernels"] == {op: impl for op in OPS}  # the choice is recorded with the weights
    assert sorted(runs["triton"]) == sorted(runs["pytorch"]) == [2, 4]
    for step, loss in runs["pytorch"].items():
        assert runs["triton"][step] == pytest.approx(loss, rel=1e-4)


def test_an_unknown_kernel_stops_training_before_the_first_step(tmp_path, shapes16):
    result = train(tmp_path / "run", shapes16, "kernels.noise_loss=no_such_kernel")
    assert result.returncode == 2
    assert "kernels.noise_loss" in result.stderr and "no_such_kernel" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


NAN_LOSS = ["kernels.check=false", "train.log_every=1", "train.checkpoint_every=2"]


def test_non_finite_steps_are_skipped_counted_and_the_run_goes_on(tmp_path, shapes16):
    run_dir = tmp_path / "run"
    result = train(run_dir, shapes16, "train.steps=6", "kernels.noise_loss=tests.kernel_plugins:noise_loss_nan_every_third_call",
                   *NAN_LOSS)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 1, 0, 0, 1]
    # an interval's loss is the mean over its finite steps: NaN only when it had none
    assert [bool(np.isfinite(r["loss"])) for r in records] == [True, True, False, True, True, False]
    assert "skipped non-finite steps: 2" in result.stderr
    state = torch.load(run_dir / "checkpoints" / "step-00000006.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_only_non_finite_steps_stop_the_run_naming_the_step_and_keep_finite_checkpoints(tmp_path, shapes16):
    run_dir = tmp_path / "run"
    result = train(run_dir, shapes16, "train.steps=10", "train.max_nonfinite_steps=3",
                   "kernels.noise_loss=tests.kernel_plugins:noise_loss_always_nan", *NAN_LOSS)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step 3: the last 3 steps had a non-finite loss or gradient"), last
    state = torch.load(run_dir / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["model"].values())


def test_too_many_bad_samples_stop_the_run_rather_than_train_on_a_trickle(tmp_path, shapes16):
    from test_data import add_shard

    data = tmp_path / "data"
    shutil.copytree(shapes16, data)
    add_shard(data, "garbage.tar", [(f"bad{index:03d}", {"png": b"not an image", "cls": b"0"}) for index in range(96)])
    result = train(tmp_path / "run", data, "train.steps=40", "train.log_every=5", "data.shuffle_buffer=0")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step ") and "could not be used" in last and "data.max_bad_fraction=0.05" in last


def test_sample_counters_live_in_the_checkpoint_and_add_up_over_resumes(tmp_path, shapes16):
    """skipped_samples is cumulative over resumes, and the bad-fraction check compares the same span on both sides."""
    from test_data import add_shard

    data = tmp_path / "data"
    shutil.copytree(shapes16, data)
    add_shard(data, "garbage.tar", [(f"bad{index:03d}", {"png": b"not an image", "cls": b"0"}) for index in range(8)])
    options = ["train.log_every=5", "train.checkpoint_every=5", "data.max_bad_fraction=0.5", "data.shuffle_buffer=0"]
    run_dir = tmp_path / "run"
    first = train(run_dir, data, "train.steps=10", *options)
    assert first.returncode == 0, first.stderr
    counters = torch.load(run_dir / "checkpoints" / "step-00000010.pt", weights_only=True)["counters"]
    before = counters[0]["skipped_samples"]
    assert counters[0]["delivered_samples"] == 10 * 8 and before >= 8  # the shards are drawn with replacement
    second = train(run_dir, data, "train.steps=20", *options)
    assert second.returncode == 0, second.stderr
    skipped = [record["skipped_samples"] for record in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert len(skipped) == 4 and skipped[1] == before and skipped == sorted(skipped), skipped  # never back to 0
    counters = torch.load(run_dir / "checkpoints" / "step-00000020.pt", weights_only=True)["counters"]
    assert counters[0]["delivered_samples"] == 20 * 8 and counters[0]["skipped_samples"] == skipped[-1]


def test_a_resumed_run_continues_the_uninterrupted_losses_bit_for_bit_with_device_resident_data(tmp_path, shapes16):
    """Model, EMA, optimizer, LR, dropout's generators and the data position all come back; timesteps,
    flips and noise follow from counters. (The streaming loader restarts its stream instead.)"""
    exact = ["data.cache=device", "model.dropout=0.1", "train.log_every=1", "train.checkpoint_every=3"]
    straight = train(tmp_path / "straight", shapes16, "train.steps=6", *exact)
    assert straight.returncode == 0, straight.stderr
    first = train(tmp_path / "resumed", shapes16, "train.steps=3", *exact)
    second = train(tmp_path / "resumed", shapes16, "train.steps=6", *exact)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "resumed from" in second.stderr
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # exactly equal floats


def start_training_to_kill(run_dir, data, *overrides, launcher=None) -> subprocess.Popen:
    """Training in a fresh interpreter (or under `launcher`), in a session of its own so that killing the group
    takes its data workers (or torchrun's ranks) too. Not in a fork of the test process (tests/forked_cli.py): a
    fork shares the test process's state, and a lock it held when killed stays held for the next fork. tqdm's, the
    one that stalled a run here, is each fork's own now (tests/test_forked_cli.py); a fresh interpreter rules out
    the others."""
    command = [*(launcher or [sys.executable, "-m"]), "engine.train", "configs/tiny.yaml", *SMALL,
               f"data.path={data}", f"train.run_dir={run_dir}", *overrides]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"})


def train_until_killed(run_dir, data, kill_after_step: int, *overrides, launcher=None):
    """Start training (`start_training_to_kill`), kill -9 it (with its workers, or torchrun and its ranks) once
    metrics.jsonl reaches `kill_after_step`: a real crash, no cleanup."""
    import signal
    import time

    process = start_training_to_kill(run_dir, data, *overrides, launcher=launcher)
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while last_logged_step(metrics) < kill_after_step:
        assert process.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the whole process group at once
    process.wait()


def test_kill_9_twice_then_the_same_command_reproduces_the_uninterrupted_losses_bit_for_bit(tmp_path, shapes16):
    """Streaming loader with 2 workers and dropout; both kills within the first epoch (64 images, 8 per
    step): after them the losses equal an uninterrupted run's, at every step. With the recipe options of
    issue 26 (EDM's preconditioning, log-normal noise levels, min-SNR, the inverse-sqrt decay of a scaled rate)."""
    exact = ["train.steps=20", "model.dropout=0.1", "train.log_every=1", "train.checkpoint_every=2",
             "data.num_workers=2", *RECIPE_OPTIONS]
    straight = train(tmp_path / "straight", shapes16, *exact)
    assert straight.returncode == 0, straight.stderr
    train_until_killed(tmp_path / "killed", shapes16, 3, *exact)
    train_until_killed(tmp_path / "killed", shapes16, 7, *exact)
    final = train(tmp_path / "killed", shapes16, *exact)
    assert final.returncode == 0, final.stderr
    assert "resumed from" in final.stderr
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")  # exactly equal floats, every step


def test_a_kill_at_any_moment_even_while_checkpointing_leaves_a_resumable_run(tmp_path, shapes16):
    """A checkpoint every step, so the kills land in or near a write; the next run always resumes."""
    run_dir = tmp_path / "run"
    every_step = ["train.steps=40", "train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    for kill_at in (3, 7, 11):
        train_until_killed(run_dir, shapes16, kill_at, *every_step)
        state, path = load_latest_checkpoint(run_dir)  # never a half-written one
        assert state["step"] >= kill_at - 1 and path.name == f"step-{state['step']:08d}.pt"
    final = train(run_dir, shapes16, *every_step)
    assert final.returncode == 0, final.stderr
    assert sorted(losses(run_dir)) == list(range(1, 41))


def test_a_kill_in_the_middle_of_a_checkpoint_write_falls_back_to_the_previous_checkpoint(tmp_path, shapes16):
    """Watch for a checkpoint's temporary file and kill -9 the run while it exists: the half-written file
    is never taken for a checkpoint, and the same command resumes from the previous one."""
    import signal
    import time

    run_dir = tmp_path / "run"
    folder = run_dir / "checkpoints"
    every_step = ["train.steps=100000", "train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=2"]
    caught = None
    for _ in range(5):  # a write lasts milliseconds; a few runs are enough to land in one
        process = start_training_to_kill(run_dir, shapes16, *every_step)
        deadline = time.monotonic() + 60
        while caught is None and time.monotonic() < deadline and process.poll() is None:
            partial = list(folder.glob(".step-*.tmp-*")) if folder.is_dir() else []
            if partial and list_checkpoints(run_dir):  # a write under way, with a complete one before it
                os.killpg(process.pid, signal.SIGKILL)
                caught = partial[0]
        if caught is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if caught is not None and caught.exists():
            break
        caught = None
    assert caught is not None, "never caught a checkpoint in the middle of its write"
    half_written_step = int(caught.name.split("-")[1].split(".")[0])
    state, path = load_latest_checkpoint(run_dir)
    assert state["step"] < half_written_step and path.name != caught.name
    resumed = train(run_dir, shapes16, f"train.steps={state['step'] + 2}", "train.log_every=1")
    assert resumed.returncode == 0 and f"at step {state['step']}" in resumed.stderr
