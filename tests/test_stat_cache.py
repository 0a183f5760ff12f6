"""The stat cache behind model fingerprints: reused while files are unchanged, never stale."""

from __future__ import annotations

import os
import time

from deepspec_plugin import stat_cache


def test_value_is_reused_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPEC_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "model" / "w.safetensors"
    f.parent.mkdir()
    f.write_bytes(b"abc")
    old = time.time() - 60
    os.utime(f, (old, old))  # outside the racy window
    calls = []

    def compute():
        calls.append(1)
        return f"v{len(calls)}"

    assert stat_cache.cached("k", f.parent, [f], compute) == "v1"
    assert stat_cache.cached("k", f.parent, [f], compute) == "v1" and len(calls) == 1
    f.write_bytes(b"abd")  # same size, new mtime
    os.utime(f, (old + 1, old + 1))
    assert stat_cache.cached("k", f.parent, [f], compute) == "v2"
    # A freshly written file is never remembered (the kernel's mtime clock is coarse).
    f.write_bytes(b"xyz")
    assert stat_cache.cached("k", f.parent, [f], compute) == "v3"
    assert stat_cache.cached("k", f.parent, [f], compute) == "v4"
    # A corrupt cache file is rebuilt, and the switch turns the cache off.
    stat_cache.cache_file().write_text("{not json")
    os.utime(f, (old, old))
    assert stat_cache.cached("k", f.parent, [f], compute) == "v5"
    assert stat_cache.cached("k", f.parent, [f], compute) == "v5"
    monkeypatch.setenv("DSPEC_STAT_CACHE", "0")
    assert stat_cache.cached("k", f.parent, [f], compute) == "v6"


def test_fingerprint_follows_the_weights(tiny, tmp_path, monkeypatch):
    import shutil

    from deepspec_plugin.models import fingerprint

    monkeypatch.setenv("DSPEC_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "m"
    shutil.copytree(tiny.draft, model)
    old = time.time() - 60
    for p in model.iterdir():
        os.utime(p, (old, old))
    first = fingerprint(model)
    assert fingerprint(model) == first and stat_cache.cache_file().exists()
    w = model / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    os.utime(w, (old + 5, old + 5))
    assert fingerprint(model) != first
