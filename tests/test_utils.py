"""Atomic writes: nothing half-written replaces a good file, and results are ordinary readable files."""

import stat

import pytest

from perpcs.utils import atomic_dir, atomic_path, read_json, write_json


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("crash mid-write")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_dir_replaces_whole_folder_only_on_success(tmp_path):
    out = tmp_path / "adapter"
    with atomic_dir(out) as tmp:
        (tmp / "x.bin").write_bytes(b"1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, replace=True) as tmp:
            (tmp / "y.bin").write_bytes(b"2")
            raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["x.bin"]
    assert stat.S_IMODE(out.stat().st_mode) == 0o755 and stat.S_IMODE((out / "x.bin").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_read_json_names_file_and_line(tmp_path):
    (tmp_path / "bad.json").write_text('{\n  "a": 1,\n  oops\n}')
    with pytest.raises(ValueError, match=r"bad.json: line 3: invalid JSON"):
        read_json(tmp_path / "bad.json")
