"""Head drafts on the target's last hidden state: Medusa heads and the MLP speculator, as in TGI.

Both read h_t, the target's final hidden state (after its final norm: what its lm_head reads) at
the position whose logits gave the last emitted token x_{t+1}; proposals are a chain of k tokens:

* **Medusa** (FasterDecoding; TGI ``layers/medusa.py`` ``MedusaHeadV1``, vLLM 0.32
  ``models/medusa.py``): head i is ``num_layers`` residual blocks ``x + SiLU(W x + b)`` and its own
  LM head, and predicts x_{t+2+i} from h_t alone: the k heads propose d_1..d_k independently.
* **MLP speculator** (IBM fms-extras; TGI ``layers/mlp.py`` ``MLPSpeculatorModelTied``): stage i
  updates a state from the previous stage's (h_t at stage 0) and the embedding of the token before
  the one it predicts (x_{t+1}, then its own d_i)::

      s_i = GELU(ln(w_s * proj(s_{i-1}) + w_e * emb(token)));  logits_i = head(s_i)
      w_s = 0.5 ** (0.5 / n_predict),  w_e = sqrt(1 - w_s ** 2) * sqrt(inner_dim / 2)

  ``ln`` is TGI's ``MLPSpeculatorLayerNorm`` (x / rms(x), then weight and bias). Weights are tied
  (one emb, head and ln; ``proj.0`` for stage 0, ``proj.1`` for the later ones): the only layout
  TGI's last release loads. ``scale_input`` stays false: TGI ignores it while vLLM and fms-extras
  normalise h_t first, so only false is one function on every engine. TGI takes n_predict from
  ``--speculate`` (for w_s): serve with ``--speculate n_predict``.

State dict names are the checkpoint's (TGI's): Medusa ``{head}.{layer}.linear.weight|bias`` and
``{head}.{num_layers}.weight``; MLP ``emb.0.weight``, ``proj.{0,1}.weight``, ``head.0.weight``,
``ln.0.weight|bias``, stored under ``speculator.``. torch is imported at module level: this module
is for processes that run models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deepspec_plugin.errors import DspecError
from deepspec_plugin.models.files import MEDUSA, MLP_SPECULATOR, head_kind

MEDUSA_WEIGHTS = "medusa_lm_head.safetensors"
MLP_WEIGHTS = "model.safetensors"
MLP_PREFIX = "speculator."
MLP_ARCHITECTURE = "MLPSpeculatorPreTrainedModel"
MLP_EPS = 1e-6  # MLPSpeculatorLayerNorm's default in TGI and vLLM


# --- Medusa -------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=True)

    def forward(self, x):
        return x + torch.nn.functional.silu(self.linear(x))


@dataclass(frozen=True)
class MedusaConfig:
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int

    def to_config_json(self, base_model: str) -> dict:
        """``config.json`` as TGI reads it (no ``architectures``: TGI would take it for a model)
        and vLLM 0.32 too (its MedusaConfig maps the ``medusa_num_*`` keys; ``medusa_fc_bias``
        keeps the blocks' biases, which vLLM drops by default)."""
        return {"medusa_num_heads": self.num_heads, "medusa_num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "base_model_name_or_path": base_model, "medusa_fc_bias": True}


class MedusaHeads(nn.Module):
    """``num_heads`` Medusa heads; ``self[i]`` is head i (blocks, then its LM head)."""

    method = MEDUSA

    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        self.cfg = cfg
        self.heads = nn.ModuleList(
            nn.ModuleList([*(ResBlock(cfg.hidden_size) for _ in range(cfg.num_layers)),
                           nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)])
            for _ in range(cfg.num_heads))

    @property
    def steps(self) -> int:
        return self.cfg.num_heads

    def head_logits(self, i: int, hidden):
        """Head i's logits from the target's final hidden states ``[..., H]``."""
        *blocks, out = self.heads[i]
        for block in blocks:
            hidden = block(hidden)
        return out(hidden)

    def checkpoint_state(self) -> dict:
        return {k.removeprefix("heads."): v.detach().contiguous()
                for k, v in self.state_dict().items()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict({f"heads.{k}": v for k, v in state.items()})


def init_medusa_from_target(heads: MedusaHeads, target) -> None:
    """Every head starts as the target's own LM head over h_t (zero blocks: identity), as Medusa
    initialises: step 0 of training predicts "the next token again", a start the loss bends."""
    with torch.no_grad():
        for head in heads.heads:
            *blocks, out = head
            for block in blocks:
                block.linear.weight.zero_()
                block.linear.bias.zero_()
            out.weight.copy_(target.get_output_embeddings().weight)


# --- the MLP speculator ---------------------------------------------------------------------------


class MlpLayerNorm(nn.Module):
    """TGI's and vLLM's ``MLPSpeculatorLayerNorm``: x / rms(x), no mean removed; weight and bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + MLP_EPS)
        return self.weight * x + self.bias


@dataclass(frozen=True)
class MlpConfig:
    n_predict: int
    emb_dim: int  # the target's hidden size
    inner_dim: int
    vocab_size: int

    def to_config_json(self, base_model: str) -> dict:
        """``config.json`` as TGI and vLLM read it (tied, unscaled input: see the module doc)."""
        return {"architectures": [MLP_ARCHITECTURE], "model_type": MLP_SPECULATOR,
                "n_predict": self.n_predict, "emb_dim": self.emb_dim, "inner_dim": self.inner_dim,
                "vocab_size": self.vocab_size, "tie_weights": True, "scale_input": False,
                "n_candidates": self.n_predict, "top_k_tokens_per_head": [1] * self.n_predict,
                "base_model_name_or_path": base_model, "torch_dtype": "float32"}


class MlpSpeculator(nn.Module):
    """The tied MLP speculator of the module docstring."""

    method = MLP_SPECULATOR

    def __init__(self, cfg: MlpConfig):
        super().__init__()
        self.cfg = cfg
        inner = cfg.inner_dim
        self.emb = nn.ModuleList([nn.Embedding(cfg.vocab_size, inner)])
        self.proj = nn.ModuleList([nn.Linear(cfg.emb_dim, inner, bias=False)]
                                  + ([nn.Linear(inner, inner, bias=False)]
                                     if cfg.n_predict > 1 else []))
        self.head = nn.ModuleList([nn.Linear(inner, cfg.vocab_size, bias=False)])
        self.ln = nn.ModuleList([MlpLayerNorm(inner)])
        self.state_weight = 0.5 ** (0.5 / cfg.n_predict)
        self.emb_weight = math.sqrt(1 - self.state_weight**2) * math.sqrt(inner / 2)

    @property
    def steps(self) -> int:
        return self.cfg.n_predict

    def stage(self, i: int, state, token_ids):
        """Stage i: the next state from ``state`` ``[..., emb or inner]`` and the previous token
        ``[...]``; the stage's logits are ``logits(next state)``."""
        z = self.emb[0](token_ids) * self.emb_weight
        proj = self.proj[0] if i == 0 else self.proj[1]
        return torch.nn.functional.gelu(self.ln[0](proj(state) * self.state_weight + z))

    def logits(self, state):
        return self.head[0](state)

    def checkpoint_state(self) -> dict:
        return {MLP_PREFIX + k: v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict({k.removeprefix(MLP_PREFIX): v for k, v in state.items()})


def init_mlp_from_target(mlp: MlpSpeculator, target, seed_std: float = 0.02) -> None:
    """The embedding and head from the target's (when inner_dim is the target's hidden size), the
    projections near the identity: stage 0 starts from "the target's state, nudged by the token"."""
    with torch.no_grad():
        for proj in mlp.proj:
            proj.weight.normal_(0.0, seed_std)
        if mlp.cfg.inner_dim == mlp.cfg.emb_dim:
            mlp.emb[0].weight.copy_(target.get_input_embeddings().weight)
            mlp.head[0].weight.copy_(target.get_output_embeddings().weight)
            for proj in mlp.proj:
                proj.weight += torch.eye(mlp.cfg.inner_dim)
        else:
            mlp.emb[0].weight.normal_(0.0, seed_std)
            mlp.head[0].weight.normal_(0.0, seed_std)


# --- files ----------------------------------------------------------------------------------------


# --- vLLM 0.32's Medusa layout (models/medusa.py): the same tensors under other names -------------

VLLM_MEDUSA_ARCHITECTURE = "MedusaModel"


def is_vllm_medusa(config: dict) -> bool:
    return config.get("model_type") == MEDUSA and "medusa_num_heads" not in config


def vllm_medusa_name(name: str, num_layers: int) -> str:
    """TGI's ``{h}.{l}.linear.weight`` -> vLLM's ``blocks.{h}.layers.{l}.weight``; the output
    layer ``{h}.{num_layers}.weight`` -> ``lm_heads.{h}.weight``."""
    head, layer, *rest = name.split(".")
    if int(layer) == num_layers:
        return f"lm_heads.{head}.{'.'.join(rest)}"
    return f"blocks.{head}.layers.{layer}.{rest[-1]}"


def vllm_medusa_config(cfg: MedusaConfig) -> dict:
    """``config.json`` as vLLM's MedusaConfig reads it; ``medusa_fc_bias`` keeps the residual
    blocks' biases (vLLM builds them without unless it is set)."""
    return {"architectures": [VLLM_MEDUSA_ARCHITECTURE], "model_type": MEDUSA,
            "num_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
            "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "truncated_vocab_size": cfg.vocab_size, "medusa_fc_bias": True,
            "torch_dtype": "float32"}


def build_heads(kind: str, config: dict, where: str = "config.json"):
    """An untrained module of ``kind`` sized by its ``config.json`` (TGI's layout, or vLLM's
    for Medusa)."""
    try:
        if kind == MEDUSA:
            vllm = is_vllm_medusa(config)
            return MedusaHeads(MedusaConfig(
                int(config["num_heads" if vllm else "medusa_num_heads"]),
                int(config["num_hidden_layers" if vllm else "medusa_num_layers"]),
                int(config["hidden_size"]), int(config["vocab_size"])))
        return MlpSpeculator(MlpConfig(
            int(config["n_predict"]), int(config["emb_dim"]),
            int(config.get("inner_dim") or config["emb_dim"]), int(config["vocab_size"])))
    except (KeyError, TypeError, ValueError) as e:
        raise DspecError(f"{where} is not a {kind} config (bad or missing {e})",
                         "point at a head draft written by dspec train") from None


def weights_file(kind: str, config: dict | None = None) -> str:
    if kind == MEDUSA and not (config and is_vllm_medusa(config)):
        return MEDUSA_WEIGHTS
    return MLP_WEIGHTS  # model.safetensors


def write_heads(module, base_model: str, dest: Path) -> None:
    """``config.json`` and the weights, in TGI's layout, into an existing (staging) directory."""
    from safetensors.torch import save_file

    from deepspec_plugin.fileio import atomic_write_text, json_text

    save_file(module.checkpoint_state(), str(Path(dest) / weights_file(module.method)),
              metadata={"format": "pt"})
    atomic_write_text(Path(dest) / "config.json",
                      json_text(module.cfg.to_config_json(base_model)))


def load_heads(path: str | Path, target, device: str = "cpu"):
    """A Medusa or MLP-speculator draft from ``path`` (safetensors only) for the loaded
    ``target``; every tensor is checked against the config before loading."""
    from safetensors.torch import load_file

    from deepspec_plugin.fileio import read_json_object
    from deepspec_plugin.tensorfiles import read_tensors, refuse_missing_weights

    path = Path(path)
    config = read_json_object(path / "config.json")
    kind = head_kind(config)
    if kind is None:
        raise DspecError(f"{path} is not a Medusa or MLP-speculator draft",
                         "point at a head draft written by dspec train --draft-type medusa or "
                         "mlp_speculator")
    module = build_heads(kind, config, f"{path}/config.json")
    hidden = module.cfg.hidden_size if kind == MEDUSA else module.cfg.emb_dim
    tcfg = target.config
    if (int(tcfg.vocab_size), int(tcfg.hidden_size)) != (module.cfg.vocab_size, hidden):
        raise DspecError(
            f"the {kind} draft in {path} was built for a target of vocabulary "
            f"{module.cfg.vocab_size} and hidden size {hidden}; this target has "
            f"{tcfg.vocab_size} and {tcfg.hidden_size}", "use the target the draft was trained for")
    file = path / weights_file(kind, config)
    if not file.is_file():
        refuse_missing_weights(path)
        raise DspecError(f"{path} has no {file.name}, where a {kind} draft keeps its weights",
                         "point at a head draft written by dspec train or dspec export tgi")
    names = {k: k for k in module.checkpoint_state()}  # module name -> stored name
    if kind == MEDUSA and is_vllm_medusa(config):
        names = {k: vllm_medusa_name(k, module.cfg.num_layers) for k in names}
    expected = {names[k]: tuple(v.shape) for k, v in module.checkpoint_state().items()}
    stored = {k: tuple(t.shape) for k, t in read_tensors(file).items()}
    missing = sorted(set(expected) - set(stored))
    wrong = [f"{k} is {list(stored[k])}, expected {list(s)}"
             for k, s in expected.items() if k in stored and stored[k] != s]
    if missing or wrong:
        raise DspecError(f"the {kind} draft in {path} "
                         + (f"lacks {', '.join(missing[:4])}" if missing else "")
                         + ("; " if missing and wrong else "") + "; ".join(wrong[:3]),
                         "re-save the whole draft (dspec train writes every tensor); a partial "
                         "or foreign checkpoint cannot be loaded")
    state = load_file(str(file))
    dtype = next(module.parameters()).dtype
    module.load_checkpoint_state({k: state[names[k]].to(dtype) for k in names})
    return module.to(device).eval()
