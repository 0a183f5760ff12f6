"""EAGLE-3 heads in DeepSpec's layout for the tests (not installed): weights built, not trained.

* :func:`build_deepspec_eagle3`: a random head sized from a target, as DeepSpec's trainer saves it
  (``Qwen3Eagle3Model``, full or reduced vocabulary, with or without Qwen3's q/k norms);
* :func:`build_oracle_eagle3`: a head whose proposals are known in advance, so that the acceptance
  vLLM measures with its converted export proves what the conversion means (which target hidden
  states feed the head, where its residual is taken, what d2t holds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.eagle3 import DEEPSPEC_ARCHITECTURES
from deepspec_plugin.exporters.eagle3_rules import config_dims, layer_shapes, read_config


def _default_layer_ids(num_layers: int) -> list[int]:
    """Up to 5 evenly spaced layers, never the last (DeepSpec's evaluator refuses it)."""
    top = max(num_layers - 2, 0)
    n = max(1, min(5, num_layers - 1))
    return sorted({round(i * top / max(n - 1, 1)) for i in range(n)})


def build_deepspec_eagle3(target: str | Path, out: str | Path, *,
                          draft_vocab_size: int | None = None,
                          target_layer_ids: list[int] | None = None, qk_norm: bool = True,
                          seed: int = 0) -> Path:
    """A tiny random EAGLE-3 head in DeepSpec's layout for ``target`` (a test stand-in: its
    weights are random, not trained).

    Sized from the target's config: hidden size, heads, intermediate size. ``embed_tokens`` and
    ``lm_head`` are the target's, as DeepSpec initialises and freezes them (with
    ``draft_vocab_size``, the head keeps the rows of a fixed random subset that includes the
    special tokens, and ``d2t``/``t2d`` describe it). ``target_layer_ids`` default to up to 5
    evenly spaced layers (DeepSpec itself requires exactly 5; a 4-layer target has fewer to give).
    ``qk_norm=False`` leaves out Qwen3's per-head norms (a Llama-style head). Writes
    ``config.json``, ``model.safetensors``, the target's tokenizer files and ``deepspec.json``.
    """
    import torch

    target, out = Path(target), Path(out)
    tcfg = read_config(target / "config.json")
    d = config_dims(tcfg)
    vocab, t_layers = int(tcfg["vocab_size"]), int(tcfg["num_hidden_layers"])
    ids = list(target_layer_ids) if target_layer_ids is not None else _default_layer_ids(t_layers)
    embed, lm_head = _target_tensors(target, "model.embed_tokens.weight", "lm_head.weight")

    gen = torch.Generator().manual_seed(seed)
    dtype = embed.dtype

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    def norm(n: int) -> torch.Tensor:  # near the RMSNorm init of ones, distinct bytes per tensor
        return (1.0 + torch.randn(n, generator=gen) * 0.05).to(dtype)

    state: dict[str, torch.Tensor] = {"embed_tokens.weight": embed.clone(),
                                      "fc.weight": rand(d["hidden"], len(ids) * d["hidden"])}
    for name, shape in layer_shapes(d, "layers.0.", 2 * d["hidden"], qk_norm).items():
        state[name] = norm(shape[0]) if len(shape) == 1 else rand(*shape)
    state["norm.weight"] = norm(d["hidden"])
    config = _deepspec_config(tcfg, target, ids)
    if draft_vocab_size is not None and draft_vocab_size < vocab:
        keep = _draft_vocabulary(tcfg, vocab, int(draft_vocab_size), gen)
        state.update(_reduced_head(lm_head[keep], keep, vocab))
        config["draft_vocab_size"] = int(draft_vocab_size)
    else:
        state["lm_head.weight"] = lm_head.clone()
    return _save_deepspec_head(target, out, state, config,
                               {"stand_in": "random weights from tests/eagle3_builders.py: "
                                            "build_deepspec_eagle3, not trained", "seed": seed})


def _target_tensors(target: Path, *names: str) -> list[Any]:
    """Tensors of the target, read from its safetensors as stored (bytes and dtype)."""
    from safetensors import safe_open

    tensors = st.read_dir(target)
    out = []
    for name in names:
        if name not in tensors:
            raise DspecError(f"{target} has no {name}", "use an untied Llama-like target")
        with safe_open(str(tensors[name].path), "pt") as f:
            out.append(f.get_tensor(name))
    return out


def _deepspec_config(tcfg: dict[str, Any], target: Path, ids: list[int]) -> dict[str, Any]:
    """A DeepSpec head's config.json: the target's, with the keys DeepSpec's trainer adds."""
    config = {k: v for k, v in tcfg.items() if k not in ("_name_or_path", "transformers_version")}
    config.update(architectures=list(DEEPSPEC_ARCHITECTURES),
                  num_target_layers=int(tcfg["num_hidden_layers"]), num_hidden_layers=1,
                  layer_types=["full_attention"], target_model_name_or_path=str(target),
                  target_layer_ids=list(ids), ttt_length=7, step_loss_decay=0.8,
                  draft_num_hidden_layers=1, tie_word_embeddings=False)
    return config


def _reduced_head(rows, target_ids, vocab: int) -> dict[str, Any]:
    """lm_head, d2t and t2d of a reduced head whose draft token i (lm_head row ``rows[i]``)
    stands for target token ``target_ids[i]`` (d2t holds offsets: target = draft + d2t)."""
    import torch

    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[target_ids] = True
    return {"lm_head.weight": rows.clone(),
            "d2t": target_ids - torch.arange(len(target_ids), dtype=torch.int64),
            "t2d": t2d}


def _save_deepspec_head(target: Path, out: Path, state: dict[str, Any], config: dict[str, Any],
                        training: dict[str, Any]) -> Path:
    """Write a head in DeepSpec's layout (weights, config, the target's tokenizer, manifest)
    atomically into ``out``."""
    from safetensors.torch import save_file

    from deepspec_plugin.fileio import atomic_dir
    from deepspec_plugin.manifest import DraftManifest, write_manifest
    from deepspec_plugin.models import copy_tokenizer_files, fingerprint, tokenizer_fingerprint

    with atomic_dir(out) as tmp:
        save_file({k: state[k].contiguous() for k in sorted(state)},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        copy_tokenizer_files(target, tmp)
        manifest = DraftManifest(
            target_fingerprint=fingerprint(target),
            tokenizer_fingerprint=tokenizer_fingerprint(target), method="eagle3",
            extra={"training": {"framework": "deepspec", "architecture": "Qwen3Eagle3Model",
                                **training}},
        )
        write_manifest(manifest, tmp / "deepspec.json")
    return out


def _draft_vocabulary(tcfg: dict[str, Any], vocab: int, size: int, gen) -> Any:
    """Sorted target ids of a reduced draft vocabulary: the special tokens, then random ids."""
    import torch

    special = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = tcfg.get(key)
        special.update(v if isinstance(v, list) else [v] if isinstance(v, int) else [])
    if size < len(special) or size < 1:
        raise DspecError(f"draft_vocab_size {size} cannot hold the {len(special)} special tokens",
                         "choose a larger draft_vocab_size")
    rest = [i for i in torch.randperm(vocab, generator=gen).tolist() if i not in special]
    return torch.tensor(sorted([*special, *rest[: size - len(special)]]), dtype=torch.int64)


# --- an oracle head: proposals known in advance, so acceptance proves the conversion's meaning ---


def greedy_continuations(target: str | Path, prompts: list[list[int]],
                         max_new_tokens: int) -> list[list[int]]:
    """The target's greedy continuation of each prompt in transformers (float32; EOS does not
    stop it, as with vLLM's ``ignore_eos``)."""
    import torch

    from deepspec_plugin.models import load_causal_lm

    model = load_causal_lm(Path(target))
    out = []
    with torch.no_grad():
        for ids in prompts:
            step = model(torch.tensor([ids]), use_cache=True)
            new: list[int] = []
            for _ in range(max_new_tokens):
                new.append(int(step.logits[0, -1].argmax()))
                if len(new) < max_new_tokens:
                    step = model(torch.tensor([new[-1:]]), past_key_values=step.past_key_values,
                                 use_cache=True)
            out.append(new)
    return out


def successor_map(prompts: list[list[int]], continuations: list[list[int]]) -> dict[int, int]:
    """Token a → the token the target most often emits right after a in these greedy
    continuations (from each prompt's last token on), one-to-one: where two tokens would share a
    successor, the more frequent one keeps it (a linear head can only permute its outputs)."""
    from collections import Counter, defaultdict

    counts: dict[int, Counter] = defaultdict(Counter)
    for ids, new in zip(prompts, continuations):
        seq = [ids[-1], *new]
        for a, b in zip(seq, seq[1:]):
            counts[a][b] += 1
    out: dict[int, int] = {}
    taken: set[int] = set()
    for a in sorted(counts, key=lambda a: (-sum(counts[a].values()), a)):
        b = max(counts[a], key=lambda b: (counts[a][b], -b))
        if b not in taken:
            out[a] = b
            taken.add(b)
    return out


def build_oracle_eagle3(target: str | Path, out: str | Path, prompts: list[list[int]],
                        max_new_tokens: int, *, reduced_vocabulary: bool = False,
                        qk_norm: bool = True, seed: int = 0) -> Path:
    """An EAGLE-3 head in DeepSpec's layout whose proposals are known in advance (a test oracle:
    its weights are constructed, not trained), for a target whose head and draft hidden sizes
    are equal.

    Construction, and why it works in DeepSpec's semantics and in vLLM's (llama_eagle3.py /
    qwen3_eagle3.py ``*DecoderLayer.forward`` and ``*Model.forward``, read in vllm 0.32):

    * ``target_layer_ids`` end with the target's last layer (id L-1, its raw output, which is
      what DeepSpec's target cache stores and what vLLM's aux id L is); ``fc`` is the identity on
      that layer's block and zero elsewhere, so the head's input state is the target's own final
      pre-norm hidden state at the position (only if the ids are mapped right);
    * the layer's ``o_proj`` and ``down_proj`` are zero: attention and MLP add nothing, and the
      layer's output is its residual, which DeepSpec takes before ``hidden_norm`` (vLLM:
      ``norm_before_residual: false``); ``hidden_norm`` is random ±1, so a head run with the
      residual taken after it predicts noise;
    * ``norm`` is the target's final norm and ``lm_head`` the target's, with its rows permuted by
      :func:`successor_map` of the target's greedy continuations of ``prompts``: where the
      target's next token is a, the head proposes the token the target emitted after a.

    After the target emitted token a at position p+1, the head reads the target's state at p
    (which predicts a) and proposes successor(a), the target's token at p+2 wherever the
    continuation repeats its own transitions (a tiny random target loops a lot). Later draft
    positions reuse that state, so they repeat the first proposal (accepted only where the
    target repeats a token). ``reduced_vocabulary`` keeps only the tokens the map covers:
    lm_head rows of those tokens, ``d2t`` pointing each at its successor (so the head also proves
    d2t's offset meaning).
    """
    import torch

    target, out = Path(target), Path(out)
    tcfg = read_config(target / "config.json")
    d = config_dims(tcfg)
    vocab, t_layers, h = int(tcfg["vocab_size"]), int(tcfg["num_hidden_layers"]), d["hidden"]
    ids = sorted(set(_default_layer_ids(t_layers)) | {t_layers - 1})
    successor = successor_map(prompts, greedy_continuations(target, prompts, max_new_tokens))
    embed, lm_head, final_norm = _target_tensors(target, "model.embed_tokens.weight",
                                                 "lm_head.weight", "model.norm.weight")
    dtype = embed.dtype
    gen = torch.Generator().manual_seed(seed)

    fc = torch.zeros(h, len(ids) * h, dtype=dtype)
    fc[:, -h:] = torch.eye(h, dtype=dtype)  # the last id's block: the target's final state
    state: dict[str, Any] = {"embed_tokens.weight": embed.clone(), "fc.weight": fc,
                             "norm.weight": final_norm.clone()}
    for name, shape in layer_shapes(d, "layers.0.", 2 * h, qk_norm).items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            state[name] = torch.zeros(shape, dtype=dtype)
        elif name.endswith("hidden_norm.weight"):
            state[name] = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype)
        elif len(shape) == 1:
            state[name] = torch.ones(shape, dtype=dtype)
        else:
            state[name] = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    config = _deepspec_config(tcfg, target, ids)
    if reduced_vocabulary:
        sources = sorted(successor)
        state.update(_reduced_head(lm_head[sources],
                                   torch.tensor([successor[a] for a in sources]), vocab))
        config["draft_vocab_size"] = len(sources)
    else:
        rows = torch.empty_like(lm_head)
        rows[torch.tensor(_permutation(successor, vocab))] = lm_head  # row succ(a) = row a
        state["lm_head.weight"] = rows
    return _save_deepspec_head(target, out, state, config, {
        "stand_in": "oracle weights from tests/eagle3_builders.py: build_oracle_eagle3, "
                    "not trained",
        "seed": seed, "oracle": {"prompts": len(prompts), "max_new_tokens": max_new_tokens,
                                 "mapped_tokens": len(successor)}})


def _permutation(partial: dict[int, int], size: int) -> list[int]:
    """A permutation p of range(size) with p[a] = partial[a]; the other tokens in order."""
    free_targets = iter(sorted(set(range(size)) - set(partial.values())))
    return [partial[a] if a in partial else next(free_targets) for a in range(size)]
