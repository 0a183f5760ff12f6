"""Distil a draft model on target-generated data: one readable training loop (nanoGPT style).

``train(target, data, out)`` checks that the data was made by this target, initialises the draft
(`deepspec_plugin.train.init`: ``layers:N``, ``fresh[:...]`` or an existing same-tokenizer model), splits
the samples into train / held-out by prompt (seeded), and minimises a distillation loss
(`deepspec_plugin.train.losses.make_loss`) against the stored top-k target signal, with AdamW, linear warmup then
cosine decay, gradient clipping and accumulation, and bf16 autocast (by default on CUDA only).

**Alignment.** A sample's ``topk_*`` row r is the target's distribution for its r-th response
token, i.e. for the token at position ``start + r``. The draft's logits at position t predict
token t + 1, so the collated signal at position t holds the row for token t + 1 and the loss mask
at t is ``loss_mask[t + 1]``; logits and signal are both ``[B, L - 1, ...]``.

**Held-out acceptance**: 1 - TVD against the stored signal (the expected speculative-sampling
acceptance, on the top-k coarsening) and greedy agreement, token-weighted over the held-out
samples, at the start, every ``eval_every`` steps and at the end.

**Checkpoints** (`deepspec_plugin.train.checkpoint`: ``out/checkpoints/step-N``, written into a temp dir and
renamed, last ``keep_last`` kept): the draft (safetensors), the optimizer tensors keyed by
parameter name and the torch RNG state (``optimizer.safetensors``) and everything else as JSON
(``state.json``). Nothing is unpickled. ``resume=True`` continues from the newest checkpoint,
and refuses one whose run identity (target, data, init, loss and hyperparameters) differs.
Training N steps straight or k steps, a kill, and a resume to N give the same weights.

**Output**: ``out/draft``, a Hugging Face checkpoint with the target's tokenizer files and a
``deepspec.json`` draft manifest, renamed into place when complete.

**LoRA** (``lora="r=16,alpha=32,targets=q_proj+v_proj"``, see `deepspec_plugin.train.lora`): the draft is
wrapped with PEFT after initialisation (base frozen, only the adapter trains; the trainable/total
parameter counts are logged); checkpoints hold the adapter weights, and resume rebuilds the base
from the init and loads them; the output is ``out/adapter`` (PEFT ``save_pretrained``) and
``out/draft`` = the merged model, a plain checkpoint; the spec is in the run identity and the
manifest (``"lora"``).

**Teacher**: the stored top-k signal, or (``teacher="online"``) the target run on each batch for
its full distributions. **On-policy** (``on_policy=F``): a seeded fraction F of micro-batches is
continued by the draft itself and graded by the target online (`deepspec_plugin.train.on_policy`).

**Scale** (`deepspec_plugin.train.distributed`): under torchrun each process trains its slice of a global batch
of ``batch_size * world`` samples per micro-batch, with DDP or FSDP (``parallel``), and N
processes of batch B train exactly as one process of batch N * B. Only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import FILENAME as DRAFT_MANIFEST
from deepspec_plugin.manifest import SCHEMA as DRAFT_SCHEMA

CHECKPOINTS = "checkpoints"
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


# --- data ---------------------------------------------------------------------------------------


def split_by_prompt(samples: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) samples; every turn of a prompt lands on the same side (seeded)."""
    prompts = sorted({s.prompt_index for s in samples})
    if len(prompts) < 2:
        raise DspecError(
            f"the data holds {len(prompts)} prompt(s); a train / held-out split needs at least 2",
            "generate data from more prompts",
        )
    if not 0.0 < eval_fraction < 1.0:
        raise DspecError(
            f"eval_fraction must be in (0, 1), got {eval_fraction}",
            "use a small fraction such as 0.05",
        )
    random.Random(f"split:{seed}").shuffle(prompts)
    n_eval = min(len(prompts) - 1, max(1, round(eval_fraction * len(prompts))))
    held = set(prompts[:n_eval])
    return (
        [s for s in samples if s.prompt_index not in held],
        [s for s in samples if s.prompt_index in held],
    )


