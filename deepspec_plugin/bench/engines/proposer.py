"""What proposes the draft tokens the reference engine verifies: the `Proposer` seam.

The engine owns the target, the verification and the accept / resample rule; a proposer owns
everything on the draft side of one batch: it is prefilled with the prompts, proposes k tokens
per row after the last emitted ("pending") token, rolls back what the target rejected, and drops
the rows that finished. `DraftModelProposer` proposes with a standalone draft LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from deepspec_plugin.bench.engines.cached_lm import CachedLM, RowMask, crop
from deepspec_plugin.bench.engines.timing import StepTimer


@dataclass
class Proposal:
    tokens: Any  # [rows, k] draft tokens
    probs: Any | None  # [rows, k, V] the draft's distributions q for the rule; None when greedy


class Proposer(Protocol):
    def prefill(self, input_ids, attention_mask, position_ids) -> None:
        """Start a batch: left-padded prompts ``[rows, L]``, their mask and positions. (A
        proposer with ``target_layers`` also gets ``target_states``: the target's hidden states
        entering those layers, ``[rows, L, n * H]``.)"""

    def propose(
        self, pending, k: int, temperature: float, generator, timer: StepTimer,
        sample: bool = True,
    ) -> Proposal:
        """k tokens per row after ``pending`` ([rows], not yet seen by the proposer), sampled
        at ``temperature`` (greedy at 0, or with ``sample`` False: then ``probs`` is None);
        single-token forwards go through ``timer``."""

    def rollback(self, num_accepted, accepted: list[int]) -> None:
        """Keep the first ``num_accepted`` ([rows] tensor; ``accepted`` on the host) proposed
        tokens of each row and forget the rest. (``target_states``, for a proposer with
        ``target_layers``: the target's states of the verified ``[pending, d_1..d_k]``.)"""

    def select(self, index, rows: list[int]) -> None:
        """Keep only these rows (``index`` a device tensor of ``rows``): the others finished."""


class DraftModelProposer:
    """A standalone draft LM proposes k tokens autoregressively from its own KV cache.

    The cache holds pending and d_1..d_{k-1} after a proposal: the draft never feeds its own last
    token d_k. Where a row accepted all k, d_k is therefore missing from the cache, and the next
    proposal feeds [d_k, pending] (d_k masked out for the other rows). ``holes`` counts each row's
    trailing rejected positions after the last crop; -1 marks a row that lacks d_k.
    """

    def __init__(self, draft: CachedLM, device):
        self.lm = draft
        self.device = device
        self._k, self._offsets = None, None  # k of the last proposal, and arange(k + 1)

    def prefill(self, input_ids, attention_mask, position_ids) -> None:
        import torch

        self.mask = RowMask(attention_mask, self.device)
        self.cache = self.lm.new_cache()
        self.lm.forward(input_ids, self.mask, position_ids, self.cache, keep=1)
        # Valid tokens in the cache per row, i.e. the position of the next token fed to it.
        self.valid = attention_mask.sum(-1)
        self.full = torch.zeros_like(self.valid, dtype=torch.bool)  # rows lacking d_k
        self.last_draft = torch.zeros_like(self.valid)
        self.any_full = False
        self.holes = [0] * len(self.valid)

    def select(self, index, rows: list[int]) -> None:
        self.cache.batch_select_indices(index)
        self.mask.select(index)
        self.valid, self.full = self.valid[index], self.full[index]
        self.last_draft = self.last_draft[index]
        self.holes = [self.holes[i] for i in rows]
        self.any_full = min(self.holes) < 0
        # Holes that were trailing in every remaining row can go now.
        crop(self.cache, self.mask, max(0, min(self.holes)), self.holes)

    def propose(
        self, pending, k: int, temperature: float, generator, timer: StepTimer,
        sample: bool = True,
    ) -> Proposal:
        import torch

        from deepspec_plugin.bench.engines.rejection import draft_token

        mask = self.mask
        if self.any_full:
            inputs = torch.stack([self.last_draft, pending], 1)
            mask.append(torch.stack([self.full.long(), torch.ones_like(pending)], 1))
            mask.dense = mask.dense and max(self.holes) == -1  # every row lacked d_k
            positions = torch.stack([self.valid, self.valid + self.full], 1)
            self.valid = self.valid + self.full + 1
        else:
            inputs = pending[:, None]
            mask.append_ones(1)
            positions = self.valid[:, None]
            self.valid = self.valid + 1
        self._start = mask.length - 1  # the column of `pending` in the mask
        tokens, probs = [], []
        for i in range(k):
            started = timer.start()
            logits = self.lm.forward(inputs, mask, positions, self.cache, keep=1)[:, -1]
            timer.stop(started, width=inputs.shape[1])
            token, q = draft_token(logits, temperature, sample, generator)
            if q is not None:
                probs.append(q)
            tokens.append(token)
            if i < k - 1:
                inputs = token[:, None]
                mask.append_ones(1)
                positions = self.valid[:, None]
                self.valid = self.valid + 1
        proposal = Proposal(torch.stack(tokens, 1), torch.stack(probs, 1) if probs else None)
        if self._k != k:
            self._k, self._offsets = k, torch.arange(k + 1, device=self.device)
        self._last = proposal.tokens[:, -1]
        return proposal

    def rollback(self, num_accepted, accepted: list[int]) -> None:
        k, mask = self._k, self.mask
        # d_i (i <= k-1) is valid iff i <= accepted; a row that accepted all k lacks d_k.
        self.holes = [k - 1 - a for a in accepted]
        crop(self.cache, mask, max(0, min(self.holes)), self.holes)
        if max(self.holes) > 0:
            kept = mask.length - self._start  # pending and the d_i still in the cache
            mask.buf[:, self._start : mask.length] = (
                self._offsets[:kept] <= num_accepted[:, None]
            ).long()
            mask.dense = False
        self.valid = self.valid - (k - 1 - num_accepted.clamp(max=k - 1))
        self.full = num_accepted == k
        self.any_full = k in accepted
        self.last_draft = self._last
