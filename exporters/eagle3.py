"""EAGLE-3 heads from DeepSpec's layout into the layout vLLM's EAGLE-3 loader reads.

DeepSpec's layout (read in deepseek-ai/DeepSpec at afdfa7c: ``deepspec/modeling/eagle3/qwen3/``
``modeling.py`` and ``config.py``, ``deepspec/modeling/eagle3/common.py``,
``deepspec/trainer/ckpt_manager.py``). The trainer saves ``Qwen3Eagle3Model`` with
``save_pretrained``: safetensors named after the module tree, no prefix::

    embed_tokens.weight            [V, H]     copied from the target and frozen
    fc.weight                      [H, n*H]   n = len(target_layer_ids) (DeepSpec v1: n = 5)
    layers.{i}.self_attn.{q,k,v}_proj.weight  [heads*hd, 2H]  every layer sees [embeds, hidden]
    layers.{i}.self_attn.o_proj.weight        [H, heads*hd]
    layers.{i}.self_attn.{q,k}_norm.weight    [hd]            Qwen3's per-head norms
    layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.{hidden_norm,input_layernorm,post_attention_layernorm}.weight  [H]
    norm.weight [H], lm_head.weight [V, H]    (the head, too, copied from the target and frozen)

Its config.json is a deep copy of the target's config with ``architectures: ["Qwen3Eagle3Model"]``,
``num_hidden_layers`` = ``draft_num_hidden_layers``, and ``target_layer_ids``,
``num_target_layers``, ``ttt_length``, ``step_loss_decay``, ``target_model_name_or_path``.
``target_layer_ids`` are decoder-layer outputs: id L is ``hidden_states[L + 1]`` of transformers'
``output_hidden_states`` (the raw output of layer L). The residual is taken before ``hidden_norm``.
DeepSpec v1 trains full-vocabulary heads; a reduced head here follows SpecForge's and EAGLE's
convention: ``draft_vocab_size`` in the config, ``lm_head.weight`` [Vd, H], ``d2t`` [Vd] with
target_id = draft_id + d2t[draft_id] and ``t2d`` [V] bool.

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

The conversion, streamed tensor by tensor (:mod:`deepspec_plugin.exporters.safetensors_io`):
``layers.0.*`` → ``midlayer.*``; ``embed_tokens`` dropped where it equals the target's (vLLM shares
the target's), kept otherwise; ``d2t`` written as int64, ``t2d`` dropped; ``target_layer_ids`` L →
``eagle_aux_hidden_state_layer_ids`` L + 1; ``Qwen3Eagle3Model`` → ``Eagle3Qwen3ForCausalLM``
(a head with q/k norms) or ``Eagle3LlamaForCausalLM`` (without); ``norm_before_residual: false``.
A DeepSpec head with more than one layer is refused: each of its layers reads the embeddings,
vLLM's layers after the first do not. (vLLM itself shifts DFlash's ``target_layer_ids`` by one the
same way: ``_get_eagle3_aux_layers_from_config``.)

The meaning of the conversion is proved, not only its shapes: :func:`build_oracle_eagle3` builds a
head whose proposals are known in advance; converted right, vLLM 0.32 accepts 0.86 tokens per draft
with it on the tiny target, with the aux ids not shifted 0.60, with ``norm_before_residual`` true
0.003 (tests/test_export_eagle3.py). :func:`vllm_load_eagle3` is the real load of ``dspec export
check``: vLLM decodes greedily with the head and without it, and the outputs must be equal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.findings import CheckReport

DEEPSPEC_ARCHITECTURES = ("Qwen3Eagle3Model",)
VLLM_LLAMA_ARCH = "Eagle3LlamaForCausalLM"
VLLM_QWEN3_ARCH = "Eagle3Qwen3ForCausalLM"
# Names vLLM 0.32's registry maps to its EAGLE-3 heads (llama_eagle3 / qwen3_eagle3).
VLLM_ARCHITECTURES = {
    "Eagle3LlamaForCausalLM": "llama", "LlamaForCausalLMEagle3": "llama",
    "Eagle3Qwen3ForCausalLM": "qwen3",
}
# DeepSpec's training-only config keys: vLLM reads none of them.
DEEPSPEC_ONLY_KEYS = ("target_layer_ids", "num_target_layers", "ttt_length", "step_loss_decay",
                      "draft_num_hidden_layers", "target_model_name_or_path",
                      "_attn_implementation", "attn_implementation", "_name_or_path", "auto_map")
MIDLAYER = "midlayer."
DROPPABLE = ("rotary_emb.inv_freq",)  # buffers some savers write; no loader wants them

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
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


# --- shapes ------------------------------------------------------------------------------------


def _dims(cfg: dict[str, Any]) -> dict[str, int]:
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


def _layer_shapes(d: dict[str, int], prefix: str, in_dim: int,
                  qk_norm: bool) -> dict[str, tuple[int, ...]]:
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


def _head_shapes(d: dict[str, int], *, n_aux: int, target_hidden: int, draft_vocab: int,
                 layer_prefix: str, qk_norm: bool) -> dict[str, tuple[int, ...]]:
    """Every weight of a one-layer EAGLE-3 head except embed_tokens and the vocab maps."""
    h = d["hidden"]
    return {
        "fc.weight": (h, n_aux * target_hidden),
        **_layer_shapes(d, layer_prefix, 2 * h, qk_norm),
        "norm.weight": (h,),
        "lm_head.weight": (draft_vocab, h),
    }


# --- small readers -----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DspecError(f"{path} is missing", "point at a model directory with config.json") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DspecError(f"{path} is not valid JSON ({e})", "restore or rebuild the file") \
            from None
    if not isinstance(data, dict):
        raise DspecError(f"{path} is not a JSON object", "restore or rebuild the file")
    return data


def _read_ints(t: st.StoredTensor) -> list[int]:
    """A small integer or bool tensor's values (the vocab maps; never a weight)."""
    import numpy as np

    if t.dtype not in _INT_DTYPES:
        raise DspecError(f"tensor {t.name} is {t.dtype}, not an integer tensor",
                         "store the vocab maps as integers (d2t int64, t2d bool)")
    with open(t.path, "rb") as f:
        f.seek(t.offset)
        raw = f.read(t.nbytes)
    return np.frombuffer(raw, dtype=_INT_DTYPES[t.dtype]).astype(np.int64).tolist()




