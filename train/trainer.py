"""Distil a draft model on target-generated data: one readable training loop (nanoGPT style).

``train(target, data, out, **settings)`` fills a `TrainConfig` (`deepspec_plugin.train.config`)
and runs it in three parts:

* `setup`: checks that the data was made by this target, initialises the draft
  (`deepspec_plugin.train.init`: ``layers:N``, ``fresh[:...]`` or an existing same-tokenizer
  model), splits the samples into train / held-out by prompt (seeded,
  `deepspec_plugin.train.batches`), builds the draft component (`deepspec_plugin.train.draft`),
  AdamW and its schedule (linear warmup then cosine decay), and restores a checkpoint to resume;
* `train_loop`: minimises a distillation loss (`deepspec_plugin.train.losses.make_loss`) against
  the stored top-k target signal, with gradient clipping and accumulation and bf16 autocast (by
  default on CUDA only), evaluating and checkpointing as it goes;
* `finish`: the last eval, the draft manifest and the output.

The loop sees the draft only through `Draft` (build, forward on a batch, save), so another draft
type is another `Draft` subclass passed to `train_with_config`.

**Held-out acceptance**: 1 - TVD against the stored signal (the expected speculative-sampling
acceptance, on the top-k coarsening) and greedy agreement, token-weighted over the held-out
samples, at the start, every ``eval_every`` steps and at the end.

**Checkpoints** (`deepspec_plugin.train.checkpoint`: ``out/checkpoints/step-N``, written into a
temp dir and renamed, last ``keep_last`` kept): the draft (safetensors), the optimizer tensors
keyed by parameter name and the torch RNG state (``optimizer.safetensors``) and everything else as
JSON (``state.json``). Nothing is unpickled. ``resume=True`` continues from the newest checkpoint,
and refuses one whose run identity (`RunIdentity`: target, data, init, loss and hyperparameters)
differs. Training N steps straight or k steps, a kill, and a resume to N give the same weights.

**Output**: ``out/draft``, a Hugging Face checkpoint with the target's tokenizer files and a
``deepspec.json`` draft manifest, renamed into place when complete.

**LoRA** (``lora="r=16,alpha=32,targets=q_proj+v_proj"``, see `deepspec_plugin.train.lora`): the
draft is wrapped with PEFT after initialisation (base frozen, only the adapter trains; the
trainable/total parameter counts are logged); checkpoints hold the adapter weights, and resume
rebuilds the base from the init and loads them; the output is ``out/adapter`` (PEFT
``save_pretrained``) and ``out/draft`` = the merged model, a plain checkpoint; the spec is in the
run identity and the manifest (``"lora"``).

**Teacher**: the stored top-k signal, or (``teacher="online"``) the target run on each batch for
its full distributions. **On-policy** (``on_policy=F``): a seeded fraction F of micro-batches is
continued by the draft itself and graded by the target online (`deepspec_plugin.train.on_policy`).

**Scale** (`deepspec_plugin.train.distributed`): under torchrun each process trains its slice of a
global batch of ``batch_size * world`` samples per micro-batch, with DDP or FSDP (``parallel``),
and N processes of batch B train exactly as one process of batch N * B. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import SCHEMA as DRAFT_SCHEMA
from deepspec_plugin.train import distributed as dist
from deepspec_plugin.train.batches import (
    batch_indices,
    collate,
    probe_signal,
    split_by_prompt,
    target_signal,
)
from deepspec_plugin.train.config import PRECISIONS, RunIdentity, TrainConfig
from deepspec_plugin.train.distributed import World
from deepspec_plugin.train.draft import Draft, StandaloneDraft

MIN_LR_RATIO = 0.1  # cosine decays to this fraction of the peak learning rate
GRAD_CLIP = 1.0


@dataclass
class TrainResult:
    out: Path
    draft: Path | None  # None when the run stopped early (stop_at) before the end
    steps: int  # steps done
    tokens_trained: int  # response (loss) tokens seen in training batches
    tokens_per_second: float
    evals: list[dict[str, Any]] = field(default_factory=list)  # {step, acceptance, greedy, tokens}
    manifest: dict[str, Any] | None = None

    @property
    def final_acceptance(self) -> float:
        return self.evals[-1]["acceptance"]

    @property
    def start_acceptance(self) -> float:
        return self.evals[0]["acceptance"]


# --- entry points -------------------------------------------------------------------------------


def train(target: Path, data: Path, out: Path, **settings) -> TrainResult:
    """Distil a draft for `target` on `data` into `out`; ``settings`` are `TrainConfig` fields.

    ``stop_at`` stops after that step (with a checkpoint), as a kill would: the run is resumed
    with ``resume=True`` and the same arguments. ``lora`` is a
    `deepspec_plugin.train.lora.parse_lora` spec. ``teacher="online"`` trains on the target's full
    distributions, computed now, instead of the stored top-k; ``on_policy`` is the fraction of
    micro-batches the draft writes itself (`deepspec_plugin.train.on_policy`). Under torchrun,
    ``batch_size`` is per process (`deepspec_plugin.train.distributed`); ``parallel`` is ``ddp``
    or ``fsdp``. ``precision``: ``auto`` (bf16 on CUDA), ``fp32``, ``bf16``.
    """
    return train_with_config(TrainConfig(target, data, out, **settings))


def draft_type_of(cfg: TrainConfig) -> type[Draft]:
    """The `Draft` class of ``cfg.draft_type``."""
    if cfg.draft_type == "eagle3":
        from deepspec_plugin.train.eagle3 import Eagle3Draft

        return Eagle3Draft
    if cfg.draft_type in ("medusa", "mlp_speculator"):
        from deepspec_plugin.train.heads import MedusaDraft, MlpSpeculatorDraft

        return MedusaDraft if cfg.draft_type == "medusa" else MlpSpeculatorDraft
    return StandaloneDraft


def train_with_config(cfg: TrainConfig, draft_type: type[Draft] | None = None) -> TrainResult:
    """Run `cfg` (see the module docstring), training a draft of ``draft_type`` (default: the
    class of ``cfg.draft_type``)."""
    draft_type = draft_type or draft_type_of(cfg)
    world, device = dist.setup(cfg.device)
    try:
        cfg = replace(cfg, device=device)  # this process's device (cuda:LOCAL_RANK)
        cfg.check(world)  # on every process: nothing is written before the checks pass
        state = setup(cfg, world, draft_type)
        if not train_loop(state):
            return state.result()
        return finish(state)
    finally:
        dist.teardown(world)


# --- schedule, precision, eval ------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine decay to MIN_LR_RATIO at `steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _autocast(device: str, precision: str = "auto"):
    """bf16 autocast: ``bf16`` asks for it (CPU or CUDA), ``auto`` uses it on CUDA where the GPU
    supports it; float32 otherwise (the CPU default: exact and reproducible)."""
    import torch

    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if precision == "bf16" or (
        precision == "auto" and kind == "cuda" and torch.cuda.is_bf16_supported()
    ):
        return torch.autocast(kind, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(
    draft,
    samples: list,
    *,
    batch_size: int,
    temperature: float,
    signal_temperature: float,
    device: str = "cpu",
) -> dict[str, Any]:
    """Token-weighted held-out 1 - TVD (``acceptance``) and greedy agreement of the draft: a
    `Draft`, or a bare causal LM. A draft of several steps (EAGLE-3) adds both per step
    (``acceptance_per_step``, ``greedy_per_step``: step i given steps < i accepted)."""
    import torch

    if not isinstance(draft, Draft):
        draft = StandaloneDraft(draft)
    was_training = draft.module.training
    draft.module.eval()
    sums: dict[str, list[float]] = {}
    with torch.no_grad(), _autocast(device, "fp32"):
        for i in range(0, len(samples), batch_size):
            batch = collate(samples[i : i + batch_size], device)
            scored = draft.score(batch, signal_temperature, temperature)
            for key, values in scored.items():
                total = sums.setdefault(key, [0.0] * len(values))
                for j, v in enumerate(values):
                    total[j] += v
    draft.module.train(was_training)
    tokens = sums.get("tokens", [0])
    acc = [a / max(n, 1) for a, n in zip(sums.get("acceptance", [0.0]), tokens)]
    greedy = [g / max(n, 1) for g, n in zip(sums.get("greedy", [0.0]), tokens)]
    out: dict[str, Any] = {"acceptance": acc[0], "greedy": greedy[0], "tokens": int(tokens[0])}
    if len(acc) > 1:
        out.update(acceptance_per_step=acc, greedy_per_step=greedy,
                   tokens_per_step=[int(n) for n in tokens])
    return out


# --- setup --------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the run is; with the optimizer, scheduler and RNG state, what a checkpoint holds."""

    step: int = 0
    samples_consumed: int = 0  # the position in the endless stream of epoch shuffles
    tokens_trained: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainState:
    """What `setup` builds and the loop and `finish` work on."""

    cfg: TrainConfig
    world: World
    identity: RunIdentity
    draft: Draft
    optimizer: Any
    scheduler: Any
    loss_fn: Any
    train_set: list
    held_out: list
    data_record: dict[str, Any]  # the manifest's "data" entry
    signal_temperature: float  # the temperature the stored signal was computed at
    scorer: Any  # the target, run online (full distributions, grades of rollouts), or None
    stop_ids: tuple[int, ...]  # where on-policy rollouts end
    rollout_tokens: int  # the longest on-policy rollout: the data's max_new_tokens
    progress: Progress
    started: float = 0.0  # the loop's start and the tokens trained by then: the throughput clock
    tokens_at_start: int = 0
    rate: float = 0.0  # tokens per second since the loop started, as of the last step

    def log(self, msg: str) -> None:
        if self.cfg.progress and self.world.is_main:
            print(f"[train] {msg}", flush=True)

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return (self.progress.tokens_trained - self.tokens_at_start) / max(elapsed, 1e-9)

    def result(self, draft: Path | None = None, manifest: dict | None = None) -> TrainResult:
        p = self.progress
        return TrainResult(out=self.cfg.out, draft=draft, steps=p.step,
                           tokens_trained=p.tokens_trained, tokens_per_second=self.rate,
                           evals=p.evals, manifest=manifest)


