"""The EAGLE-3 head: one decoder layer over the target's own hidden states, in vLLM's layout.

The same module serves training (`ttt_forward` in ``deepspec_plugin.train.eagle3``), the reference
engine's proposer and the export: its ``state_dict`` *is* the checkpoint vLLM's
``Eagle3LlamaForCausalLM`` loads (read in vllm 0.32, ``model_executor/models/llama_eagle3.py``):

    fc.weight          [H, n_aux * H_target]  fuses the target's low / mid / high hidden states
    midlayer.*         one Llama decoder layer whose q/k/v read [input_layernorm(embedding);
                       hidden_norm(hidden)], 2 x H wide, plus ``hidden_norm``
    norm.weight        the final norm
    lm_head.weight     [draft_vocab_size, H]
    d2t                int64 [draft_vocab_size]: target id = draft id + d2t[draft id]
    t2d                bool [V]: which target tokens the head can propose (vLLM skips it)

No ``embed_tokens``: the head embeds with the target's (frozen) embedding, which vLLM shares with
the head when the checkpoint has none. One step, exactly as vLLM's ``LlamaModel.forward`` with
``norm_before_residual: false``::

    residual = hidden                                   # fc(target features), or the last step's
    x = attn(cat(input_layernorm(embed(token)), hidden_norm(hidden)))
    residual = residual + x
    residual = residual + mlp(post_attention_layernorm(residual))
    logits = lm_head(norm(residual)); next step's hidden = residual     # (pre-norm)

torch is imported at module level: this module is for processes that run models.
Target layer ids follow vLLM's convention: id i is the hidden state *entering* target layer i
(`AuxHiddenStates` hooks exactly those); DeepSpec's id L (the output of layer L) is vLLM's L + 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from deepspec_plugin.errors import DspecError
from deepspec_plugin.models.files import is_eagle3_dir  # noqa: F401  (re-exported)

ARCHITECTURE = "Eagle3LlamaForCausalLM"
WEIGHTS = "model.safetensors"
# Finite stand-in for -inf (a logit of a token outside the draft vocabulary): no NaN in softmax.
MASKED_LOGIT = -1e30


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers, as vLLM picks them for a Llama target
    (``get_eagle3_aux_hidden_state_layers``: 2, L // 2, L - 3), deduplicated for tiny targets."""
    ids = sorted({min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)})
    return [i for i in ids if 0 <= i <= num_layers]


