"""Loading models (safetensors only, never the hub) and checking that a pair can speculate."""

from __future__ import annotations

from pathlib import Path

from deepspec_plugin.errors import DspecError
from deepspec_plugin.fileio import read_json
from deepspec_plugin.models.files import require_causal_lm, require_model_dir
from deepspec_plugin.models.tokenizer import first_tokenizer_difference, tokenizer_fingerprint
from deepspec_plugin.tensorfiles import refuse_missing_weights, safetensors_files


def load_causal_lm(path: Path, device: str = "cpu", dtype: str = "float32"):
    """Load a causal LM from safetensors only, in eval mode with gradients off."""
    path = Path(path)
    require_model_dir(path)
    config = read_json(path / "config.json")
    require_causal_lm(path, config)
    if not safetensors_files(path):
        refuse_missing_weights(path)
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise DspecError(f"unknown dtype {dtype!r}", "use float32, bfloat16 or float16")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per model load is noise in a CLI and in logs
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, use_safetensors=True, local_files_only=True
        )
    except Exception as e:  # noqa: BLE001 - whatever the reader says, the checkpoint is unusable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DspecError(
            f"cannot load the model in {path}: {type(e).__name__}: {reason}",
            "the checkpoint is corrupt or incomplete: rebuild or re-copy it",
        ) from e
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def check_pair(target: Path, draft: Path) -> None:
    """Refuse a draft that cannot speculate for `target`: other vocab or tokenizer, not an LM
    (an EAGLE-3 head: `check_head_pair`)."""
    from deepspec_plugin.models.files import head_kind, is_eagle3_dir

    target, draft = Path(target), Path(draft)
    for d in (target, draft):
        require_model_dir(d)
    tcfg, dcfg = read_json(target / "config.json"), read_json(draft / "config.json")
    require_causal_lm(target, tcfg)
    if is_eagle3_dir(draft):
        check_head_pair(target, tcfg, draft, dcfg)
        return
    if head_kind(dcfg) is not None:
        check_head_draft_pair(target, tcfg, draft, dcfg)
        return
    require_causal_lm(draft, dcfg)
    tv, dv = tcfg.get("vocab_size"), dcfg.get("vocab_size")
    if tv != dv:
        raise DspecError(
            f"vocab sizes differ: target {target} has {tv}, draft {draft} has {dv}",
            "build the draft from the target (dspec models draft-init) so they share a vocabulary",
        )
    if tokenizer_fingerprint(target) != tokenizer_fingerprint(draft):
        raise DspecError(
            f"tokenizers differ between target {target} and draft {draft}: "
            + first_tokenizer_difference(target, draft),
            "copy the target's tokenizer files into the draft directory",
        )


def check_head_pair(target: Path, tcfg: dict, head: Path, hcfg: dict) -> None:
    """Refuse an EAGLE-3 head built for another target: its sizes, its layer ids, and the
    target fingerprint its manifest records (when it has one)."""
    fix = "use the target the head was trained for, or train a head for this one"
    for key, target_key in (("vocab_size", "vocab_size"), ("target_hidden_size", "hidden_size")):
        if hcfg.get(key) != tcfg.get(target_key):
            raise DspecError(f"the EAGLE-3 head {head} has {key} {hcfg.get(key)}, the target "
                             f"{target} has {target_key} {tcfg.get(target_key)}", fix)
    ids = hcfg.get("eagle_aux_hidden_state_layer_ids") or []
    layers = int(tcfg.get("num_hidden_layers") or 0)
    bad = [i for i in ids if not 1 <= int(i) <= layers]
    if bad:
        raise DspecError(f"the EAGLE-3 head {head} reads target layers {ids}, but the target "
                         f"{target} has {layers} layers", fix)
    check_recorded_target(target, head, "EAGLE-3 head")


def check_head_draft_pair(target: Path, tcfg: dict, draft: Path, dcfg: dict) -> None:
    """Refuse a Medusa or MLP-speculator draft built for another target: vocabulary, hidden
    size, and the target fingerprint its manifest records (when it has one)."""
    from deepspec_plugin.models.files import MEDUSA, head_kind

    kind = head_kind(dcfg)
    hidden_key = "hidden_size" if kind == MEDUSA else "emb_dim"
    for key, target_key in (("vocab_size", "vocab_size"), (hidden_key, "hidden_size")):
        if dcfg.get(key) != tcfg.get(target_key):
            raise DspecError(f"the {kind} draft {draft} has {key} {dcfg.get(key)}, the target "
                             f"{target} has {target_key} {tcfg.get(target_key)}",
                             "use the target the draft was trained for, or train one for this")
    check_recorded_target(target, draft, f"{kind} draft")


def check_recorded_target(target: Path, draft: Path, what: str) -> None:
    """Refuse a draft whose manifest (when it has one) names another target's fingerprint."""
    from deepspec_plugin.manifest import FILENAME, read_manifest
    from deepspec_plugin.models.fingerprint import fingerprint

    if (draft / FILENAME).is_file():
        recorded = read_manifest(draft / FILENAME).target_fingerprint
        if recorded != fingerprint(target):
            raise DspecError(f"the {what} {draft} was trained for another target "
                             f"({recorded[:19]}...), not {target}",
                             "use the target it was trained for, or train one for this target")