def setup(cfg: TrainConfig, world: World, draft_type: type[Draft] = StandaloneDraft) -> TrainState:
    """Everything the loop needs, from the data and the init or the newest checkpoint."""
    import torch

    from deepspec_plugin.train.data import check_data_target, read_data
    from deepspec_plugin.train.losses import make_loss

    data_manifest = check_data_target(cfg.data, cfg.target)
    signal_temperature = float(data_manifest.settings.get("signal_temperature", 1.0))
    loss_fn = make_loss(cfg.loss, cfg.temperature)
    loss_fn(torch.zeros(1, 1, 2), probe_signal(signal_temperature), None)  # temperatures agree
    samples = list(read_data(cfg.data))
    train_set, held_out = split_by_prompt(samples, cfg.eval_fraction, cfg.seed)
    dist.barrier(world)  # every process has checked `out` before the first writes it

    init_dir = _initialise(cfg, world, draft_type)
    identity = cfg.run_identity(world, init_dir, loss_fn.spec)
    resume_from = _checkpoint_to_resume(cfg, world, identity)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    weights = resume_from / "draft" if resume_from is not None else None
    draft = draft_type.build(cfg, world, init_dir, weights)
    optimizer = torch.optim.AdamW(
        draft.trainable_parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    # The scheduler before the optimizer state: creating it sets the groups' lr, which the
    # saved state then overrides.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps)
    )
    progress = Progress()
    if resume_from is not None:
        progress = _restore(resume_from, draft, optimizer, scheduler, cfg.device)
    scorer, stop_ids = _online_target(cfg)
    state = TrainState(
        cfg=cfg, world=world, identity=identity, draft=draft, optimizer=optimizer,
        scheduler=scheduler, loss_fn=loss_fn, train_set=train_set, held_out=held_out,
        data_record={
            "path": str(cfg.data.resolve()),
            "target_fingerprint": data_manifest.target_fingerprint,
            "samples": len(samples),
            "train_samples": len(train_set),
            "held_out_samples": len(held_out),
        },
        signal_temperature=signal_temperature, scorer=scorer, stop_ids=stop_ids,
        rollout_tokens=int(data_manifest.settings.get("max_new_tokens", 128)), progress=progress,
    )
    if resume_from is not None:
        state.log(f"resumed from {resume_from} at step {progress.step}")
    state.log(draft.describe())
    state.log(
        f"{len(train_set)} train / {len(held_out)} held-out samples, loss {loss_fn.spec}, "
        f"init {cfg.draft_init}, {cfg.steps} steps, {world.size} process(es) x batch "
        f"{cfg.batch_size}, teacher {cfg.teacher}, on-policy {cfg.on_policy:g}"
    )
    return state


