"""Checkpoints: atomic writes, the latest pointer, pruning, and falling back past a corrupt one."""

import warnings

import pytest
import torch

from engine.checkpoint import CheckpointError, list_checkpoints, load_latest_checkpoint, save_checkpoint


def state(step):
    return {"step": step, "model": {"w": torch.full((3,), float(step))}}


def test_save_keeps_the_newest_and_points_latest_at_it(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, state(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030.pt", "step-00000040.pt"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-00000040.pt"
    loaded, path = load_latest_checkpoint(tmp_path)
    assert loaded["step"] == 40 and path.name == "step-00000040.pt"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp" in p.name]


def test_a_run_without_checkpoints_loads_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    save_checkpoint(tmp_path, 1, state(1))
    newest = save_checkpoint(tmp_path, 2, state(2))
    newest.write_bytes(newest.read_bytes()[:50])
    with pytest.warns(UserWarning, match="step-00000002.pt cannot be read"):
        loaded, path = load_latest_checkpoint(tmp_path)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(3))


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    save_checkpoint(tmp_path, 1, state(1))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"step": 2, "model": Unpicklable()})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, _ = load_latest_checkpoint(tmp_path)
    assert loaded["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001.pt"]


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EACCES"])
def test_a_full_disk_or_unwritable_directory_is_one_clear_error_and_keeps_the_previous_checkpoint(
        tmp_path, monkeypatch, errno_name):
    import errno
    import os

    save_checkpoint(tmp_path, 1, state(1))

    def failing_write(*args, **kwargs):
        code = getattr(errno, errno_name)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_write)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(tmp_path, 2, state(2))
    message = str(caught.value)
    assert "\n" not in message and "step-00000002.pt" in message and os.strerror(getattr(errno, errno_name)) in message
    assert "previous checkpoint" in message and "step-00000001.pt is intact" in message
    monkeypatch.undo()
    loaded, _ = load_latest_checkpoint(tmp_path)
    assert loaded["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000001.pt"]
