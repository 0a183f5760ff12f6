"""LoRA for draft training, with PEFT: parse ``--lora``, wrap a draft, save, resume and merge.

Spec form: ``r=R[,alpha=A][,targets=NAME+NAME...][,dropout=P]``. Fields are separated by ``,``,
so target module names are joined with ``+`` (e.g. ``targets=q_proj+v_proj``). Defaults: alpha is
2r; targets are every attention and MLP projection of a Llama-like model (:data:`DEFAULT_TARGETS`);
dropout is 0 (so a LoRA run stays deterministic and resumes exactly).

A target name matches a module whose dotted name ends with it (PEFT's rule), and must match at
least one ``nn.Linear`` of the model; otherwise the error lists the model's linear module names.

The trainer keeps the base frozen and trains only the adapter; its checkpoints hold the adapter
weights (safetensors); the final draft is the merged model (``merge_and_unload``), a plain
Hugging Face checkpoint that exporters use directly, with the adapter beside it in ``out/adapter``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SPEC_FORM = (
    "r=R[,alpha=A][,targets=NAME+NAME...][,dropout=P], e.g. r=16,alpha=32,targets=q_proj+v_proj"
)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSpec:
    r: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


def _bad(spec: str, why: str) -> DspecError:
    return DspecError(f"invalid LoRA spec {spec!r}: {why}", f"use the form {SPEC_FORM}")


def parse_lora(spec: str) -> LoraSpec:
    """``"r=16,alpha=32,targets=q_proj+v_proj"`` -> LoraSpec; a bad spec raises DspecError."""
    fields: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            raise _bad(spec, f"{part!r} is not key=value")
        if key not in ("r", "alpha", "targets", "dropout"):
            raise _bad(spec, f"unknown key {key!r}")
        if key in fields:
            raise _bad(spec, f"{key!r} given twice")
        fields[key] = value
    if "r" not in fields:
        raise _bad(spec, "the rank r is required")
    try:
        r = int(fields["r"])
    except ValueError:
        raise _bad(spec, f"r must be an integer, got {fields['r']!r}") from None
    if r < 1:
        raise _bad(spec, f"r must be >= 1, got {r}")
    try:
        alpha = float(fields.get("alpha", 2 * r))
        dropout = float(fields.get("dropout", 0.0))
    except ValueError:
        raise _bad(spec, "alpha and dropout must be numbers") from None
    if alpha <= 0:
        raise _bad(spec, f"alpha must be > 0, got {fields['alpha']}")
    if not 0.0 <= dropout < 1.0:
        raise _bad(spec, f"dropout must be in [0, 1), got {fields['dropout']}")
    targets = DEFAULT_TARGETS
    if "targets" in fields:
        targets = tuple(t.strip() for t in fields["targets"].split("+"))
        if not all(targets):
            raise _bad(spec, f"empty name in targets {fields['targets']!r}")
        targets = tuple(dict.fromkeys(targets))  # drop repeats, keep the order
    if alpha == int(alpha):
        alpha = int(alpha)  # so the manifest shows alpha=32, not 32.0
    return LoraSpec(r=r, alpha=alpha, targets=targets, dropout=dropout)


def linear_module_names(model) -> list[str]:
    """Dotted names of the model's ``nn.Linear`` modules (the LoRA-able ones)."""
    import torch

    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_targets(model, spec: LoraSpec) -> None:
    """Every target name must match (as a suffix, as PEFT matches) some linear module."""
    names = linear_module_names(model)
    missing = [
        t for t in spec.targets if not any(n == t or n.endswith("." + t) for n in names)
    ]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise DspecError(
            f"LoRA target module(s) {', '.join(missing)} not in the model; its linear modules "
            f"are {', '.join(short)} ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})",
            "pass targets= with names from that list, joined with +",
        )


def check_targets_of(model_dir: Path, spec: LoraSpec) -> None:
    """check_targets on the model in `model_dir`, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    check_targets(model, spec)


def apply_lora(model, spec: LoraSpec):
    """The PEFT model around `model`: base frozen, only the LoRA matrices trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    check_targets(model, spec)
    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.targets),
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        p.requires_grad_("lora_" in name)  # only the adapter trains, whatever `model` had
    return peft_model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def load_adapter_weights(peft_model, adapter_dir: Path) -> None:
    """Load adapter weights saved by ``save_pretrained`` into `peft_model` (safetensors only);
    every LoRA tensor must be present, and nothing else."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise DspecError(
            f"{adapter_dir} holds no {ADAPTER_WEIGHTS}",
            "the checkpoint is incomplete: delete it to resume from an older one",
        )
    state = load_file(str(path))
    result = set_peft_model_state_dict(peft_model, state)
    lora_missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or lora_missing:
        raise DspecError(
            f"the adapter in {adapter_dir} does not fit this LoRA spec "
            f"(unexpected {list(result.unexpected_keys)[:3]}, missing {lora_missing[:3]})",
            "resume with the --lora spec the run was started with",
        )


def merge(peft_model):
    """The plain model with the adapter merged into its weights (``merge_and_unload``)."""
    return peft_model.merge_and_unload()


__all__ = [
    "DEFAULT_TARGETS",
    "LoraSpec",
    "parse_lora",
    "apply_lora",
    "check_targets",
    "check_targets_of",
    "linear_module_names",
    "parameter_counts",
    "load_adapter_weights",
    "merge",
]