def _initialise(cfg: TrainConfig, world: World, draft_type: type[Draft]) -> Path:
    """``out/init``, made by rank 0 (a refusal there is raised on every process)."""
    out = cfg.out
    created = not out.exists()
    init_error = None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            init_dir = draft_type.initialise(cfg, out / "init", cfg.seed)
            draft_type.check_init(init_dir, cfg)
        except BaseException as e:
            if created:  # a refused init leaves nothing behind (a rerun would find `out`)
                shutil.rmtree(out, ignore_errors=True)
            if not world.distributed:
                raise
            init_error = e
    problem = dist.broadcast_object(
        None if init_error is None else (getattr(init_error, "problem", str(init_error)),
                                         getattr(init_error, "fix", None)), world)
    if problem is not None:
        raise DspecError(*problem)
    if not world.is_main:  # rank 0 built it; the others only read it
        init_dir = draft_type.initialise(cfg, out / "init", cfg.seed)
    return init_dir


def _checkpoint_to_resume(cfg: TrainConfig, world: World, identity: RunIdentity) -> Path | None:
    """The newest complete checkpoint when resuming; one of another run is refused."""
    from deepspec_plugin.train import checkpoint as ckpts

    if world.is_main:
        ckpts.remove_partial(cfg.out)
    checkpoints = ckpts.checkpoint_dirs(cfg.out) if cfg.resume else []
    if not checkpoints:
        return None
    newest = checkpoints[-1]
    recorded = ckpts.read_state(newest).get("run", {})
    if recorded != identity.to_json():
        raise DspecError(
            f"checkpoint {newest} is from another run "
            f"({'; '.join(identity.differences(recorded))})",
            "resume with the same target, data, init, loss and settings, or use a new --out",
        )
    return newest


