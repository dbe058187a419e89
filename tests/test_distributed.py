"""Parallel training on the CPU (gloo) under torchrun: DDP, FSDP2, gradient accumulation and compile
all follow the same loss trajectory as one eager process with the same global batch.

Most runs fork their two ranks with torchrun's environment (tests/forked_cli.py: no fresh interpreters); torchrun
itself launches the runs that test what it adds, a kill -9 of the whole group and a SIGTERM it forwards.

The data set holds one image repeated, so the loss does not depend on which rank streams which
shard; timesteps, flips and noise come from counters over the global batch, so they match too.
"""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from PIL import Image

from engine.checkpoint import load_latest_checkpoint
from engine.data.prepare import prepare
from engine.post_hoc_ema import list_snapshots
from forked_cli import torchrun
from test_train_cli import (ONE_LEVEL, RECIPE_OPTIONS, ROOT, SMALL, last_logged_step, losses, train,
                            train_until_killed)

TORCHRUN = [*torchrun(2), "-m"]
STEPS = ["train.steps=4", "train.log_every=1", "train.checkpoint_every=4", "train.batch_size=8"]


@pytest.fixture(scope="module")
def repeated_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("repeated") / "images" / "only_class"
    folder.mkdir(parents=True)
    image = Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    for index in range(32):
        image.save(folder / f"{index:03d}.png")
    out = folder.parents[1] / "shards"
    prepare(folder.parent, out, shard_size=8, image_size=16, channels=3, progress=False)
    return out


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, repeated_image):
    run_dir = tmp_path_factory.mktemp("single")
    result = train(run_dir, repeated_image, *STEPS)
    assert result.returncode == 0, result.stderr
    return run_dir


