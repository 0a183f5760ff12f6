"""Drafts that read the frozen target's hidden states and predict several tokens ahead.

EAGLE-3 heads, Medusa heads and the MLP speculator share one training step: per batch the target
runs teacher-forced (no grad; `TargetStates` keeps its states in memory, never on disk), the
draft's module maps those states to logits for each draft step i at the chains that have a label
(`Unrolled`), and step i is scored against the stored top-k row of the token it predicts, with
loss weight ``step_weight ** i`` (EAGLE-3, DeepSpec and Medusa all decay by 0.8). Held-out
acceptance is reported per step. A draft type says how its module is built and what its
logits' columns are (`id_map`: a reduced draft vocabulary's map, with one last column for the
mass outside it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from deepspec_plugin.train.distributed import World
from deepspec_plugin.train.draft import Draft

PROMPT_LABEL_TOPK = 32  # the top-k kept per prompt position, as `dspec data generate` stores


@dataclass
class Unrolled:
    logits: list  # per step: [N_i, columns] at the chains where step i has a label
    rows: list  # per step: (batch index, position of the stored signal row) of those chains


def step_signals(unrolled: Unrolled, batch: dict[str, Any], temperature: float | None,
                 id_map=None):
    """The stored top-k rows each step's logits predict; ``id_map`` maps target ids to logit
    columns (a reduced vocabulary), None for logits over the whole target vocabulary."""
    from deepspec_plugin.train.losses import TargetSignal

    out = []
    for bi, pos in unrolled.rows:
        ids = batch["topk_ids"][bi, pos]
        if id_map is not None:
            ids = id_map[ids]
        out.append(TargetSignal(topk_ids=ids.unsqueeze(0),
                                topk_probs=batch["topk_probs"][bi, pos].unsqueeze(0),
                                temperature=temperature))
    return out


class TargetStates:
    """The frozen target's aux states of each sample, computed on first sight and kept in memory
    (never on disk) up to ``budget_bytes``: from the second epoch on, a step costs only the head.

    Each sample runs alone (no padding), so a state is bit-for-bit the same whether it was
    remembered or computed again (after a resume, or past the budget): exact resume holds.
    Keyed by the sample's tokens.

    With ``topk`` the target runs to its logits and each sample also keeps the target's own
    top-k next-token probabilities at every position (in the stored data's format): labels for
    the prompt positions, which the data holds none for.
    """

    def __init__(self, target, layer_ids, budget_bytes: int, topk: int | None = None):
        from deepspec_plugin.models.eagle3 import AuxHiddenStates

        # Without labels the target runs only up to its highest aux layer: no logits needed.
        self.capture = AuxHiddenStates(target, layer_ids, stop_early=topk is None)
        self.target, self.topk = target, topk
        self.budget = int(budget_bytes)
        self.used = 0
        self.memory: dict[bytes, Any] = {}
        self.computed = self.remembered = 0

    def _compute(self, tokens):
        import torch

        with torch.no_grad():
            if self.topk is None:
                return self.capture.run(input_ids=tokens[None])[0], None
            logits = self.target(input_ids=tokens[None]).logits[0, :-1].float()
            states = self.capture.take()[0]
            top = torch.topk(torch.softmax(logits, -1), k=self.topk, dim=-1, sorted=True)
            return states, (top.indices.to(torch.int32), top.values.to(torch.float16))

    def _sample(self, tokens):
        key = tokens.cpu().numpy().tobytes()
        entry = self.memory.get(key)
        if entry is not None:
            self.remembered += 1
            return entry
        entry = self._compute(tokens)
        self.computed += 1
        size = sum(t.numel() * t.element_size() for t in (entry[0], *(entry[1] or ())))
        if self.used + size <= self.budget:
            self.memory[key] = entry
            self.used += size
        return entry

    def batch(self, input_ids, attention_mask):
        """``[B, L, n_aux * H]`` for a right-padded batch (zeros at padding)."""
        return self.batch_with_labels(input_ids, attention_mask)[0]

    def batch_with_labels(self, input_ids, attention_mask):
        """The states, and with ``topk`` the target's labels at every position in collate's
        layout: (``topk_ids`` ``[B, L - 1, K]``, ``topk_probs``, ``mask`` ``[B, L - 1]``, true
        where token t + 1 exists); else None."""
        import torch

        entries = [self._sample(ids[mask.bool()]) for ids, mask in zip(input_ids, attention_mask)]
        b, width = input_ids.shape
        out = entries[0][0].new_zeros((b, width, entries[0][0].shape[-1]))
        for i, (states, _) in enumerate(entries):
            out[i, : states.shape[0]] = states
        if self.topk is None:
            return out, None
        ids = torch.zeros((b, width - 1, self.topk), dtype=torch.long, device=input_ids.device)
        probs = torch.zeros((b, width - 1, self.topk), dtype=torch.float32,
                            device=input_ids.device)
        for i, (_, (tids, tprobs)) in enumerate(entries):
            ids[i, : len(tids)] = tids.long()
            probs[i, : len(tids)] = tprobs.float()
        return out, (ids, probs, attention_mask[:, 1:].bool())


class StepDraft(Draft):
    """A draft over the frozen target's states, trained per draft step (see the module doc).

    Subclasses set ``self.module`` (wrapped for the world: its forward maps ``(states,
    input_ids, mask)`` to an `Unrolled`), and may override `target_inputs` and `id_map`.
    """

    def __init__(self, target, cfg, world: World, layer_ids, steps: int):
        self.target, self.cfg, self.world = target, cfg, world
        self.steps = int(steps)
        self.weights = [float(cfg.step_weight) ** i for i in range(self.steps)]
        self.prompt_labels = bool(cfg.prompt_labels)
        self.states = TargetStates(target, layer_ids, int(cfg.target_states_gib * 2**30),
                                   topk=PROMPT_LABEL_TOPK if self.prompt_labels else None)
        self.target_seconds = 0.0  # time in the target's forward, for the share it takes
        self.head_seconds = 0.0
        self._batch = None

    @property
    def id_map(self):
        return None

    def target_inputs(self, states):
        """What the module reads of the captured states (EAGLE-3: all of them)."""
        return states

    def forward(self, batch: dict[str, Any], prompt_labels: bool | None = None):
        """The draft's steps on a batch. With prompt labels (training), every position is
        learnt, labelled by the target's own top-k from the forward that gave its states: at a
        response token that is the stored signal again (same target, same prefix)."""
        import torch

        started = time.perf_counter()
        states, labels = self.states.batch_with_labels(batch["input_ids"],
                                                       batch["attention_mask"])
        with torch.no_grad():
            states = self.target_inputs(states)
        if self.prompt_labels if prompt_labels is None else prompt_labels:
            ids, probs, every = labels
            batch = {**batch, "topk_ids": ids, "topk_probs": probs, "mask": every}
        mid = time.perf_counter()
        out = self.module(states, batch["input_ids"], batch["mask"])
        self.target_seconds += mid - started
        self.head_seconds += time.perf_counter() - mid
        self._batch = batch
        return out

    def loss(self, output: Unrolled, signal, loss_fn):
        import torch

        signals = step_signals(output, self._batch, signal.temperature, self.id_map)
        n0 = max(int(self._batch["mask"].sum()), 1)
        total = torch.zeros((), device=self._batch["input_ids"].device)
        for w, logits, sig in zip(self.weights, output.logits, signals):
            if logits.shape[0]:
                total = total + w * loss_fn(logits.unsqueeze(0), sig, None) * (
                    logits.shape[0] / n0)
        return total

    def score(self, batch: dict[str, Any], signal_temperature: float,
              temperature: float) -> dict[str, list[float]]:
        """Held-out sums per step: 1 - TVD and greedy agreement, and the token counts."""
        from deepspec_plugin.train.losses import acceptance_from_tvd, greedy_agreement

        output = self.forward(batch, prompt_labels=False)  # held out: the responses only
        signals = step_signals(output, batch, signal_temperature, self.id_map)
        acc, greedy, tokens = [], [], []
        for logits, sig in zip(output.logits, signals):
            n = logits.shape[0]
            x = logits.unsqueeze(0).float()
            acc.append(float(acceptance_from_tvd(x, sig, None, temperature)) * n if n else 0.0)
            greedy.append(float(greedy_agreement(x, sig, None)) * n if n else 0.0)
            tokens.append(n)
        return {"acceptance": acc, "greedy": greedy, "tokens": tokens}

    def timing(self) -> dict[str, float]:
        total = self.target_seconds + self.head_seconds
        return {"target_seconds": self.target_seconds, "head_seconds": self.head_seconds,
                "target_share": self.target_seconds / total if total else 0.0,
                "target_forwards": self.states.computed,
                "target_states_remembered": self.states.remembered,
                "target_states_memory_bytes": self.states.used}