@dataclass(frozen=True)
class Eagle3Config:
    """The head's sizes: the target's layer geometry, the draft vocabulary, the aux layer ids."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    aux_layer_ids: tuple[int, ...]
    target_num_layers: int
    max_position_embeddings: int
    rope_parameters: dict
    bos_token_id: int | None = None
    eos_token_id: Any = None
    pad_token_id: int | None = None

    @classmethod
    def for_target(cls, target_config: dict, draft_vocab_size: int,
                   aux_layer_ids: list[int] | None = None) -> Eagle3Config:
        """A head sized like one layer of the target (``target_config``: its config.json)."""
        t = target_config
        layers = int(t["num_hidden_layers"])
        ids = list(aux_layer_ids) if aux_layer_ids is not None else default_aux_layer_ids(layers)
        check_aux_layer_ids(ids, layers)
        vocab = int(t["vocab_size"])
        if not 0 < draft_vocab_size <= vocab:
            raise DspecError(f"draft_vocab_size {draft_vocab_size} is not in [1, {vocab}]",
                             f"choose a draft vocabulary of at most the target's {vocab} tokens")
        heads = int(t["num_attention_heads"])
        return cls(
            hidden_size=int(t["hidden_size"]), intermediate_size=int(t["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(t.get("num_key_value_heads") or heads),
            head_dim=int(t.get("head_dim") or int(t["hidden_size"]) // heads),
            rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)), vocab_size=vocab,
            draft_vocab_size=int(draft_vocab_size), target_hidden_size=int(t["hidden_size"]),
            aux_layer_ids=tuple(ids), target_num_layers=layers,
            max_position_embeddings=int(t.get("max_position_embeddings") or 8192),
            rope_parameters=dict(_rope_parameters(t)),
            bos_token_id=t.get("bos_token_id"), eos_token_id=t.get("eos_token_id"),
            pad_token_id=t.get("pad_token_id"),
        )

    def to_config_json(self) -> dict:
        """``config.json`` as vLLM's EAGLE-3 loader reads it (Llama keys and the head's own)."""
        ids = list(self.aux_layer_ids)
        config = {
            "architectures": [ARCHITECTURE], "model_type": "llama",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": False, "mlp_bias": False, "num_hidden_layers": 1,
            "layer_types": ["full_attention"], "tie_word_embeddings": False,
            "vocab_size": self.vocab_size, "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": dict(self.rope_parameters),
            "rope_theta": self.rope_parameters.get("rope_theta", 10000.0),
            "eagle_aux_hidden_state_layer_ids": ids, "num_aux_hidden_states": len(ids),
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids,
                             "use_aux_hidden_state": True},
            "norm_before_residual": False, "norm_before_fc": False,
            "target_num_hidden_layers": self.target_num_layers,
            "torch_dtype": "float32",
        }
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        return config

    @classmethod
    def from_config_json(cls, cfg: dict, where: str = "config.json") -> Eagle3Config:
        try:
            ids = (cfg.get("eagle_aux_hidden_state_layer_ids")
                   or (cfg.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids"))
            heads = int(cfg["num_attention_heads"])
            return cls(
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]), num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                vocab_size=int(cfg["vocab_size"]),
                draft_vocab_size=int(cfg.get("draft_vocab_size") or cfg["vocab_size"]),
                target_hidden_size=int(cfg.get("target_hidden_size") or cfg["hidden_size"]),
                aux_layer_ids=tuple(int(i) for i in ids),
                target_num_layers=int(cfg.get("target_num_hidden_layers") or max(ids)),
                max_position_embeddings=int(cfg.get("max_position_embeddings") or 8192),
                rope_parameters=dict(_rope_parameters(cfg)),
                bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DspecError(f"{where} is not an EAGLE-3 head's config (bad or missing {e})",
                             "point at a head written by dspec train --draft-type eagle3 or "
                             "dspec export vllm --method eagle3") from None

    def to_json(self) -> dict:
        return asdict(self) | {"aux_layer_ids": list(self.aux_layer_ids)}


def _rope_parameters(cfg: dict) -> dict:
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope = dict(rope)
    rope.setdefault("rope_theta", float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def check_aux_layer_ids(ids: list[int], num_layers: int) -> None:
    """vLLM's aux ids are hidden states entering layers 1..L-1 (0 is the embedding, which carries
    nothing the head's own embedding lacks; L, the last output, is allowed too)."""
    bad = [i for i in ids if not 1 <= int(i) <= num_layers]
    if not ids or bad:
        raise DspecError(
            f"target layer ids {list(ids)} do not fit the target's {num_layers} layers"
            + (f" ({', '.join(map(str, bad))} out of range)" if bad else ""),
            f"give ids in [1, {num_layers}] (vLLM's convention: the hidden state entering that "
            f"layer), or leave the default {default_aux_layer_ids(num_layers)}")
    if any(b <= a for a, b in zip(ids, ids[1:])):
        raise DspecError(f"target layer ids {list(ids)} are not strictly increasing",
                         "list each layer once, low to high (vLLM collects them in layer order)")


def _llama_config(cfg: Eagle3Config):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, num_hidden_layers=1,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters=dict(cfg.rope_parameters), hidden_act="silu",
    )


