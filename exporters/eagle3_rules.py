"""vLLM's loading rules for EAGLE-3 heads, as a checker, and the layout they describe.

vLLM's layout (read in vllm 0.32: ``model_executor/models/llama_eagle3.py`` and
``qwen3_eagle3.py``, ``Eagle3*ForCausalLM.load_weights``; ``transformers_utils/configs/eagle.py``;
``v1/worker/gpu_model_runner.py: _get_eagle3_aux_layers_from_config``; ``models/llama.py:
LlamaModel.forward``). One decoder layer named ``midlayer.*`` (mapped to ``layers.0.``), ``fc``,
``norm``, ``lm_head`` [draft_vocab_size, H], ``d2t`` (int64, only when the draft vocabulary is
smaller; ``t2d`` is skipped); ``embed_tokens`` optional (without it the target's is shared).
Config: Llama- or Qwen3-style keys, an ``architectures`` entry starting with ``Eagle3`` (vLLM
prefixes any other name with ``Eagle3`` and then finds no model), ``draft_vocab_size``,
``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids`` (which target hidden states feed the
head), ``num_aux_hidden_states`` (the 0.32 Llama head sizes ``fc`` from it, else 3),
``norm_before_residual``. vLLM's aux id i is the hidden state entering target layer i (0 = the
embeddings, num_layers = the last layer's output before the final norm).

Each rule of :func:`check_vllm_eagle3` is one finding whose ``source`` names the vLLM file and
function it encodes. Used by :func:`deepspec_plugin.exporters.eagle3.write_vllm_eagle3` (the
shapes) and by ``dspec export check`` for EAGLE-3 exports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.findings import CheckReport
from deepspec_plugin.fileio import read_json_object

VLLM_LLAMA_ARCH = "Eagle3LlamaForCausalLM"
VLLM_QWEN3_ARCH = "Eagle3Qwen3ForCausalLM"
# Names vLLM 0.32's registry maps to its EAGLE-3 heads (llama_eagle3 / qwen3_eagle3).
VLLM_ARCHITECTURES = {
    "Eagle3LlamaForCausalLM": "llama", "LlamaForCausalLMEagle3": "llama",
    "Eagle3Qwen3ForCausalLM": "qwen3",
}
MIDLAYER = "midlayer."

SRC_LOADER = ("vllm/model_executor/models/llama_eagle3.py (qwen3_eagle3.py): "
              "Eagle3*ForCausalLM.load_weights, AutoWeightsLoader")
SRC_LAYER = "vllm/model_executor/models/llama_eagle3.py (qwen3_eagle3.py): *DecoderLayer.__init__"
SRC_MODEL = "vllm/model_executor/models/llama_eagle3.py (qwen3_eagle3.py): *Model.__init__"
SRC_ARCH = ("vllm/transformers_utils/configs/eagle.py: EAGLEConfig.__init__; "
            "vllm/model_executor/models/registry.py")
SRC_AUX = ("vllm/v1/worker/gpu_model_runner.py: _get_eagle3_aux_layers_from_config; "
           "vllm/model_executor/models/llama.py: LlamaModel.forward")
SRC_VOCAB = ("vllm/model_executor/models/llama_eagle3.py: Eagle3LlamaForCausalLM.__init__, "
             "compute_logits")
SRC_EMBED = "vllm/v1/spec_decode/llm_base_proposer.py: _maybe_share_embeddings"
SRC_METHOD = "vllm/config/speculative.py: SpeculativeConfig.__post_init__ (method detection)"

_INT_DTYPES = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "U16": "<u2",
               "U32": "<u4", "U64": "<u8", "BOOL": "?"}


# --- shapes ------------------------------------------------------------------------------------


def config_dims(cfg: dict[str, Any]) -> dict[str, int]:
    """The sizes a decoder layer's tensors follow, from a Llama/Qwen3-style config."""
    try:
        hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return {
            "hidden": hidden, "heads": heads,
            "kv_heads": int(cfg.get("num_key_value_heads") or heads),
            "head_dim": int(cfg.get("head_dim") or hidden // heads),
            "intermediate": int(cfg["intermediate_size"]),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise DspecError(f"config lacks a valid {e} (a Llama/Qwen3-style config is needed)",
                         "fix config.json") from None


def layer_shapes(d: dict[str, int], prefix: str, in_dim: int,
                 qk_norm: bool) -> dict[str, tuple[int, ...]]:
    """One decoder layer's weights (``in_dim``: the attention input, 2 x hidden in a head's
    first layer); ``qk_norm`` adds Qwen3's per-head norms."""
    h, hd, i = d["hidden"], d["head_dim"], d["intermediate"]
    out = {
        f"{prefix}self_attn.q_proj.weight": (d["heads"] * hd, in_dim),
        f"{prefix}self_attn.k_proj.weight": (d["kv_heads"] * hd, in_dim),
        f"{prefix}self_attn.v_proj.weight": (d["kv_heads"] * hd, in_dim),
        f"{prefix}self_attn.o_proj.weight": (h, d["heads"] * hd),
        f"{prefix}mlp.gate_proj.weight": (i, h),
        f"{prefix}mlp.up_proj.weight": (i, h),
        f"{prefix}mlp.down_proj.weight": (h, i),
        f"{prefix}hidden_norm.weight": (h,),
        f"{prefix}input_layernorm.weight": (h,),
        f"{prefix}post_attention_layernorm.weight": (h,),
    }
    if qk_norm:
        out[f"{prefix}self_attn.q_norm.weight"] = (hd,)
        out[f"{prefix}self_attn.k_norm.weight"] = (hd,)
    return out


def head_shapes(d: dict[str, int], *, n_aux: int, target_hidden: int, draft_vocab: int,
                layer_prefix: str, qk_norm: bool) -> dict[str, tuple[int, ...]]:
    """Every weight of a one-layer EAGLE-3 head except embed_tokens and the vocab maps."""
    h = d["hidden"]
    return {
        "fc.weight": (h, n_aux * target_hidden),
        **layer_shapes(d, layer_prefix, 2 * h, qk_norm),
        "norm.weight": (h,),
        "lm_head.weight": (draft_vocab, h),
    }


# --- small readers -----------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict; a missing or broken one is a DspecError."""
    return read_json_object(path, fix="point at a model directory with config.json")


def read_int_values(t: st.StoredTensor) -> list[int]:
    """A small integer or bool tensor's values (the vocab maps; never a weight)."""
    import numpy as np

    if t.dtype not in _INT_DTYPES:
        raise DspecError(f"tensor {t.name} is {t.dtype}, not an integer tensor",
                         "store the vocab maps as integers (d2t int64, t2d bool)")
    with open(t.path, "rb") as f:
        f.seek(t.offset)
        raw = f.read(t.nbytes)
    return np.frombuffer(raw, dtype=_INT_DTYPES[t.dtype]).astype(np.int64).tolist()


def layer_id_list(value: Any) -> list[int] | None:
    """``value`` as a non-empty list of layer ids (ints), or None where it is not one."""
    if not isinstance(value, list | tuple) or not value:
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return None
    return list(value)


def vocab_targets(d2t: list[int]) -> list[int]:
    """The target id of each draft id: draft_id + d2t[draft_id]."""
    return [i + off for i, off in enumerate(d2t)]


# --- check -------------------------------------------------------------------------------------


def check_vllm_eagle3(export_dir: str | Path, target: str | Path | None = None) -> CheckReport:
    """Apply vLLM's EAGLE-3 loading rules to an export (and, given the target, its fit to it)."""
    export_dir = Path(export_dir)
    report = CheckReport(path=export_dir, format="eagle3")
    try:
        cfg = read_config(export_dir / "config.json")
    except DspecError as e:
        report.add("config", False, str(e), SRC_MODEL)
        return report
    tcfg = None
    if target is not None:
        try:
            tcfg = read_config(Path(target) / "config.json")
        except DspecError as e:
            report.add("target", False, str(e))
    arch_family = _check_config(report, cfg, tcfg)
    _check_manifest(report, export_dir)
    try:
        tensors = st.read_dir(export_dir)
    except DspecError as e:
        report.add("weights", False, str(e), SRC_LOADER)
        return report
    report.add("weights", bool(tensors), f"{len(tensors)} tensors" if tensors
               else "no *.safetensors weights", SRC_LOADER)
    if tensors and arch_family is not None:
        _check_tensors(report, cfg, tcfg, tensors, arch_family)
    return report


def _check_config(report: CheckReport, cfg: dict[str, Any],
                  tcfg: dict[str, Any] | None) -> str | None:
    archs = list(cfg.get("architectures") or [])
    family = VLLM_ARCHITECTURES.get(archs[0]) if archs else None
    report.add("architecture", family is not None,
               f"architectures {archs}" + ("" if family else
               f": vLLM loads EAGLE-3 heads as {', '.join(VLLM_ARCHITECTURES)} (another name is "
               "prefixed with Eagle3 and then not found)"), SRC_ARCH)
    if family == "qwen3" and cfg.get("model_type") != "qwen3":
        report.add("model_type", False, f"model_type {cfg.get('model_type')!r} with a Qwen3 "
                   "EAGLE-3 head: vLLM builds the layer from a Qwen3 config", SRC_LAYER)

    need = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "num_hidden_layers", "rms_norm_eps", "vocab_size", "max_position_embeddings",
            "draft_vocab_size", "target_hidden_size")
    absent = [k for k in need if cfg.get(k) is None]
    report.add("config_keys", not absent, f"missing {', '.join(absent)}" if absent
               else "every key the head is built from is present", SRC_MODEL)
    report.add("norm_before_residual", isinstance(cfg.get("norm_before_residual"), bool),
               f"norm_before_residual = {cfg.get('norm_before_residual')!r} (must be written "
               "explicitly: it decides whether the residual is taken before hidden_norm)",
               SRC_LAYER)
    if absent:
        return None

    ids = layer_id_list(cfg.get("eagle_aux_hidden_state_layer_ids"))
    problems = []
    if ids is None:
        problems.append("eagle_aux_hidden_state_layer_ids is not a non-empty list of ints "
                        "(vLLM would use its default layers, which the head was not trained on)")
    else:
        if any(b <= a for a, b in zip(ids, ids[1:])):
            problems.append(f"{ids} is not strictly increasing (vLLM collects each layer once, "
                            "in order)")
        n = cfg.get("num_aux_hidden_states")
        if n is not None and n != len(ids):
            problems.append(f"num_aux_hidden_states {n} != {len(ids)} ids")
        nested = (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if nested is not None and list(nested) != ids:
            problems.append(f"eagle_config names other layers ({nested})")
        if n is None and nested is None and len(ids) != 3:
            problems.append(f"{len(ids)} ids but neither num_aux_hidden_states nor eagle_config "
                            "says so: vLLM 0.32's Llama head then sizes fc for 3")
    report.add("aux_layer_ids", not problems, "; ".join(problems) or f"layers {ids}", SRC_AUX)

    v, dv = cfg.get("vocab_size"), cfg.get("draft_vocab_size")
    report.add("draft_vocab_size", isinstance(dv, int) and isinstance(v, int) and 0 < dv <= v,
               f"draft_vocab_size {dv}, vocab_size {v}", SRC_VOCAB)

    if tcfg is not None:
        t_layers = int(tcfg.get("num_hidden_layers") or 0)
        out = [x for x in ids or [] if not 0 <= x <= t_layers]
        report.add("aux_layer_range", not out,
                   f"ids {out} are outside [0, {t_layers}] (the target has {t_layers} layers; "
                   "an id past them is never collected)" if out
                   else f"ids within the target's {t_layers} layers", SRC_AUX)
        th, tv = tcfg.get("hidden_size"), tcfg.get("vocab_size")
        report.add("target_hidden_size", cfg.get("target_hidden_size") == th,
                   f"target_hidden_size {cfg.get('target_hidden_size')}, the target's hidden "
                   f"size {th}", SRC_MODEL)
        report.add("vocab_size", v == tv, f"vocab_size {v}, the target's {tv} (drafted ids are "
                   "target ids)", SRC_VOCAB)
    return family


def _check_manifest(report: CheckReport, export_dir: Path) -> None:
    path = export_dir / "deepspec.json"
    if not path.is_file():
        return
    try:
        method = json.loads(path.read_text()).get("method")
    except (OSError, ValueError, AttributeError):
        method = None
    report.add("method", method == "eagle3",
               f"deepspec.json says method {method!r}; it must say eagle3 (vLLM guesses "
               "draft_model from a path without 'eagle3' in it)", SRC_METHOD)


def _check_tensors(report: CheckReport, cfg: dict[str, Any], tcfg: dict[str, Any] | None,
                   tensors: dict[str, st.StoredTensor], family: str) -> None:
    try:
        d = config_dims(cfg)
    except DspecError as e:
        report.add("tensor_shapes", False, str(e), SRC_LAYER)
        return
    ids = layer_id_list(cfg.get("eagle_aux_hidden_state_layer_ids")) or [0, 0, 0]
    n_aux = int(cfg.get("num_aux_hidden_states") or len(ids))
    vocab, draft_vocab = int(cfg["vocab_size"]), int(cfg["draft_vocab_size"])
    prefix = MIDLAYER if any(n.startswith(MIDLAYER) for n in tensors) else "layers.0."
    expected = head_shapes(d, n_aux=n_aux, target_hidden=int(cfg["target_hidden_size"]),
                            draft_vocab=draft_vocab, layer_prefix=prefix,
                            qk_norm=family == "qwen3")
    n_layers = int(cfg.get("num_hidden_layers") or 1)
    for i in range(1, n_layers):  # later layers read the hidden state only
        expected.update(layer_shapes(d, f"layers.{i}.", d["hidden"], family == "qwen3"))
    optional = {"embed_tokens.weight": (vocab, d["hidden"]),
                **{f"layers.{i}.hidden_norm.weight": (d["hidden"],) for i in range(1, n_layers)}}
    reduced = draft_vocab < vocab
    if reduced:
        expected["d2t"] = (draft_vocab,)
    optional["t2d"] = (vocab,)

    missing = sorted(set(expected) - set(tensors))
    report.add("tensors_present", not missing, f"missing {', '.join(missing)}" if missing
               else f"{len(expected)} tensors the head needs", SRC_LOADER)
    unknown = sorted(set(tensors) - set(expected) - set(optional) - {"d2t"})  # d2t: own rule
    report.add("tensors_known", not unknown,
               f"no parameter for {', '.join(unknown)} (the loader raises on unknown names)"
               if unknown else "every tensor has a parameter", SRC_LOADER)
    shapes = {**expected, **optional}
    wrong = [f"{n} {list(t.shape)} != {list(shapes[n])}" for n, t in sorted(tensors.items())
             if n in shapes and t.shape != shapes[n]]
    report.add("tensor_shapes", not wrong, "; ".join(wrong) or "every shape fits the config",
               f"{SRC_LAYER}; {SRC_MODEL}")
    weights = [n for n in tensors if n not in ("d2t", "t2d")]
    not_float = [f"{n} ({tensors[n].dtype})" for n in weights
                 if tensors[n].dtype not in st.FLOAT_DTYPES]
    report.add("weight_dtypes", not not_float, "not floating point: " + ", ".join(not_float)
               if not_float else "floating point", SRC_LOADER)

    d2t = tensors.get("d2t")
    if reduced:
        ok, msg = d2t is not None, "d2t is missing"
        if d2t is not None:
            ok = d2t.dtype == "I64" and d2t.shape == (draft_vocab,)
            msg = f"d2t {d2t.dtype}{list(d2t.shape)}, expected I64[{draft_vocab}]"
            if ok:
                targets = vocab_targets(read_int_values(d2t))
                ok = all(0 <= t < vocab for t in targets) and len(set(targets)) == len(targets)
                msg = ("maps the draft vocabulary to distinct target ids" if ok else
                       f"draft_id + d2t[draft_id] leaves [0, {vocab}) or repeats ids")
        report.add("d2t", ok, msg, SRC_VOCAB)
    else:
        report.add("d2t", d2t is None, "a full-size head has no d2t parameter in vLLM"
                   if d2t is not None else "full vocabulary: no d2t needed", SRC_VOCAB)

    if tcfg is not None and "embed_tokens.weight" not in tensors:
        th = tcfg.get("hidden_size")
        report.add("embed_tokens", th == d["hidden"],
                   f"no embed_tokens: the target's is shared, which needs equal hidden sizes "
                   f"(head {d['hidden']}, target {th})", SRC_EMBED)
