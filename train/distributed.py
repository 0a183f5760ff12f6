"""Data parallel training under ``torchrun``: DDP, or FSDP for drafts that do not fit one device.

``torchrun --nproc-per-node N -m train ...`` (or ``torchrun ... $(which dspec) train ...``) sets
``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; `setup` then joins the process group (gloo on CPU, NCCL on
CUDA, one GPU per process). Each optimizer step consumes one global batch of
``batch_size * world`` samples per micro-batch; rank r trains on its r-th slice, and its loss is
scaled so that the gradient DDP averages is the mean over the tokens of the whole global batch:
N processes with batch size B train exactly as one process with batch size N * B.

Every collective here is a no-op in a single process, so the training loop reads the same either
way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from deepspec_plugin.errors import DspecError

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: a single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup(device: str) -> tuple[World, str]:
    """Join the torchrun process group if there is one; (world, this process's device)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        if torch.cuda.device_count() <= local_rank:
            raise DspecError(
                f"process {local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                "start at most one process per GPU (torchrun --nproc-per-node)",
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local_rank, backend=backend), device


def teardown(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # gloo aborts at exit when a peer is still mid-collective
            dist.destroy_process_group()


def wrap(model, world: World, mode: str):
    """The model prepared for data parallel training (unchanged in a single process)."""
    if mode not in PARALLEL_MODES:
        raise DspecError(f"unknown parallel mode {mode!r}", f"use {' or '.join(PARALLEL_MODES)}")
    if not world.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    # Shard each decoder layer, then the rest (embeddings, norm, head: tied, so one unit) at the
    # root, whose forward is the whole computation.
    for layer in unwrap(model).model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def unwrap(model):
    """The causal LM under DDP (FSDP2 shards in place), the trainer's module and PEFT."""
    model = getattr(model, "module", model)
    model = getattr(model, "lm", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def all_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum over the processes (float64)."""
    if not world.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, world: World):
    """Rank 0's ``obj`` on every process (e.g. an error raised on rank 0 only)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def full_state(model, optimizer):
    """(model state dict, optimizer state dict), full and on CPU, keyed by parameter names.

    A collective under FSDP (every rank calls it); the same dicts in any mode, so a checkpoint
    written by N processes resumes in M.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    target = getattr(model, "module", model)  # DDP: names without its "module." prefix
    model_sd = get_model_state_dict(target, options=options)
    optim_sd = get_optimizer_state_dict(target, optimizer, options=options)
    return model_sd, optim_sd


def full_model_state(model) -> dict:
    """The model's state dict of `full_state` alone (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(getattr(model, "module", model), options=options)


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Load a full, name-keyed optimizer state dict (see `full_state`) in any mode."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    target = getattr(model, "module", model)
    set_optimizer_state_dict(
        target, optimizer, optim_state_dict=state,
        options=StateDictOptions(full_state_dict=True),
    )
