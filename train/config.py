"""Every setting of a training run, checked in one place, and the run identity derived from them.

`TrainConfig` is what ``train(...)`` keywords and ``dspec train`` options fill. `RunIdentity` is
what a checkpoint records and a resume must match: the target, the data and the init by
fingerprint, the loss and every setting that changes the weights (not the run controls:
``resume``, ``device``, ``progress``, ``stop_at``, ``save_every``, ...).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import FILENAME as DRAFT_MANIFEST
from deepspec_plugin.train.distributed import PARALLEL_MODES

TEACHERS = ("stored", "online")
DRAFT_TYPES = ("standalone", "eagle3", "medusa", "mlp_speculator")
HEAD_TYPES = ("eagle3", "medusa", "mlp_speculator")  # drafts on the target's hidden states
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    target: Path
    data: Path
    out: Path
    # deepspec_plugin.train.init: layers:N, fresh[:...] or a model dir; for eagle3: "eagle3" (a
    # new head) or a head's directory. None: the draft type's default (layers:2, eagle3).
    draft_init: str | None = None
    loss: str = "tvd+fkl"  # deepspec_plugin.train.losses.make_loss spec
    steps: int = 100
    lr: float = 1e-3  # peak; linear warmup then cosine decay
    batch_size: int = 8  # samples per micro-batch, per process under torchrun
    grad_accum: int = 1  # micro-batches per step
    warmup_steps: int = 10
    temperature: float = 1.0  # the temperature the draft will serve at
    eval_fraction: float = 0.05  # share of prompts held out for the acceptance eval
    eval_every: int = 50
    save_every: int = 50
    keep_last: int = 2  # checkpoints kept
    seed: int = 0  # data split, order, initialisation, on-policy choices
    resume: bool = False  # continue from the newest checkpoint in `out`
    device: str = "cpu"
    progress: bool = True
    stop_at: int | None = None  # stop after this step with a checkpoint, as a kill would
    lora: str | None = None  # deepspec_plugin.train.lora.parse_lora spec
    teacher: str = "stored"  # stored top-k, or "online": the target run on each batch
    on_policy: float = 0.0  # fraction of micro-batches the draft writes itself
    parallel: str = "ddp"  # under torchrun: ddp or fsdp
    precision: str = "auto"  # auto (bf16 on CUDA), fp32 or bf16
    # standalone (a causal LM), or a draft on the target's hidden states: eagle3 (one decoder
    # layer), medusa (residual heads) or mlp_speculator (IBM's, for TGI)
    draft_type: str = "standalone"
    step_weight: float = 0.8  # eagle3 / medusa / mlp_speculator: step i's loss weight ** i
    # medusa / mlp_speculator only (deepspec_plugin.train.heads):
    heads: int = 3  # Medusa heads, or MLP-speculator stages: the most tokens one proposal has
    head_layers: int = 1  # Medusa: residual blocks per head
    # eagle3 only (deepspec_plugin.train.eagle3):
    ttt_steps: int = 7  # draft steps unrolled in training (training-time test)
    draft_vocab_size: int | None = None  # None: min(8192, the target's vocabulary)
    aux_layer_ids: tuple[int, ...] | None = None  # vLLM ids; None: low, middle, high (2, L/2, L-3)
    target_states_gib: float = 4.0  # the target's states kept in memory (never on disk); 0: none
    # Also learn at prompt positions, labelled by the frozen target's own top-k there (from the
    # same forward that gives the states): EAGLE's fixed-data signal, free, beside the responses.
    prompt_labels: bool = False

    def __post_init__(self) -> None:
        self.target, self.data, self.out = Path(self.target), Path(self.data), Path(self.out)
        if self.draft_init is None:
            self.draft_init = (self.draft_type if self.draft_type in HEAD_TYPES
                               else "layers:2")
        if self.aux_layer_ids is not None:
            self.aux_layer_ids = tuple(int(i) for i in self.aux_layer_ids)

    @property
    def lora_spec(self):
        """The parsed ``lora`` spec (a `LoraSpec`), or None for full fine-tuning."""
        from deepspec_plugin.train.lora import parse_lora

        return parse_lora(self.lora) if self.lora is not None else None

    def global_batch_size(self, world) -> int:
        return self.batch_size * world.size

    def check(self, world) -> None:
        """Refuse settings that cannot run, before anything is written (every process checks)."""
        if self.parallel not in PARALLEL_MODES:
            raise DspecError(f"unknown parallel mode {self.parallel!r}",
                             f"use {' or '.join(PARALLEL_MODES)}")
        lora_spec = self.lora_spec
        out = self.out
        if out.exists() and not self.resume:
            raise DspecError(
                f"{out} already exists",
                "choose a new --out, or pass --resume to continue a run there",
            )
        if self.resume and (out / "draft" / DRAFT_MANIFEST).is_file():
            raise DspecError(f"the run in {out} is already finished", "choose a new --out")
        for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every"):
            value = getattr(self, name)
            if value < 1:
                raise DspecError(f"{name} must be >= 1, got {value}", f"pass a positive {name}")
        if self.teacher not in TEACHERS:
            raise DspecError(f"unknown teacher {self.teacher!r}", f"use {' or '.join(TEACHERS)}")
        if not 0.0 <= self.on_policy <= 1.0:
            raise DspecError(f"on_policy must be a fraction in [0, 1], got {self.on_policy}",
                             "e.g. --on-policy 0.25")
        if self.draft_type not in DRAFT_TYPES:
            raise DspecError(f"unknown draft type {self.draft_type!r}",
                             f"use {' or '.join(DRAFT_TYPES)}")
        if self.draft_type in HEAD_TYPES:
            self._check_head_draft(world)
        elif self.prompt_labels:
            raise DspecError("prompt labels are a setting of drafts on the target's states",
                             "pass --draft-type eagle3, medusa or mlp_speculator, or leave "
                             "--prompt-labels out")
        if self.precision not in PRECISIONS:
            raise DspecError(f"unknown precision {self.precision!r}",
                             f"use {', '.join(PRECISIONS)}")
        if world.distributed and self.parallel == "fsdp":
            if lora_spec is not None:
                raise DspecError("LoRA under FSDP is not supported",
                                 "LoRA drafts fit one device: use --parallel ddp")
            if self.on_policy > 0:
                raise DspecError("on-policy rollouts under FSDP are not supported (each process "
                                 "decodes a different length, and FSDP needs them in lockstep)",
                                 "use --parallel ddp, or --on-policy 0")

    def _check_head_draft(self, world) -> None:
        name = {"eagle3": "EAGLE-3", "medusa": "Medusa",
                "mlp_speculator": "MLP-speculator"}[self.draft_type]
        refusals = [
            (self.lora is not None, "LoRA", "a head draft is small: train it in full"),
            (self.on_policy > 0, "on-policy rollouts", "use --on-policy 0"),
            (self.teacher != "stored", "--teacher online",
             "use the stored signal (--teacher stored); the target runs online anyway"),
            (world.distributed and self.parallel != "ddp", "FSDP", "use --parallel ddp"),
        ]
        for refused, what, fix in refusals:
            if refused:
                raise DspecError(f"{name} training does not support {what}", fix)
        if self.draft_type != "eagle3":
            if self.heads < 1 or self.head_layers < (1 if self.draft_type == "medusa" else 0):
                raise DspecError(f"{name} needs heads >= 1 and head_layers >= 1, got "
                                 f"{self.heads} and {self.head_layers}", "e.g. --heads 3")
        if self.ttt_steps < 1:
            raise DspecError(f"ttt_steps must be >= 1, got {self.ttt_steps}", "e.g. 7")
        if not 0.0 < self.step_weight <= 1.0:
            raise DspecError(f"step_weight must be in (0, 1], got {self.step_weight}", "e.g. 0.8")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 1:
            raise DspecError(f"draft_vocab_size must be >= 1, got {self.draft_vocab_size}",
                             "e.g. 8192")

    def draft_record(self) -> dict[str, Any] | None:
        """What a draft type other than standalone adds to the run identity."""
        if self.draft_type == "standalone":
            return None
        if self.draft_type != "eagle3":
            return {"type": self.draft_type, "heads": self.heads,
                    "step_weight": float(self.step_weight),
                    **({"head_layers": self.head_layers} if self.draft_type == "medusa" else {}),
                    **({"prompt_labels": True} if self.prompt_labels else {})}
        return {"type": self.draft_type, "ttt_steps": self.ttt_steps,
                "step_weight": float(self.step_weight),
                "draft_vocab_size": self.draft_vocab_size,
                "aux_layer_ids": list(self.aux_layer_ids) if self.aux_layer_ids else None,
                **({"prompt_labels": True} if self.prompt_labels else {})}

    def run_identity(self, world, init_dir: Path, loss_spec: str) -> RunIdentity:
        """This run's identity; ``loss_spec`` is the loss's normalised spec."""
        from deepspec_plugin.models import fingerprint

        lora_spec = self.lora_spec
        return RunIdentity(
            target_fingerprint=fingerprint(self.target),
            data_fingerprint=data_fingerprint(self.data),
            init=self.draft_init,
            init_fingerprint=fingerprint(init_dir),
            loss=loss_spec,
            temperature=float(self.temperature),
            steps=self.steps,
            lr=self.lr,
            global_batch_size=self.global_batch_size(world),
            grad_accum=self.grad_accum,
            warmup_steps=self.warmup_steps,
            eval_fraction=self.eval_fraction,
            seed=self.seed,
            teacher=self.teacher,
            on_policy=float(self.on_policy),
            lora=lora_spec.to_json() if lora_spec is not None else None,
            draft=self.draft_record(),
        )

    def training_record(self, world) -> dict[str, Any]:
        """The manifest's ``training`` entry: how the run was laid out."""
        return {
            "processes": world.size,
            "parallel": self.parallel if world.distributed else None,
            "batch_size_per_process": self.batch_size,
            "global_batch_size": self.global_batch_size(world),
            "grad_accum": self.grad_accum,
            "precision": self.precision,
            "device": str(self.device),
        }


