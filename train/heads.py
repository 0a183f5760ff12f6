"""Medusa heads and the MLP speculator in training: TGI's head drafts, on the target's states.

Both read h_t, the frozen target's final hidden state (`deepspec_plugin.models.heads`), computed
per batch by `TargetStates` (the last layer's output, the target's final norm applied here; no
logits unless prompt labels are asked for, nothing on disk). The data's signal is the label:
collate's row r holds the target's top-k for token r + 1, so

* Medusa head i at position t (predicting x_{t+2+i}) learns from row t + 1 + i;
* MLP stage i at chain t reads token x_{t+1+i} (the target's own: a draft token counts only
  where the earlier ones were accepted, i.e. equal to it) and the state of stage i - 1 at t, and
  learns from row t + 1 + i.

Steps are weighted ``step_weight ** i`` as Medusa trains its heads (0.8 there too); the logits
cover the whole vocabulary, as TGI's formats do.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import FILENAME as DRAFT_MANIFEST
from deepspec_plugin.train import distributed as dist
from deepspec_plugin.train.distributed import World
from deepspec_plugin.train.steps import StepDraft, Unrolled

DEFAULT_HEADS = 3
DEFAULT_HEAD_LAYERS = 1


def medusa_steps(heads, hidden, input_ids, mask) -> Unrolled:
    """Each head's logits where its label exists. ``hidden`` ``[B, L, H]`` (normed target
    states), ``mask`` ``[B, L - 1]`` (collate's: token r + 1 is labelled)."""
    logits, rows = [], []
    for i in range(heads.steps):
        shift = 1 + i  # the state at t, the signal row t + 1 + i
        bi, t = mask[:, shift:].nonzero(as_tuple=True)
        logits.append(heads.head_logits(i, hidden[bi, t]))
        rows.append((bi, t + shift))
    return Unrolled(logits, rows)


def mlp_steps(mlp, hidden, input_ids, mask) -> Unrolled:
    """Each stage's logits where its label exists (see the module docstring)."""
    n = input_ids.shape[1] - 1
    state = hidden[:, :n]
    logits, rows = [], []
    for i in range(mlp.steps):
        # chains t = 0..n-1-i read token t + 1 + i; the labelled ones t <= n - 2 - i
        state = mlp.stage(i, state[:, : n - i], input_ids[:, 1 + i:])
        bi, t = mask[:, 1 + i:].nonzero(as_tuple=True)
        logits.append(mlp.logits(state[bi, t]))
        rows.append((bi, t + 1 + i))
    return Unrolled(logits, rows)


def _steps_module(heads, steps_fn):
    import torch

    class HeadSteps(torch.nn.Module):
        """The heads over a batch's states; DDP wraps this: its forward is the whole
        differentiable computation."""

        def __init__(self):
            super().__init__()
            self.heads = heads

        def forward(self, hidden, input_ids, mask):
            return steps_fn(self.heads, hidden, input_ids, mask)

    return HeadSteps()


class HeadDraft(StepDraft):
    """A head draft (``kind``: medusa or mlp_speculator) over the frozen target."""

    kind: str
    method: str

    def __init__(self, heads, target, cfg, world: World = World()):
        num_layers = int(target.config.num_hidden_layers)
        super().__init__(target, cfg, world, [num_layers], heads.steps)
        self.heads = heads
        self.final_norm = target.model.norm
        steps_fn = medusa_steps if self.kind == "medusa" else mlp_steps
        self.module = dist.wrap(_steps_module(heads, steps_fn), world, cfg.parallel)

    def target_inputs(self, states):
        return self.final_norm(states)

    # --- init and build ----------------------------------------------------------------------

    @classmethod
    def check_init(cls, init_dir: Path, cfg) -> None:
        from deepspec_plugin.models.files import head_draft_kind

        if head_draft_kind(init_dir) != cls.kind:
            raise DspecError(f"{init_dir} is not a {cls.kind} draft",
                             f"start from --draft-init {cls.kind} (the default: new heads) or "
                             f"from a {cls.kind} draft this project wrote")

    @classmethod
    @abstractmethod
    def fresh(cls, cfg, target):
        """New heads for ``target``, initialised from its own embedding and LM head."""

    @classmethod
    def initialise(cls, cfg, dest: Path, seed: int) -> Path:
        """``out/init``: untrained heads, seeded."""
        import torch

        from deepspec_plugin.fileio import atomic_dir
        from deepspec_plugin.models import copy_tokenizer_files, load_causal_lm
        from deepspec_plugin.models.heads import write_heads

        if cfg.draft_init not in (cls.kind, "default"):
            source = Path(cfg.draft_init)
            cls.check_init(source, cfg)
            return source
        if dest.exists():
            return dest
        target = load_causal_lm(cfg.target)
        torch.manual_seed(seed)
        heads = cls.fresh(cfg, target)
        with atomic_dir(dest, overwrite=True) as tmp:
            write_heads(heads, str(Path(cfg.target).resolve()), tmp)
            copy_tokenizer_files(cfg.target, tmp)
        return dest

    @classmethod
    def build(cls, cfg, world: World, init_dir: Path, weights: Path | None) -> HeadDraft:
        from deepspec_plugin.models import load_causal_lm
        from deepspec_plugin.models.heads import load_heads

        target = load_causal_lm(cfg.target, device=cfg.device)  # frozen, eval
        heads = load_heads(weights if weights is not None else init_dir, target, cfg.device)
        heads.requires_grad_(True)
        heads.train()
        return cls(heads, target, cfg, world)

    # --- output ------------------------------------------------------------------------------

    def causal_lm(self):
        raise DspecError(f"a {self.kind} draft is not a causal LM: it cannot write on-policy "
                         "rollouts", f"train {self.kind} with --on-policy 0")

    def write_weights(self, dest: Path | None) -> None:
        from deepspec_plugin.models.heads import write_heads

        if self.world.is_main:
            Path(dest).mkdir(parents=True, exist_ok=True)
            write_heads(self.heads, str(Path(self.cfg.target).resolve()), dest)

    def save(self, out: Path, target: Path, manifest: dict[str, Any]) -> Path:
        from deepspec_plugin.fileio import atomic_dir
        from deepspec_plugin.manifest import write_manifest
        from deepspec_plugin.models import copy_tokenizer_files
        from deepspec_plugin.models.heads import write_heads

        dest = out / "draft"
        if self.world.is_main:
            with atomic_dir(dest, overwrite=True) as tmp:
                write_heads(self.heads, str(Path(target).resolve()), tmp)
                copy_tokenizer_files(target, tmp)
                write_manifest(manifest, tmp / DRAFT_MANIFEST)
        return dest

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.heads.parameters())

    def manifest_fields(self) -> dict[str, Any]:
        return {"k": self.steps, self.kind: {
            **self.shape(), "step_weight": float(self.cfg.step_weight),
            "prompt_labels": self.prompt_labels, "parameters": self.parameters_count(),
            "hidden_states_on_disk_bytes": 0, **self.timing()}}

    @abstractmethod
    def shape(self) -> dict[str, Any]:
        """The heads' sizes, for the manifest."""