def build_head(cfg: Eagle3Config, embed_tokens):
    """A fresh (untrained) head; ``embed_tokens``: the target's embedding module, shared, frozen."""
    import torch
    from transformers.models.llama.modeling_llama import (
        LlamaMLP,
        LlamaRMSNorm,
        LlamaRotaryEmbedding,
    )

    llama = _llama_config(cfg)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            h2, hd = 2 * cfg.hidden_size, cfg.head_dim
            self.q_proj = nn.Linear(h2, cfg.num_attention_heads * hd, bias=False)
            self.k_proj = nn.Linear(h2, cfg.num_key_value_heads * hd, bias=False)
            self.v_proj = nn.Linear(h2, cfg.num_key_value_heads * hd, bias=False)
            self.o_proj = nn.Linear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=False)

    class MidLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            self.hidden_norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            self.self_attn = Attention()
            self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
            self.mlp = LlamaMLP(llama)

    head = Eagle3Head(cfg, embed_tokens)
    head.fc = nn.Linear(len(cfg.aux_layer_ids) * cfg.target_hidden_size, cfg.hidden_size,
                        bias=False)
    head.midlayer = MidLayer()
    head.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
    head.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
    head.rotary = LlamaRotaryEmbedding(config=llama)
    head.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
    head.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
    # target id -> draft id, draft_vocab_size where the target token is outside (not saved)
    head.register_buffer("target_to_draft",
                         torch.full((cfg.vocab_size,), cfg.draft_vocab_size, dtype=torch.long),
                         persistent=False)
    return head


class Eagle3Head(nn.Module):
    """The head (built by `build_head` / `load_head`). Tensors as vLLM names them."""

    def __init__(self, cfg: Eagle3Config, embed_tokens):
        super().__init__()
        self.cfg = cfg
        # A plain attribute, not a submodule: the target's embedding is neither trained nor saved.
        object.__setattr__(self, "embed_tokens", embed_tokens)

    # --- the vocabulary maps ----------------------------------------------------------------

    def set_vocabulary(self, target_ids) -> None:
        """The draft vocabulary: ``target_ids`` (sorted, distinct), draft id i = target_ids[i]."""
        import torch

        ids = torch.as_tensor(target_ids, dtype=torch.long, device=self.d2t.device)
        if ids.numel() != self.cfg.draft_vocab_size:
            raise DspecError(f"{ids.numel()} draft tokens for a head of draft_vocab_size "
                             f"{self.cfg.draft_vocab_size}", "pass one target id per draft token")
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True
        self._refresh_maps()

    def _refresh_maps(self) -> None:
        import torch

        ids = self.draft_to_target_ids()
        self.target_to_draft.fill_(self.cfg.draft_vocab_size)
        self.target_to_draft[ids] = torch.arange(ids.numel(), device=ids.device)

    def draft_to_target_ids(self):
        import torch

        return torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device) + self.d2t

    # --- one step ---------------------------------------------------------------------------

    def combine(self, aux):
        """fc over the concatenated aux hidden states ``[..., n_aux * H_target]``."""
        return self.fc(aux)

    def qkv(self, token_ids, hidden, position_ids):
        """The layer's attention inputs for these positions: (q, k, v) with rope applied,
        ``[B, heads, T, head_dim]``; and the residual (the hidden state in)."""
        import torch
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        layer, cfg = self.midlayer, self.cfg
        embeds = self.embed_tokens(token_ids).to(hidden.dtype)
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)
        b, t, _ = x.shape
        hd = cfg.head_dim
        q = layer.self_attn.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        cos, sin = self.rotary(x, position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v, hidden

    def finish(self, attn_out, residual):
        """The rest of the layer after attention (``attn_out`` ``[B, heads, T, head_dim]``):
        returns (normed, pre-norm) hidden states; logits come from ``normed``."""
        layer = self.midlayer
        b, _, t, _ = attn_out.shape
        residual = residual + layer.self_attn.o_proj(attn_out.transpose(1, 2).reshape(b, t, -1))
        residual = residual + layer.mlp(layer.post_attention_layernorm(residual))
        return self.norm(residual), residual

    def logits(self, normed):
        """Logits over the draft vocabulary ``[..., draft_vocab_size]``."""
        return self.lm_head(normed)

    def logits_with_outside(self, normed):
        """Draft-vocabulary logits plus one last column for "any token outside it" at
        `MASKED_LOGIT`: a target signal mapped with ``target_to_draft`` then scores exactly."""
        import torch.nn.functional as F

        return F.pad(self.logits(normed), (0, 1), value=MASKED_LOGIT)

    def target_probs(self, draft_probs):
        """Draft-vocabulary probabilities ``[..., Vd]`` spread onto the target's vocabulary
        (0 outside the draft vocabulary: the head never proposes those tokens)."""
        import torch

        out = torch.zeros((*draft_probs.shape[:-1], self.cfg.vocab_size),
                          dtype=draft_probs.dtype, device=draft_probs.device)
        out[..., self.draft_to_target_ids()] = draft_probs
        return out


def attend(q, k, v, mask):
    """Scaled dot-product attention with grouped kv heads; ``mask`` bool, True = attend."""
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                          enable_gqa=k.shape[1] != q.shape[1])


