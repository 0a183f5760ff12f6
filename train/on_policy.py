"""On-policy batches (DistillSpec, Zhou et al. 2024): the draft writes, the target grades.

Off-policy distillation only shows the draft the target's own continuations; at serving time the
draft conditions on its own proposals too. For a fraction of the micro-batches, `rollout` keeps
each sample's context, lets the current draft continue it (sampled at the serving temperature,
greedy at 0; seeded by the batch position, so a resumed run rolls out the same tokens), and
returns samples without a stored signal: the trainer then scores them with the target online.

Which micro-batches are on-policy is a pure function of (seed, micro-batch index), identical on
every process.
"""

from __future__ import annotations

import hashlib
import random

from deepspec_plugin.train.data import Sample


def is_on_policy(fraction: float, seed: int, micro_batch: int) -> bool:
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return random.Random(f"on-policy:{seed}:{micro_batch}").random() < fraction


def rollout_seed(seed: int, micro_batch: int, rank: int) -> int:
    h = hashlib.sha256(f"rollout:{seed}:{micro_batch}:{rank}".encode()).digest()
    return int.from_bytes(h[:4], "little")


def context_of(sample: Sample) -> list[int]:
    """The tokens before the sample's first response token."""
    mask = sample.loss_mask
    first = int(mask.nonzero()[0, 0]) if mask.any() else len(mask)
    return sample.input_ids[:first].tolist()


def rollout(draft, samples: list[Sample], *, max_new_tokens: int, temperature: float, seed: int,
            stop_token_ids: tuple[int, ...], device: str = "cpu") -> list[Sample]:
    """The samples' contexts continued by `draft` (a causal LM); signal fields left empty."""
    import torch

    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.bench.engines.reference import ReferenceEngine

    was_training = draft.training
    contexts = [context_of(s) for s in samples]
    engine = ReferenceEngine(draft, device=device)  # plain decoding with the draft alone
    try:
        result = engine.generate(
            contexts,
            GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, k=None,
                             seed=seed, stop_token_ids=tuple(stop_token_ids)),
        )
    finally:
        draft.train(was_training)
    out = []
    for s, ctx, g in zip(samples, contexts, result.generations):
        response = list(g.token_ids) or list(stop_token_ids[:1])  # never an empty response
        ids = torch.tensor(ctx + response, dtype=torch.long)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[len(ctx):] = True
        out.append(Sample(prompt_index=s.prompt_index, turn=s.turn, input_ids=ids,
                          loss_mask=mask, topk_ids=None, topk_probs=None, leftover=None))
    return out
