"""Atomic result files: whole content or the previous file, never a half-written one."""

import json
import os

import pytest

from simclr_jax.runtime import files


def test_text_is_written_whole_and_no_temporary_file_stays(tmp_path):
    path = tmp_path / "eval.json"
    files.write_text_atomic(path, "first")
    files.write_text_atomic(str(path), "second ✓")  # replaces; str and PathLike both work
    assert path.read_text(encoding="utf-8") == "second ✓"
    assert os.listdir(tmp_path) == ["eval.json"]


def test_json_as_json_dumps_writes_it(tmp_path):
    path = tmp_path / "linear_eval.json"
    obj = {"b": [1, 2.5], "a": {"top1": 0.5}}
    files.write_json_atomic(path, obj, indent=2, sort_keys=True)
    assert path.read_text() == json.dumps(obj, indent=2, sort_keys=True)
    assert os.listdir(tmp_path) == ["linear_eval.json"]


def test_failing_serialisation_leaves_the_existing_file(tmp_path):
    path = tmp_path / "finetune.json"
    files.write_json_atomic(path, {"top1": 0.9})
    with pytest.raises(TypeError):
        files.write_json_atomic(path, {"top1": object()})
    assert json.loads(path.read_text()) == {"top1": 0.9}
    assert os.listdir(tmp_path) == ["finetune.json"]


def test_failing_write_removes_its_temporary_file_and_keeps_the_target(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    files.write_text_atomic(path, "old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        files.write_text_atomic(path, "new")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]


def test_new_files_get_the_usual_permissions(tmp_path):
    # A temporary file from mkstemp would be 0600: unreadable to others once renamed.
    umask = os.umask(0o022)
    try:
        files.write_text_atomic(tmp_path / "config.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644
