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

vLLM's layout is described, and checked, in :mod:`deepspec_plugin.exporters.eagle3_rules`.

The conversion, streamed tensor by tensor (:mod:`deepspec_plugin.exporters.safetensors_io`):
``layers.0.*`` → ``midlayer.*``; ``embed_tokens`` dropped where it equals the target's (vLLM
shares the target's), kept otherwise; ``d2t`` written as int64, ``t2d`` dropped;
``target_layer_ids`` L → ``eagle_aux_hidden_state_layer_ids`` L + 1; ``Qwen3Eagle3Model`` →
``Eagle3Qwen3ForCausalLM`` (a head with q/k norms) or ``Eagle3LlamaForCausalLM`` (without);
``norm_before_residual: false``.
A DeepSpec head with more than one layer is refused: each of its layers reads the embeddings,
vLLM's layers after the first do not. (vLLM itself shifts DFlash's ``target_layer_ids`` by one the
same way: ``_get_eagle3_aux_layers_from_config``.)

The meaning of the conversion is proved, not only its shapes: tests/eagle3_builders.py builds an
oracle head whose proposals are known in advance; converted right, vLLM 0.32 accepts 0.86 tokens
per draft with it on the tiny target, with the aux ids not shifted 0.60, with
``norm_before_residual`` true 0.003 (tests/test_export_eagle3.py). The real load of an export in
vLLM (greedy output with the head equal to that without it) is
:mod:`deepspec_plugin.exporters.eagle3_load`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.eagle3_rules import (
    MIDLAYER,
    VLLM_LLAMA_ARCH,
    VLLM_QWEN3_ARCH,
    config_dims,
    head_shapes,
    layer_id_list,
    read_config,
    read_int_values,
    vocab_targets,
)

DEEPSPEC_ARCHITECTURES = ("Qwen3Eagle3Model",)
# DeepSpec's training-only config keys: vLLM reads none of them.
DEEPSPEC_ONLY_KEYS = ("target_layer_ids", "num_target_layers", "ttt_length", "step_loss_decay",
                      "draft_num_hidden_layers", "target_model_name_or_path",
                      "_attn_implementation", "attn_implementation", "_name_or_path", "auto_map")
DROPPABLE = ("rotary_emb.inv_freq",)  # buffers some savers write; no loader wants them

_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


def _target_embedding(target: Path) -> st.StoredTensor | None:
    try:
        tensors = st.read_dir(target)
    except DspecError:
        return None
    return tensors.get("model.embed_tokens.weight")


# --- detection ---------------------------------------------------------------------------------


