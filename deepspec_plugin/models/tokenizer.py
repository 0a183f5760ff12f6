"""Tokenizers: loading, what defines one (for fingerprints and comparisons), portable configs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.fileio import read_json, write_json
from deepspec_plugin.models.files import TOKENIZER_FILES, require_model_dir

ENDOFTEXT = "<|endoftext|>"


IM_START = "<|im_start|>"


IM_END = "<|im_end|>"


# ChatML, as SmolLM2-Instruct uses it, without its default system prompt (it would eat most of a
# tiny model's short context for nothing).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def canonical_json(obj: Any) -> bytes:
    """The bytes a fingerprint hashes: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def load_tokenizer(path: Path):
    """The tokenizer of a local model directory (AutoTokenizer, never the hub)."""
    path = Path(path)
    require_model_dir(path)
    if not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise DspecError(
            f"{path} has no tokenizer files", "copy the target's tokenizer files into it"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def token_content(value: Any) -> Any:
    """Special tokens are stored either as strings or as AddedToken dicts; keep the content."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [token_content(v) for v in value]
    return value


def chat_template(model_dir: Path) -> Any:
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    as_json = model_dir / "chat_template.json"
    if as_json.exists():
        return read_json(as_json).get("chat_template")
    cfg = model_dir / "tokenizer_config.json"
    return read_json(cfg).get("chat_template") if cfg.exists() else None


def special_tokens(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    found: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = model_dir / name
        if not p.exists():
            continue
        data = read_json(p)
        for key in (
            "bos_token",
            "eos_token",
            "pad_token",
            "unk_token",
            "additional_special_tokens",
        ):
            if data.get(key) is not None:
                found.setdefault(key, token_content(data[key]))
    return found


def tokenizer_table(model_dir: Path) -> dict[str, Any]:
    """What defines a tokenizer's behaviour: model type, vocab, merges, added tokens."""
    tj = Path(model_dir) / "tokenizer.json"
    if tj.exists():
        data = read_json(tj)
        model = data.get("model") or {}
        merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []]
        added = sorted(
            (t["id"], t["content"], bool(t.get("special"))) for t in data.get("added_tokens") or []
        )
        return {
            "type": model.get("type"),
            "vocab": model.get("vocab"),
            "merges": merges,
            "added": added,
        }
    # A slow-only tokenizer: ask transformers for the resolved vocab.
    tok = load_tokenizer(model_dir)
    return {"type": type(tok).__name__, "vocab": tok.get_vocab(), "merges": [], "added": []}


def id_to_token(model_dir: Path) -> dict[int, str]:
    table = tokenizer_table(model_dir)
    ids = {i: t for t, i in (table["vocab"] or {}).items()}
    ids.update({i: t for i, t, _ in table["added"]})
    return ids


def first_tokenizer_difference(target: Path, draft: Path) -> str:
    t, d = id_to_token(target), id_to_token(draft)
    for i in sorted(set(t) | set(d)):
        if t.get(i) != d.get(i):
            return f"first differing token id {i}: target {t.get(i)!r}, draft {d.get(i)!r}"
    tt, dt = tokenizer_table(target), tokenizer_table(draft)
    if tt["merges"] != dt["merges"]:
        return "same tokens but different BPE merges"
    if special_tokens(target) != special_tokens(draft):
        ts, ds = special_tokens(target), special_tokens(draft)
        return f"special tokens differ: target {ts}, draft {ds}"
    if chat_template(target) != chat_template(draft):
        return "chat templates differ"
    return "tokenizer model types differ"


_TOKENIZER_FP_CACHE: dict[tuple, str] = {}


def tokenizer_fingerprint(model_dir: Path) -> str:
    """Hash of a tokenizer's vocab, merges, added and special tokens and chat template.

    Computed from the parsed files, so re-saving with other formatting (or a library version that
    writes merges as pairs instead of strings) keeps the fingerprint. Remembered in-process by
    the files' raw bytes (parsing a 2 MB tokenizer.json takes 0.2 s, an export asks several
    times, and the draft's and the export's files are copies of the target's), and across
    processes by their stats (:mod:`deepspec_plugin.stat_cache`).
    """
    model_dir = Path(model_dir)
    require_model_dir(model_dir)
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            h.update(name.encode() + b"\0" + (model_dir / name).read_bytes() + b"\0")
    key = h.hexdigest()
    if key not in _TOKENIZER_FP_CACHE:
        from deepspec_plugin.stat_cache import cached

        files = [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
        _TOKENIZER_FP_CACHE[key] = cached("tokenizer", model_dir, files,
                                          lambda: _compute_tokenizer_fingerprint(model_dir))
    return _TOKENIZER_FP_CACHE[key]


def _compute_tokenizer_fingerprint(model_dir: Path) -> str:
    if not any(
        (model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise DspecError(
            f"{model_dir} has no tokenizer files", "copy the target's tokenizer files into it"
        )
    payload = {
        "table": tokenizer_table(model_dir),
        "special": special_tokens(model_dir),
        "chat_template": chat_template(model_dir),
    }
    return "sha256:" + hashlib.sha256(canonical_json(payload)).hexdigest()


def write_portable_tokenizer_config(dst: Path) -> None:
    """Rewrite tokenizer_config.json in the form that transformers 4 and 5 and vLLM all read.

    transformers 5 saves `tokenizer_class: TokenizersBackend`, a list-valued
    `extra_special_tokens` and the template only in chat_template.jinja; older readers know
    `PreTrainedTokenizerFast`, `additional_special_tokens` and `chat_template` in this file.
    """
    path = dst / "tokenizer_config.json"
    cfg = read_json(path)
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = chat_template(dst)
    write_json(path, cfg)
    special = {
        k: cfg[k]
        for k in ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")
        if k in cfg
    }
    write_json(dst / "special_tokens_map.json", special)