def _target_embedding(target: Path) -> st.StoredTensor | None:
    try:
        tensors = st.read_dir(target)
    except DspecError:
        return None
    return tensors.get("model.embed_tokens.weight")


def _layer_ids(value: Any) -> list[int] | None:
    if not isinstance(value, list | tuple) or not value:
        return None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return None
    return list(value)


def _vocab_targets(d2t: list[int]) -> list[int]:
    return [i + off for i, off in enumerate(d2t)]


# --- detection ---------------------------------------------------------------------------------


def is_deepspec_eagle3(draft_dir: str | Path) -> bool:
    """True for a checkpoint in DeepSpec's EAGLE-3 layout (config and tensor names; no weights
    are read)."""
    draft_dir = Path(draft_dir)
    try:
        cfg = _read_json(draft_dir / "config.json")
    except DspecError:
        return False
    if _layer_ids(cfg.get("target_layer_ids")) is None:
        return False
    if any(a in DEEPSPEC_ARCHITECTURES for a in cfg.get("architectures") or []):
        return True
    try:
        names = st.read_dir(draft_dir)
    except DspecError:
        return False
    return "fc.weight" in names and "layers.0.hidden_norm.weight" in names


# --- conversion --------------------------------------------------------------------------------


def _refuse(problems: list[str], what: str, fix: str) -> None:
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more"
                                           if len(problems) > 6 else "")
        raise DspecError(f"{what}: {shown}", fix)


