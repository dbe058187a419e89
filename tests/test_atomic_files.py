"""Atomic files and folders (engine.atomic_files): the old version survives a failed write, and no
temporary file or folder is left behind."""

import os

import pytest

import engine.atomic_files
from engine.atomic_files import atomic_folder, atomic_write, remove_stale_temporaries


class WriteFailed(Exception):
    pass


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_successful_write_replaces_the_file(tmp_path):
    path = tmp_path / "record.json"
    atomic_write(path, lambda file: file.write(b"first"))
    atomic_write(path, lambda file: file.write(b"second"))
    assert path.read_bytes() == b"second" and names(tmp_path) == ["record.json"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "record.json"
    path.write_bytes(b"old")

    def half_then_fail(file):
        file.write(b"half of the new")
        raise WriteFailed

    with pytest.raises(WriteFailed):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and names(tmp_path) == ["record.json"]
    with pytest.raises(WriteFailed):  # and when there was no old file, there is none after
        atomic_write(tmp_path / "new.json", half_then_fail)
    assert names(tmp_path) == ["record.json"]


def test_stale_temporaries_of_other_processes_are_removed_and_ours_kept(tmp_path):
    (tmp_path / ".step-00000010.pt.tmp-999999").write_bytes(b"killed mid-save")
    ours = tmp_path / f".step-00000020.pt.tmp-{os.getpid()}"
    ours.write_bytes(b"being written")
    (tmp_path / "step-00000005.pt").write_bytes(b"complete")
    remove_stale_temporaries(tmp_path)
    assert names(tmp_path) == [ours.name, "step-00000005.pt"]


def test_a_successful_folder_write_creates_or_replaces_the_folder(tmp_path):
    out = tmp_path / "parent" / "pipeline"
    with atomic_folder(out) as tmp:
        assert tmp.parent == out.parent and not out.exists()
        (tmp / "weights").write_text("first")
    assert names(out) == ["weights"] and (out / "weights").read_text() == "first"
    with atomic_folder(out) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights").write_text("second")
    assert names(out) == ["unet"] and (out / "unet" / "weights").read_text() == "second"
    assert names(out.parent) == ["pipeline"]  # neither the temporary folder nor the old one is left
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_folder(empty) as tmp:
        (tmp / "weights").write_text("into an empty folder")
    assert names(empty) == ["weights"]


def test_a_failing_folder_write_leaves_the_old_folder_and_no_temporary_folder(tmp_path):
    out = tmp_path / "pipeline"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(WriteFailed):
        with atomic_folder(out) as tmp:
            (tmp / "weights").write_text("half of the new")
            raise WriteFailed
    assert names(tmp_path) == ["pipeline"] and (out / "weights").read_text() == "old"
    with pytest.raises(WriteFailed):  # and when there was no old folder, there is none after
        with atomic_folder(tmp_path / "new") as tmp:
            raise WriteFailed
    assert names(tmp_path) == ["pipeline"]


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "pipeline"
    out.mkdir()
    (out / "weights").write_text("old")
    replace = os.replace

    def refuse_the_new_folder(source, destination):
        if ".tmp-" in os.path.basename(source):
            raise OSError(28, "No space left on device")
        replace(source, destination)

    monkeypatch.setattr(engine.atomic_files.os, "replace", refuse_the_new_folder)
    with pytest.raises(OSError, match="No space left"):
        with atomic_folder(out) as tmp:
            (tmp / "weights").write_text("new")
    assert names(tmp_path) == ["pipeline"] and (out / "weights").read_text() == "old"
