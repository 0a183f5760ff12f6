"""Distil a draft model on target-generated data: one readable training loop (nanoGPT style).

``train(target, data, out)`` checks that the data was made by this target, initialises the draft
(``layers:N``: the target's first N layers, or ``PATH``: an existing same-tokenizer model), splits
the samples into train / held-out by prompt (seeded), and minimises a distillation loss
(`train.losses.make_loss`) against the stored top-k target signal, with AdamW, linear warmup then
cosine decay, gradient clipping and accumulation, and bf16 autocast on CUDA only.

**Alignment.** A sample's ``topk_*`` row r is the target's distribution for its r-th response
token, i.e. for the token at position ``start + r``. The draft's logits at position t predict
token t + 1, so the collated signal at position t holds the row for token t + 1 and the loss mask
at t is ``loss_mask[t + 1]``; logits and signal are both ``[B, L - 1, ...]``.

**Held-out acceptance**: 1 - TVD against the stored signal (the expected speculative-sampling
acceptance, on the top-k coarsening) and greedy agreement, token-weighted over the held-out
samples, at the start, every ``eval_every`` steps and at the end.

**Checkpoints** (``out/checkpoints/step-N``, written into a temp dir and renamed, last
``keep_last`` kept): the draft (safetensors), the optimizer tensors and torch RNG state
(``optimizer.safetensors``) and everything else as JSON (``state.json``: step, data position,
tokens, evals, optimizer param groups, scheduler state, python RNG state, and the run identity).
Nothing is unpickled. ``resume=True`` continues from the newest checkpoint, and refuses one whose
run identity (target, data, init, loss and hyperparameters) differs. Training N steps straight or
k steps, a kill, and a resume to N give the same weights.

**Output**: ``out/draft``, a Hugging Face checkpoint with the target's tokenizer files and a
``deepspec.json`` draft manifest, renamed into place when complete.

**LoRA** (``lora="r=16,alpha=32,targets=q_proj+v_proj"``, see `train.lora`): the draft is
wrapped with PEFT after initialisation (base frozen, only the adapter trains; the trainable/total
parameter counts are logged); checkpoints hold the adapter weights, and resume rebuilds the base
from the init and loads them; the output is ``out/adapter`` (PEFT ``save_pretrained``) and
``out/draft`` = the merged model, a plain checkpoint; the spec is in the run identity and the
manifest (``"lora"``).

Not here yet: torchrun data parallel / FSDP, on-policy batches, ``fresh:`` inits.
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

DRAFT_SCHEMA = "deepspec-draft/v1"
DRAFT_MANIFEST = "deepspec.json"
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
    """
    import torch

    width = max(len(s.input_ids) for s in samples)
    k = samples[0].topk_ids.shape[-1]
    b = len(samples)
    input_ids = torch.zeros((b, width), dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width - 1), dtype=torch.bool)
    ids = torch.zeros((b, width - 1, k), dtype=torch.long)
    probs = torch.zeros((b, width - 1, k), dtype=torch.float32)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = s.input_ids
        attention[i, :n] = 1
        shifted = s.loss_mask[1:n].bool()  # token t + 1 is a response token
        mask[i, : n - 1] = shifted
        positions = shifted.nonzero().squeeze(-1)
        if len(positions) != len(s.topk_ids):
            raise DspecError(
                f"sample (prompt {s.prompt_index}, turn {s.turn}) has {len(s.topk_ids)} signal "
                f"rows for {len(positions)} response tokens after the first",
                "regenerate the data (a response must follow at least one context token)",
            )
        ids[i, positions] = s.topk_ids
        probs[i, positions] = s.topk_probs.float()
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention.to(device),
        "mask": mask.to(device),
        "topk_ids": ids.to(device),
        "topk_probs": probs.to(device),
    }


