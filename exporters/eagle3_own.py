"""EAGLE-3 heads already in vLLM's layout (the project's own): checked against the target, copied.

`dspec train --draft-type eagle3` writes its head with
:func:`deepspec_plugin.models.eagle3.write_head`, in exactly the layout vLLM 0.32's
``Eagle3LlamaForCausalLM`` loads (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t`` int64,
``t2d`` bool, no ``embed_tokens``; ids in vLLM's convention), so the export changes nothing it
does not have to. What it checks first, because vLLM would not (or only with an unhelpful error
deep in its worker):

* the target: vocabulary, hidden size, and the aux layer ids within its layers ([0, L]: id i is
  the hidden state entering layer i, L the last layer's output);
* every tensor a one-layer head needs, with the shapes its config implies (``fc`` as wide as
  ``n_aux`` target hidden states), nothing vLLM has no parameter for, floating-point weights;
* the vocab maps (``d2t`` offsets to distinct target ids, ``t2d`` naming the same tokens), and
  that the draft vocabulary holds the target's stop tokens
  (:func:`deepspec_plugin.bench.run.stop_token_ids`): a head that cannot propose EOS never
  drafts the end of a response, and that costs at the end of every answer.

The weights: ``t2d`` stays (vLLM skips it; :func:`deepspec_plugin.models.eagle3.load_head`
reads it), so a reduced head's ``model.safetensors`` is copied byte for byte. A full-vocabulary
head's ``d2t`` (the identity, which ``write_head`` always saves) is dropped: vLLM has no
parameter for it and refuses the checkpoint. The config is the head's, with the aux ids written
in every place a vLLM version reads them and the target's special token ids.

Also accepts an earlier export (any vLLM-layout EAGLE-3 head: Llama- or Qwen3-style).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.eagle3 import _plan_vocab_maps, _refuse, draft_vocabulary
from deepspec_plugin.exporters.eagle3_rules import (
    MIDLAYER,
    VLLM_ARCHITECTURES,
    config_dims,
    head_shapes,
    layer_id_list,
    read_config,
)

WEIGHTS = "model.safetensors"
OPTIONAL = ("embed_tokens.weight",)  # a head with its own embedding keeps it
FIX_TARGET = "export with the target the head was trained for (--target)"
FIX_RESAVE = ("re-save the whole head (dspec train writes every tensor); a partial or foreign "
              "checkpoint cannot be exported")


def aux_layer_ids(cfg: dict[str, Any], where: Path) -> list[int]:
    """The head's aux ids, from wherever its config has them (top level or ``eagle_config``);
    two different lists, or a count that disagrees, are refused (vLLM versions read different
    ones)."""
    top = layer_id_list(cfg.get("eagle_aux_hidden_state_layer_ids"))
    nested = layer_id_list((cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids"))
    ids = top or nested
    fix = "rewrite the head's config.json with one list of the layers it was trained on"
    if ids is None:
        raise DspecError(f"{where}/config.json names no eagle_aux_hidden_state_layer_ids, so "
                         "vLLM would feed the head layers it was not trained on", fix)
    if top and nested and top != nested:
        raise DspecError(f"{where}/config.json names two aux layer lists ({top} and eagle_config's "
                         f"{nested})", fix)
    n = cfg.get("num_aux_hidden_states")
    if n is not None and n != len(ids):
        raise DspecError(f"{where}/config.json: num_aux_hidden_states {n} but {len(ids)} aux "
                         f"layer ids {ids}", fix)
    return ids


def check_fits_target(cfg: dict[str, Any], tcfg: dict[str, Any], ids: list[int],
                      where: Path) -> None:
    """Vocabulary, hidden size and aux layer ids against the target's config."""
    vocab, hidden = int(tcfg.get("vocab_size") or 0), int(tcfg.get("hidden_size") or 0)
    if int(cfg.get("vocab_size") or 0) != vocab:
        raise DspecError(f"{where} has vocab_size {cfg.get('vocab_size')}, the target {vocab}",
                         FIX_TARGET)
    th = int(cfg.get("target_hidden_size") or cfg.get("hidden_size") or 0)
    if th != hidden:
        raise DspecError(f"{where} was built for a target of hidden size {th}; the target's is "
                         f"{hidden}", FIX_TARGET)
    layers = int(tcfg.get("num_hidden_layers") or 0)
    bad = [i for i in ids if not 0 <= i <= layers]
    _refuse([f"{i} is not in [0, {layers}]" for i in bad],
            f"aux layer ids {ids} of {where} do not fit the target's {layers} layers", FIX_TARGET)
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise DspecError(f"aux layer ids {ids} of {where} are not strictly increasing (vLLM "
                         "collects hidden states in layer order, once each)",
                         "rewrite them in the order the head was trained with")