def write_vllm_eagle3(draft: str | Path, target: str | Path, stage: str | Path) -> list[str]:
    """Write vLLM's ``model.safetensors`` and ``config.json`` for a DeepSpec EAGLE-3 head into
    ``stage`` (an existing staging directory); returns what was changed, in words.

    Everything is validated against the target before a byte is written: the tensors a head needs,
    their shapes (hidden size, vocabulary, fc width), the target layer ids, the vocab maps.
    """
    draft, target, stage = Path(draft), Path(target), Path(stage)
    dcfg = _read_json(draft / "config.json")
    tcfg = _read_json(target / "config.json")
    archs = list(dcfg.get("architectures") or [])
    if any(a.startswith("Gemma4") for a in archs):
        raise DspecError(f"{draft} is a DeepSpec Gemma4 EAGLE-3 head ({', '.join(archs)}); vLLM "
                         "0.32 has no Gemma4 EAGLE-3 model", "export a Qwen3-style head")
    layer_ids = _layer_ids(dcfg.get("target_layer_ids"))
    if layer_ids is None:
        raise DspecError(f"{draft}/config.json has no target_layer_ids list, so it is not a "
                         "DeepSpec EAGLE-3 checkpoint",
                         "point --draft at a DeepSpec EAGLE-3 checkpoint (step_* directory)")
    if not list(draft.glob("*.safetensors")):
        from deepspec_plugin.models import _refuse_missing_weights

        _refuse_missing_weights(draft)
    tensors = st.read_dir(draft)
    fix_target = "export with the target the draft was trained for (--target)"

    # Layers: vLLM's layers after the first take no embeddings; DeepSpec's all do.
    layers = sorted({int(m.group(1)) for n in tensors if (m := _LAYER_RE.match(n))})
    n_layers = int(dcfg.get("num_hidden_layers") or 0)
    if layers != [0] or n_layers != 1:
        raise DspecError(
            f"{draft} has {max(n_layers, len(layers))} decoder layers (num_hidden_layers "
            f"{n_layers}, tensors for layers {layers}); vLLM's EAGLE-3 head feeds the embeddings "
            "only into its first layer, DeepSpec's into every layer",
            "train the head with draft_num_hidden_layers=1 (DeepSpec's default)")
    if dcfg.get("attention_bias") or any(n.endswith(".bias") for n in tensors):
        raise DspecError(f"{draft} has attention biases; vLLM's Qwen3 EAGLE-3 layer has no "
                         "o_proj bias", "train the head without attention_bias")

    # Target layer ids: DeepSpec's layer outputs, in range and increasing.
    t_layers = int(tcfg.get("num_hidden_layers") or 0)
    bad = [x for x in layer_ids if not 0 <= x < t_layers]
    _refuse([f"{x} is not in [0, {t_layers - 1}]" for x in bad],
            f"target_layer_ids {layer_ids} of {draft} do not fit the target's {t_layers} layers",
            fix_target)
    if any(b <= a for a, b in zip(layer_ids, layer_ids[1:])):
        raise DspecError(f"target_layer_ids {layer_ids} of {draft} are not strictly increasing "
                         "(vLLM collects hidden states in layer order, once each)",
                         "fix target_layer_ids in the draft's config.json to the order it was "
                         "trained with")

    d, td = _dims(dcfg), _dims(tcfg)
    vocab = int(tcfg.get("vocab_size") or 0)
    if int(dcfg.get("vocab_size") or 0) != vocab:
        raise DspecError(f"{draft} has vocab_size {dcfg.get('vocab_size')}, the target {vocab}",
                         fix_target)
    # DeepSpec's heads cover the whole vocabulary; a reduced one says so (config or d2t).
    draft_vocab = int(dcfg.get("draft_vocab_size") or
                      (tensors["d2t"].shape[0] if "d2t" in tensors and tensors["d2t"].shape
                       else vocab))
    qk_norm = "layers.0.self_attn.q_norm.weight" in tensors
    expected = _head_shapes(d, n_aux=len(layer_ids), target_hidden=td["hidden"],
                            draft_vocab=draft_vocab, layer_prefix="layers.0.", qk_norm=qk_norm)
    expected_opt = {"embed_tokens.weight": (vocab, d["hidden"])}
    reduced = draft_vocab < vocab
    if draft_vocab > vocab:
        raise DspecError(f"{draft}: draft_vocab_size {draft_vocab} exceeds the target's "
                         f"vocabulary {vocab}", fix_target)

    missing = sorted(set(expected) - set(tensors))
    if reduced and "d2t" not in tensors:
        missing.append("d2t")
    _refuse(missing, f"{draft} lacks tensors an EAGLE-3 head needs",
            "re-save the whole head (DeepSpec's save_pretrained writes every tensor); a partial "
            "checkpoint cannot be exported")
    known = set(expected) | set(expected_opt) | {"d2t", "t2d"}
    unknown = sorted(n for n in tensors if n not in known and not n.endswith(DROPPABLE))
    _refuse(unknown, f"{draft} has tensors vLLM's EAGLE-3 loader has no place for",
            "this is not a Qwen3Eagle3Model-style head; export it with the tool that trained it")
    wrong = [f"{n} is {list(tensors[n].shape)}, expected {list(shape)}"
             for n, shape in {**expected, **expected_opt}.items()
             if n in tensors and tensors[n].shape != shape]
    _refuse(wrong, f"{draft} does not fit the target {target} (hidden size {td['hidden']}, "
            f"vocabulary {vocab}, {len(layer_ids)} target layers)", fix_target)
    not_float = [f"{n} ({t.dtype})" for n, t in tensors.items()
                 if (n in expected or n in expected_opt) and t.dtype not in st.FLOAT_DTYPES]
    _refuse(not_float, f"{draft} has weights that are not floating point",
            "re-save the head in float32, bfloat16 or float16 (quantised heads are not exported)")

    notes: list[str] = []
    plan: list[st.Planned] = []
    embed = tensors.get("embed_tokens.weight")
    if embed is not None:
        t_embed = _target_embedding(target)
        if t_embed is not None and st.same_bytes(embed, t_embed):
            notes.append("embed_tokens dropped: identical to the target's, and vLLM shares the "
                         "target's embedding with the head")
        else:
            plan.append(st.renamed(embed, "embed_tokens.weight"))
            notes.append("embed_tokens kept: it differs from the target's (or the target's could "
                         "not be compared), so vLLM gives the head its own")
    plan.append(st.renamed(tensors["fc.weight"], "fc.weight"))
    layer_names = sorted(n for n in expected if n.startswith("layers.0."))
    plan += [st.renamed(tensors[n], MIDLAYER + n[len("layers.0."):]) for n in layer_names]
    notes.append("renamed layers.0.* to midlayer.* (vLLM's name for the head's one layer)")
    plan.append(st.renamed(tensors["norm.weight"], "norm.weight"))
    plan.append(st.renamed(tensors["lm_head.weight"], "lm_head.weight"))
    notes += _plan_vocab_maps(tensors, draft, draft_vocab, vocab, plan)
    dropped = sorted(n for n in tensors if n.endswith(DROPPABLE))
    if dropped:
        notes.append(f"dropped {', '.join(dropped)} (recomputed by every loader)")

    aux_ids = [x + 1 for x in layer_ids]
    notes.append(f"target_layer_ids {layer_ids} (outputs of those target layers) written as "
                 f"eagle_aux_hidden_state_layer_ids {aux_ids} (vLLM's id i is the hidden state "
                 "entering layer i)")
    arch = VLLM_QWEN3_ARCH if qk_norm else VLLM_LLAMA_ARCH
    notes.append(f"architectures {archs or '(none)'} written as [{arch}] "
                 f"({'qwen3' if qk_norm else 'llama'}_eagle3.py"
                 f"{': the head has q/k norms' if qk_norm else ''})")
    config = _vllm_config(dcfg, tcfg, arch=arch, aux_ids=aux_ids, draft_vocab=draft_vocab,
                          target_hidden=td["hidden"], qk_norm=qk_norm)
    notes.append("norm_before_residual written as false (DeepSpec takes the residual before "
                 "hidden_norm)")

    st.write_safetensors(stage / "model.safetensors", plan, metadata={"format": "pt"})
    (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return notes


def _plan_vocab_maps(tensors: dict[str, st.StoredTensor], draft: Path, draft_vocab: int,
                     vocab: int, plan: list[st.Planned]) -> list[str]:
    """Validate d2t (and t2d against it); plan d2t as int64 where the head's vocab is reduced."""
    notes = []
    d2t_t, t2d_t = tensors.get("d2t"), tensors.get("t2d")
    fix = "rebuild the vocab maps from the draft vocabulary the head was trained with"
    if d2t_t is not None:
        if d2t_t.shape != (draft_vocab,):
            raise DspecError(f"{draft}: d2t is {list(d2t_t.shape)}, expected [{draft_vocab}] "
                             "(one entry per draft token)", fix)
        d2t = _read_ints(d2t_t)
        targets = _vocab_targets(d2t)
        if any(not 0 <= t < vocab for t in targets) or len(set(targets)) != len(targets):
            raise DspecError(f"{draft}: d2t does not map the {draft_vocab} draft tokens to "
                             f"distinct target ids in [0, {vocab}) as draft_id + d2t[draft_id]",
                             fix + " (d2t holds offsets, not target ids)")
        if t2d_t is not None:
            t2d = _read_ints(t2d_t)
            if len(t2d) != vocab or {i for i, v in enumerate(t2d) if v} != set(targets):
                raise DspecError(f"{draft}: t2d and d2t name different draft vocabularies", fix)
        if draft_vocab == vocab:
            if any(d2t):
                raise DspecError(f"{draft}: d2t permutes a full vocabulary, which vLLM cannot "
                                 "load (it keeps no map for a full-size head)",
                                 "reorder lm_head's rows to target order and drop d2t")
            notes.append("d2t dropped: the head covers the whole vocabulary (vLLM has no map "
                         "for a full-size head)")
        elif d2t_t.dtype == "I64":
            plan.append(st.renamed(d2t_t, "d2t"))
        else:
            import numpy as np

            raw = np.asarray(d2t, dtype="<i8").tobytes()
            plan.append(st.Planned("d2t", "I64", (draft_vocab,), data=raw))
            notes.append(f"d2t converted from {d2t_t.dtype} to I64 (vLLM's draft_id_to_target_id "
                         "is int64)")
        if draft_vocab < vocab:
            notes.append(f"draft vocabulary of {draft_vocab} of the target's {vocab} tokens: d2t "
                         "kept (target_id = draft_id + d2t[draft_id])")
    if t2d_t is not None:
        notes.append("t2d dropped (vLLM skips it)")
    return notes


def _vllm_config(dcfg: dict[str, Any], tcfg: dict[str, Any], *, arch: str, aux_ids: list[int],
                 draft_vocab: int, target_hidden: int, qk_norm: bool) -> dict[str, Any]:
    config = {k: v for k, v in dcfg.items() if k not in DEEPSPEC_ONLY_KEYS}
    config.update(
        architectures=[arch],
        model_type="qwen3" if qk_norm else "llama",
        num_hidden_layers=1,
        layer_types=["full_attention"],
        vocab_size=int(tcfg["vocab_size"]),
        draft_vocab_size=int(draft_vocab),
        target_hidden_size=int(target_hidden),
        eagle_aux_hidden_state_layer_ids=list(aux_ids),
        num_aux_hidden_states=len(aux_ids),
        # Older and newer readers look here; 0.32's Llama head reads num_aux_hidden_states first.
        eagle_config={"eagle_aux_hidden_state_layer_ids": list(aux_ids),
                      "use_aux_hidden_state": True},
        norm_before_residual=False,
        norm_before_fc=False,
        tie_word_embeddings=False,
    )
    config["max_position_embeddings"] = max(int(config.get("max_position_embeddings") or 0),
                                            int(tcfg.get("max_position_embeddings") or 0))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in tcfg:
            config[key] = tcfg[key]
    return config


# --- check -------------------------------------------------------------------------------------


def check_vllm_eagle3(export_dir: str | Path, target: str | Path | None = None) -> CheckReport:
    """Apply vLLM's EAGLE-3 loading rules to an export (and, given the target, its fit to it)."""
    export_dir = Path(export_dir)
    report = CheckReport(path=export_dir, format="eagle3")
    try:
        cfg = _read_json(export_dir / "config.json")
    except DspecError as e:
        report.add("config", False, str(e), SRC_MODEL)
        return report
    tcfg = None
    if target is not None:
        try:
            tcfg = _read_json(Path(target) / "config.json")
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

    ids = _layer_ids(cfg.get("eagle_aux_hidden_state_layer_ids"))
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
        d = _dims(cfg)
    except DspecError as e:
        report.add("tensor_shapes", False, str(e), SRC_LAYER)
        return
    ids = _layer_ids(cfg.get("eagle_aux_hidden_state_layer_ids")) or [0, 0, 0]
    n_aux = int(cfg.get("num_aux_hidden_states") or len(ids))
    vocab, draft_vocab = int(cfg["vocab_size"]), int(cfg["draft_vocab_size"])
    prefix = MIDLAYER if any(n.startswith(MIDLAYER) for n in tensors) else "layers.0."
    expected = _head_shapes(d, n_aux=n_aux, target_hidden=int(cfg["target_hidden_size"]),
                            draft_vocab=draft_vocab, layer_prefix=prefix,
                            qk_norm=family == "qwen3")
    n_layers = int(cfg.get("num_hidden_layers") or 1)
    for i in range(1, n_layers):  # later layers read the hidden state only
        expected.update(_layer_shapes(d, f"layers.{i}.", d["hidden"], family == "qwen3"))
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
                targets = _vocab_targets(_read_ints(d2t))
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


# --- tiny test checkpoints in DeepSpec's layout ---------------------------------------------------


def _default_layer_ids(num_layers: int) -> list[int]:
    """Up to 5 evenly spaced layers, never the last (DeepSpec's evaluator refuses it)."""
    top = max(num_layers - 2, 0)
    n = max(1, min(5, num_layers - 1))
    return sorted({round(i * top / max(n - 1, 1)) for i in range(n)})


def build_deepspec_eagle3(target: str | Path, out: str | Path, *,
                          draft_vocab_size: int | None = None,
                          target_layer_ids: list[int] | None = None, qk_norm: bool = True,
                          seed: int = 0) -> Path:
    """A tiny random EAGLE-3 head in DeepSpec's layout for ``target`` (a test stand-in: its
    weights are random, not trained).

    Sized from the target's config: hidden size, heads, intermediate size. ``embed_tokens`` and
    ``lm_head`` are the target's, as DeepSpec initialises and freezes them (with
    ``draft_vocab_size``, the head keeps the rows of a fixed random subset that includes the
    special tokens, and ``d2t``/``t2d`` describe it). ``target_layer_ids`` default to up to 5
    evenly spaced layers (DeepSpec itself requires exactly 5; a 4-layer target has fewer to give).
    ``qk_norm=False`` leaves out Qwen3's per-head norms (a Llama-style head). Writes
    ``config.json``, ``model.safetensors``, the target's tokenizer files and ``deepspec.json``.
    """
    import torch

    target, out = Path(target), Path(out)
    tcfg = _read_json(target / "config.json")
    d = _dims(tcfg)
    vocab, t_layers = int(tcfg["vocab_size"]), int(tcfg["num_hidden_layers"])
    ids = list(target_layer_ids) if target_layer_ids is not None else _default_layer_ids(t_layers)
    embed, lm_head = _target_tensors(target, "model.embed_tokens.weight", "lm_head.weight")

    gen = torch.Generator().manual_seed(seed)
    dtype = embed.dtype

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    def norm(n: int) -> torch.Tensor:  # near the RMSNorm init of ones, distinct bytes per tensor
        return (1.0 + torch.randn(n, generator=gen) * 0.05).to(dtype)

    state: dict[str, torch.Tensor] = {"embed_tokens.weight": embed.clone(),
                                      "fc.weight": rand(d["hidden"], len(ids) * d["hidden"])}
    for name, shape in _layer_shapes(d, "layers.0.", 2 * d["hidden"], qk_norm).items():
        state[name] = norm(shape[0]) if len(shape) == 1 else rand(*shape)
    state["norm.weight"] = norm(d["hidden"])
    config = _deepspec_config(tcfg, target, ids)
    if draft_vocab_size is not None and draft_vocab_size < vocab:
        keep = _draft_vocabulary(tcfg, vocab, int(draft_vocab_size), gen)
        state.update(_reduced_head(lm_head[keep], keep, vocab))
        config["draft_vocab_size"] = int(draft_vocab_size)
    else:
        state["lm_head.weight"] = lm_head.clone()
    return _save_deepspec_head(target, out, state, config,
                               {"stand_in": "random weights from deepspec_plugin.exporters.eagle3."
                                            "build_deepspec_eagle3, not trained", "seed": seed})


def _target_tensors(target: Path, *names: str) -> list[Any]:
    """Tensors of the target, read from its safetensors as stored (bytes and dtype)."""
    from safetensors import safe_open

    tensors = st.read_dir(target)
    out = []
    for name in names:
        if name not in tensors:
            raise DspecError(f"{target} has no {name}", "use an untied Llama-like target")
        with safe_open(str(tensors[name].path), "pt") as f:
            out.append(f.get_tensor(name))
    return out


def _deepspec_config(tcfg: dict[str, Any], target: Path, ids: list[int]) -> dict[str, Any]:
    """A DeepSpec head's config.json: the target's, with the keys DeepSpec's trainer adds."""
    config = {k: v for k, v in tcfg.items() if k not in ("_name_or_path", "transformers_version")}
    config.update(architectures=list(DEEPSPEC_ARCHITECTURES),
                  num_target_layers=int(tcfg["num_hidden_layers"]), num_hidden_layers=1,
                  layer_types=["full_attention"], target_model_name_or_path=str(target),
                  target_layer_ids=list(ids), ttt_length=7, step_loss_decay=0.8,
                  draft_num_hidden_layers=1, tie_word_embeddings=False)
    return config


def _reduced_head(rows, target_ids, vocab: int) -> dict[str, Any]:
    """lm_head, d2t and t2d of a reduced head whose draft token i (lm_head row ``rows[i]``)
    stands for target token ``target_ids[i]`` (d2t holds offsets: target = draft + d2t)."""
    import torch

    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target_ids] = True
    return {"lm_head.weight": rows.clone(),
            "d2t": target_ids - torch.arange(len(target_ids), dtype=torch.int64),
            "t2d": t2d}