def _signal(batch: dict[str, Any], signal_temperature: float):
    """The target signal at the response positions only, as ``[1, N, K]`` (see _draft_logits)."""
    from train.losses import TargetSignal

    m = batch["mask"]
    return TargetSignal(
        topk_ids=batch["topk_ids"][m].unsqueeze(0),
        topk_probs=batch["topk_probs"][m].unsqueeze(0),
        temperature=signal_temperature,
    )


def _draft_logits(model, batch: dict[str, Any]):
    """The draft's logits at the response positions only, as ``[1, N, V]``.

    The head over the whole vocabulary (49152 for the reference target) at every prompt position
    would dominate time and memory; only the N positions that predict a response token are needed.
    Losses over these N rows need no mask: their mean is the masked mean over the batch.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    hidden = base.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return base.lm_head(hidden[:, :-1][batch["mask"]]).unsqueeze(0)


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

    from train.losses import acceptance_from_tvd, greedy_agreement

    was_training = model.training
    model.eval()
    acc = greedy = 0.0
    tokens = 0
    with torch.no_grad(), _autocast(device):
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


def _autocast(device: str):
    """bf16 autocast where the device supports it (CUDA); float32 elsewhere."""
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- run identity, init -------------------------------------------------------------------------


def _data_fingerprint(data: Path) -> str:
    """Identity of a data directory: its manifest's shard checksums and settings."""
    from train.data import load_manifest

    m = load_manifest(data)
    payload = {
        "target": m.target_fingerprint,
        "settings": m.settings,
        "shards": [(s.file, s.sha256) for s in m.shards],
    }
    return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _init_draft(target: Path, spec: str, out: Path) -> Path:
    """The initial draft directory for `spec`: ``layers:N`` (written to out/init) or ``PATH``."""
    from deepspec_plugin.models import check_pair, draft_init

    if spec.startswith("layers:"):
        try:
            layers = int(spec.split(":", 1)[1])
        except ValueError:
            raise DspecError(
                f"invalid draft init {spec!r}", "use layers:N or a model directory"
            ) from None
        init = out / "init"
        if not init.is_dir():  # on resume it is already there (its fingerprint is checked)
            draft_init(target, layers, init)
    elif spec.startswith("fresh:"):
        raise DspecError(
            f"draft init {spec!r} is not supported yet",
            "use layers:N or an existing model directory",
        )
    else:
        init = Path(spec).expanduser()
        if not init.is_dir():
            raise DspecError(
                f"draft init {spec!r} is neither layers:N nor a model directory",
                "pass layers:N or the path of a same-tokenizer model directory",
            )
    check_pair(target, init)
    return init


def _diff(old: dict, new: dict) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


# --- checkpoints --------------------------------------------------------------------------------