def check_stop_tokens(targets: list[int], target: Path, where: Path) -> None:
    """The draft vocabulary must hold every stop token of the target."""
    from deepspec_plugin.bench.run import stop_token_ids
    from deepspec_plugin.models import load_tokenizer

    missing = sorted(set(stop_token_ids(load_tokenizer(target), target)) - set(targets))
    if missing:
        raise DspecError(f"the draft vocabulary of {where} lacks the target's stop token(s) "
                         f"{missing}: the head could never propose the end of a response",
                         "retrain the head for this target (dspec train keeps the stop tokens "
                         "in the draft vocabulary), or " + FIX_TARGET)


def _expected(cfg: dict[str, Any], tensors: dict[str, st.StoredTensor], ids: list[int],
              family: str, where: Path) -> dict[str, tuple[int, ...]]:
    n_layers = int(cfg.get("num_hidden_layers") or 1)
    if n_layers != 1:
        raise DspecError(f"{where} has {n_layers} decoder layers; this export copies one-layer "
                         "heads (what dspec train writes, and what vLLM's EAGLE-3 heads are "
                         "trained as)", "export a one-layer head")
    prefix = MIDLAYER if any(n.startswith(MIDLAYER) for n in tensors) else "layers.0."
    return head_shapes(config_dims(cfg), n_aux=len(ids),
                       target_hidden=int(cfg.get("target_hidden_size") or cfg["hidden_size"]),
                       draft_vocab=int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
                       layer_prefix=prefix, qk_norm=family == "qwen3")


def check_tensors(tensors: dict[str, st.StoredTensor], expected: dict[str, tuple[int, ...]],
                  *, reduced: bool, hidden: int, vocab: int, where: Path) -> None:
    """Every tensor present, known, of its shape, floating point (the vocab maps: integers)."""
    missing = sorted(set(expected) - set(tensors)) + (["d2t"] if reduced and "d2t" not in tensors
                                                      else [])
    _refuse(missing, f"{where} lacks tensors an EAGLE-3 head needs", FIX_RESAVE)
    known = set(expected) | set(OPTIONAL) | {"d2t", "t2d"}
    _refuse(sorted(set(tensors) - known), f"{where} has tensors vLLM's EAGLE-3 loader has no "
            "place for", "export a head in vLLM's EAGLE-3 layout (dspec train writes one)")
    shapes = {**expected, "embed_tokens.weight": (vocab, hidden)}
    _refuse([f"{n} is {list(tensors[n].shape)}, expected {list(s)}" for n, s in shapes.items()
             if n in tensors and tensors[n].shape != s],
            f"{where} does not match its own config", FIX_RESAVE)
    _refuse([f"{n} ({t.dtype})" for n, t in tensors.items()
             if n in shapes and t.dtype not in st.FLOAT_DTYPES],
            f"{where} has weights that are not floating point",
            "re-save the head in float32, bfloat16 or float16 (quantised heads are not exported)")


