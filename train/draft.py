"""The draft in training as a component: how it is built, its forward on a batch, how it is saved.

The training loop sees only `Draft`: it trains ``draft.module`` (wrapped for DDP / FSDP, so the
collectives see the whole forward), gets the response logits of a batch from `Draft.forward`,
scores it with `Draft.loss`, writes checkpoint weights with `Draft.write_weights` and the finished
draft with `Draft.save`.
A draft type is a `Draft` subclass; `StandaloneDraft` is a causal LM of the target's vocabulary
trained in full or with a LoRA adapter.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from deepspec_plugin.manifest import FILENAME as DRAFT_MANIFEST
from deepspec_plugin.train import distributed as dist
from deepspec_plugin.train.distributed import World


def response_logits(model, batch: dict[str, Any]):
    """A causal LM's logits at the response positions only, as ``[1, N, V]``.

    The head over the whole vocabulary (49152 for the reference target) at every prompt position
    would dominate time and memory; only the N positions that predict a response token are needed.
    Losses over these N rows need no mask: their mean is the masked mean over the batch.
    """
    base = dist.unwrap(model)
    hidden = base.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return base.lm_head(hidden[:, :-1][batch["mask"]]).unsqueeze(0)


def _response_module(lm):
    """`response_logits` as the forward of a module around the draft, so that DDP and FSDP see
    (and hook) the whole computation: FSDP gathers the shards in the root's forward."""
    import torch

    class ResponseLogits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, mask):
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask}
            return response_logits(self.lm, batch)

    return ResponseLogits(lm)


class Draft(ABC):
    """A draft in training. ``module``: what the optimizer, gradient clipping, train / eval mode
    and the state dicts see (wrapped for the world)."""

    method: str  # the draft manifest's "method"
    module: Any

    @classmethod
    @abstractmethod
    def check_init(cls, init_dir: Path, cfg) -> None:
        """Refuse an init this draft cannot be built from (on rank 0, before anything trains)."""

    @classmethod
    def initialise(cls, cfg, dest: Path, seed: int) -> Path:
        """The draft's start (``out/init``, or the directory ``cfg.draft_init`` names)."""
        from deepspec_plugin.train.init import init_draft

        return init_draft(cfg.target, cfg.draft_init, dest, seed=seed)

    @classmethod
    @abstractmethod
    def build(cls, cfg, world: World, init_dir: Path, weights: Path | None) -> Draft:
        """The draft from its init, with the checkpoint weights ``weights`` (what
        `write_weights` wrote) loaded when resuming. The caller seeds the RNGs first."""

    @abstractmethod
    def forward(self, batch: dict[str, Any]):
        """Logits at the response positions of a collated batch, ``[1, N, V]``."""

    def loss(self, output, signal, loss_fn):
        """The training loss of ``forward``'s output against the target's signal for the
        batch. A draft type whose forward unrolls several steps weighs them here."""
        return loss_fn(output.float(), signal, None)

    def score(self, batch: dict[str, Any], signal_temperature: float,
              temperature: float) -> dict[str, list[float]]:
        """Held-out sums over a batch, one entry per draft step: 1 - TVD and greedy agreement,
        each weighted by its token count, and the counts."""
        from deepspec_plugin.train.batches import target_signal
        from deepspec_plugin.train.losses import acceptance_from_tvd, greedy_agreement

        logits = self.forward(batch).float()
        signal = target_signal(batch, signal_temperature)
        n = int(batch["mask"].sum())
        if n == 0:
            return {"acceptance": [0.0], "greedy": [0.0], "tokens": [0]}
        return {"acceptance": [float(acceptance_from_tvd(logits, signal, None, temperature)) * n],
                "greedy": [float(greedy_agreement(logits, signal, None)) * n], "tokens": [n]}

    def timing(self) -> dict[str, float]:
        """Where the training time went, where the draft type knows (the target's share)."""
        return {}

    @abstractmethod
    def causal_lm(self):
        """The draft as a plain causal LM (unwrapped), to decode on-policy rollouts with."""

    @abstractmethod
    def write_weights(self, dest: Path | None) -> None:
        """A checkpoint's weights into ``dest``. A collective under FSDP: every process calls it
        (the others with None), rank 0 writes."""

    @abstractmethod
    def save(self, out: Path, target: Path, manifest: dict[str, Any]) -> Path:
        """The finished draft (and what goes beside it) under ``out``; returns ``out/draft``.
        A collective like `write_weights`."""

    def trainable_parameters(self) -> list:
        return [p for p in self.module.parameters() if p.requires_grad]

    def describe(self) -> str:
        """One log line: what trains."""
        return type(self).__name__

    def manifest_fields(self) -> dict[str, Any]:
        """Entries this draft type adds to the draft manifest."""
        return {}