def batch_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Sample indices ``start .. start + count`` of the endless stream of seeded epoch shuffles.

    The stream is a function of (n, seed) only, so the data position is one integer.
    """
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        order = list(range(n))
        random.Random(f"order:{seed}:{epoch}").shuffle(order)
        take = order[offset : offset + count - len(out)]
        out.extend(take)
        pos += len(take)
    return out


def collate(samples: list, device: str = "cpu") -> dict[str, Any]:
    """Right-padded batch, with the target signal shifted onto the logits that predict it.

    ``input_ids``/``attention_mask`` are ``[B, L]``; ``topk_ids``/``topk_probs`` are
    ``[B, L - 1, K]`` and ``mask`` ``[B, L - 1]``: position t holds the target's distribution for
    token t + 1 (what the draft's logits at t predict), true where token t + 1 is a response token.
    Samples without a stored signal (on-policy rollouts) give no ``topk_*`` entries.
    """
    import torch

    width = max(len(s.input_ids) for s in samples)
    with_signal = all(s.topk_ids is not None for s in samples)
    b = len(samples)
    input_ids = torch.zeros((b, width), dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width - 1), dtype=torch.bool)
    if with_signal:
        k = samples[0].topk_ids.shape[-1]
        ids = torch.zeros((b, width - 1, k), dtype=torch.long)
        probs = torch.zeros((b, width - 1, k), dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = s.input_ids
        attention[i, :n] = 1
        shifted = s.loss_mask[1:n].bool()  # token t + 1 is a response token
        mask[i, : n - 1] = shifted
        if not with_signal:
            continue
        positions = shifted.nonzero().squeeze(-1)
        if len(positions) != len(s.topk_ids):
            raise DspecError(
                f"sample (prompt {s.prompt_index}, turn {s.turn}) has {len(s.topk_ids)} signal "
                f"rows for {len(positions)} response tokens after the first",
                "regenerate the data (a response must follow at least one context token)",
            )
        ids[i, positions] = s.topk_ids
        probs[i, positions] = s.topk_probs.float()
    batch = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "mask": mask.to(device),
    }
    if with_signal:
        batch.update(topk_ids=ids.to(device), topk_probs=probs.to(device))
    return batch


def _signal(batch: dict[str, Any], signal_temperature: float, teacher=None):
    """The target signal at the response positions only, as ``[1, N, ...]`` (see _draft_logits):
    the stored top-k, or the full distribution of ``teacher`` (the target, run now) when given or
    when the batch has no stored signal."""
    from deepspec_plugin.train.losses import TargetSignal

    if teacher is not None or "topk_ids" not in batch:
        if teacher is None:
            raise RuntimeError("a batch without a stored signal needs the target online")
        return TargetSignal(logits=_response_logits(teacher, batch).float())
    m = batch["mask"]
    return TargetSignal(
        topk_ids=batch["topk_ids"][m].unsqueeze(0),
        topk_probs=batch["topk_probs"][m].unsqueeze(0),
        temperature=signal_temperature,
    )


def _response_logits(model, batch: dict[str, Any]):
    """A causal LM's logits at the response positions only, as ``[1, N, V]``.

    The head over the whole vocabulary (49152 for the reference target) at every prompt position
    would dominate time and memory; only the N positions that predict a response token are needed.
    Losses over these N rows need no mask: their mean is the masked mean over the batch.
    """
    from deepspec_plugin.train.distributed import unwrap

    base = unwrap(model)
    hidden = base.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return base.lm_head(hidden[:, :-1][batch["mask"]]).unsqueeze(0)


def _response_module(model):
    """`_response_logits` as the forward of a module around the draft, so that DDP and FSDP see
    (and hook) the whole computation: FSDP gathers the shards in the root's forward."""
    import torch

    class ResponseLogits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, mask):
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "mask": mask}
            return _response_logits(self.lm, batch)

    return ResponseLogits(model)


def _draft_logits(net, batch: dict[str, Any]):
    """The draft's response logits through `net` (`_response_module`, maybe DDP/FSDP wrapped);
    a bare causal LM is accepted too."""
    if hasattr(net, "lm") or hasattr(getattr(net, "module", None), "lm"):
        return net(batch["input_ids"], batch["attention_mask"], batch["mask"])
    return _response_logits(net, batch)


