"""A model's identity: a hash of its config, weights and tokenizer, independent of sharding."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.fileio import read_json
from deepspec_plugin.models.files import TOKENIZER_FILES, require_model_dir
from deepspec_plugin.models.tokenizer import canonical_json, tokenizer_fingerprint
from deepspec_plugin.tensorfiles import tensor_index

# Config keys that say nothing about the model itself (library versions, where it was loaded
# from, runtime switches). `torch_dtype`/`dtype` are dropped too: the weights' dtypes are hashed
# from the safetensors headers, and transformers renamed the key between versions.
VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "_commit_hash",
        "torch_dtype",
        "dtype",
        "use_cache",
        "_attn_implementation_autoset",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


_CHUNK = 8 << 20


def canonical_config(model_dir: Path) -> dict[str, Any]:
    config = read_json(Path(model_dir) / "config.json")
    return {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}


def weights_digest(model_dir: Path) -> str:
    """Hash tensor names, dtypes, shapes and bytes in name order (independent of sharding)."""
    h = hashlib.sha256()
    index = tensor_index(model_dir)
    for name in sorted(index):
        t = index[name]
        h.update(canonical_json([name, t.dtype, list(t.shape)]))
        with open(t.path, "rb") as f:
            f.seek(t.offset)
            left = t.nbytes
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise DspecError(f"{t.path} is truncated", "re-save or re-download the weights")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def fingerprint(model_dir: Path) -> str:
    """A stable "sha256:<hex>" identity of a model: config, weights and tokenizer.

    Hashes the canonical config.json (sorted keys, minus VOLATILE_CONFIG_KEYS), every tensor's
    name, dtype, shape and bytes (streamed from the safetensors files, in name order, so sharding
    does not matter), and the tokenizer fingerprint. Remembered across processes while the
    files' sizes, mtimes and inodes stay the same (:mod:`deepspec_plugin.stat_cache`).
    """
    model_dir = Path(model_dir)
    require_model_dir(model_dir)
    from deepspec_plugin.stat_cache import cached

    files = [p for p in model_dir.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name == "config.json" or p.name in TOKENIZER_FILES)]
    return cached("fingerprint", model_dir, files, lambda: _compute_fingerprint(model_dir))


def _compute_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    h.update(b"config\0" + canonical_json(canonical_config(model_dir)))
    h.update(b"weights\0" + weights_digest(model_dir).encode())
    h.update(b"tokenizer\0" + tokenizer_fingerprint(model_dir).encode())
    return "sha256:" + h.hexdigest()


def config_and_weights_fingerprint(model_dir: Path) -> str:
    """The identity of a model directory without tokenizer files (heads): config and weights."""
    h = hashlib.sha256()
    h.update(b"config\0" + canonical_json(canonical_config(model_dir)))
    h.update(b"weights\0" + weights_digest(model_dir).encode())
    return "sha256:" + h.hexdigest()