def _checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so any step-N dir is complete), oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir()
        and p.name.startswith("step-")
        and p.name[5:].isdigit()
        and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    out: Path, step: int, model, optimizer, scheduler, state: dict[str, Any], keep_last: int
) -> Path:
    import torch
    from safetensors.torch import save_file

    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"step-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step-{step}.tmp-", dir=root))
    try:
        model.save_pretrained(str(tmp / "draft"))
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for idx, entry in opt["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{idx}.{key}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        py_state = random.getstate()
        full = dict(
            state,
            step=step,
            optimizer_param_groups=opt["param_groups"],
            optimizer_scalars=scalars,
            scheduler=scheduler.state_dict(),
            rng_python=[py_state[0], list(py_state[1]), py_state[2]],
        )
        (tmp / "state.json").write_text(json.dumps(full, indent=1, sort_keys=True) + "\n")
        os.chmod(tmp, 0o755)
        if dest.exists():  # a rerun of the same step: replace it
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in _checkpoint_dirs(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def load_checkpoint(
    ckpt: Path, model_device: str, optimizer_factory, scheduler_factory, load_model=None
):
    """(model, optimizer, scheduler, state dict) from a checkpoint: safetensors and JSON only.

    ``load_model(ckpt / "draft")`` builds the model when the checkpoint is not a full model (a
    LoRA adapter); by default the checkpoint's draft is loaded as a causal LM.
    """
    import torch
    from safetensors.torch import load_file

    from deepspec_plugin.models import load_causal_lm

    state = json.loads((ckpt / "state.json").read_text())
    if load_model is not None:
        model = load_model(ckpt / "draft").train()
    else:
        model = load_causal_lm(ckpt / "draft", device=model_device).requires_grad_(True).train()
    optimizer = optimizer_factory(model)
    # The scheduler first: creating it sets the groups' lr, which the saved state then overrides.
    scheduler = scheduler_factory(optimizer)
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    opt_state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = (
                value.to(model_device) if key != "step" else value
            )
    for name, value in state["optimizer_scalars"].items():
        idx, key = name.split(".", 1)
        opt_state.setdefault(int(idx), {})[key] = value
    groups = state["optimizer_param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    v, s, g = state["rng_python"]
    random.setstate((v, tuple(s), g))
    return model, optimizer, scheduler, state


# --- output -------------------------------------------------------------------------------------


def _write_draft(out: Path, model, target: Path, manifest: dict[str, Any]) -> Path:
    """out/draft: weights, config, the target's tokenizer files and deepspec.json, atomically."""
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
        (tmp / DRAFT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
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
    loss: str = "tvd",
    steps: int = 100,
    lr: float = 5e-4,
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
) -> TrainResult:
    """Distil a draft for `target` on `data` into `out` (see the module docstring).

    ``stop_at`` stops after that step (with a checkpoint), as a kill would: the run is resumed
    with ``resume=True`` and the same arguments. ``lora`` is a `train.lora.parse_lora` spec.
    """
    import torch

    from deepspec_plugin.models import fingerprint, load_causal_lm, tokenizer_fingerprint
    from train.data import check_data_target, read_data
    from train.lora import (
        apply_lora,
        check_targets_of,
        load_adapter_weights,
        merge,
        parameter_counts,
        parse_lora,
    )
    from train.losses import make_loss

    def log(msg: str) -> None:
        if progress:
            print(f"[train] {msg}", flush=True)

    target, data, out = Path(target), Path(data), Path(out)
    # Checks first: nothing is written before they pass.
    if out.exists() and not resume:
        raise DspecError(
            f"{out} already exists", "choose a new --out, or pass --resume to continue a run there"
        )
    if resume and (out / "draft" / DRAFT_MANIFEST).is_file():
        raise DspecError(f"the run in {out} is already finished", "choose a new --out")
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("grad_accum", grad_accum),
        ("eval_every", eval_every),
        ("save_every", save_every),
    ):
        if value < 1:
            raise DspecError(f"{name} must be >= 1, got {value}", f"pass a positive {name}")
    lora_spec = parse_lora(lora) if lora is not None else None
    data_manifest = check_data_target(data, target)
    signal_temperature = float(data_manifest.settings.get("signal_temperature", 1.0))
    loss_fn = make_loss(loss, temperature)
    loss_fn(torch.zeros(1, 1, 2), _probe_signal(signal_temperature), None)  # temperatures agree

    samples = list(read_data(data))
    train_set, held_out = split_by_prompt(samples, eval_fraction, seed)

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        init_dir = _init_draft(target, draft_init, out)
        if lora_spec is not None:
            check_targets_of(init_dir, lora_spec)
    except BaseException:
        if created:  # a refused init leaves nothing behind (a rerun would find `out` existing)
            shutil.rmtree(out, ignore_errors=True)
        raise
    run = {
        "target_fingerprint": fingerprint(target),
        "data_fingerprint": _data_fingerprint(data),
        "init": draft_init,
        "init_fingerprint": fingerprint(init_dir),
        "loss": loss_fn.spec,
        "temperature": float(temperature),
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "warmup_steps": warmup_steps,
        "eval_fraction": eval_fraction,
        "seed": seed,
    }
    if lora_spec is not None:  # absent for full fine-tuning, so its identity is unchanged
        run["lora"] = lora_spec.to_json()

    def make_optimizer(model):
        params = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter only
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, steps, warmup_steps)
        )

    for stale in (out / CHECKPOINTS).glob(".step-*.tmp-*"):  # what a kill mid-save leaves
        shutil.rmtree(stale, ignore_errors=True)
    checkpoints = _checkpoint_dirs(out) if resume else []
    if checkpoints:
        ckpt = checkpoints[-1]
        recorded = json.loads((ckpt / "state.json").read_text()).get("run", {})
        if recorded != run:
            raise DspecError(
                f"checkpoint {ckpt} is from another run ({'; '.join(_diff(recorded, run))})",
                "resume with the same target, data, init, loss and settings, or use a new --out",
            )
        def load_lora_model(adapter_dir: Path):
            base = load_causal_lm(init_dir, device=device)
            peft_model = apply_lora(base, lora_spec)
            load_adapter_weights(peft_model, adapter_dir)
            return peft_model

        model, optimizer, scheduler, state = load_checkpoint(
            ckpt,
            device,
            make_optimizer,
            make_scheduler,
            load_model=load_lora_model if lora_spec is not None else None,
        )
        step, consumed = state["step"], state["samples_consumed"]
        tokens_trained, evals = state["tokens_trained"], state["evals"]
        log(f"resumed from {ckpt} at step {step}")
    else:
        torch.manual_seed(seed)
        random.seed(seed)
        model = load_causal_lm(init_dir, device=device).requires_grad_(True).train()
        if lora_spec is not None:
            model = apply_lora(model, lora_spec).train()
        optimizer = make_optimizer(model)
        scheduler = make_scheduler(optimizer)
        step = consumed = tokens_trained = 0
        evals = []

    eval_args = dict(
        batch_size=batch_size,
        temperature=temperature,
        signal_temperature=signal_temperature,
        device=device,
    )

    def run_eval() -> None:
        if evals and evals[-1]["step"] == step:
            return
        e = {"step": step, **evaluate(model, held_out, **eval_args)}
        evals.append(e)
        log(
            f"step {step}: held-out acceptance (1-TVD) {e['acceptance']:.4f}, "
            f"greedy agreement {e['greedy']:.4f} over {e['tokens']} tokens"
        )

    trainable, total = parameter_counts(model)
    log(
        f"{'LoRA ' + lora if lora_spec is not None else 'full fine-tuning'}: "
        f"{trainable:,} trainable of {total:,} parameters ({trainable / max(total, 1):.2%})"
    )
    log(
        f"{len(train_set)} train / {len(held_out)} held-out samples, loss {loss_fn.spec}, "
        f"init {draft_init}, {steps} steps"
    )
    run_eval()
    started, tokens_at_start = time.perf_counter(), tokens_trained
    while step < steps:
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(grad_accum):
            picked = batch_indices(len(train_set), seed, consumed, batch_size)
            consumed += batch_size
            batch = collate([train_set[i] for i in picked], device)
            with _autocast(device):
                logits = _draft_logits(model, batch)
            value = loss_fn(logits, _signal(batch, signal_temperature), None)
            (value / grad_accum).backward()
            step_loss += value.item() / grad_accum
            tokens_trained += int(batch["mask"].sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
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
            path = save_checkpoint(out, step, model, optimizer, scheduler, state, keep_last)
            log(f"saved {path}")
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
        "data": {
            "path": str(data.resolve()),
            "target_fingerprint": data_manifest.target_fingerprint,
            "samples": len(samples),
            "train_samples": len(train_set),
            "held_out_samples": len(held_out),
        },
        "steps": step,
        "tokens_trained": tokens_trained,
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
        _write_adapter(out, model)  # before the draft: out/draft is the finished-run marker
        model = merge(model)
    draft = _write_draft(out, model, target, manifest)
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

    from train.losses import TargetSignal

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
    "save_checkpoint",
    "load_checkpoint",
]