def is_deepspec_eagle3(draft_dir: str | Path) -> bool:
    """True for a checkpoint in DeepSpec's EAGLE-3 layout (config and tensor names; no weights
    are read)."""
    draft_dir = Path(draft_dir)
    try:
        cfg = read_config(draft_dir / "config.json")
    except DspecError:
        return False
    if layer_id_list(cfg.get("target_layer_ids")) is None:
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
    dcfg = read_config(draft / "config.json")
    tcfg = read_config(target / "config.json")
    archs = list(dcfg.get("architectures") or [])
    if any(a.startswith("Gemma4") for a in archs):
        raise DspecError(f"{draft} is a DeepSpec Gemma4 EAGLE-3 head ({', '.join(archs)}); vLLM "
                         "0.32 has no Gemma4 EAGLE-3 model", "export a Qwen3-style head")
    layer_ids = layer_id_list(dcfg.get("target_layer_ids"))
    if layer_ids is None:
        raise DspecError(f"{draft}/config.json has no target_layer_ids list, so it is not a "
                         "DeepSpec EAGLE-3 checkpoint",
                         "point --draft at a DeepSpec EAGLE-3 checkpoint (step_* directory)")
    if not list(draft.glob("*.safetensors")):
        from deepspec_plugin.tensorfiles import refuse_missing_weights

        refuse_missing_weights(draft)
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

    d, td = config_dims(dcfg), config_dims(tcfg)
    vocab = int(tcfg.get("vocab_size") or 0)
    if int(dcfg.get("vocab_size") or 0) != vocab:
        raise DspecError(f"{draft} has vocab_size {dcfg.get('vocab_size')}, the target {vocab}",
                         fix_target)
    # DeepSpec's heads cover the whole vocabulary; a reduced one says so (config or d2t).
    draft_vocab = int(dcfg.get("draft_vocab_size") or
                      (tensors["d2t"].shape[0] if "d2t" in tensors and tensors["d2t"].shape
                       else vocab))
    qk_norm = "layers.0.self_attn.q_norm.weight" in tensors
    expected = head_shapes(d, n_aux=len(layer_ids), target_hidden=td["hidden"],
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


def draft_vocabulary(tensors: dict[str, st.StoredTensor], draft: Path, draft_vocab: int,
                     vocab: int) -> list[int]:
    """The target id of each draft id (``draft_id + d2t[draft_id]``), after checking d2t, and t2d
    against it: distinct target ids in [0, vocab); a full vocabulary only as the identity (vLLM
    keeps no map for a full-size head). A reduced head without d2t gives [] (refused as missing
    by the caller)."""
    d2t_t, t2d_t = tensors.get("d2t"), tensors.get("t2d")
    fix = "rebuild the vocab maps from the draft vocabulary the head was trained with"
    if d2t_t is None:
        return list(range(vocab)) if draft_vocab == vocab else []
    if d2t_t.shape != (draft_vocab,):
        raise DspecError(f"{draft}: d2t is {list(d2t_t.shape)}, expected [{draft_vocab}] "
                         "(one entry per draft token)", fix)
    d2t = read_int_values(d2t_t)
    targets = vocab_targets(d2t)
    if any(not 0 <= t < vocab for t in targets) or len(set(targets)) != len(targets):
        raise DspecError(f"{draft}: d2t does not map the {draft_vocab} draft tokens to "
                         f"distinct target ids in [0, {vocab}) as draft_id + d2t[draft_id]",
                         fix + " (d2t holds offsets, not target ids)")
    if t2d_t is not None:
        t2d = read_int_values(t2d_t)
        if len(t2d) != vocab or {i for i, v in enumerate(t2d) if v} != set(targets):
            raise DspecError(f"{draft}: t2d and d2t name different draft vocabularies", fix)
    if draft_vocab == vocab and any(d2t):
        raise DspecError(f"{draft}: d2t permutes a full vocabulary, which vLLM cannot "
                         "load (it keeps no map for a full-size head)",
                         "reorder lm_head's rows to target order and drop d2t")
    return targets


def _plan_vocab_maps(tensors: dict[str, st.StoredTensor], draft: Path, draft_vocab: int,
                     vocab: int, plan: list[st.Planned], *, keep_t2d: bool = False) -> list[str]:
    """Validate d2t (and t2d against it); plan d2t as int64 where the head's vocab is reduced
    (a full-size head's d2t, the identity, is dropped: vLLM has no parameter for it); t2d is
    planned as it is with ``keep_t2d``, else dropped (vLLM skips it)."""
    notes = []
    draft_vocabulary(tensors, draft, draft_vocab, vocab)
    d2t_t, t2d_t = tensors.get("d2t"), tensors.get("t2d")
    if d2t_t is not None:
        if draft_vocab == vocab:
            notes.append("d2t dropped: the head covers the whole vocabulary (vLLM has no map "
                         "for a full-size head)")
        elif d2t_t.dtype == "I64":
            plan.append(st.renamed(d2t_t, "d2t"))
        else:
            import numpy as np

            raw = np.asarray(read_int_values(d2t_t), dtype="<i8").tobytes()
            plan.append(st.Planned("d2t", "I64", (draft_vocab,), data=raw))
            notes.append(f"d2t converted from {d2t_t.dtype} to I64 (vLLM's draft_id_to_target_id "
                         "is int64)")
        if draft_vocab < vocab:
            notes.append(f"draft vocabulary of {draft_vocab} of the target's {vocab} tokens: d2t "
                         "kept (target_id = draft_id + d2t[draft_id])")
    if t2d_t is not None and keep_t2d:
        plan.append(st.renamed(t2d_t, "t2d"))
        notes.append("t2d kept as trained (vLLM skips it; load_head reads it)")
    elif t2d_t is not None:
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