def _restore(ckpt: Path, draft: Draft, optimizer, scheduler, device: str) -> Progress:
    """The optimizer, scheduler and RNG state of a checkpoint, and its progress."""
    from deepspec_plugin.train import checkpoint as ckpts

    dist.load_optimizer_state(draft.module, optimizer, ckpts.optimizer_state(ckpt, device))
    state = ckpts.read_state(ckpt)
    scheduler.load_state_dict(state["scheduler"])
    ckpts.restore_rng(ckpt)
    return Progress(step=state["step"], samples_consumed=state["samples_consumed"],
                    tokens_trained=state["tokens_trained"], evals=state["evals"])


def _online_target(cfg: TrainConfig) -> tuple[Any, tuple[int, ...]]:
    """(the target loaded to score batches online, or None; the stop ids of rollouts)."""
    from deepspec_plugin.bench.run import stop_token_ids
    from deepspec_plugin.models import load_causal_lm, load_tokenizer

    scorer = None
    if cfg.teacher == "online" or cfg.on_policy > 0:
        scorer = load_causal_lm(cfg.target, device=cfg.device).eval().requires_grad_(False)
    stop_ids = ()
    if cfg.on_policy > 0:
        stop_ids = tuple(stop_token_ids(load_tokenizer(cfg.target), cfg.target))
    return scorer, stop_ids