def vllm_config(cfg: dict[str, Any], tcfg: dict[str, Any], ids: list[int]) -> tuple[dict, list]:
    """The head's config as vLLM reads it, and what was changed, in words."""
    notes = []
    config = {k: v for k, v in cfg.items() if k != "_name_or_path"}
    if not isinstance(cfg.get("norm_before_residual"), bool):
        notes.append("norm_before_residual written as false (vLLM's reading of a config without "
                     "it; the speculators path would read true)")
    config.update(
        eagle_aux_hidden_state_layer_ids=list(ids), num_aux_hidden_states=len(ids),
        eagle_config={**(cfg.get("eagle_config") or {}),
                      "eagle_aux_hidden_state_layer_ids": list(ids), "use_aux_hidden_state": True},
        norm_before_residual=bool(cfg.get("norm_before_residual", False)),
        tie_word_embeddings=False, vocab_size=int(tcfg["vocab_size"]),
    )
    config["max_position_embeddings"] = max(int(config.get("max_position_embeddings") or 0),
                                            int(tcfg.get("max_position_embeddings") or 0))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in tcfg and config.get(key) != tcfg[key]:
            config[key] = tcfg[key]
            notes.append(f"{key} written as the target's {tcfg[key]!r}")
    return config, notes


def copy_vllm_eagle3(draft: str | Path, target: str | Path, stage: str | Path) -> list[str]:
    """Check the vLLM-layout head ``draft`` against ``target``, then write its
    ``model.safetensors`` and ``config.json`` into ``stage`` (an existing staging directory);
    returns what was changed, in words. Nothing is written before every check passed."""
    import json

    draft, target, stage = Path(draft), Path(target), Path(stage)
    cfg, tcfg = read_config(draft / "config.json"), read_config(target / "config.json")
    archs = list(cfg.get("architectures") or [])
    family = VLLM_ARCHITECTURES.get(archs[0]) if archs else None
    if family is None:
        raise DspecError(f"{draft} has architectures {archs}; vLLM loads EAGLE-3 heads as "
                         f"{', '.join(VLLM_ARCHITECTURES)}",
                         "point --draft at a head written by dspec train --draft-type eagle3")
    ids = aux_layer_ids(cfg, draft)
    check_fits_target(cfg, tcfg, ids, draft)
    if not list(draft.glob("*.safetensors")):
        from deepspec_plugin.tensorfiles import refuse_missing_weights

        refuse_missing_weights(draft)
    tensors = st.read_dir(draft)
    vocab = int(tcfg["vocab_size"])
    draft_vocab = int(cfg.get("draft_vocab_size") or vocab)
    if not 0 < draft_vocab <= vocab:
        raise DspecError(f"{draft}: draft_vocab_size {draft_vocab} is not in [1, {vocab}]",
                         FIX_TARGET)
    expected = _expected(cfg, tensors, ids, family, draft)
    check_tensors(tensors, expected, reduced=draft_vocab < vocab,
                  hidden=config_dims(cfg)["hidden"], vocab=vocab, where=draft)
    check_stop_tokens(draft_vocabulary(tensors, draft, draft_vocab, vocab), target, draft)

    names = sorted(set(expected) | (set(OPTIONAL) & set(tensors)))
    plan = [st.renamed(tensors[n], n) for n in names]
    notes = _plan_vocab_maps(tensors, draft, draft_vocab, vocab, plan, keep_t2d=True)
    # In the source's order: where nothing changes, write_or_copy copies the file whole.
    plan.sort(key=lambda p: (p.source is None, str(p.source.path) if p.source else "",
                             p.source.offset if p.source else 0))
    config, config_notes = vllm_config(cfg, tcfg, ids)
    copied = st.unchanged_file(plan) is not None
    st.write_or_copy(stage / WEIGHTS, plan, metadata={"format": "pt"})
    (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ([f"{WEIGHTS} copied byte for byte (already vLLM's EAGLE-3 layout)" if copied else
             f"{WEIGHTS} rewritten with the tensors vLLM loads"] + notes + config_notes
            + [f"aux layer ids {ids} kept as they are (vLLM's convention: id i is the hidden "
               "state entering target layer i)"])
