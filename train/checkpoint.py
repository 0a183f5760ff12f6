"""Training checkpoints: safetensors and JSON only, written atomically, resumable in any world size.

``out/checkpoints/step-N`` holds

* ``draft/``: the draft's weights (``save_pretrained``; for LoRA the adapter only);
* ``optimizer.safetensors``: the optimizer's tensors, keyed ``state.<parameter name>.<key>``
  (names, not positions, so a checkpoint of N processes resumes in M), and the torch RNG state;
* ``state.json``: everything else: step, data position, tokens, evals, the optimizer's param
  groups and scalars, the scheduler, the python RNG state and the run identity.

A checkpoint is written into a temp dir and renamed, so any ``step-N`` is complete; the last
``keep_last`` are kept. Nothing is unpickled on load.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deepspec_plugin.fileio import atomic_dir, json_text

CHECKPOINTS = "checkpoints"


def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, so any step-N dir is complete), oldest first."""
    root = Path(out) / CHECKPOINTS
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


def remove_partial(out: Path) -> None:
    """Delete what a kill mid-save leaves (temp dirs); complete checkpoints are untouched."""
    for stale in (Path(out) / CHECKPOINTS).glob(".step-*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(
    out: Path,
    step: int,
    write_draft: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    scheduler,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write step-N: ``write_draft(dir)`` saves the weights; ``optimizer_state`` is name-keyed
    (`deepspec_plugin.train.distributed.full_state`)."""
    import torch
    from safetensors.torch import save_file

    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"step-{step}"
    with atomic_dir(dest, overwrite=True) as tmp:  # a rerun of the same step replaces it
        write_draft(tmp / "draft")
        tensors, scalars = {}, {}
        for name, entry in optimizer_state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state.{name}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{name}.{key}"] = value
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        py_state = random.getstate()
        full = dict(
            state,
            step=step,
            optimizer_param_groups=optimizer_state["param_groups"],
            optimizer_scalars=scalars,
            scheduler=scheduler.state_dict(),
            rng_python=[py_state[0], list(py_state[1]), py_state[2]],
        )
        (tmp / "state.json").write_text(json_text(full, indent=1))
    for old in checkpoint_dirs(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "state.json").read_text())


def optimizer_state(ckpt: Path, device: str) -> dict[str, Any]:
    """The name-keyed optimizer state dict of a checkpoint (for `set_optimizer_state_dict`)."""
    from safetensors.torch import load_file

    state = read_state(ckpt)
    tensors = load_file(str(Path(ckpt) / "optimizer.safetensors"))
    per_param: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            name, field = key[len("state."):].rsplit(".", 1)
            per_param.setdefault(name, {})[field] = value if field == "step" else value.to(device)
    for key, value in state["optimizer_scalars"].items():
        name, field = key.rsplit(".", 1)
        per_param.setdefault(name, {})[field] = value
    groups = state["optimizer_param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": per_param, "param_groups": groups}


def restore_rng(ckpt: Path) -> None:
    """The torch and python RNG states saved with a checkpoint."""
    import torch
    from safetensors import safe_open

    with safe_open(str(Path(ckpt) / "optimizer.safetensors"), framework="pt") as f:
        torch.set_rng_state(f.get_tensor("rng.torch"))
    v, s, g = read_state(ckpt)["rng_python"]
    random.setstate((v, tuple(s), g))
