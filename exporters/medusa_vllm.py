"""Medusa heads in vLLM 0.32's layout: the export's weights, config and rules.

vLLM 0.32 (``model_executor/models/medusa.py``, ``transformers_utils/configs/medusa.py``) loads
Medusa as ``MedusaModel``: ``blocks.{h}.layers.{l}.weight|bias`` (residual blocks ``x + SiLU(W x
+ b)``, biases only where the config says ``medusa_fc_bias``: without it vLLM silently drops
them and runs another model) and ``lm_heads.{h}.weight``; the config's ``num_heads`` and
``num_hidden_layers``. The source is a Medusa draft in TGI's / FasterDecoding's layout (what
``dspec train --draft-type medusa`` writes), read by :mod:`deepspec_plugin.exporters.heads`;
tensors are streamed and renamed, never loaded.

vLLM 0.33 removed Medusa (and the MLP speculator, whose model 0.32 already has disabled): this
export needs vLLM <= 0.32, and the export says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.findings import CheckReport
from deepspec_plugin.fileio import read_json
from deepspec_plugin.models.heads import (
    MedusaConfig,
    is_vllm_medusa,
    vllm_medusa_config,
    vllm_medusa_name,
)

WEIGHTS = "model.safetensors"
SRC_MODEL = "vllm 0.32 model_executor/models/medusa.py: Medusa.__init__, load_weights"
SRC_CONFIG = "vllm 0.32 transformers_utils/configs/medusa.py: MedusaConfig"
REMOVED_NOTE = ("vLLM 0.33 removed speculative method 'medusa': serve this export with vLLM "
                "<= 0.32 (or the same heads with TGI: dspec export tgi)")


def write_vllm_medusa(draft: Path, target_config: dict, stage: Path, k: int) -> list[str]:
    """The heads of ``draft`` (TGI's layout) as vLLM's ``MedusaModel`` into ``stage``; notes."""
    from deepspec_plugin.exporters.heads import read_medusa

    src = read_medusa(draft)
    tv, th = int(target_config["vocab_size"]), int(target_config["hidden_size"])
    if (src.vocab_size, src.hidden_size) != (tv, th):
        raise DspecError(f"the Medusa heads in {draft} have vocabulary {src.vocab_size} and "
                         f"hidden size {src.hidden_size}, the target {tv} and {th}",
                         "export the heads with the target they were trained for")
    if k > src.num_heads:
        raise DspecError(f"k = {k} but the draft has {src.num_heads} Medusa heads",
                         f"pass --k {src.num_heads} or less")
    planned = [st.renamed(src.tensors[name], vllm_medusa_name(name, src.num_layers))
               for name in sorted(src.tensors)]
    st.write_or_copy(stage / WEIGHTS, planned, metadata={"format": "pt"})
    cfg = MedusaConfig(src.num_heads, src.num_layers, src.hidden_size, src.vocab_size)
    (stage / "config.json").write_text(json.dumps(vllm_medusa_config(cfg), indent=2,
                                                  sort_keys=True) + "\n")
    return [REMOVED_NOTE]


def check_vllm_medusa(report: CheckReport, path: Path, target: Path | None) -> None:
    """The config and tensors vLLM 0.32's Medusa reads, against the target's sizes."""
    config = read_json(path / "config.json")
    vllm = isinstance(config, dict) and is_vllm_medusa(config)
    report.add("medusa.config", vllm and config.get("architectures") == ["MedusaModel"],
               "config.json is vLLM's MedusaModel (model_type medusa, num_heads, "
               "num_hidden_layers)" if vllm else "config.json is not vLLM's Medusa config "
               "(model_type medusa with num_heads)", SRC_CONFIG)
    if not vllm:
        return
    bias = config.get("medusa_fc_bias") is True
    report.add("medusa.fc_bias", bias, "medusa_fc_bias is true: the blocks' biases load" if bias
               else "medusa_fc_bias is not true: vLLM builds the blocks without bias and drops "
               "the trained biases", SRC_MODEL)
    heads, layers = int(config.get("num_heads") or 0), int(config.get("num_hidden_layers") or 0)
    hidden, vocab = int(config.get("hidden_size") or 0), int(config.get("vocab_size") or 0)
    if target is not None:
        tcfg = read_json(target / "config.json")
        same = (hidden, vocab) == (tcfg.get("hidden_size"), tcfg.get("vocab_size"))
        report.add("medusa.target_sizes", same, f"hidden {hidden}, vocabulary {vocab}" + (
            ", the target's" if same else f"; the target has {tcfg.get('hidden_size')} and "
            f"{tcfg.get('vocab_size')}"), SRC_MODEL)
    expected = {}
    for h in range(heads):
        for la in range(layers):
            expected[f"blocks.{h}.layers.{la}.weight"] = (hidden, hidden)
            expected[f"blocks.{h}.layers.{la}.bias"] = (hidden,)
        expected[f"lm_heads.{h}.weight"] = (vocab, hidden)
    try:
        stored = st.read_dir(path)
    except DspecError as e:
        report.add("medusa.tensors", False, str(e), SRC_MODEL)
        return
    wrong = [f"{n} {list(stored[n].shape)}, expected {list(s)}" for n, s in expected.items()
             if n in stored and tuple(stored[n].shape) != s]
    missing = sorted(set(expected) - set(stored))
    report.add("medusa.tensors", not missing and not wrong and bool(expected),
               f"the {len(expected)} tensors of {heads} heads x {layers} block(s)"
               if not missing and not wrong else
               "; ".join(([f"missing {', '.join(missing[:4])}"] if missing else []) + wrong[:3]),
               SRC_MODEL)