def _save_deepspec_head(target: Path, out: Path, state: dict[str, Any], config: dict[str, Any],
                        training: dict[str, Any]) -> Path:
    """Write a head in DeepSpec's layout (weights, config, the target's tokenizer, manifest)
    atomically into ``out``."""
    from safetensors.torch import save_file

    from deepspec_plugin.manifest import DraftManifest, write_manifest
    from deepspec_plugin.models import _atomic_dir, fingerprint, tokenizer_fingerprint
    from deepspec_plugin.exporters.output import copy_tokenizer_files

    with _atomic_dir(out) as tmp:
        save_file({k: state[k].contiguous() for k in sorted(state)},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(target, tmp)
        manifest = DraftManifest(
            target_fingerprint=fingerprint(target),
            tokenizer_fingerprint=tokenizer_fingerprint(target), method="eagle3",
            extra={"training": {"framework": "deepspec", "architecture": "Qwen3Eagle3Model",
                                **training}},
        )
        write_manifest(manifest, tmp / "deepspec.json")
    return out


def _draft_vocabulary(tcfg: dict[str, Any], vocab: int, size: int, gen) -> Any:
    """Sorted target ids of a reduced draft vocabulary: the special tokens, then random ids."""
    import torch

    special = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = tcfg.get(key)
        special.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
    if size < len(special) or size < 1:
        raise DspecError(f"draft_vocab_size {size} cannot hold the {len(special)} special tokens",
                         "choose a larger draft_vocab_size")
    rest = [i for i in torch.randperm(vocab, generator=gen).tolist() if i not in special]
    return torch.tensor(sorted([*special, *rest[: size - len(special)]]), dtype=torch.int64)


# --- an oracle head: proposals known in advance, so acceptance proves the conversion's meaning ---


def greedy_continuations(target: str | Path, prompts: list[list[int]],
                         max_new_tokens: int) -> list[list[int]]:
    """The target's greedy continuation of each prompt in transformers (float32; EOS does not
    stop it, as with vLLM's ``ignore_eos``)."""
    import torch

    from deepspec_plugin.models import load_causal_lm

    model = load_causal_lm(Path(target))
    out = []
    with torch.no_grad():
        for ids in prompts:
            step = model(torch.tensor([ids]), use_cache=True)
            new: list[int] = []
            for _ in range(max_new_tokens):
                new.append(int(step.logits[0, -1].argmax()))
                if len(new) < max_new_tokens:
                    step = model(torch.tensor([new[-1:]]), past_key_values=step.past_key_values,
                                 use_cache=True)
            out.append(new)
    return out


def successor_map(prompts: list[list[int]], continuations: list[list[int]]) -> dict[int, int]:
    """Token a → the token the target most often emits right after a in these greedy
    continuations (from each prompt's last token on), one-to-one: where two tokens would share a
    successor, the more frequent one keeps it (a linear head can only permute its outputs)."""
    from collections import Counter, defaultdict

    counts: dict[int, Counter] = defaultdict(Counter)
    for ids, new in zip(prompts, continuations):
        seq = [ids[-1], *new]
        for a, b in zip(seq, seq[1:]):
            counts[a][b] += 1
    out: dict[int, int] = {}
    taken: set[int] = set()
    for a in sorted(counts, key=lambda a: (-sum(counts[a].values()), a)):
        b = max(counts[a], key=lambda b: (counts[a][b], -b))
        if b not in taken:
            out[a] = b
            taken.add(b)
    return out


def build_oracle_eagle3(target: str | Path, out: str | Path, prompts: list[list[int]],
                        max_new_tokens: int, *, reduced_vocabulary: bool = False,
                        qk_norm: bool = True, seed: int = 0) -> Path:
    """An EAGLE-3 head in DeepSpec's layout whose proposals are known in advance (a test oracle:
    its weights are constructed, not trained), for a target whose head and draft hidden sizes
    are equal.

    Construction, and why it works in DeepSpec's semantics and in vLLM's (llama_eagle3.py /
    qwen3_eagle3.py ``*DecoderLayer.forward`` and ``*Model.forward``, read in vllm 0.32):

    * ``target_layer_ids`` end with the target's last layer (id L-1, its raw output, which is
      what DeepSpec's target cache stores and what vLLM's aux id L is); ``fc`` is the identity on
      that layer's block and zero elsewhere, so the head's input state is the target's own final
      pre-norm hidden state at the position (only if the ids are mapped right);
    * the layer's ``o_proj`` and ``down_proj`` are zero: attention and MLP add nothing, and the
      layer's output is its residual, which DeepSpec takes before ``hidden_norm`` (vLLM:
      ``norm_before_residual: false``); ``hidden_norm`` is random ±1, so a head run with the
      residual taken after it predicts noise;
    * ``norm`` is the target's final norm and ``lm_head`` the target's, with its rows permuted by
      :func:`successor_map` of the target's greedy continuations of ``prompts``: where the
      target's next token is a, the head proposes the token the target emitted after a.

    After the target emitted token a at position p+1, the head reads the target's state at p
    (which predicts a) and proposes successor(a), the target's token at p+2 wherever the
    continuation repeats its own transitions (a tiny random target loops a lot). Later draft
    positions reuse that state, so they repeat the first proposal (accepted only where the
    target repeats a token). ``reduced_vocabulary`` keeps only the tokens the map covers:
    lm_head rows of those tokens, ``d2t`` pointing each at its successor (so the head also proves
    d2t's offset meaning).
    """
    import torch

    target, out = Path(target), Path(out)
    tcfg = _read_json(target / "config.json")
    d = _dims(tcfg)
    vocab, t_layers, h = int(tcfg["vocab_size"]), int(tcfg["num_hidden_layers"]), d["hidden"]
    ids = sorted(set(_default_layer_ids(t_layers)) | {t_layers - 1})
    successor = successor_map(prompts, greedy_continuations(target, prompts, max_new_tokens))
    embed, lm_head, final_norm = _target_tensors(target, "model.embed_tokens.weight",
                                                 "lm_head.weight", "model.norm.weight")
    dtype = embed.dtype
    gen = torch.Generator().manual_seed(seed)

    fc = torch.zeros(h, len(ids) * h, dtype=dtype)
    fc[:, -h:] = torch.eye(h, dtype=dtype)  # the last id's block: the target's final state
    state: dict[str, Any] = {"embed_tokens.weight": embed.clone(), "fc.weight": fc,
                             "norm.weight": final_norm.clone()}
    for name, shape in _layer_shapes(d, "layers.0.", 2 * h, qk_norm).items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = torch.zeros(shape, dtype=dtype)
        elif name.endswith("hidden_norm.weight"):
            state[name] = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype)
        elif len(shape) == 1:
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            state[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    config = _deepspec_config(tcfg, target, ids)
    if reduced_vocabulary:
        sources = sorted(successor)
        state.update(_reduced_head(lm_head[sources],
                                   torch.tensor([successor[a] for a in sources]), vocab))
        config["draft_vocab_size"] = len(sources)
    else:
        rows = torch.empty_like(lm_head)
        rows[torch.tensor(_permutation(successor, vocab))] = lm_head  # row succ(a) = row a
        state["lm_head.weight"] = rows
    return _save_deepspec_head(target, out, state, config, {
        "stand_in": "oracle weights from deepspec_plugin.exporters.eagle3.build_oracle_eagle3, not trained",
        "seed": seed, "oracle": {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
                                 "mapped_tokens": len(successor)}})


def _permutation(partial: dict[int, int], size: int) -> list[int]:
    """A permutation p of range(size) with p[a] = partial[a]; the other tokens in order."""
    free_targets = iter(sorted(set(range(size)) - set(partial.values())))
    return [partial[a] if a in partial else next(free_targets) for a in range(size)]


# --- a real load in vLLM -----------------------------------------------------------------------

VLLM_SCRIPT = r'''
"""Greedy generation in vLLM's offline LLM: the target alone, then with each EAGLE-3 head.

Written out and run by deepspec_plugin.exporters.eagle3.run_vllm_eagle3 (vLLM spawns processes and wants its
caller's main module guarded, so it never runs inside the caller). Usage: SPEC.json RESULT.json.
"""
import gc
import json
import sys
from itertools import zip_longest

NAMES = {"vllm:spec_decode_num_drafts": "num_drafts",
         "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
         "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens"}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def counters(llm):
    """vLLM's spec-decode counters, summed over label sets."""
    from vllm.v1.metrics.reader import Counter, Vector

    out = {name: 0 for name in NAMES.values()}
    per_pos = []
    for m in llm.get_metrics():
        if isinstance(m, Counter) and m.name in NAMES:
            out[NAMES[m.name]] += int(m.value)
        elif isinstance(m, Vector) and m.name == PER_POS:
            per_pos = [a + int(b) for a, b in zip_longest(per_pos, m.values, fillvalue=0)]
    out["accepted_per_position"] = per_pos
    return out


def since(after, before):
    out = {k: after[k] - before[k] for k in NAMES.values()}
    out["accepted_per_position"] = [a - b for a, b in zip_longest(
        after["accepted_per_position"], before["accepted_per_position"], fillvalue=0)]
    return out


if __name__ == "__main__":
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    common = dict(model=spec["target"], tokenizer=spec["target"], dtype="float32",
                  enforce_eager=True, max_model_len=spec["max_model_len"], max_num_seqs=4,
                  seed=0, generation_config="vllm", enable_prefix_caching=False,
                  disable_log_stats=False)
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_new_tokens"],
                            ignore_eos=True, detokenize=False)
    inputs = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    result = {"vllm": vllm.__version__, "plain": None, "heads": {}}
    for head in ([None] if spec["plain"] else []) + spec["heads"]:
        extra = {} if head is None else {"speculative_config": {
            "method": "eagle3", "model": head, "num_speculative_tokens": spec["k"]}}
        llm = LLM(**common, **extra)
        before = counters(llm)  # the metrics registry lives as long as the process
        outputs = llm.generate(inputs, params, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        if head is None:
            result["plain"] = tokens
        else:
            result["heads"][head] = {"tokens": tokens, "counts": since(counters(llm), before)}
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:
            pass
        del llm
        gc.collect()
        with open(sys.argv[2], "w") as f:
            json.dump(result, f)
'''

LOAD_START_S = 240  # one LLM start on a busy CPU takes about a minute; room for a slow machine


def eagle3_prompt_ids(target: str | Path, num_prompts: int) -> list[list[int]]:
    """The first user turns of the packaged mt-bench prompts as token ids (through the target's
    chat template where its tokenizer has one)."""
    from deepspec_plugin.bench.prompts import format_turns, has_chat_template, load_prompt_file
    from deepspec_plugin.bench.spec import PROMPTS_DIR
    from deepspec_plugin.models import load_tokenizer

    tok = load_tokenizer(Path(target))
    turns = load_prompt_file(PROMPTS_DIR / "mt-bench.jsonl")[:num_prompts]
    return [format_turns(tok, t[:1], [], has_chat_template(tok)) for t in turns]


def run_vllm_eagle3(target: str | Path, heads: list[str | Path], prompts: list[list[int]],
                    k: int, max_new_tokens: int, *, plain: bool = True,
                    timeout_s: float | None = None) -> dict[str, Any]:
    """Greedy generation in vLLM's offline LLM (one subprocess in its own session, killed by
    process group at the end): the target alone (``plain``), then with each head in turn.

    Returns ``{"vllm": version, "plain": token ids per prompt or None, "heads": {str(head):
    {"tokens", "counts": num_drafts, num_draft_tokens, num_accepted_tokens,
    accepted_per_position}}, "log": vLLM's log}``. Raises DspecError with the log's tail where
    vLLM fails or runs past ``timeout_s``.
    """
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    heads = [str(Path(h)) for h in heads]
    runs = len(heads) + int(plain)
    timeout_s = timeout_s or 120 + LOAD_START_S * runs
    need = max(len(p) for p in prompts) + max_new_tokens + k + 16
    max_model_len = max(256, need)
    with tempfile.TemporaryDirectory(prefix="dspec-eagle3-") as tmp:
        tmp = Path(tmp)
        (tmp / "run_vllm.py").write_text(VLLM_SCRIPT)
        (tmp / "spec.json").write_text(json.dumps({
            "target": str(target), "heads": heads, "prompts": prompts, "k": int(k),
            "max_new_tokens": int(max_new_tokens), "plain": plain,
            "max_model_len": max_model_len}))
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CACHE_ROOT", str(tmp / "vllm-cache"))
        log_path, result_path = tmp / "vllm.log", tmp / "result.json"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([sys.executable, str(tmp / "run_vllm.py"),
                                     str(tmp / "spec.json"), str(result_path)],
                                    stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own group: vLLM's children too
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        text = log_path.read_text(errors="replace")
        tail = "\n".join(text.splitlines()[-25:])
        if rc != 0 or not result_path.is_file():
            what = (f"ran past {timeout_s:.0f} s" if rc is None else f"exited with status {rc}")
            raise DspecError(f"vLLM {what} loading or running the EAGLE-3 head "
                             f"({', '.join(heads) or 'no head'}) with the target {target}; "
                             f"last lines of its log:\n{tail}\n",
                             "read the log above: a head vLLM cannot build fails here with "
                             "the reason")
        result = json.loads(result_path.read_text())
    result["log"] = text
    return result


def vllm_load_eagle3(export_dir: Path, target: Path, k: int, *, num_prompts: int = 2,
                     max_new_tokens: int = 16) -> dict[str, Any]:
    """Load an EAGLE-3 export in vLLM with its target and decode greedily with it and without it.

    Returns ``{"equal": speculative tokens == plain tokens for every prompt, "counts":
    {"num_drafts", "num_draft_tokens", "num_accepted_tokens"} (vLLM's metrics), "summary": one
    line}``. No reference engine runs EAGLE-3, so the check is that vLLM builds the head, drafts
    with it and leaves greedy output unchanged (acceptance is reported, not judged).
    """
    export_dir, target = Path(export_dir), Path(target)
    prompts = eagle3_prompt_ids(target, num_prompts)
    result = run_vllm_eagle3(target, [export_dir], prompts, k, max_new_tokens)
    run = result["heads"][str(export_dir)]
    counts = {key: int(run["counts"][key])
              for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    differ = [i for i, (a, b) in enumerate(zip(run["tokens"], result["plain"])) if a != b]
    equal = not differ and len(run["tokens"]) == len(result["plain"])
    summary = (f"vLLM {result['vllm']} loaded the EAGLE-3 head: "
               f"{counts['num_accepted_tokens']}/{counts['num_draft_tokens']} draft tokens "
               f"accepted over {counts['num_drafts']} drafts (k={k}, {len(prompts)} prompts, "
               "greedy); ")
    summary += ("output identical to plain decoding" if equal else
                f"output differs from plain decoding on prompt(s) {differ}: speculation changed "
                "greedy tokens, so vLLM ran the head or its verification wrongly")
    return {"equal": equal, "counts": counts, "summary": summary}
