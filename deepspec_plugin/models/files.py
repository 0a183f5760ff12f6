"""A model directory as files: what must be there, what it holds, what is copied with it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.tensorfiles import tensor_index

# Model families whose checkpoints are `model.embed_tokens`, `model.layers.{i}.*`, `model.norm`,
# `lm_head` and whose config truncates by changing `num_hidden_layers`.
LLAMA_LIKE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


def require_model_dir(path: Path) -> None:
    if not Path(path).is_dir():
        raise DspecError(
            f"model directory {path} does not exist", "build or download the model, or fix the path"
        )


def architectures(config: dict[str, Any]) -> list[str]:
    return list(config.get("architectures") or [])


def is_causal_lm(config: dict[str, Any]) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures(config))


def require_causal_lm(model_dir: Path, config: dict[str, Any]) -> None:
    if not is_causal_lm(config):
        arch = (
            ", ".join(architectures(config))
            or f"model_type {config.get('model_type')!r}, no architectures"
        )
        raise DspecError(
            f"{model_dir} is not a causal language model ({arch})",
            "point at a *ForCausalLM checkpoint",
        )


def param_count(path: Path) -> int:
    """Number of parameters stored in a model directory, read from safetensors headers only."""
    require_model_dir(Path(path))
    return sum(math.prod(t.shape) for t in tensor_index(Path(path)).values())


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files (and generation_config.json) of ``src``; returns their names."""
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise DspecError(f"{src} has no tokenizer files", "point --target at a model directory "
                         "with its tokenizer files")
    return copied


# vLLM 0.32's names for its EAGLE-3 heads (model_executor/models/registry.py); speculators'
# "Eagle3Speculator" directories are another format (exporters/speculators.py).
EAGLE3_ARCHITECTURES = frozenset({"Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3",
                                  "Eagle3Qwen3ForCausalLM"})


def is_eagle3_dir(path: str | Path) -> bool:
    """True for a directory holding an EAGLE-3 head in vLLM's layout (its config says so)."""
    from deepspec_plugin.fileio import read_json

    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return False
    try:
        cfg = read_json(cfg_path)
    except DspecError:
        return False
    return isinstance(cfg, dict) and any(
        a in EAGLE3_ARCHITECTURES for a in cfg.get("architectures") or [])


MEDUSA = "medusa"
MLP_SPECULATOR = "mlp_speculator"


def head_kind(config: dict[str, Any]) -> str | None:
    """``medusa``, ``mlp_speculator`` or None for a draft's config, as TGI's loader tells them
    apart (``medusa_num_heads`` first, then ``model_type``; vLLM's Medusa layout says
    ``model_type: medusa``)."""
    if "medusa_num_heads" in config or config.get("model_type") == MEDUSA:  # TGI's, vLLM's
        return MEDUSA
    if config.get("model_type") == MLP_SPECULATOR:
        return MLP_SPECULATOR
    return None


def head_draft_kind(path: str | Path) -> str | None:
    """The head-draft kind of a directory (`head_kind` of its config.json), else None."""
    from deepspec_plugin.fileio import read_json

    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = read_json(cfg_path)
    except DspecError:
        return None
    return head_kind(cfg) if isinstance(cfg, dict) else None