# --- schedule, eval -----------------------------------------------------------------------------


def lr_factor(step: int, steps: int, warmup_steps: int) -> float:
    """Linear warmup to 1 over warmup_steps, then cosine decay to MIN_LR_RATIO at `steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * progress))


def evaluate(
    model,
    samples: list,
    *,
    batch_size: int,
    temperature: float,
    signal_temperature: float,
    device: str = "cpu",
) -> dict[str, float]:
    """Token-weighted held-out 1 - TVD (``acceptance``) and greedy agreement of the draft."""
    import torch

    from deepspec_plugin.train.losses import acceptance_from_tvd, greedy_agreement

    was_training = model.training
    model.eval()
    acc = greedy = 0.0
    tokens = 0
    with torch.no_grad(), _autocast(device, "fp32"):
        for i in range(0, len(samples), batch_size):
            batch = collate(samples[i : i + batch_size], device)
            logits = _draft_logits(model, batch).float()
            signal = _signal(batch, signal_temperature)
            n = int(batch["mask"].sum())
            if n == 0:
                continue
            acc += float(acceptance_from_tvd(logits, signal, None, temperature)) * n
            greedy += float(greedy_agreement(logits, signal, None)) * n
            tokens += n
    model.train(was_training)
    return {"acceptance": acc / max(tokens, 1), "greedy": greedy / max(tokens, 1), "tokens": tokens}


PRECISIONS = ("auto", "fp32", "bf16")


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


# --- run identity -------------------------------------------------------------------------------


def _data_fingerprint(data: Path) -> str:
    """Identity of a data directory: its manifest's shard checksums and settings."""
    from deepspec_plugin.train.data import load_manifest

    m = load_manifest(data)
    payload = {
        "target": m.target_fingerprint,
        "settings": m.settings,
        "shards": [(s.file, s.sha256) for s in m.shards],
    }
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _diff(old: dict, new: dict) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


# --- output -------------------------------------------------------------------------------------


def _write_draft(out: Path, model, target: Path, manifest: dict[str, Any]) -> Path:
    """out/draft: weights, config, the target's tokenizer files and deepspec.json, atomically."""
    from deepspec_plugin.manifest import write_manifest
    from deepspec_plugin.models import TOKENIZER_FILES, check_pair

    dest = out / "draft"
    tmp = Path(tempfile.mkdtemp(prefix=".draft.tmp-", dir=out))
    try:
        model.save_pretrained(str(tmp))
        if not list(tmp.glob("*.safetensors")):
            raise RuntimeError("save_pretrained wrote no safetensors weights")
        for name in TOKENIZER_FILES + ("generation_config.json",):
            if (target / name).exists():
                shutil.copy2(target / name, tmp / name)
        write_manifest(manifest, tmp / DRAFT_MANIFEST)  # validated: the exporters read it
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_pair(target, dest)
    return dest


def _write_adapter(out: Path, peft_model) -> Path:
    """out/adapter: the PEFT adapter (safetensors + adapter_config.json), atomically."""
    dest = out / "adapter"
    tmp = Path(tempfile.mkdtemp(prefix=".adapter.tmp-", dir=out))
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        os.chmod(tmp, 0o755)
        if dest.exists():  # left by a run killed between the adapter and the draft
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


# --- the loop -----------------------------------------------------------------------------------


