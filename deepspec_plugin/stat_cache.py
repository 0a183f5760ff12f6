"""Remember a value computed from a directory's files while none of them changed.

A model's fingerprint hashes every byte of its weights: 0.6 s for the 517 MB reference target,
minutes for a 70B one, and every export (and the serving plugin at start) asks for the target's.
Like git's index, this keys the stored value on each file's size, mtime (ns) and inode: a file
rewritten in any ordinary way changes at least one of them, and then the value is recomputed.
Files modified in the last ``RACY_S`` seconds are not remembered: the kernel's clock behind
mtimes is coarse, so a second same-size write within one tick could keep every stat (git's
"racily clean" entries).

Stored in ``$DSPEC_CACHE/stat-cache.json`` (default ``~/.cache/deepspec``), written atomically,
at most ``MAX_ENTRIES`` directories per kind (the least recently used go first). A missing or
corrupt cache file is simply rebuilt. ``DSPEC_STAT_CACHE=0`` turns it off.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from deepspec_plugin.fileio import atomic_write_json

MAX_ENTRIES = 256
RACY_S = 2.0


def cache_file() -> Path:
    base = os.environ.get("DSPEC_CACHE") or str(Path.home() / ".cache" / "deepspec")
    return Path(base).expanduser() / "stat-cache.json"


def _stats(files: Iterable[Path]) -> list[list]:
    out = []
    for f in sorted(files):
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns, st.st_ino])
    return out


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def cached(kind: str, directory: Path, files: Iterable[Path], compute: Callable[[], str]) -> str:
    """``compute()``, or the value stored for ``directory`` when ``files`` have the same stats."""
    if os.environ.get("DSPEC_STAT_CACHE", "1") == "0":
        return compute()
    files = list(files)
    key = str(Path(directory).resolve())
    stats = _stats(files)
    path = cache_file()
    entry = _load(path).get(kind, {}).get(key)
    if entry and entry.get("stat") == stats:
        return entry["value"]
    value = compute()
    if _stats(files) != stats:  # changed while it was read: do not remember a torn value
        return value
    if any(f.stat().st_mtime > time.time() - RACY_S for f in files):
        return value
    try:
        data = _load(path)  # re-read: another process may have written meanwhile
        table = data.setdefault(kind, {})
        table[key] = {"stat": stats, "value": value, "used": time.time()}
        for old in sorted(table, key=lambda k: table[k].get("used", 0))[:-MAX_ENTRIES]:
            del table[old]
        atomic_write_json(path, data, indent=None)
    except OSError:
        pass  # a read-only home is no reason to fail: the value is still right
    return value