class StandaloneDraft(Draft):
    """A causal LM with the target's vocabulary; LoRA (``cfg.lora``) trains an adapter on it."""

    method = "draft_model"

    def __init__(self, model, world: World = World(), parallel: str = "ddp", lora=None,
                 init_dir: Path | None = None, label: str = "full fine-tuning"):
        from deepspec_plugin.train.lora import parameter_counts

        self.model = model  # the causal LM; the PEFT model around it under LoRA
        self.world, self.parallel, self.lora, self.init_dir = world, parallel, lora, init_dir
        self.label = label  # how `describe` names what trains
        self.trainable, self.total = parameter_counts(model)
        wrapper = _response_module(model)
        wrapper.training = model.training  # the wrapper alone: the model's mode is unchanged
        self.module = dist.wrap(wrapper, world, parallel)

    @classmethod
    def check_init(cls, init_dir: Path, cfg) -> None:
        from deepspec_plugin.train.lora import check_targets_of

        if cfg.lora_spec is not None:
            check_targets_of(init_dir, cfg.lora_spec)

    @classmethod
    def build(cls, cfg, world: World, init_dir: Path, weights: Path | None) -> StandaloneDraft:
        from deepspec_plugin.models import load_causal_lm
        from deepspec_plugin.train.lora import apply_lora, load_adapter_weights

        lora = cfg.lora_spec
        if lora is not None:  # checkpoints hold the adapter: the base comes from the init
            model = apply_lora(load_causal_lm(init_dir, device=cfg.device), lora)
            if weights is not None:
                load_adapter_weights(model, weights)
        else:
            source = weights if weights is not None else init_dir
            model = load_causal_lm(source, device=cfg.device).requires_grad_(True)
        model.train()
        label = f"LoRA {cfg.lora}" if lora is not None else "full fine-tuning"
        return cls(model, world, cfg.parallel, lora, init_dir, label)

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp" and self.world.distributed

    def forward(self, batch: dict[str, Any]):
        return self.module(batch["input_ids"], batch["attention_mask"], batch["mask"])

    def causal_lm(self):
        return dist.unwrap(self.module)

    def _gathered_state(self) -> dict:
        """The full (unsharded) state dict of the causal LM; a collective."""
        full = dist.full_model_state(self.module)
        return {k.removeprefix("lm."): v for k, v in full.items()}

    def write_weights(self, dest: Path | None) -> None:
        if self.sharded:
            state = self._gathered_state()
            if self.world.is_main:
                dist.unwrap(self.module).save_pretrained(str(dest), state_dict=state)
        elif self.world.is_main:
            self.model.save_pretrained(str(dest))  # LoRA: the adapter only

    def save(self, out: Path, target: Path, manifest: dict[str, Any]) -> Path:
        from deepspec_plugin.models import load_causal_lm
        from deepspec_plugin.train.lora import merge

        if self.sharded:
            state = self._gathered_state()
            if self.world.is_main:
                final = load_causal_lm(self.init_dir)  # a plain copy to hold the gathered weights
                final.load_state_dict(state)
                write_draft_dir(out, final, target, manifest)
        elif self.world.is_main:
            final = self.model
            if self.lora is not None:
                write_adapter_dir(out, self.model)  # first: out/draft marks a finished run
                final = merge(self.model)
            write_draft_dir(out, final, target, manifest)
        return out / "draft"

    def describe(self) -> str:
        return (f"{self.label}: {self.trainable:,} trainable of {self.total:,} parameters "
                f"({self.trainable / max(self.total, 1):.2%})")

    def manifest_fields(self) -> dict[str, Any]:
        if self.lora is None:
            return {}
        return {"lora": dict(self.lora.to_json(), adapter="adapter",
                             trainable_parameters=self.trainable)}


# --- output -------------------------------------------------------------------------------------


def write_draft_dir(out: Path, model, target: Path, manifest: dict[str, Any]) -> Path:
    """out/draft: weights, config, the target's tokenizer files and deepspec.json, atomically."""
    from deepspec_plugin.fileio import atomic_dir
    from deepspec_plugin.manifest import write_manifest
    from deepspec_plugin.models import check_pair, copy_tokenizer_files

    dest = out / "draft"
    with atomic_dir(dest, overwrite=True) as tmp:
        model.save_pretrained(str(tmp))
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError("save_pretrained wrote no safetensors weights")
        copy_tokenizer_files(target, tmp)
        write_manifest(manifest, tmp / DRAFT_MANIFEST)  # validated: the exporters read it
    check_pair(target, dest)
    return dest


def write_adapter_dir(out: Path, peft_model) -> Path:
    """out/adapter: the PEFT adapter (safetensors + adapter_config.json), atomically."""
    from deepspec_plugin.fileio import atomic_dir

    dest = out / "adapter"
    # overwrite: one may be left by a run killed between the adapter and the draft
    with atomic_dir(dest, overwrite=True) as tmp:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
    return dest
