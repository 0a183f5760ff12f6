"""The speculators format, beside vLLM's layout: ``speculators/`` in an EAGLE-3 export.

vllm-project/speculators (read at 0.9.0: ``speculators/config.py``, ``models/eagle3/config.py``,
``proposals/greedy.py``) describes a draft and the target it was made for in one
``config.json``: ``speculators_model_type``, ``transformer_layer_config`` (the head's decoder
layer, a transformers config), the EAGLE-3 keys at the top level, and ``speculators_config`` =
{algorithm, proposal_methods [{proposal_type, speculative_tokens, ...}], default_proposal_method,
verifier {name_or_path, architectures}}. ``vllm serve SPECULATOR_DIR`` then serves the verifier
with that draft (vLLM 0.32: ``transformers_utils/config.py: maybe_override_with_speculators``,
``configs/speculators/algos.py: update_eagle3``).

What vLLM 0.32 reads from it, and so what is written explicitly:

* ``transformer_layer_config`` becomes the draft's config, with ``draft_vocab_size``,
  ``target_hidden_size``, ``norm_before_residual``, ``norm_before_fc`` and
  ``eagle_aux_hidden_state_layer_ids`` copied in from the top level. ``norm_before_residual``
  defaults to *true* there (false on the plain path), so it is always written.
* ``num_aux_hidden_states`` is not copied from the top level, and the Llama head sizes ``fc``
  from it, else for 3 states: it is written inside ``transformer_layer_config``.
* ``speculative_tokens`` of the first proposal method is vLLM's ``num_speculative_tokens``.

The weights are the export's, tensor for tensor, named as speculators' ``Eagle3DraftModel``
names them (``layers.0.*``, which vLLM loads as it loads ``midlayer.*``): a second copy of the
head (streamed). It applies to EAGLE-3 heads only (speculators has no ``draft_model`` type).
vLLM 0.33 requires the verifier to be a Hub id; an export whose target is a local path says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.eagle3_rules import MIDLAYER, VLLM_ARCHITECTURES

SPECULATORS_DIR = "speculators"
SPECULATORS_VERSION = "0.9.0"  # the release whose config classes the tests validate against
WEIGHTS = "model.safetensors"
# The head's decoder-layer keys: what speculators' transformer_layer_config holds.
LAYER_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "rms_norm_eps", "attention_bias", "mlp_bias",
              "max_position_embeddings", "rope_parameters", "rope_theta", "vocab_size",
              "bos_token_id", "eos_token_id", "pad_token_id", "layer_types")
# Top-level EAGLE-3 keys of speculators' Eagle3SpeculatorConfig that vLLM reads.
EAGLE3_KEYS = ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
               "norm_before_residual", "norm_before_fc")


def layer_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``transformer_layer_config`` from the vLLM-layout config ``cfg``."""
    family = VLLM_ARCHITECTURES[cfg["architectures"][0]]
    layer = {k: cfg[k] for k in LAYER_KEYS if k in cfg}
    if cfg.get("dtype") or cfg.get("torch_dtype"):  # transformers 5 reads "dtype"
        layer["dtype"] = cfg.get("dtype") or cfg.get("torch_dtype")
    layer.update(model_type=family, num_hidden_layers=1, tie_word_embeddings=False,
                 num_aux_hidden_states=len(cfg["eagle_aux_hidden_state_layer_ids"]))
    return layer


def speculators_config(cfg: dict[str, Any], *, verifier: str,
                       verifier_architectures: list[str], k: int) -> dict[str, Any]:
    """The speculators-format ``config.json`` of the vLLM-layout head config ``cfg``, for the
    target named ``verifier`` (as the server will load it), proposing ``k`` tokens."""
    return {
        "architectures": ["Eagle3Speculator"],  # Eagle3SpeculatorConfig's own; vLLM sets its own
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer_config(cfg),
        **{key: cfg[key] for key in EAGLE3_KEYS},
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(k),
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier,
                         "architectures": list(verifier_architectures)},
        },
    }


