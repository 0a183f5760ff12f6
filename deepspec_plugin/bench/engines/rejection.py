"""The exact accept/resample rule of speculative sampling, batched, on probability tensors.

The rule (Leviathan et al. 2023, Chen et al. 2023): for draft tokens d_1..d_k sampled from the
draft's distributions q_1..q_k, and the target's distributions p_1..p_{k+1} after the same
prefixes, accept d_i while u_i < p_i(d_i) / q_i(d_i) with u_i ~ U[0, 1); at the first rejection
(position a) emit a token sampled from norm(max(0, p_a - q_a)); if all k are accepted, emit a
bonus token sampled from p_{k+1}. Every emitted token is then distributed exactly as the target
would have sampled it, whatever the draft.

Greedy decoding is the same rule with one-hot p and q (temperature 0 turns a distribution into
the one-hot of its argmax): q(d) = 1, p(d) is 1 exactly when d is the target's argmax, so a draft
token is accepted while it equals the target's argmax, and the residual max(0, p - q) at the first
rejection is the one-hot of the target's argmax. ``greedy_verify`` computes exactly that without
building one-hot tensors; ``tests/test_rejection.py`` checks the two agree.

Everything stays on the tensors' device; no Python loop touches the vocabulary, and nothing here
synchronises with the device.
"""

from __future__ import annotations

import torch


def probs_from_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sampling distribution over the last dim, in float32; temperature 0: the argmax one-hot."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        probs = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return probs.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per distribution (last dim); the result has the leading shape of ``probs``."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])



def draft_token(logits: torch.Tensor, temperature: float, sample: bool,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A draft's next token and the distribution q it was sampled from: its argmax (q None)
    at T = 0 or under the greedy drafting rule."""
    if temperature == 0 or not sample:
        return logits.argmax(-1), None
    q = probs_from_logits(logits, temperature)
    return sample_from_probs(q, generator), q

def sample_from_logits(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample from softmax(logits / temperature); temperature 0 is argmax and draws nothing."""
    if temperature == 0:
        return logits.argmax(-1)
    return sample_from_probs(probs_from_logits(logits, temperature), generator)


def rejection_sample(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor,
    draft_tokens: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a batch of drafts: returns (num_accepted [B] long, next_token [B] long).

    ``target_probs`` [B, k+1, V] are p_1..p_{k+1}; ``draft_probs`` [B, k, V] are q_1..q_k, from
    which ``draft_tokens`` [B, k] were sampled. The emitted tokens of row b are
    ``draft_tokens[b, :num_accepted[b]]`` followed by ``next_token[b]``. Each call draws B x k
    uniforms and then B categorical samples from ``generator``, whatever the data, so a seeded
    generator makes the whole run reproducible.
    """
    batch, k, vocab = draft_probs.shape
    if target_probs.shape != (batch, k + 1, vocab) or draft_tokens.shape != (batch, k):
        raise ValueError(
            f"shapes disagree: target {tuple(target_probs.shape)},"
            f" draft {tuple(draft_probs.shape)}, tokens {tuple(draft_tokens.shape)}"
        )
    device = target_probs.device
    index = draft_tokens.unsqueeze(-1)
    p_of_draft = target_probs[:, :k].gather(-1, index).squeeze(-1)
    q_of_draft = draft_probs.gather(-1, index).squeeze(-1)
    u = torch.rand((batch, k), generator=generator, device=device, dtype=torch.float32)
    # u < p/q without dividing (q(d) > 0 since d was sampled from q); strict, so that p(d) = 0 is
    # never accepted and p(d) >= q(d) always is.
    accepted = u * q_of_draft < p_of_draft
    num_accepted = accepted.long().cumprod(-1).sum(-1)

    # The distribution of the next token: the residual at the first rejection, or p_{k+1}.
    rows = torch.arange(batch, device=device)
    p_next = target_probs[rows, num_accepted]
    all_accepted = num_accepted == k
    q_next = draft_probs[rows, num_accepted.clamp(max=k - 1)]
    residual = (p_next - q_next).clamp_min_(0.0)
    residual = torch.where(all_accepted.unsqueeze(-1), p_next, residual)
    mass = residual.sum(-1, keepdim=True)
    # p == q up to rounding leaves no residual mass (and a rejection of probability ~0): fall back
    # to p, the distribution the residual approximates there.
    next_dist = torch.where(
        mass > 0, residual / mass.clamp_min(torch.finfo(mass.dtype).tiny), p_next
    )
    next_token = sample_from_probs(next_dist, generator)
    return num_accepted, next_token


def greedy_verify(
    target_logits: torch.Tensor, draft_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rejection_sample`` with one-hot p and q (temperature 0), from the target's logits.

    Accepts draft tokens while they equal the target's argmax; the next token is the target's
    argmax at the first mismatch (or after the last draft token). Draws no random numbers.
    """
    k = draft_tokens.shape[1]
    argmax = target_logits.argmax(-1)  # [B, k+1]
    num_accepted = (argmax[:, :k] == draft_tokens).long().cumprod(-1).sum(-1)
    next_token = argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return num_accepted, next_token