def init_from_target(head: Eagle3Head, target) -> None:
    """Initialise what has a natural counterpart in the target: the final norm, the lm_head rows
    of the draft vocabulary, and ``fc`` as the identity on the highest aux layer (so the first
    step starts from the target's own high hidden state); the layer keeps its random init with
    small output projections, so at step 0 the head is close to "read the target's state"."""
    import torch

    with torch.no_grad():
        head.norm.weight.copy_(target.model.norm.weight)
        head.lm_head.weight.copy_(target.get_output_embeddings().weight[head.draft_to_target_ids()])
        h, th = head.cfg.hidden_size, head.cfg.target_hidden_size
        head.fc.weight.normal_(0.0, 0.02 / math.sqrt(len(head.cfg.aux_layer_ids)))
        if h == th:
            head.fc.weight[:, -th:] += torch.eye(h)
        layer = head.midlayer
        for norm in (layer.input_layernorm, layer.hidden_norm, layer.post_attention_layernorm):
            norm.weight.fill_(1.0)
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj):
            lin.weight.normal_(0.0, 0.02)
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            lin.weight.normal_(0.0, 0.02 / math.sqrt(2.0))


# --- the target's hidden states --------------------------------------------------------------


class EnoughLayers(Exception):
    """Raised by `AuxHiddenStates` with ``stop_early`` once the highest aux layer is captured:
    the rest of the target's forward is not needed (training needs no logits)."""


class AuxHiddenStates:
    """Forward pre-hooks on the target's layers that keep the hidden states entering the aux
    layers (vLLM's convention) of the latest forward; id L (= num layers) is the output of the
    last layer, before the final norm. With ``stop_early`` the forward stops there by raising
    `EnoughLayers` (catch it: `run`)."""

    def __init__(self, target, layer_ids, stop_early: bool = False):
        self.layer_ids = list(layer_ids)
        self.target = target
        layers = target.model.layers
        self._seen: dict[int, Any] = {}
        self._handles = []
        last = max(self.layer_ids)
        for i in self.layer_ids:
            stop = stop_early and i == last
            if i < len(layers):
                self._handles.append(layers[i].register_forward_pre_hook(self._pre(i, stop)))
            else:  # the last layer's output
                self._handles.append(layers[-1].register_forward_hook(self._post(i, stop)))

    def _pre(self, i, stop):
        def hook(_module, args):
            self._seen[i] = args[0]
            if stop:
                raise EnoughLayers
        return hook

    def _post(self, i, stop):
        def hook(_module, _args, output):
            self._seen[i] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise EnoughLayers
        return hook

    def run(self, **inputs):
        """The target's decoder over ``inputs`` (no head), returning `take`'s states."""
        try:
            self.target.model(**inputs)
        except EnoughLayers:
            pass
        return self.take()

    def take(self):
        """The concatenated states ``[B, T, n_aux * H]`` of the latest forward (then forgotten)."""
        import torch

        missing = [i for i in self.layer_ids if i not in self._seen]
        if missing:
            raise RuntimeError(f"no hidden state was captured for target layers {missing}")
        out = torch.cat([self._seen[i] for i in self.layer_ids], dim=-1)
        self._seen.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# --- files -----------------------------------------------------------------------------------


