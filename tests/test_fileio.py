"""deepspec_plugin.fileio: atomic files and directories, JSON reads with one-line errors."""

from __future__ import annotations

import json
import stat

import pytest

from deepspec_plugin.errors import DspecError
from deepspec_plugin.fileio import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    read_json_object,
)


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_file_is_replaced_whole_and_shared(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _leftovers(path.parent) == []


def test_a_failed_file_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_json(path, {"not json": object()})
    assert path.read_text() == "old" and _leftovers(tmp_path) == []


def test_a_directory_appears_whole_readable_by_all(tmp_path):
    dest = tmp_path / "model"
    with atomic_dir(dest) as tmp:
        (tmp / "weights").write_bytes(b"w")
        (tmp / "weights").chmod(0o600)  # what safetensors writes
        (tmp / "inner").mkdir(mode=0o700)
        assert not dest.exists()
    assert (dest / "weights").read_bytes() == b"w"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "weights").stat().st_mode) == 0o644
    assert stat.S_IMODE((dest / "inner").stat().st_mode) == 0o755
    assert _leftovers(tmp_path) == []


def test_a_failed_directory_leaves_the_old_one(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "old").write_text("kept")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    assert sorted(p.name for p in dest.iterdir()) == ["old"] and _leftovers(tmp_path) == []
    with pytest.raises(DspecError, match="already exists"), atomic_dir(dest, overwrite=False):
        pass
    with atomic_dir(dest) as tmp:
        (tmp / "new").write_text("y")
    assert sorted(p.name for p in dest.iterdir()) == ["new"] and _leftovers(tmp_path) == []


def test_json_reads_name_the_problem(tmp_path):
    with pytest.raises(DspecError, match=r"missing\. Fix: restore it") as e:
        read_json(tmp_path / "nope.json", fix="restore it")
    assert "\n" not in str(e.value)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DspecError, match="is not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    assert read_json(tmp_path / "list.json") == [1]
    with pytest.raises(DspecError, match="is not a JSON object"):
        read_json_object(tmp_path / "list.json")