def train(
    target: Path,
    data: Path,
    out: Path,
    *,
    draft_init: str = "layers:2",
    loss: str = "tvd+fkl",
    steps: int = 100,
    lr: float = 1e-3,
    batch_size: int = 8,
    grad_accum: int = 1,
    warmup_steps: int = 10,
    temperature: float = 1.0,
    eval_fraction: float = 0.05,
    eval_every: int = 50,
    save_every: int = 50,
    keep_last: int = 2,
    seed: int = 0,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    stop_at: int | None = None,
    lora: str | None = None,
    teacher: str = "stored",
    on_policy: float = 0.0,
    parallel: str = "ddp",
    precision: str = "auto",
) -> TrainResult:
    """Distil a draft for `target` on `data` into `out` (see the module docstring).

    ``stop_at`` stops after that step (with a checkpoint), as a kill would: the run is resumed
    with ``resume=True`` and the same arguments. ``lora`` is a `deepspec_plugin.train.lora.parse_lora` spec.
    ``teacher="online"`` trains on the target's full distributions, computed now, instead of the
    stored top-k; ``on_policy`` is the fraction of micro-batches the draft writes itself
    (`deepspec_plugin.train.on_policy`). Under torchrun, ``batch_size`` is per process (`deepspec_plugin.train.distributed`);
    ``parallel`` is ``ddp`` or ``fsdp``. ``precision``: ``auto`` (bf16 on CUDA), ``fp32``, ``bf16``.
    """
    from deepspec_plugin.train import distributed as dist
    from deepspec_plugin.train.distributed import PARALLEL_MODES

    world, device = dist.setup(device)
    try:
        return _train(
            target, data, out, world=world, draft_init=draft_init, loss=loss, steps=steps, lr=lr,
            batch_size=batch_size, grad_accum=grad_accum, warmup_steps=warmup_steps,
            temperature=temperature, eval_fraction=eval_fraction, eval_every=eval_every,
            save_every=save_every, keep_last=keep_last, seed=seed, resume=resume, device=device,
            progress=progress, stop_at=stop_at, lora=lora, teacher=teacher, on_policy=on_policy,
            parallel=parallel if parallel in PARALLEL_MODES else _bad_parallel(parallel),
            precision=precision,
        )
    finally:
        dist.teardown(world)


def _bad_parallel(parallel: str):
    from deepspec_plugin.train.distributed import PARALLEL_MODES

    raise DspecError(f"unknown parallel mode {parallel!r}", f"use {' or '.join(PARALLEL_MODES)}")


TEACHERS = ("stored", "online")


def _check_arguments(out: Path, resume: bool, lora_spec, on_policy: float, teacher: str,
                     parallel: str, precision: str, world, values: dict[str, int]) -> None:
    if out.exists() and not resume:
        raise DspecError(
            f"{out} already exists", "choose a new --out, or pass --resume to continue a run there"
        )
    if resume and (out / "draft" / DRAFT_MANIFEST).is_file():
        raise DspecError(f"the run in {out} is already finished", "choose a new --out")
    for name, value in values.items():
        if value < 1:
            raise DspecError(f"{name} must be >= 1, got {value}", f"pass a positive {name}")
    if teacher not in TEACHERS:
        raise DspecError(f"unknown teacher {teacher!r}", f"use {' or '.join(TEACHERS)}")
    if not 0.0 <= on_policy <= 1.0:
        raise DspecError(f"on_policy must be a fraction in [0, 1], got {on_policy}",
                         "e.g. --on-policy 0.25")
    if precision not in PRECISIONS:
        raise DspecError(f"unknown precision {precision!r}", f"use {', '.join(PRECISIONS)}")
    if world.distributed and parallel == "fsdp":
        if lora_spec is not None:
            raise DspecError("LoRA under FSDP is not supported",
                             "LoRA drafts fit one device: use --parallel ddp")
        if on_policy > 0:
            raise DspecError("on-policy rollouts under FSDP are not supported (each process "
                             "decodes a different length, and FSDP needs them in lockstep)",
                             "use --parallel ddp, or --on-policy 0")