def head_state(head: Eagle3Head) -> dict:
    """The tensors of the checkpoint, named as vLLM loads them (no d2t for a head over the whole
    vocabulary: vLLM has no place for it)."""
    skip = ("rotary.", "target_to_draft")
    if head.cfg.draft_vocab_size == head.cfg.vocab_size:
        skip += ("d2t",)
    return {k: v.detach().contiguous() for k, v in head.state_dict().items()
            if not k.startswith(skip)}


def write_head(head: Eagle3Head, dest: Path) -> None:
    """``config.json`` and ``model.safetensors`` into an existing (staging) directory."""
    from safetensors.torch import save_file

    from deepspec_plugin.fileio import atomic_write_text, json_text

    state = head_state(head)
    save_file(state, str(Path(dest) / WEIGHTS), metadata={"format": "pt"})
    config = head.cfg.to_config_json()
    config["torch_dtype"] = str(state["fc.weight"].dtype).removeprefix("torch.")
    atomic_write_text(Path(dest) / "config.json", json_text(config))


def load_head(path: str | Path, target, device: str = "cpu") -> Eagle3Head:
    """A head from ``path`` (vLLM's layout, safetensors only) on the loaded ``target`` model,
    whose embedding it shares. Every tensor is checked against the config before loading."""
    import torch

    from deepspec_plugin.fileio import read_json_object
    from deepspec_plugin.tensorfiles import read_dir, read_tensors, refuse_missing_weights

    path = Path(path)
    cfg = Eagle3Config.from_config_json(read_json_object(path / "config.json"),
                                        f"{path}/config.json")
    tcfg = target.config
    if int(tcfg.vocab_size) != cfg.vocab_size or int(tcfg.hidden_size) != cfg.target_hidden_size:
        raise DspecError(
            f"the head in {path} was built for a target of vocabulary {cfg.vocab_size} and hidden "
            f"size {cfg.target_hidden_size}; this target has {tcfg.vocab_size} and "
            f"{tcfg.hidden_size}", "use the target the head was trained for")
    check_aux_layer_ids(list(cfg.aux_layer_ids), int(tcfg.num_hidden_layers))
    if not (path / WEIGHTS).is_file():
        refuse_missing_weights(path)
    head = build_head(cfg, target.get_input_embeddings())
    expected = {k: tuple(v.shape) for k, v in head_state(head).items()}
    stored = read_dir(path)
    unknown = sorted(set(stored) - set(expected) - {"d2t", "t2d", "embed_tokens.weight"})
    if unknown:
        raise DspecError(f"the EAGLE-3 head in {path} has tensors a Llama-style head does not "
                         f"({', '.join(unknown[:4])}): the reference engine would run another "
                         "model than the one trained",
                         "evaluate a Llama-style head (dspec train --draft-type eagle3 writes "
                         "one), or this head with --engine vllm")
    missing = sorted(set(expected) - set(stored) - {"t2d"})
    wrong = [f"{k} is {list(stored[k].shape)}, expected {list(s)}"
             for k, s in expected.items() if k in stored and tuple(stored[k].shape) != s]
    if missing or wrong:
        raise DspecError(f"the EAGLE-3 head in {path} "
                         + (f"lacks {', '.join(missing[:5])}" if missing else "")
                         + ("; " if missing and wrong else "") + "; ".join(wrong[:3]),
                         "re-save the whole head (dspec train writes every tensor); a partial "
                         "or foreign checkpoint cannot be loaded")
    from safetensors.torch import load_file

    read_tensors(path / WEIGHTS)  # offsets checked before a byte is trusted
    state = {k: t for k, t in load_file(str(path / WEIGHTS)).items() if k in expected}
    state.setdefault("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
    if "t2d" not in state:
        state["t2d"] = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        state["t2d"][torch.arange(cfg.draft_vocab_size) + state["d2t"].long()] = True
    dtypes = {k: v.dtype for k, v in head.state_dict().items()}
    head.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()}, strict=False)
    head._refresh_maps()
    return head.to(device).eval()
