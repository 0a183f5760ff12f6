"""Medusa and MLP-speculator proposals for the reference engine, as TGI and vLLM make them.

Both heads read h, the target's final hidden state (its last layer's output after the final norm)
at the position whose logits gave the pending token: after the prefill, the last prompt token
(prompts are left-padded, so that is the last column of every row); after a verification of
``[pending, d_1..d_k]`` that accepted a tokens, column a. A proposal is a chain of k tokens
(no tree): Medusa head i gives d_{i+1} from h alone; the MLP speculator's stage i gives d_{i+1}
from its state and the token before (pending, then its own d_i), as TGI's ``MLPSpeculatorModel``.
Nothing is cached on the draft side, so a rollback only keeps the new h.

Tokens are argmax at temperature 0 (and under the greedy rule, which is what vLLM and TGI do at
any temperature), or sampled from each head's distribution under the ``probabilistic`` rule.
"""

from __future__ import annotations

from deepspec_plugin.bench.engines.proposer import Proposal
from deepspec_plugin.bench.engines.timing import StepTimer


class HeadProposer:
    """Proposes with a `deepspec_plugin.models.heads` module from the target's final states.

    ``target_layers`` asks the engine for the last layer's output (id = the number of layers);
    ``final_norm`` is the target's own norm, applied here to the few rows a proposal reads.
    """

    def __init__(self, heads, final_norm, num_layers: int, device):
        self.heads = heads
        self.method = heads.method
        self.norm = final_norm
        self.device = device
        self.target_layers = [int(num_layers)]
        self.max_k = heads.steps  # a draft of N heads (stages) proposes at most N tokens

    def prefill(self, input_ids, attention_mask, position_ids, target_states=None) -> None:
        self.hidden = self.norm(target_states[:, -1])

    def propose(
        self, pending, k: int, temperature: float, generator, timer: StepTimer,
        sample: bool = True,
    ) -> Proposal:
        import torch

        from deepspec_plugin.bench.engines.rejection import draft_token

        heads = self.heads
        medusa = self.method == "medusa"
        state, previous = self.hidden, pending
        tokens, probs = [], []
        for i in range(k):
            started = timer.start()
            if medusa:
                logits = heads.head_logits(i, self.hidden)
            else:
                state = heads.stage(i, state, previous)
                logits = heads.logits(state)
            timer.stop(started)
            token, q = draft_token(logits, temperature, sample, generator)
            if q is not None:
                probs.append(q)
            tokens.append(token)
            previous = token
        return Proposal(torch.stack(tokens, 1), torch.stack(probs, 1) if probs else None)

    def rollback(self, num_accepted, accepted: list[int], target_states=None) -> None:
        import torch

        rows = torch.arange(target_states.shape[0], device=target_states.device)
        self.hidden = self.norm(target_states[rows, num_accepted])

    def select(self, index, rows: list[int]) -> None:
        self.hidden = self.hidden[index]