def _train(target, data, out, *, world, draft_init, loss, steps, lr, batch_size, grad_accum,
           warmup_steps, temperature, eval_fraction, eval_every, save_every, keep_last, seed,
           resume, device, progress, stop_at, lora, teacher, on_policy, parallel, precision):
    import torch

    from deepspec_plugin.bench.run import stop_token_ids
    from deepspec_plugin.models import (
        fingerprint,
        load_causal_lm,
        load_tokenizer,
        tokenizer_fingerprint,
    )
    from deepspec_plugin.train import checkpoint as ckpts
    from deepspec_plugin.train import distributed as dist
    from deepspec_plugin.train.data import check_data_target, read_data
    from deepspec_plugin.train.init import init_draft
    from deepspec_plugin.train.lora import (
        apply_lora,
        check_targets_of,
        load_adapter_weights,
        merge,
        parameter_counts,
        parse_lora,
    )
    from deepspec_plugin.train.losses import make_loss
    from deepspec_plugin.train.on_policy import is_on_policy, rollout, rollout_seed

    def log(msg: str) -> None:
        if progress and world.is_main:
            print(f"[train] {msg}", flush=True)

    target, data, out = Path(target), Path(data), Path(out)
    # Checks first, on every process: nothing is written before they pass.
    lora_spec = parse_lora(lora) if lora is not None else None
    _check_arguments(out, resume, lora_spec, on_policy, teacher, parallel, precision, world,
                     dict(steps=steps, batch_size=batch_size, grad_accum=grad_accum,
                          eval_every=eval_every, save_every=save_every))
    data_manifest = check_data_target(data, target)
    signal_temperature = float(data_manifest.settings.get("signal_temperature", 1.0))
    loss_fn = make_loss(loss, temperature)
    loss_fn(torch.zeros(1, 1, 2), _probe_signal(signal_temperature), None)  # temperatures agree

    samples = list(read_data(data))
    train_set, held_out = split_by_prompt(samples, eval_fraction, seed)
    dist.barrier(world)  # every process has checked `out` before the first writes it

    created = not out.exists()
    init_error = None
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            init_dir = init_draft(target, draft_init, out / "init", seed=seed)
            if lora_spec is not None:
                check_targets_of(init_dir, lora_spec)
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
        init_dir = init_draft(target, draft_init, out / "init", seed=seed)
    run = {
        "target_fingerprint": fingerprint(target),
        "data_fingerprint": _data_fingerprint(data),
        "init": draft_init,
        "init_fingerprint": fingerprint(init_dir),
        "loss": loss_fn.spec,
        "temperature": float(temperature),
        "steps": steps,
        "lr": lr,
        "global_batch_size": batch_size * world.size,
        "grad_accum": grad_accum,
        "warmup_steps": warmup_steps,
        "eval_fraction": eval_fraction,
        "seed": seed,
        "teacher": teacher,
        "on_policy": float(on_policy),
    }
    if lora_spec is not None:  # absent for full fine-tuning, so its identity is unchanged
        run["lora"] = lora_spec.to_json()

    if world.is_main:
        ckpts.remove_partial(out)
    checkpoints = ckpts.checkpoint_dirs(out) if resume else []
    resumed_from = checkpoints[-1] if checkpoints else None
    if resumed_from is not None:
        recorded = ckpts.read_state(resumed_from).get("run", {})
        if recorded != run:
            raise DspecError(
                f"checkpoint {resumed_from} is from another run "
                f"({'; '.join(_diff(recorded, run))})",
                "resume with the same target, data, init, loss and settings, or use a new --out",
            )

    # The draft: from the init, or the newest checkpoint's weights.
    torch.manual_seed(seed)
    random.seed(seed)
    if lora_spec is not None:
        model = apply_lora(load_causal_lm(init_dir, device=device), lora_spec)
        if resumed_from is not None:
            load_adapter_weights(model, resumed_from / "draft")
    else:
        weights = resumed_from / "draft" if resumed_from is not None else init_dir
        model = load_causal_lm(weights, device=device).requires_grad_(True)
    model.train()
    trainable, total = parameter_counts(model)
    net = dist.wrap(_response_module(model), world, parallel)
    optimizer = torch.optim.AdamW(
        [p for p in net.parameters() if p.requires_grad],  # LoRA: the adapter only
        lr=lr, betas=(0.9, 0.95), weight_decay=0.0,
    )
    # The scheduler before the optimizer state: creating it sets the groups' lr, which the
    # saved state then overrides.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup_steps)
    )
    if resumed_from is not None:
        dist.load_optimizer_state(net, optimizer, ckpts.optimizer_state(resumed_from, device))
        state = ckpts.read_state(resumed_from)
        scheduler.load_state_dict(state["scheduler"])
        ckpts.restore_rng(resumed_from)
        step, consumed = state["step"], state["samples_consumed"]
        tokens_trained, evals = state["tokens_trained"], state["evals"]
        log(f"resumed from {resumed_from} at step {step}")
    else:
        step = consumed = tokens_trained = 0
        evals = []

    scorer = None  # the target, run online: full distributions, and grades of rollouts
    if teacher == "online" or on_policy > 0:
        scorer = load_causal_lm(target, device=device).eval().requires_grad_(False)
    stop_ids = tuple(stop_token_ids(load_tokenizer(target), target)) if on_policy > 0 else ()
    rollout_tokens = int(data_manifest.settings.get("max_new_tokens", 128))

    def run_eval() -> None:
        # Every process evaluates the whole held-out set (small): identical numbers, and FSDP's
        # collectives stay in lockstep.
        if evals and evals[-1]["step"] == step:
            return
        e = {"step": step, **evaluate(net, held_out, batch_size=batch_size,
                                      temperature=temperature,
                                      signal_temperature=signal_temperature, device=device)}
        evals.append(e)
        log(
            f"step {step}: held-out acceptance (1-TVD) {e['acceptance']:.4f}, "
            f"greedy agreement {e['greedy']:.4f} over {e['tokens']} tokens"
        )

    def write_weights(dest: Path) -> None:
        """The draft's weights as a Hugging Face directory (a collective under FSDP)."""
        if parallel == "fsdp" and world.distributed:
            full, _ = dist.full_state(net, optimizer)
            if world.is_main:
                sd = {k.removeprefix("lm."): v for k, v in full.items()}
                dist.unwrap(net).save_pretrained(str(dest), state_dict=sd)
        elif world.is_main:
            model.save_pretrained(str(dest))

    log(
        f"{'LoRA ' + lora if lora_spec is not None else 'full fine-tuning'}: "
        f"{trainable:,} trainable of {total:,} parameters ({trainable / max(total, 1):.2%})"
    )
    log(
        f"{len(train_set)} train / {len(held_out)} held-out samples, loss {loss_fn.spec}, "
        f"init {draft_init}, {steps} steps, {world.size} process(es) x batch {batch_size}, "
        f"teacher {teacher}, on-policy {on_policy:g}"
    )
    run_eval()
    global_batch = batch_size * world.size
    started, tokens_at_start = time.perf_counter(), tokens_trained
    rate = 0.0
    while step < steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(grad_accum):
            micro = consumed // global_batch
            picked = batch_indices(len(train_set), seed, consumed, global_batch)
            consumed += global_batch
            mine = [train_set[i] for i in
                    picked[world.rank * batch_size : (world.rank + 1) * batch_size]]
            online = teacher == "online"
            if is_on_policy(on_policy, seed, micro):
                mine = rollout(dist.unwrap(net), mine, max_new_tokens=rollout_tokens,
                               temperature=temperature, seed=rollout_seed(seed, micro, world.rank),
                               stop_token_ids=stop_ids, device=device)
                online = True
            batch = collate(mine, device)
            with _autocast(device, precision):
                logits = _draft_logits(net, batch)
            with torch.no_grad():
                signal = _signal(batch, signal_temperature, scorer if online else None)
            value = loss_fn(logits.float(), signal, None)
            # Weight by this process's share of the global batch's tokens, so that the mean
            # gradient over processes is the token mean over the global batch.
            n_local = int(batch["mask"].sum())
            (n_global,) = dist.all_sum([n_local], world)
            (value * (n_local * world.size / max(n_global, 1.0)) / grad_accum).backward()
            step_loss += value.item() * n_local / max(n_global, 1.0) * world.size / grad_accum
            tokens_trained += int(n_global)
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        step += 1

        elapsed = time.perf_counter() - started
        rate = (tokens_trained - tokens_at_start) / max(elapsed, 1e-9)
        if step % 10 == 0 or step == steps:
            log(
                f"step {step}/{steps}: loss {step_loss:.4f}, lr {scheduler.get_last_lr()[0]:.2e}, "
                f"{rate:.0f} tokens/s"
            )
        if step % eval_every == 0 or step == steps:
            run_eval()
        stopping = stop_at is not None and step >= stop_at and step < steps
        if step % save_every == 0 or stopping:
            state = {
                "run": run,
                "samples_consumed": consumed,
                "tokens_trained": tokens_trained,
                "evals": evals,
            }
            _, optim_state = dist.full_state(net, optimizer)
            if world.is_main:
                path = ckpts.save_checkpoint(out, step, write_weights, optim_state, scheduler,
                                             state, keep_last)
                log(f"saved {path}")
            elif parallel == "fsdp":
                write_weights(out)  # the collective half of rank 0's save
            dist.barrier(world)
        if stopping:
            return TrainResult(
                out=out,
                draft=None,
                steps=step,
                tokens_trained=tokens_trained,
                tokens_per_second=rate,
                evals=evals,
            )

    elapsed = time.perf_counter() - started
    rate = (tokens_trained - tokens_at_start) / max(elapsed, 1e-9)
    run_eval()
    final = evals[-1]
    manifest = {
        "schema": DRAFT_SCHEMA,
        "target_fingerprint": run["target_fingerprint"],
        "tokenizer_fingerprint": tokenizer_fingerprint(target),
        "method": "draft_model",
        "init": {"spec": draft_init, "fingerprint": run["init_fingerprint"]},
        "loss": loss_fn.spec,
        "temperature": float(temperature),
        "teacher": teacher,
        "on_policy": float(on_policy),
        "data": {
            "path": str(data.resolve()),
            "target_fingerprint": data_manifest.target_fingerprint,
            "samples": len(samples),
            "train_samples": len(train_set),
            "held_out_samples": len(held_out),
        },
        "steps": step,
        "tokens_trained": tokens_trained,
        "training": {"processes": world.size, "parallel": parallel if world.distributed
                     else None, "batch_size_per_process": batch_size,
                     "global_batch_size": global_batch, "grad_accum": grad_accum,
                     "precision": precision, "device": str(device)},
        "held_out": {
            "acceptance": final["acceptance"],
            "greedy_agreement": final["greedy"],
            "start_acceptance": evals[0]["acceptance"],
            "start_greedy_agreement": evals[0]["greedy"],
            "tokens": final["tokens"],
        },
        "tokens_per_second": rate,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if lora_spec is not None:
        manifest["lora"] = dict(
            lora_spec.to_json(), adapter="adapter", trainable_parameters=trainable
        )
    draft = out / "draft"
    if parallel == "fsdp" and world.distributed:
        full, _ = dist.full_state(net, optimizer)  # a collective: every process takes part
        if world.is_main:
            final_model = load_causal_lm(init_dir)  # a plain copy to hold the gathered weights
            final_model.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()})
            _write_draft(out, final_model, target, manifest)
    elif world.is_main:
        final_model = model
        if lora_spec is not None:
            _write_adapter(out, model)  # before the draft: out/draft is the finished-run marker
            final_model = merge(model)
        _write_draft(out, final_model, target, manifest)
    dist.barrier(world)
    log(
        f"wrote {draft}: held-out acceptance {evals[0]['acceptance']:.4f} -> "
        f"{final['acceptance']:.4f}, {rate:.0f} tokens/s"
    )
    return TrainResult(
        out=out,
        draft=draft,
        steps=step,
        tokens_trained=tokens_trained,
        tokens_per_second=rate,
        evals=evals,
        manifest=manifest,
    )


def _probe_signal(signal_temperature: float):
    """A one-token stand-in signal, only to make the loss check its temperature against the data's
    before any work is done."""
    import torch

    from deepspec_plugin.train.losses import TargetSignal

    return TargetSignal(
        topk_ids=torch.zeros(1, 1, 1, dtype=torch.long),
        topk_probs=torch.ones(1, 1, 1),
        temperature=signal_temperature,
    )


__all__ = [
    "TrainResult",
    "train",
    "evaluate",
    "collate",
    "split_by_prompt",
    "batch_indices",
    "lr_factor",
]