def speculators_name(name: str) -> str:
    """A tensor's name in speculators' layout: ``midlayer.`` is its ``layers.0.``."""
    return "layers.0." + name[len(MIDLAYER):] if name.startswith(MIDLAYER) else name


def write_speculators(stage: Path, tcfg: dict[str, Any], *, verifier: str, k: int) -> list[str]:
    """``stage/speculators/``: the config above and the export's weights renamed, from the
    vLLM-layout files already in ``stage``; returns what was written, in words."""
    cfg = json.loads((stage / "config.json").read_text())
    dest = stage / SPECULATORS_DIR
    dest.mkdir()
    spec = speculators_config(cfg, verifier=verifier,
                              verifier_architectures=tcfg.get("architectures") or [], k=k)
    (dest / "config.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    tensors = st.read_tensors(stage / WEIGHTS)
    plan = [st.renamed(t, speculators_name(n))
            for n, t in sorted(tensors.items(), key=lambda kv: kv[1].offset)]
    st.write_safetensors(dest / WEIGHTS, plan, metadata={"format": "pt"})
    notes = [f"{SPECULATORS_DIR}/: the same head in the speculators format (config.json for "
             f"speculators {SPECULATORS_VERSION}, weights named layers.0.*; `vllm serve "
             f"{SPECULATORS_DIR}` serves the target {verifier} with it)"]
    if not _looks_like_hub_id(verifier):
        notes.append(f"the speculators config names the verifier by the local path {verifier}: "
                     "vLLM 0.33 wants a Hub id there (pass --target-name)")
    return notes


def _looks_like_hub_id(name: str) -> bool:
    return not name.startswith(("/", ".", "~")) and name.count("/") == 1


def check_speculators_dir(export_dir: Path, report) -> None:
    """Rules for ``speculators/`` where an export has one: speculators' required keys, the
    EAGLE-3 keys equal to the vLLM layout's, the same tensors under speculators' names."""
    dest = Path(export_dir) / SPECULATORS_DIR
    if not dest.is_dir():
        return
    src = "vllm/transformers_utils/configs/speculators/base.py: validate_speculators_config"
    try:
        spec = json.loads((dest / "config.json").read_text())
        cfg = json.loads((Path(export_dir) / "config.json").read_text())
        methods = spec["speculators_config"]["proposal_methods"]
        ok = (spec["speculators_model_type"] == "eagle3" and methods
              and methods[0]["speculative_tokens"] >= 1
              and spec["speculators_config"]["verifier"]["name_or_path"]
              and isinstance(spec["transformer_layer_config"], dict))
        differ = [key for key in EAGLE3_KEYS if spec.get(key) != cfg.get(key)]
        n_aux = spec["transformer_layer_config"].get("num_aux_hidden_states")
        if n_aux != len(cfg.get("eagle_aux_hidden_state_layer_ids") or []):
            differ.append("transformer_layer_config.num_aux_hidden_states")
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        report.add("speculators_config", False, f"{SPECULATORS_DIR}/config.json is not a "
                   f"speculators EAGLE-3 config ({type(e).__name__}: {e})", src)
        return
    report.add("speculators_config", bool(ok) and not differ,
               f"{SPECULATORS_DIR}/config.json differs from config.json in {', '.join(differ)}"
               if differ else f"{SPECULATORS_DIR}/config.json: speculators eagle3, verifier "
               f"{spec['speculators_config']['verifier']['name_or_path']}", src)
    try:
        mine = {speculators_name(n): t.shape for n, t in st.read_dir(export_dir).items()}
        theirs = {n: t.shape for n, t in st.read_dir(dest).items()}
    except DspecError as e:
        report.add("speculators_weights", False, str(e), src)
        return
    report.add("speculators_weights", mine == theirs,
               "the same tensors as the vLLM layout, named layers.0.*" if mine == theirs else
               f"tensors differ from the vLLM layout's: {sorted(set(mine) ^ set(theirs))[:5]}",
               src)