def _assert_same_trajectory(got: dict, single_run, rel: float = 1e-4) -> None:
    expected = losses(single_run)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=rel), f"step {step}"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_follow_the_single_process_trajectory_and_resume(tmp_path, repeated_image, single_process, parallel):
    run_dir = tmp_path / parallel
    result = train(run_dir, repeated_image, *STEPS, f"train.parallel={parallel}", ranks=2)
    assert result.returncode == 0, result.stderr
    _assert_same_trajectory(losses(run_dir), single_process)
    state, _ = load_latest_checkpoint(run_dir)
    assert state["step"] == 4 and all(not hasattr(value, "placements") for value in state["model"].values())
    # The EMA (under FSDP: each rank's shard of it) ends where the single process's does, saved in full.
    single, _ = load_latest_checkpoint(single_process)
    assert state["ema"].keys() == single["ema"].keys()
    for name, value in single["ema"].items():
        torch.testing.assert_close(state["ema"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # The same command with more steps resumes from the 2-rank checkpoint.
    again = train(run_dir, repeated_image, *STEPS[1:], "train.steps=6", f"train.parallel={parallel}", ranks=2)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_a_conditional_model_trains_under_fsdp_as_in_one_process_and_its_checkpoint_resumes_in_one(tmp_path,
                                                                                                 repeated_image):
    """Each rank drops the labels of its slice of the global batch's drops: the same losses and the same weights,
    the class embedding (sharded by FSDP) included, as one process. 32 channels and then 64: at fewer
    than two channels per GroupNorm group the norm would cancel the class embedding and hide a wrong drop.
    The FSDP run also recomputes its activations (model.activation_checkpointing=all), which changes nothing
    but the memory; both keep a second EMA and two post-hoc EMA profiles, snapshotted at steps 2 and 4. The FSDP
    checkpoint then resumes in a single process."""
    conditional = [*STEPS, "model.num_classes=1", "model.label_dropout=0.5", "model.base_channels=32",
                   "train.extra_ema_decays=[0.5]", "train.post_hoc_ema_sigma_rels=[0.05,0.2]", "train.post_hoc_ema_every=2"]
    single = train(tmp_path / "single", repeated_image, *conditional)
    assert single.returncode == 0, single.stderr
    result = train(tmp_path / "fsdp", repeated_image, *conditional, "train.parallel=fsdp",
                   "model.activation_checkpointing=all", ranks=2)
    assert result.returncode == 0, result.stderr
    _assert_same_trajectory(losses(tmp_path / "fsdp"), tmp_path / "single")
    single_state, fsdp_state = (load_latest_checkpoint(tmp_path / name)[0] for name in ("single", "fsdp"))
    expected, got = single_state["model"], fsdp_state["model"]
    assert expected.keys() == got.keys() and any(key.endswith("class_embed.weight") for key in got)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-6, msg=name)
    # the extra EMA (train.extra_ema_decays), sharded like the main one, ends where the single process's does
    assert list(fsdp_state["extra_emas"]) == ["ema_0.5"]
    for name, value in single_state["extra_emas"]["ema_0.5"].items():
        torch.testing.assert_close(fsdp_state["extra_emas"]["ema_0.5"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    # so do the post-hoc profiles, in the checkpoint and in the snapshots rank 0 writes of them
    assert list(fsdp_state["post_hoc_emas"]) == ["sigma_rel_0.05", "sigma_rel_0.2"]
    snapshots = {name: [(s.sigma_rel, s.step, s.path.relative_to(tmp_path / name)) for s in
                        list_snapshots(tmp_path / name / "post_hoc_ema")] for name in ("single", "fsdp")}
    assert snapshots["fsdp"] == snapshots["single"] and [step for _, step, _ in snapshots["fsdp"]] == [2, 2, 4, 4]
    for _, _, path in snapshots["fsdp"]:
        expected = torch.load(tmp_path / "single" / path, weights_only=True)
        for name, value in torch.load(tmp_path / "fsdp" / path, weights_only=True).items():
            torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-6, msg=f"{path}: {name}")
    again = train(tmp_path / "fsdp", repeated_image, *conditional[1:], "train.steps=5")
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and sorted(losses(tmp_path / "fsdp")) == [1, 2, 3, 4, 5]
    assert [s.step for s in list_snapshots(tmp_path / "fsdp" / "post_hoc_ema")] == [2, 2, 4, 4, 5, 5]


def test_gradient_accumulation_follows_the_same_trajectory(tmp_path, repeated_image, single_process):
    run_dir = tmp_path / "accumulated"
    result = train(run_dir, repeated_image, *STEPS, "train.grad_accum_steps=2")
    assert result.returncode == 0, result.stderr
    _assert_same_trajectory(losses(run_dir), single_process)


def test_the_recipe_options_train_under_fsdp_with_gradient_accumulation_as_in_one_process(tmp_path, repeated_image):
    """EDM's preconditioning, log-normal noise levels, min-SNR and the scaled, decaying rate (issue 26) are functions
    of the step and the sample index, so 2 FSDP ranks with 2 micro-batches each follow one process; and resume."""
    single = train(tmp_path / "single", repeated_image, *STEPS, *RECIPE_OPTIONS)
    assert single.returncode == 0, single.stderr
    result = train(tmp_path / "fsdp", repeated_image, *STEPS, *RECIPE_OPTIONS, "train.parallel=fsdp",
                   "train.grad_accum_steps=2", ranks=2)
    assert result.returncode == 0, result.stderr
    _assert_same_trajectory(losses(tmp_path / "fsdp"), tmp_path / "single")
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] > lrs[-1] > 0  # the rate decays (inverse_sqrt from step 3)
    again = train(tmp_path / "fsdp", repeated_image, *STEPS[1:], *RECIPE_OPTIONS, "train.steps=6",
                  "train.parallel=fsdp", "train.grad_accum_steps=2", ranks=2)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr and sorted(losses(tmp_path / "fsdp")) == [1, 2, 3, 4, 5, 6]


def test_a_compiled_model_follows_the_eager_trajectory(tmp_path, repeated_image):
    eager = train(tmp_path / "eager", repeated_image, *STEPS, *ONE_LEVEL)
    assert eager.returncode == 0, eager.stderr
    result = train(tmp_path / "compiled", repeated_image, *STEPS, *ONE_LEVEL, "train.compile=true",
                   "train.compile_scope=blocks")
    assert result.returncode == 0, result.stderr
    _assert_same_trajectory(losses(tmp_path / "compiled"), tmp_path / "eager", rel=1e-3)


def test_a_global_batch_that_does_not_split_is_one_clear_line(tmp_path, repeated_image):
    result = train(tmp_path / "run", repeated_image, *STEPS, "train.batch_size=6", "train.grad_accum_steps=2",
                   ranks=2)
    assert result.returncode != 0
    assert "train.batch_size (6) must be divisible by the world size (2) x train.grad_accum_steps (2)" in result.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist only with a GPU")
def test_the_training_step_never_waits_for_the_gpu(tmp_path, repeated_image):
    """train.sync_check makes any synchronising CUDA call inside a step raise (bf16, fused kernels)."""
    result = train(tmp_path / "run", repeated_image, *STEPS, "train.sync_check=true", "train.device=cuda",
                   "data.num_workers=0")
    assert result.returncode == 0, result.stderr


def test_device_resident_data_follows_the_streaming_trajectory(tmp_path, repeated_image, single_process):
    """data.cache: device holds the set on the training device and draws batches there, no loader."""
    run_dir = tmp_path / "cached"
    result = train(run_dir, repeated_image, *STEPS, "data.cache=device")
    assert result.returncode == 0, result.stderr
    assert "32 images" in result.stderr and "held on cpu" in result.stderr
    _assert_same_trajectory(losses(run_dir), single_process)


@pytest.mark.parametrize("option, rel", [("train.precision=fp16", 2e-2), ("train.precision=bf16", 5e-2),
                                         ("train.channels_last=true", 1e-4)])
def test_precisions_and_channels_last_follow_the_fp32_trajectory(tmp_path, repeated_image, single_process, option, rel):
    """fp16 (with its grad scaler) and bf16 autocast round differently but train the same way; NHWC is exact."""
    run_dir = tmp_path / "run"
    result = train(run_dir, repeated_image, *STEPS, option)
    assert result.returncode == 0, result.stderr
    _assert_same_trajectory(losses(run_dir), single_process, rel=rel)


def test_a_killed_two_rank_ddp_run_resumes_to_the_uninterrupted_losses(tmp_path, repeated_image):
    """kill -9 of torchrun and both ranks; the same command then follows the uninterrupted trajectory."""
    exact = [*STEPS[1:], "train.steps=12", "train.checkpoint_every=3", "model.dropout=0.1", "data.num_workers=1"]
    straight = train(tmp_path / "straight", repeated_image, *exact, ranks=2)
    assert straight.returncode == 0, straight.stderr
    run_dir = tmp_path / "killed"
    # killed once step 4 is logged (resumed from step 3's checkpoint): the 8 steps left are a margin for the time a
    # loaded machine takes to see it; at step 7 the 5 left once ran out and the kill found the run finished
    train_until_killed(run_dir, repeated_image, 4, *exact, launcher=TORCHRUN)
    resumed = train(run_dir, repeated_image, *exact, launcher=TORCHRUN)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    expected = losses(tmp_path / "straight")
    got = losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 13))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


