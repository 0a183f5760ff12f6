"""A draft cut from its target: the embeddings, the first N decoder layers, final norm and head."""

from __future__ import annotations

import re
from pathlib import Path

from deepspec_plugin.errors import DspecError
from deepspec_plugin.fileio import atomic_dir, read_json, write_json
from deepspec_plugin.models.files import (
    LLAMA_LIKE_MODEL_TYPES,
    architectures,
    copy_tokenizer_files,
    require_causal_lm,
    require_model_dir,
)
from deepspec_plugin.tensorfiles import tensor_index

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def draft_init(target: Path, layers: int, out: Path, overwrite: bool = False) -> Path:
    """A draft made of the target's embeddings, first `layers` decoder layers, final norm and head.

    Works from the safetensors files directly (no model is instantiated), keeps the target's dtype
    and its tied/untied head, and copies the tokenizer and generation config.
    """
    target, out = Path(target), Path(out)
    require_model_dir(target)
    config = read_json(target / "config.json")
    require_causal_lm(target, config)
    if config.get("model_type") not in LLAMA_LIKE_MODEL_TYPES:
        raise DspecError(
            f"{target} is a {config.get('model_type')!r} model "
            f"({', '.join(architectures(config))}); "
            "draft-init needs a Llama-like decoder",
            f"use a target of type {', '.join(sorted(LLAMA_LIKE_MODEL_TYPES))}",
        )
    n_target = int(config["num_hidden_layers"])
    if not isinstance(layers, int) or not 1 <= layers <= n_target:
        raise DspecError(
            f"draft layers must be between 1 and the target's {n_target}, got {layers}",
            f"pass --layers 1..{n_target}",
        )
    if out.exists() and not overwrite:
        raise DspecError(
            f"{out} already exists", "pass overwrite (--overwrite) or choose another path"
        )
    if out.resolve() == target.resolve():
        raise DspecError(f"the draft would overwrite its target {target}", "choose another path")

    index = tensor_index(target)
    keep: list[str] = []
    for name in sorted(index):
        m = _LAYER_RE.match(name)
        if m:
            if int(m.group(1)) < layers:
                keep.append(name)
        elif name.startswith("model.") or name.startswith("lm_head."):
            keep.append(name)
        else:
            raise DspecError(
                f"{target} has an unexpected tensor {name}",
                "draft-init needs a Llama-like checkpoint",
            )
    if "model.embed_tokens.weight" not in keep:
        raise DspecError(
            f"{target} has no model.embed_tokens.weight", "draft-init needs a Llama-like checkpoint"
        )

    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {}
    for path in sorted({index[name].path for name in keep}):
        with safe_open(str(path), framework="pt") as f:
            for name in keep:
                if index[name].path == path:
                    tensors[name] = f.get_tensor(name).contiguous()

    draft_config = dict(config)
    draft_config["num_hidden_layers"] = layers
    if isinstance(draft_config.get("layer_types"), list):
        draft_config["layer_types"] = draft_config["layer_types"][:layers]
    if "max_window_layers" in draft_config:
        draft_config["max_window_layers"] = min(int(draft_config["max_window_layers"]), layers)
    draft_config.pop("_name_or_path", None)

    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", draft_config)
        copy_tokenizer_files(target, tmp)
    return out
