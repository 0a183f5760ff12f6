"""EAGLE-3 proposals for the reference engine, as vLLM 0.32 makes them (``v1/spec_decode/
llm_base_proposer.py``, ``models/llama_eagle3.py``).

The head's cache holds one entry per target position j: token x_{j+1} with the target's hidden
states at j (fused by ``fc``), at position j. A proposal first feeds the entries the last target
pass made possible (after the prefill: the prompt; after a verification: pending and the accepted
tokens), the last of which pairs the pending token with the target's states at the position
before it; its output gives d_1. Each later step feeds the previous draft token with the head's
own pre-norm output, one position further; those chain entries are dropped again on rollback
(vLLM overwrites them), so the cache only ever holds entries of target states.

Rows of a batch accept different counts: a block is laid out with each row's valid entries first
and holes (masked, `RowMask`) after, so trailing holes common to every row are cropped (batch
size 1 never keeps one). Proposals are argmax at temperature 0, or sampled from the head's
distribution over its draft vocabulary (q is 0 outside it) under the ``probabilistic`` rule.
"""

from __future__ import annotations

from typing import Any

from deepspec_plugin.bench.engines.cached_lm import RowMask, crop
from deepspec_plugin.bench.engines.proposer import Proposal
from deepspec_plugin.bench.engines.timing import StepTimer


class Eagle3Proposer:
    """Proposes with an EAGLE-3 head (`deepspec_plugin.models.eagle3`) from the target's states.

    ``target_layers``: the aux layer ids the engine must capture in every target forward and
    pass as ``target_states`` to `prefill` and `rollback`.
    """

    method = "eagle3"

    def __init__(self, head, device):
        self.head = head
        self.device = device
        self.target_layers = list(head.cfg.aux_layer_ids)

    # --- the Proposer interface ------------------------------------------------------------

    def prefill(self, input_ids, attention_mask, position_ids, target_states=None) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        rows, width = input_ids.shape
        self.mask = RowMask(attention_mask[:, :0], self.device)
        # The first block: column c pairs token ids[c + 1] (the pending token at the last
        # column) with the target's states at c, at the position of c.
        self.block_tokens = input_ids.roll(-1, dims=1)
        self.block_states = target_states
        self.block_valid = attention_mask.bool()
        self.block_positions = position_ids
        self.last = [width - 1] * rows  # the pending token's column in the block, per row

    def propose(
        self, pending, k: int, temperature: float, generator, timer: StepTimer,
        sample: bool = True,
    ) -> Proposal:
        import torch

        from deepspec_plugin.bench.engines.rejection import probs_from_logits, sample_from_probs

        head = self.head
        rows = pending.shape[0]
        row_ix = torch.arange(rows, device=self.device)
        last = torch.tensor(self.last, device=self.device)
        tokens = self.block_tokens.clone()
        tokens[row_ix, last] = pending
        self._block_width = tokens.shape[1]
        hidden = head.combine(self.block_states)
        self.mask.append(self.block_valid.long())
        started = timer.start()
        normed, pre = self.forward_entries(tokens, hidden, self.block_positions)
        timer.stop(started, width=tokens.shape[1])
        normed, pre = normed[row_ix, last], pre[row_ix, last]
        position = self.block_positions[row_ix, last]
        drafted, probs = [], []
        for i in range(k):
            if i > 0:
                self.mask.append_ones(1)
                position = position + 1
                started = timer.start()
                normed, pre = self.forward_entries(drafted[-1][:, None], pre[:, None],
                                                   position[:, None])
                timer.stop(started)
                normed, pre = normed[:, 0], pre[:, 0]
            logits = head.logits(normed)
            if temperature == 0 or not sample:
                draft_ids = logits.argmax(-1)
            else:
                q = probs_from_logits(logits, temperature)
                draft_ids = sample_from_probs(q, generator)
                probs.append(head.target_probs(q))
            drafted.append(head.draft_to_target_ids()[draft_ids])
        self._k = k
        self._proposed = torch.stack(drafted, 1)
        return Proposal(self._proposed, torch.stack(probs, 1) if probs else None)

    def rollback(self, num_accepted, accepted: list[int], target_states=None) -> None:
        import torch

        # The chain entries (k - 1 of them) go; so do the block's trailing holes common to all.
        holes = [self._block_width - 1 - a for a in self.last]
        n_chain = self._k - 1
        if n_chain:
            self.cache.crop(-n_chain)
            self.mask.length -= n_chain
        crop(self.cache, self.mask, max(0, min(holes)), holes)
        # Next block: pending and the accepted tokens' target states; token c is d_{c+1} (the
        # pending token goes at column a, filled in by `propose`).
        k = self._k
        offsets = torch.arange(k + 1, device=self.device)
        position = self.block_positions[torch.arange(len(self.last)), torch.tensor(self.last)] + 1
        self.block_tokens = torch.cat([self._proposed, self._proposed[:, -1:]], 1)
        self.block_states = target_states
        self.block_valid = offsets[None] <= num_accepted[:, None]
        self.block_positions = position[:, None] + offsets
        self.last = list(accepted)

    def select(self, index, rows: list[int]) -> None:
        self.cache.batch_select_indices(index)
        self.mask.select(index)
        self.block_tokens = self.block_tokens[index]
        self.block_states = self.block_states[index]
        self.block_valid = self.block_valid[index]
        self.block_positions = self.block_positions[index]
        self.last = [self.last[i] for i in rows]

    # --- the head on its cache -----------------------------------------------------------

    def forward_entries(self, tokens, hidden, positions) -> tuple[Any, Any]:
        """The head's layer over new entries ``[rows, T]`` (whose mask columns are appended
        already), attending causally to the cache: (normed, pre-norm) states."""
        import torch

        from deepspec_plugin.models.eagle3 import attend

        q, k, v, residual = self.head.qkv(tokens, hidden, positions)
        keys, values = self.cache.update(k, v, 0)
        total, new = keys.shape[2], tokens.shape[1]
        seen = self.mask.buf[:, :total].bool()  # [rows, S]
        cols = torch.arange(total, device=self.device)
        query_col = cols[total - new :]
        causal = cols[None, :] <= query_col[:, None]  # [new, S]
        itself = cols[None, :] == query_col[:, None]  # a hole still sees itself: no NaN
        allowed = (seen[:, None, :] & causal[None]) | itself[None]
        return self.head.finish(attend(q, keys, values, allowed[:, None]), residual)