def test_a_single_process_checkpoint_resumes_on_two_ranks(tmp_path, repeated_image, single_process):
    """The reverse of FSDP -> 1: the same weights, optimizer and EMA continue under DDP on 2 ranks."""
    run_dir = tmp_path / "run"
    shutil.copytree(single_process, run_dir)  # 4 steps in one process
    result = train(run_dir, repeated_image, *STEPS[1:], "train.steps=6", ranks=2)
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "starts afresh" in result.stderr  # the documented data semantics
    assert sorted(losses(run_dir)) == [1, 2, 3, 4, 5, 6]


def test_sigterm_to_torchrun_checkpoints_every_rank_at_one_step(tmp_path, repeated_image):
    run_dir = tmp_path / "run"
    command = [*TORCHRUN, "engine.train", "configs/tiny.yaml", *SMALL, f"data.path={repeated_image}",
               f"train.run_dir={run_dir}", *STEPS[1:], "train.steps=100000", "train.checkpoint_every=100000"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore::UserWarning"})
    deadline = time.monotonic() + 180
    while last_logged_step(run_dir / "metrics.jsonl") < 3:  # the live file's last line may be half written
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    _, stderr = process.communicate(timeout=600)
    assert "stopped by SIGTERM" in stderr
    state, _ = load_latest_checkpoint(run_dir)
    assert state["step"] % 10 == 0  # the ranks agree every 10 steps, and stop together there
    again = train(run_dir, repeated_image, *STEPS[1:], f"train.steps={state['step'] + 2}", ranks=2)
    assert again.returncode == 0 and f"at step {state['step']}" in again.stderr