@dataclass(frozen=True)
class RunIdentity:
    target_fingerprint: str
    data_fingerprint: str
    init: str
    init_fingerprint: str
    loss: str
    temperature: float
    steps: int
    lr: float
    global_batch_size: int
    grad_accum: int
    warmup_steps: int
    eval_fraction: float
    seed: int
    teacher: str
    on_policy: float
    lora: dict[str, Any] | None = None  # absent from the JSON for full fine-tuning
    draft: dict[str, Any] | None = None  # absent for standalone drafts

    def to_json(self) -> dict[str, Any]:
        """As recorded in a checkpoint's ``state.json``."""
        d = asdict(self)
        for key in ("lora", "draft"):  # so older runs' identities stay what they were
            if d[key] is None:
                del d[key]
        return d

    def differences(self, recorded: dict[str, Any]) -> list[str]:
        """What differs from an identity a checkpoint recorded, one line per setting."""
        now = self.to_json()
        return [
            f"{k}: {recorded.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(set(recorded) | set(now))
            if recorded.get(k) != now.get(k)
        ]


def data_fingerprint(data: Path) -> str:
    """Identity of a data directory: its manifest's shard checksums and settings."""
    from deepspec_plugin.train.data import load_manifest

    m = load_manifest(data)
    payload = {
        "target": m.target_fingerprint,
        "settings": m.settings,
        "shards": [(s.file, s.sha256) for s in m.shards],
    }
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
