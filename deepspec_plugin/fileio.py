"""Files written atomically and JSON read with one-line errors: the one helper for each.

A reader never sees half a file or half a directory: a file is written into a unique temp file
beside it, flushed and fsynced, then renamed over the old one; a directory is built in a temp
directory beside its destination and renamed into place (an old one is swapped out by renames and
removed after). Anything that fails or is interrupted leaves the destination as it was and no temp
file behind. Temp names start with a dot, so globs like ``*.safetensors`` never see them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError

MISSING_FIX = "point at a Hugging Face model directory"


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` (mode 0644) through a temp file, fsync and rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these files are shared like any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def json_text(obj: Any, indent: int | None = 2) -> str:
    """The project's JSON files: sorted keys, a trailing newline (stable diffs and hashes)."""
    return json.dumps(obj, indent=indent, sort_keys=True) + "\n"


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json_text(obj, indent))


def write_json(path: str | Path, obj: Any) -> None:
    """Plain write, for files inside a directory that :func:`atomic_dir` renames as a whole."""
    Path(path).write_text(json_text(obj))


def read_json(path: str | Path, fix: str = MISSING_FIX) -> Any:
    """Parse a JSON file; a missing or corrupt file is a one-line ``DspecError`` (``fix`` for a
    missing one)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DspecError(f"{path} is missing", fix) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DspecError(f"{path} is not valid JSON ({e})", "restore or rebuild the file") from None


def read_json_object(path: str | Path, fix: str = MISSING_FIX) -> dict[str, Any]:
    """:func:`read_json` for files that must hold a JSON object (configs, manifests)."""
    data = read_json(path, fix)
    if not isinstance(data, dict):
        raise DspecError(f"{path} is not a JSON object", "restore or rebuild the file")
    return data


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp dir beside ``dest``; when the block succeeds it replaces ``dest``."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        _readable_by_all(tmp)
        replace_dir(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _readable_by_all(root: Path) -> None:
    """A model directory is meant to be shared (a server often runs as another user): mkdtemp
    makes it 0700 and safetensors writes its files 0600."""
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        os.chmod(path, mode | (0o055 if path.is_dir() else 0o044))


def replace_dir(src: Path, dest: Path, overwrite: bool = True) -> None:
    """Move the finished dir ``src`` to ``dest``, swapping out an old ``dest`` (os.replace
    cannot replace a non-empty directory)."""
    if dest.exists():
        if not overwrite:
            raise DspecError(
                f"{dest} already exists", "pass overwrite (--overwrite) or choose another path"
            )
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, trash / dest.name)
        os.replace(src, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dest)
