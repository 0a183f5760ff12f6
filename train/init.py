"""Where a draft starts: ``--draft-init`` specs.

* ``layers:N``: the target's embeddings, first N decoder layers, final norm and head
  (`deepspec_plugin.models.draft_init`);
* ``fresh`` or ``fresh:key=value,...``: a randomly initialised decoder of the target's family,
  vocabulary and tokenizer, with a small shape. Keys: ``layers`` (default 2), ``hidden``,
  ``heads``, ``kv_heads``, ``intermediate`` (defaults: the target's), e.g.
  ``fresh:layers=2,hidden=256,heads=4,kv_heads=2,intermediate=768``. Seeded, so a resume rebuilds
  exactly the same start;
* ``PATH``: an existing model directory with the target's tokenizer.

Every init is checked against the target (`check_pair`: vocabulary and tokenizer) before training.
"""

from __future__ import annotations

from pathlib import Path

from deepspec_plugin.errors import DspecError

FRESH_KEYS = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
}
FRESH_DEFAULT_LAYERS = 2
VALID_SPECS = "layers:N, fresh[:layers=L,hidden=H,heads=A,kv_heads=G,intermediate=I] or a path"


def parse_fresh(spec: str) -> dict[str, int]:
    """``fresh:layers=2,hidden=256`` -> {"num_hidden_layers": 2, "hidden_size": 256}."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    shape: dict[str, int] = {"num_hidden_layers": FRESH_DEFAULT_LAYERS}
    for item in filter(None, (part.strip() for part in body.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in FRESH_KEYS:
            raise DspecError(
                f"invalid fresh draft option {item!r} in {spec!r}",
                f"use keys {', '.join(FRESH_KEYS)} as key=value, e.g. fresh:layers=2,hidden=256",
            )
        try:
            number = int(value)
        except ValueError:
            number = 0
        if number < 1:
            raise DspecError(f"{key} must be a positive integer in {spec!r}", "e.g. hidden=256")
        shape[FRESH_KEYS[key.strip()]] = number
    return shape


def fresh_draft(target: Path, spec: str, out: Path, seed: int = 0) -> Path:
    """A randomly initialised draft of the target's family and tokenizer at `out` (atomic)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from deepspec_plugin.fileio import atomic_dir, read_json
    from deepspec_plugin.models import LLAMA_LIKE_MODEL_TYPES, copy_tokenizer_files

    raw = read_json(Path(target) / "config.json")
    if raw.get("model_type") not in LLAMA_LIKE_MODEL_TYPES:
        raise DspecError(
            f"{target} is a {raw.get('model_type')!r} model; fresh drafts copy a Llama-like config",
            "use layers:N or a model directory as --draft-init",
        )
    shape = parse_fresh(spec)
    config = AutoConfig.from_pretrained(str(target))
    if "hidden_size" in shape and "num_attention_heads" not in shape:
        # Keep the target's head size where it divides the new width.
        head_dim = config.hidden_size // config.num_attention_heads
        shape["num_attention_heads"] = max(1, shape["hidden_size"] // head_dim)
    if "num_attention_heads" in shape and "num_key_value_heads" not in shape:
        shape["num_key_value_heads"] = shape["num_attention_heads"]
    for key, value in shape.items():
        setattr(config, key, value)
    if config.hidden_size % config.num_attention_heads:
        raise DspecError(
            f"hidden {config.hidden_size} is not a multiple of heads {config.num_attention_heads}",
            "choose heads that divide hidden",
        )
    if config.num_attention_heads % config.num_key_value_heads:
        raise DspecError(
            f"heads {config.num_attention_heads} is not a multiple of kv_heads "
            f"{config.num_key_value_heads}",
            "choose kv_heads that divide heads",
        )
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:1] * config.num_hidden_layers
    if getattr(config, "max_window_layers", None) is not None:
        config.max_window_layers = min(config.max_window_layers, config.num_hidden_layers)

    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.set_rng_state(generator_state)  # the caller's RNG stream is not disturbed
    hf_logging.disable_progress_bar()
    with atomic_dir(Path(out), overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        copy_tokenizer_files(Path(target), tmp)
    return Path(out)


def init_draft(target: Path, spec: str, out: Path, seed: int = 0) -> Path:
    """The initial draft directory for `spec` (see the module docstring); built ones go to `out`.

    ``out`` is reused when it exists (a resume: its fingerprint is in the run identity).
    """
    from deepspec_plugin.models import check_pair, draft_init

    target, out = Path(target), Path(out)
    if spec.startswith("layers:"):
        try:
            layers = int(spec.split(":", 1)[1])
        except ValueError:
            raise DspecError(f"invalid draft init {spec!r}", f"use {VALID_SPECS}") from None
        if not out.is_dir():
            draft_init(target, layers, out)
        init = out
    elif spec == "fresh" or spec.startswith("fresh:"):
        parse_fresh(spec)  # refuse a bad spec before any work
        if not out.is_dir():
            fresh_draft(target, spec, out, seed=seed)
        init = out
    else:
        init = Path(spec).expanduser()
        if not init.is_dir():
            raise DspecError(
                f"draft init {spec!r} is neither layers:N, fresh[:...] nor a model directory",
                f"use {VALID_SPECS}",
            )
    check_pair(target, init)
    return init
