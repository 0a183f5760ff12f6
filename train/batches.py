"""Training batches: the train / held-out split, the data order, collation and the target signal.

**Alignment.** A sample's ``topk_*`` row r is the target's distribution for its r-th response
token, i.e. for the token at position ``start + r``. The draft's logits at position t predict
token t + 1, so the collated signal at position t holds the row for token t + 1 and the loss mask
at t is ``loss_mask[t + 1]``; logits and signal are both ``[B, L - 1, ...]``.
"""

from __future__ import annotations

import random
from typing import Any

from deepspec_plugin.errors import DspecError


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


def target_signal(batch: dict[str, Any], signal_temperature: float, teacher=None):
    """The target signal at the response positions only, as ``[1, N, ...]`` (the rows of
    `deepspec_plugin.train.draft.response_logits`): the stored top-k, or the full distribution of
    ``teacher`` (the target, run now) when given or when the batch has no stored signal."""
    from deepspec_plugin.train.draft import response_logits
    from deepspec_plugin.train.losses import TargetSignal

    if teacher is not None or "topk_ids" not in batch:
        if teacher is None:
            raise RuntimeError("a batch without a stored signal needs the target online")
        return TargetSignal(logits=response_logits(teacher, batch).float())
    m = batch["mask"]
    return TargetSignal(
        topk_ids=batch["topk_ids"][m].unsqueeze(0),
        topk_probs=batch["topk_probs"][m].unsqueeze(0),
        temperature=signal_temperature,
    )


def probe_signal(signal_temperature: float):
    """A one-token stand-in signal, only to make a loss check its temperature against the data's
    before any work is done."""
    import torch

    from deepspec_plugin.train.losses import TargetSignal

    return TargetSignal(
        topk_ids=torch.zeros(1, 1, 1, dtype=torch.long),
        topk_probs=torch.ones(1, 1, 1),
        temperature=signal_temperature,
    )


__all__ = ["split_by_prompt", "batch_indices", "collate", "target_signal", "probe_signal"]
