"""Head drafts: the source layouts the exporters read, and small random builders for tests.

A head draft is not a language model: it is a set of extra heads that read the target's last
hidden state. Two layouts are read here, as their training tools write them:

- Medusa (FasterDecoding/Medusa): ``config.json`` with ``medusa_num_heads``, ``medusa_num_layers``
  and ``base_model_name_or_path`` (often ``hidden_size``/``vocab_size`` too); weights in
  ``medusa_lm_head.safetensors`` or in a whole-model checkpoint, named ``{head}.{layer}.linear.
  weight|bias`` for the residual blocks and ``{head}.{num_layers}.weight`` for each head's
  output layer, possibly under a prefix such as ``medusa_head.``.
- MLP speculator (IBM fms-extras, as on the Hub): ``config.json`` with ``model_type:
  mlp_speculator``, ``n_predict``, ``inner_dim``, ``emb_dim``, ``vocab_size``, ``tie_weights``,
  ``scale_input``; tensors ``emb.{i}.weight``, ``proj.{i}.weight``, ``head.{i}.weight``,
  ``ln.{i}.weight|bias``, with or without the ``speculator.`` prefix.

Reading only looks at safetensors headers (:mod:`deepspec_plugin.tensorfiles`): an exporter
then streams the bytes it needs. Pickle weights are refused, never loaded.

``build_medusa`` and ``build_mlp_speculator`` write small random head drafts sized from a target's
config, with its tokenizer files and a ``deepspec.json``: stand-ins for trained heads, for tests
and examples only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters.safetensors_io import (
    StoredTensor,
    read_dir,
    read_tensors,
    same_bytes,
)
from deepspec_plugin.fileio import read_json
from deepspec_plugin.tensorfiles import PICKLE_SUFFIXES

MEDUSA = "medusa"
MLP_SPECULATOR = "mlp_speculator"
DRAFT_MODEL = "draft_model"
MEDUSA_WEIGHTS = "medusa_lm_head.safetensors"
MLP_PREFIX = "speculator."
MLP_ARCHITECTURE = "MLPSpeculatorPreTrainedModel"

# `{prefix}{head}.{layer}.linear.weight|bias` or `{prefix}{head}.{layer}.weight`
_MEDUSA_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?)(?P<head>\d+)\.(?P<layer>\d+)\."
                          r"(?P<rest>linear\.weight|linear\.bias|weight)$")
_MLP_NAME = re.compile(r"^(?P<prefix>(?:speculator\.)?)(?P<part>emb|proj|head|ln)\.(?P<i>\d+)\."
                       r"(?P<rest>weight|bias)$")


# --- detection ---------------------------------------------------------------------------------


def detect_head_format(path: str | Path) -> str:
    """``"medusa"``, ``"mlp_speculator"`` or ``"draft_model"`` (a standalone causal LM)."""
    path = Path(path)
    if not path.is_dir():
        raise DspecError(f"draft directory {path} does not exist", "fix the --draft path")
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise DspecError(f"{path / 'config.json'} is not a JSON object", "restore the file")
    if "medusa_num_heads" in config:
        return MEDUSA
    archs = config.get("architectures") or []
    if config.get("model_type") == MLP_SPECULATOR or (archs and archs[0] == MLP_ARCHITECTURE):
        return MLP_SPECULATOR
    if any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return DRAFT_MODEL
    raise DspecError(
        f"{path} is neither a head draft (no medusa_num_heads, no model_type mlp_speculator) nor "
        f"a causal LM (architectures {archs or 'missing'})",
        "point --draft at a Medusa, MLP-speculator or *ForCausalLM draft directory",
    )


# --- reading the source layouts ----------------------------------------------------------------


def _weight_files(path: Path, preferred: str | None = None) -> list[str]:
    """The safetensors files to read; pickle-only drafts are refused without being opened."""
    if preferred and (path / preferred).is_file():
        return [preferred]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise DspecError(
            f"{path} holds only pickle weights ({', '.join(pickles)}); pickle files are never "
            "loaded (unpickling runs arbitrary code)",
            "convert them to safetensors where you trust them (load, then "
            "safetensors.torch.save_file) and export again",
        )
    raise DspecError(f"{path} has no *.safetensors weights",
                     "point --draft at a head draft with safetensors weights")


def pickle_files(path: str | Path) -> list[str]:
    """Pickle files in a draft directory (reported, never loaded, never copied)."""
    return sorted(p.name for p in Path(path).iterdir() if p.suffix in PICKLE_SUFFIXES)


def _int_key(config: dict, key: str, where: Path, minimum: int = 1) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DspecError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}",
                         f"fix {key} in the draft's config.json")
    return value


def _one_prefix(prefixes: set[str], path: Path, what: str) -> str:
    if len(prefixes) > 1:
        raise DspecError(f"{path} holds {what} tensors under several prefixes "
                         f"({', '.join(sorted(repr(p) for p in prefixes))})",
                         "keep one set of heads in the draft directory")
    return next(iter(prefixes))


@dataclass
class MedusaSource:
    """A Medusa draft as read: tensors keyed by their unprefixed name (``0.0.linear.weight``)."""

    path: Path
    config: dict[str, Any]
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    base_model_name_or_path: str | None
    tensors: dict[str, StoredTensor]
    prefix: str = ""


def medusa_names(num_heads: int, num_layers: int) -> list[str]:
    """The tensor names of ``num_heads`` Medusa heads of ``num_layers`` residual blocks each."""
    names = []
    for h in range(num_heads):
        for la in range(num_layers):
            names += [f"{h}.{la}.linear.weight", f"{h}.{la}.linear.bias"]
        names.append(f"{h}.{num_layers}.weight")
    return names


def read_medusa(path: str | Path) -> MedusaSource:
    """Read a Medusa draft (FasterDecoding layout) and check its names and shapes."""
    path = Path(path)
    config = read_json(path / "config.json")
    num_heads = _int_key(config, "medusa_num_heads", path)
    num_layers = _int_key(config, "medusa_num_layers", path, minimum=0)
    index = read_dir(path, _weight_files(path, MEDUSA_WEIGHTS))
    found: dict[str, dict[str, StoredTensor]] = {}
    for name, t in index.items():
        m = _MEDUSA_NAME.match(name)
        if m:
            found.setdefault(m["prefix"], {})[name[len(m["prefix"]):]] = t
    if not found:
        raise DspecError(f"{path} has no Medusa head tensors ({{head}}.{{layer}}.linear.weight, "
                         "{head}.{num_layers}.weight)", "point --draft at a Medusa draft")
    prefix = _one_prefix(set(found), path, "Medusa head")
    tensors = found[prefix]
    missing = [n for n in medusa_names(num_heads, num_layers) if n not in tensors]
    if missing:
        raise DspecError(
            f"{path} does not match its config (medusa_num_heads {num_heads}, "
            f"medusa_num_layers {num_layers}): missing {', '.join(prefix + n for n in missing[:4])}"
            + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""),
            "fix medusa_num_heads / medusa_num_layers in config.json or re-save the heads",
        )
    out_shape = tensors[f"0.{num_layers}.weight"].shape
    if len(out_shape) != 2:
        raise DspecError(f"{path}: {prefix}0.{num_layers}.weight has shape {list(out_shape)}, "
                         "expected [vocab_size, hidden_size]", "re-save the heads")
    vocab, hidden = out_shape
    for key, have in (("hidden_size", hidden), ("vocab_size", vocab)):
        if config.get(key) is not None and config[key] != have:
            raise DspecError(f"{path}: config.json says {key} {config[key]}, the head tensors have "
                             f"{have}", f"fix {key} in config.json")
    return MedusaSource(path, config, num_heads, num_layers, int(hidden), int(vocab),
                        config.get("base_model_name_or_path"),
                        {n: tensors[n] for n in medusa_names(num_heads, num_layers)}, prefix)


@dataclass
class MlpSource:
    """An MLP speculator as read: tensors keyed by their unprefixed name (``emb.0.weight``)."""

    path: Path
    config: dict[str, Any]
    n_predict: int
    inner_dim: int
    emb_dim: int
    vocab_size: int
    tie_weights: bool
    scale_input: bool
    tensors: dict[str, StoredTensor]
    prefix: str = MLP_PREFIX
    untied_duplicates: list[str] = field(default_factory=list)  # tied copies that differ


def read_mlp_speculator(path: str | Path) -> MlpSource:
    """Read an MLP speculator (fms-extras / Hub layout) and check its names and shapes."""
    path = Path(path)
    config = read_json(path / "config.json")
    n_predict = _int_key(config, "n_predict", path)
    index = read_dir(path, _weight_files(path))
    found: dict[str, dict[str, StoredTensor]] = {}
    for name, t in index.items():
        m = _MLP_NAME.match(name)
        if m:
            found.setdefault(m["prefix"], {})[name[len(m["prefix"]):]] = t
    if not found:
        raise DspecError(f"{path} has no MLP-speculator tensors (emb.i, proj.i, head.i, ln.i)",
                         "point --draft at an MLP speculator")
    prefix = _one_prefix(set(found), path, "MLP-speculator")
    tensors = found[prefix]
    need = ["emb.0.weight", "proj.0.weight", "head.0.weight", "ln.0.weight", "ln.0.bias"]
    missing = [n for n in need if n not in tensors]
    if missing:
        raise DspecError(f"{path} lacks {', '.join(prefix + n for n in missing)}",
                         "re-save the speculator with all its tensors")
    for name in ("head.0.weight", "proj.0.weight", "emb.0.weight"):
        if len(tensors[name].shape) != 2:
            raise DspecError(f"{path}: {prefix}{name} has shape {list(tensors[name].shape)}, "
                             "expected a matrix", "re-save the speculator")
    vocab, inner = tensors["head.0.weight"].shape
    emb_dim = tensors["proj.0.weight"].shape[1]
    for key, have in (("inner_dim", inner), ("emb_dim", emb_dim), ("vocab_size", vocab)):
        # fms-extras writes inner_dim 0 for "same as emb_dim"
        if config.get(key) not in (None, have) and not (key == "inner_dim" and config[key] == 0):
            raise DspecError(f"{path}: config.json says {key} {config[key]}, the tensors have "
                             f"{have}", f"fix {key} in config.json")
    tie = bool(config.get("tie_weights", False))
    src = MlpSource(path, config, n_predict, int(inner), int(emb_dim), int(vocab), tie,
                    bool(config.get("scale_input", False)), tensors, prefix)
    if tie:
        # Tied copies (emb.i = emb.0, proj.i = proj.1 for i >= 2, ...) must really be copies.
        for name, t in tensors.items():
            part, i, rest = name.split(".")
            shared = (min(int(i), 1) if part == "proj" else 0)  # proj.0 and proj.1 are distinct
            base = f"{part}.{shared}.{rest}"
            if name != base and base in tensors and not same_bytes(t, tensors[base]):
                src.untied_duplicates.append(prefix + name)
    return src




# --- builders for tests ------------------------------------------------------------------------


def _target_dims(target: Path) -> tuple[int, int]:
    config = read_json(Path(target) / "config.json")
    try:
        return int(config["hidden_size"]), int(config["vocab_size"])
    except (KeyError, TypeError, ValueError):
        raise DspecError(f"{target}/config.json has no hidden_size / vocab_size",
                         "point at a causal LM directory") from None


def _source_manifest(target: Path, method: str, k: int, builder: str, seed: int):
    from deepspec_plugin.manifest import DraftManifest
    from deepspec_plugin.models import fingerprint, tokenizer_fingerprint

    return DraftManifest(
        target_fingerprint=fingerprint(target), tokenizer_fingerprint=tokenizer_fingerprint(target),
        method=method, k=k,
        extra={"training": {"builder": builder, "seed": seed,
                            "note": "random weights (a stand-in for trained heads)"}},
    )


def _write_json(path: Path, obj: Any) -> None:
    import json

    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def build_medusa(target: str | Path, out: str | Path, num_heads: int = 3, num_layers: int = 1,
                 seed: int = 0, *, prefix: str = "", weights_file: str = MEDUSA_WEIGHTS) -> Path:
    """A random Medusa draft for ``target`` in the FasterDecoding layout (a test stand-in).

    ``prefix`` (e.g. ``"medusa_head."``) and ``weights_file`` (e.g. ``model.safetensors``) give
    the variants that Medusa's own training scripts write.
    """
    import torch
    from safetensors.torch import save_file

    from deepspec_plugin.exporters.output import copy_tokenizer_files, staged_output
    from deepspec_plugin.manifest import write_manifest

    target, out = Path(target), Path(out)
    hidden, vocab = _target_dims(target)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in medusa_names(num_heads, num_layers):
        if name.endswith("linear.weight"):
            t = torch.randn(hidden, hidden, generator=gen) * 0.02
        elif name.endswith("linear.bias"):
            t = torch.randn(hidden, generator=gen) * 0.01
        else:
            t = torch.randn(vocab, hidden, generator=gen) * 0.05
        tensors[prefix + name] = t.contiguous()
    config = {"medusa_num_heads": num_heads, "medusa_num_layers": num_layers,
              "base_model_name_or_path": str(target), "hidden_size": hidden, "vocab_size": vocab}
    with staged_output(out, overwrite=True) as tmp:
        save_file(tensors, str(tmp / weights_file), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        copy_tokenizer_files(target, tmp)
        write_manifest(_source_manifest(target, MEDUSA, num_heads, "build_medusa", seed), tmp)
    return out


def build_mlp_speculator(target: str | Path, out: str | Path, n_predict: int = 3,
                         inner_dim: int | None = None, tie_weights: bool = True, seed: int = 0,
                         *, prefix: str = MLP_PREFIX, scale_input: bool = True) -> Path:
    """A random MLP speculator for ``target`` in the fms-extras layout (a test stand-in).

    As fms-extras saves it: every one of the ``n_predict`` stages is stored, and with
    ``tie_weights`` the stages share emb/head/ln (and proj.i = proj.1 for i >= 2) as copies.
    """
    import torch
    from safetensors.torch import save_file

    from deepspec_plugin.exporters.output import copy_tokenizer_files, staged_output
    from deepspec_plugin.manifest import write_manifest

    target, out = Path(target), Path(out)
    hidden, vocab = _target_dims(target)
    inner = inner_dim or hidden
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.05):
        return torch.randn(*shape, generator=gen) * std

    tensors: dict[str, Any] = {}
    for i in range(n_predict):
        tied_to = (1 if i >= 2 else i) if tie_weights else i
        proj_in = hidden if i == 0 else inner
        if tie_weights and tied_to != i:
            tensors[f"proj.{i}.weight"] = tensors[f"proj.{tied_to}.weight"].clone()
        else:
            tensors[f"proj.{i}.weight"] = rand(inner, proj_in)
        if tie_weights and i > 0:
            for n in ("emb.{}.weight", "head.{}.weight", "ln.{}.weight", "ln.{}.bias"):
                tensors[n.format(i)] = tensors[n.format(0)].clone()
        else:
            tensors[f"emb.{i}.weight"] = rand(vocab, inner)
            tensors[f"head.{i}.weight"] = rand(vocab, inner)
            tensors[f"ln.{i}.weight"] = 1.0 + rand(inner, std=0.01)
            tensors[f"ln.{i}.bias"] = rand(inner, std=0.01)
    config = {
        "architectures": [MLP_ARCHITECTURE], "model_type": MLP_SPECULATOR,
        "n_predict": n_predict, "inner_dim": inner, "emb_dim": hidden, "vocab_size": vocab,
        "tie_weights": tie_weights, "scale_input": scale_input, "n_candidates": n_predict,
        "top_k_tokens_per_head": [1] * n_predict, "torch_dtype": "float32",
    }
    with staged_output(out, overwrite=True) as tmp:
        save_file({prefix + k: v.contiguous() for k, v in tensors.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        copy_tokenizer_files(target, tmp)
        write_manifest(_source_manifest(target, MLP_SPECULATOR, n_predict,
                                        "build_mlp_speculator", seed), tmp)
    return out


def tensor_names(path: str | Path) -> list[str]:
    """The tensor names of one safetensors file (header only)."""
    return sorted(read_tensors(path))