# --- the loop -----------------------------------------------------------------------------------


def train_loop(s: TrainState) -> bool:
    """Train to ``cfg.steps``; False when it stopped early at ``cfg.stop_at`` (checkpointed)."""
    import torch

    cfg, p = s.cfg, s.progress
    evaluate_held_out(s)
    s.started, s.tokens_at_start = time.perf_counter(), p.tokens_trained
    while p.step < cfg.steps:
        s.optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            step_loss += micro_step(s)
        torch.nn.utils.clip_grad_norm_(s.draft.module.parameters(), GRAD_CLIP)
        s.optimizer.step()
        s.scheduler.step()
        p.step += 1

        s.rate = s.tokens_per_second()
        if p.step % 10 == 0 or p.step == cfg.steps:
            share = s.draft.timing().get("target_share")
            s.log(f"step {p.step}/{cfg.steps}: loss {step_loss:.4f}, "
                  f"lr {s.scheduler.get_last_lr()[0]:.2e}, {s.rate:.0f} tokens/s"
                  + (f", {share:.0%} of the time in the target" if share is not None else ""))
        if p.step % cfg.eval_every == 0 or p.step == cfg.steps:
            evaluate_held_out(s)
        stopping = cfg.stop_at is not None and cfg.stop_at <= p.step < cfg.steps
        if p.step % cfg.save_every == 0 or stopping:
            save_checkpoint(s)
        if stopping:
            return False
    return True


def micro_step(s: TrainState) -> float:
    """Forward and backward of this process's slice of the next micro-batch (gradients
    accumulate); returns its share of the step's loss."""
    import torch

    from deepspec_plugin.train.on_policy import is_on_policy, rollout, rollout_seed

    cfg, world, p = s.cfg, s.world, s.progress
    global_batch = cfg.global_batch_size(world)
    micro = p.samples_consumed // global_batch
    picked = batch_indices(len(s.train_set), cfg.seed, p.samples_consumed, global_batch)
    p.samples_consumed += global_batch
    mine = [s.train_set[i]
            for i in picked[world.rank * cfg.batch_size : (world.rank + 1) * cfg.batch_size]]
    online = cfg.teacher == "online"
    if is_on_policy(cfg.on_policy, cfg.seed, micro):
        mine = rollout(s.draft.causal_lm(), mine, max_new_tokens=s.rollout_tokens,
                       temperature=cfg.temperature, seed=rollout_seed(cfg.seed, micro, world.rank),
                       stop_token_ids=s.stop_ids, device=cfg.device)
        online = True
    batch = collate(mine, cfg.device)
    with _autocast(cfg.device, cfg.precision):
        output = s.draft.forward(batch)
    with torch.no_grad():
        signal = target_signal(batch, s.signal_temperature, s.scorer if online else None)
    value = s.draft.loss(output, signal, s.loss_fn)
    # Weight by this process's share of the global batch's tokens, so that the mean gradient
    # over processes is the token mean over the global batch.
    n_local = int(batch["mask"].sum())
    (n_global,) = dist.all_sum([n_local], world)
    (value * (n_local * world.size / max(n_global, 1.0)) / cfg.grad_accum).backward()
    p.tokens_trained += int(n_global)
    return value.item() * n_local / max(n_global, 1.0) * world.size / cfg.grad_accum


