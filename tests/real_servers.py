"""Real servers for the tests (vLLM's OpenAI-compatible server, Prometheus), on 127.0.0.1 only.

Each server runs in its own process group and is always ended by its PID, children included
(vLLM's engine core may outlive its API server). A server that exits or is not ready in time
fails the test with the tail of its log.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from local_http import free_port

SERVER_READY_TIMEOUT_S = 180.0
VLLM_K = 3  # the speculative tokens of the tests' vLLM servers

needs_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (pip install 'deepspec-plugin[vllm]' or scripts/setup.sh)",
)


def log_tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen) -> None:
    """End a server started with ``start_new_session``: its whole process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def started(cmd: list[str], log_path: Path, ready_url: str, *, env: dict | None = None,
            cwd: Path | None = None, what: str = "the server",
            timeout_s: float = SERVER_READY_TIMEOUT_S):
    """Start ``cmd`` (output into ``log_path``), wait until ``ready_url`` answers 200, yield the
    process, and stop it whatever happens."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(ready_url):
            if proc.poll() is not None:
                pytest.fail(f"{what} exited with {proc.returncode} before it was ready; "
                            f"its log:\n{log_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} was not ready within {timeout_s:.0f} s; its log:\n"
                            f"{log_tail(log_path)}")
            time.sleep(1.0)
        yield proc
    finally:
        stop_process(proc)


@contextlib.contextmanager
def vllm_server(workdir: Path, *, target: Path | None = None, draft: Path | None = None,
                config: Path | None = None, port: int | None = None, max_num_seqs: int = 4,
                extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None,
                log_name: str = "vllm-server.log"):
    """``python -m vllm.entrypoints.openai.api_server`` for ``target`` (with ``draft`` as its
    ``draft_model``, k = VLLM_K), or from a ``vllm serve --config`` file; yields (url, log)."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(workdir) / log_name
    # Unbuffered: a test reads the server's log while it runs.
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               VLLM_CPU_KVCACHE_SPACE="1", VLLM_CACHE_ROOT=str(Path(workdir) / "vllm-cache"),
               **(extra_env or {}))
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    cmd += ["--config", str(config)] if config is not None else ["--model", str(target)]
    if draft is not None:
        spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": VLLM_K}
        cmd += ["--speculative-config", json.dumps(spec)]
    cmd += ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
            "--max-num-seqs", str(max_num_seqs), "--host", "127.0.0.1", "--port", str(port),
            *extra_args]
    with started(cmd, log_path, f"{url}/health", env=env, cwd=workdir,
                 what="the vLLM server"):
        yield url, log_path


def server_counters(url: str) -> dict[str, int]:
    """vLLM's own spec-decode counter totals from its /metrics."""
    from deepspec_plugin.bench import promparse

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        samples = promparse.parse_samples(r.read().decode())
    return {
        name: int(promparse.total(samples, f"vllm:spec_decode_num_{name}_total") or 0)
        for name in ("drafts", "draft_tokens", "accepted_tokens")
    }