class MedusaDraft(HeadDraft):
    """Medusa heads: ``cfg.heads`` heads of ``cfg.head_layers`` residual blocks each."""

    kind = method = "medusa"

    @classmethod
    def fresh(cls, cfg, target):
        from deepspec_plugin.models.heads import MedusaConfig, MedusaHeads, init_medusa_from_target

        heads = MedusaHeads(MedusaConfig(int(cfg.heads), int(cfg.head_layers),
                                         int(target.config.hidden_size),
                                         int(target.config.vocab_size)))
        init_medusa_from_target(heads, target)
        return heads

    def shape(self) -> dict[str, Any]:
        c = self.heads.cfg
        return {"num_heads": c.num_heads, "num_layers": c.num_layers}

    def describe(self) -> str:
        c = self.heads.cfg
        return (f"Medusa: {c.num_heads} heads of {c.num_layers} residual block(s) and an LM head "
                f"each, {self.parameters_count():,} trainable parameters (step weights "
                f"{self.cfg.step_weight}^i)")


class MlpSpeculatorDraft(HeadDraft):
    """The tied MLP speculator: ``cfg.heads`` stages."""

    kind = method = "mlp_speculator"

    @classmethod
    def fresh(cls, cfg, target):
        from deepspec_plugin.models.heads import MlpConfig, MlpSpeculator, init_mlp_from_target

        hidden = int(target.config.hidden_size)
        mlp = MlpSpeculator(MlpConfig(int(cfg.heads), hidden, hidden,
                                      int(target.config.vocab_size)))
        init_mlp_from_target(mlp, target)
        return mlp

    def shape(self) -> dict[str, Any]:
        c = self.heads.cfg
        return {"n_predict": c.n_predict, "inner_dim": c.inner_dim, "tie_weights": True,
                "scale_input": False}

    def describe(self) -> str:
        c = self.heads.cfg
        return (f"MLP speculator: {c.n_predict} stages (tied weights, inner dim {c.inner_dim}), "
                f"{self.parameters_count():,} trainable parameters (step weights "
                f"{self.cfg.step_weight}^i)")