def evaluate_held_out(s: TrainState) -> None:
    """Held-out acceptance at this step (once). Every process evaluates the whole held-out set
    (small): identical numbers, and FSDP's collectives stay in lockstep."""
    p = s.progress
    if p.evals and p.evals[-1]["step"] == p.step:
        return
    e = {"step": p.step, **evaluate(s.draft, s.held_out, batch_size=s.cfg.batch_size,
                                    temperature=s.cfg.temperature,
                                    signal_temperature=s.signal_temperature, device=s.cfg.device)}
    p.evals.append(e)
    s.log(
        f"step {p.step}: held-out acceptance (1-TVD) {e['acceptance']:.4f}, "
        f"greedy agreement {e['greedy']:.4f} over {e['tokens']} tokens"
    )
    if "acceptance_per_step" in e:
        s.log("  per draft step, 1-TVD " + " ".join(f"{a:.3f}" for a in e["acceptance_per_step"])
              + "; greedy " + " ".join(f"{g:.3f}" for g in e["greedy_per_step"]))


def save_checkpoint(s: TrainState) -> None:
    """``out/checkpoints/step-N`` (a collective: every process takes part, rank 0 writes)."""
    from deepspec_plugin.train import checkpoint as ckpts

    p = s.progress
    state = {
        "run": s.identity.to_json(),
        "samples_consumed": p.samples_consumed,
        "tokens_trained": p.tokens_trained,
        "evals": p.evals,
    }
    _, optim_state = dist.full_state(s.draft.module, s.optimizer)
    if s.world.is_main:
        path = ckpts.save_checkpoint(s.cfg.out, p.step, s.draft.write_weights, optim_state,
                                     s.scheduler, state, s.cfg.keep_last)
        s.log(f"saved {path}")
    else:
        s.draft.write_weights(None)  # the collective half of rank 0's save
    dist.barrier(s.world)


# --- finish -------------------------------------------------------------------------------------


def finish(s: TrainState) -> TrainResult:
    """The final eval, then ``out/draft`` with its manifest (and what the draft type adds)."""
    s.rate = s.tokens_per_second()
    evaluate_held_out(s)
    manifest = draft_manifest(s)
    draft = s.draft.save(s.cfg.out, s.cfg.target, manifest)
    dist.barrier(s.world)
    first, final = s.progress.evals[0], s.progress.evals[-1]
    s.log(
        f"wrote {draft}: held-out acceptance {first['acceptance']:.4f} -> "
        f"{final['acceptance']:.4f}, {s.rate:.0f} tokens/s"
    )
    return s.result(draft, manifest)


def draft_manifest(s: TrainState) -> dict[str, Any]:
    """The finished draft's ``deepspec.json`` (`deepspec_plugin.manifest` validates it)."""
    from deepspec_plugin.models import tokenizer_fingerprint

    cfg, p, run = s.cfg, s.progress, s.identity
    first, final = p.evals[0], p.evals[-1]
    manifest = {
        "schema": DRAFT_SCHEMA,
        "target_fingerprint": run.target_fingerprint,
        "tokenizer_fingerprint": tokenizer_fingerprint(cfg.target),
        "method": s.draft.method,
        "init": {"spec": run.init, "fingerprint": run.init_fingerprint},
        "loss": run.loss,
        "temperature": run.temperature,
        "teacher": run.teacher,
        "on_policy": run.on_policy,
        "data": s.data_record,
        "steps": p.step,
        "tokens_trained": p.tokens_trained,
        "training": cfg.training_record(s.world),
        "held_out": {
            "acceptance": final["acceptance"],
            "greedy_agreement": final["greedy"],
            "start_acceptance": first["acceptance"],
            "start_greedy_agreement": first["greedy"],
            "tokens": final["tokens"],
            **{k: final[k] for k in ("acceptance_per_step", "greedy_per_step") if k in final},
        },
        "tokens_per_second": s.rate,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest.update(s.draft.manifest_fields())
    return manifest


__all__ = [
    "PRECISIONS",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "train",
    "train_with_config",
    "setup",
    "train_loop",
    "finish",
    "evaluate",
    "collate",
    "split_by_prompt",
    "batch_indices",
    "lr_factor",
]
