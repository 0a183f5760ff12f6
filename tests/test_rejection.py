"""The accept/resample rule is lossless: emitted tokens follow the target's distribution exactly.

Distribution checks are chi-square goodness-of-fit tests on a small vocabulary (V = 8) over
adversarial (target, draft) pairs, each run as one vectorised batch of N samples. The pairs are
Markov chains (the distribution of a token depends on the previous token), so the check of the
first two emitted tokens' joint distribution also checks that position 2 is conditioned on
position 1 correctly, across accepted drafts, resampled tokens and bonus tokens.

False-failure rate: each check rejects at ALPHA = 1e-4; there are 6 pairs x 3 checks = 18
checks, so by Bonferroni a correct rule fails this file with probability <= 18 x 1e-4 = 0.18%
over random seeds. The seed is fixed, so the outcome is deterministic run to run. A negative
control (a broken rule that resamples from p instead of the residual) must be rejected, which
shows the checks have power at this N.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from deepspec_plugin.bench.engines.rejection import (
    greedy_verify,
    probs_from_logits,
    rejection_sample,
    sample_from_logits,
    sample_from_probs,
)

ALPHA = 1e-4
V = 8
N = 40_000
START = 0  # the token before the first emitted one



def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True)


def _pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Adversarial (P, Q) pairs: row s of each matrix is the next-token distribution after s."""
    g = torch.Generator().manual_seed(1234)

    def rand() -> torch.Tensor:
        return torch.rand((V, V), generator=g, dtype=torch.float64) + 0.05

    p_random = _normalize(rand())
    eye_next = torch.roll(torch.eye(V, dtype=torch.float64), 1, dims=1)  # s -> s + 1
    low, high = torch.zeros(V, dtype=torch.float64), torch.zeros(V, dtype=torch.float64)
    low[: V // 2], high[V // 2 :] = 1.0, 1.0
    peaked = _normalize(0.02 + 10.0 * eye_next)
    near_uniform = _normalize(1.0 + 0.1 * torch.rand((V, V), generator=g, dtype=torch.float64))
    # p has zeros where q has mass, and mass where q has none
    p_holes = _normalize(rand() * torch.tensor([0, 1, 1, 0, 1, 1, 1, 0], dtype=torch.float64))
    q_holes = _normalize(rand() * torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.float64))
    return {
        "p_equals_q": (p_random, p_random.clone()),
        "disjoint_supports": (_normalize(rand() * low), _normalize(rand() * high)),
        "one_hot_draft": (p_random, eye_next),
        "near_uniform_p_peaked_q": (near_uniform, peaked),
        "peaked_p_near_uniform_q": (peaked, near_uniform),
        "partial_overlap_with_zeros": (p_holes, q_holes),
    }


def _one_step(P, Q, prev, k, gen, rule):
    """One draft of k tokens after token ``prev`` [n]; returns (tokens [n, k+1], emitted [n])."""
    n = prev.shape[0]
    drafts, q_rows, p_rows = [], [], []
    last = prev
    for _ in range(k):
        q = Q[last].float()
        p_rows.append(P[last].float())
        q_rows.append(q)
        last = sample_from_probs(q, gen)
        drafts.append(last)
    p_rows.append(P[last].float())
    draft_tokens = torch.stack(drafts, 1)
    num_accepted, next_token = rule(
        torch.stack(p_rows, 1), torch.stack(q_rows, 1), draft_tokens, gen
    )
    tokens = torch.cat([draft_tokens, next_token[:, None]], 1)
    # the token at position num_accepted is next_token
    tokens[torch.arange(n), num_accepted] = next_token
    return tokens, num_accepted + 1


def _first_tokens(P, Q, k, n_tokens, seed=0, rule=rejection_sample) -> torch.Tensor:
    """The first ``n_tokens`` emitted tokens of N independent runs, by repeated drafts."""
    gen = torch.Generator().manual_seed(seed)
    out = torch.full((N, n_tokens), -1, dtype=torch.long)
    count = torch.zeros(N, dtype=torch.long)
    while (count < n_tokens).any():
        rows = (count < n_tokens).nonzero().squeeze(1)
        prev = torch.where(
            count[rows] > 0, out[rows, (count[rows] - 1).clamp_min(0)], torch.full_like(rows, START)
        )
        tokens, emitted = _one_step(P, Q, prev, k, gen, rule)
        for j in range(k + 1):
            take = (j < emitted) & (count[rows] + j < n_tokens)
            r = rows[take]
            out[r, count[r] + j] = tokens[take, j]
        count[rows] = (count[rows] + emitted).clamp(max=n_tokens)
    return out


def _gof_pvalue(observed: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of counts against probabilities; cells of probability 0 must be empty.

    Cells with an expected count under 5 are pooled into one, where the chi-square approximation
    would otherwise be poor.
    """
    observed, probs = observed.ravel().astype(float), probs.ravel()
    impossible = probs <= 1e-15
    assert observed[impossible].sum() == 0, "a token of target probability 0 was emitted"
    observed, probs = observed[~impossible], probs[~impossible]
    expected = probs / probs.sum() * observed.sum()
    small = expected < 5
    if small.sum() > 1:
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(chisquare(observed, expected).pvalue)


PAIRS = _pairs()


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("k", [1, 3])
def test_first_token_follows_target(name, k):
    P, Q = PAIRS[name]
    first = _first_tokens(P, Q, k, 1, seed=k)[:, 0]
    counts = np.bincount(first.numpy(), minlength=V)
    assert _gof_pvalue(counts, P[START].numpy()) > ALPHA


@pytest.mark.parametrize("name", list(PAIRS))
def test_first_two_tokens_follow_target_jointly(name):
    P, Q = PAIRS[name]
    two = _first_tokens(P, Q, 2, 2, seed=7)
    counts = np.bincount((two[:, 0] * V + two[:, 1]).numpy(), minlength=V * V).reshape(V, V)
    joint = P[START].numpy()[:, None] * P.numpy()  # P(x1) P(x2 | x1)
    assert _gof_pvalue(counts, joint) > ALPHA


def _broken_rule(target_probs, draft_probs, draft_tokens, gen):
    """A wrong rule (resamples from p, not from the residual): the negative control."""
    num_accepted, _ = rejection_sample(target_probs, draft_probs, draft_tokens, gen)
    rows = torch.arange(draft_tokens.shape[0])
    return num_accepted, sample_from_probs(target_probs[rows, num_accepted], gen)


def test_checks_have_power_against_a_broken_rule():
    P, Q = PAIRS["near_uniform_p_peaked_q"]
    first = _first_tokens(P, Q, 1, 1, seed=3, rule=_broken_rule)[:, 0]
    counts = np.bincount(first.numpy(), minlength=V)
    assert _gof_pvalue(counts, P[START].numpy()) < 1e-6


def test_greedy_is_the_rule_with_one_hot_distributions():
    gen = torch.Generator().manual_seed(0)
    batch, k, vocab = 64, 4, 50
    target_logits = torch.randn((batch, k + 1, vocab), generator=gen)
    draft_logits = torch.randn((batch, k, vocab), generator=gen)
    argmax = target_logits.argmax(-1)
    draft_tokens = draft_logits.argmax(-1)
    # make row b agree with the target on its first (b mod (k + 1)) positions
    agree = torch.arange(k)[None, :] < (torch.arange(batch) % (k + 1))[:, None]
    draft_tokens = torch.where(agree, argmax[:, :k], draft_tokens)
    draft_tokens = torch.where(
        ~agree & (draft_tokens == argmax[:, :k]), (draft_tokens + 1) % vocab, draft_tokens
    )
    # the draft's one-hot distribution is at its own tokens
    draft_probs = torch.zeros((batch, k, vocab)).scatter_(-1, draft_tokens[..., None], 1.0)
    target_probs = probs_from_logits(target_logits, 0.0)

    num_accepted, next_token = rejection_sample(target_probs, draft_probs, draft_tokens, gen)
    g_accepted, g_next = greedy_verify(target_logits, draft_tokens)
    expected_accepted = torch.arange(batch) % (k + 1)
    assert torch.equal(num_accepted, expected_accepted)
    assert torch.equal(g_accepted, expected_accepted)
    assert torch.equal(next_token, argmax[torch.arange(batch), expected_accepted])
    assert torch.equal(g_next, next_token)


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 3, 11)
    probs = probs_from_logits(logits, 0.0)
    assert torch.equal(probs.argmax(-1), logits.argmax(-1))
    assert torch.equal(probs.sum(-1), torch.ones(5, 3))
    assert torch.equal(sample_from_logits(logits, 0.0, None), logits.argmax(-1))
    with pytest.raises(ValueError):
        probs_from_logits(logits, -1.0)


def test_acceptance_bookkeeping():
    gen = torch.Generator().manual_seed(5)
    batch, k = 1000, 3
    P, Q = PAIRS["disjoint_supports"]
    p = P[0].float().expand(batch, k + 1, V)
    q = Q[0].float().expand(batch, k, V)
    drafts = sample_from_probs(q, gen)
    # disjoint supports: nothing is accepted, and the next token is always in p's support
    num_accepted, next_token = rejection_sample(p, q, drafts, gen)
    assert num_accepted.dtype == torch.long and next_token.dtype == torch.long
    assert (num_accepted == 0).all() and (next_token < V // 2).all()
    # p == q: everything is accepted and the bonus token comes from p_{k+1}
    bonus = torch.zeros(batch, 1, V)
    bonus[:, 0, 5] = 1.0
    num_accepted, next_token = rejection_sample(torch.cat([q, bonus], 1), q, drafts, gen)
    assert (num_accepted == k).all() and (next_token == 5).all()
    # acceptance is a prefix: a token after a rejected one is never counted
    p_first_bad = torch.cat([p[:, :1], q[:, 1:], bonus], 1)
    num_accepted, _ = rejection_sample(p_first_bad, q, drafts, gen)
    assert (num_accepted == 0).all()


def test_no_residual_mass_falls_back_to_p():
    gen = torch.Generator().manual_seed(6)
    batch = 4000
    p = torch.tensor([0.5, 0.25, 0.25, 0.0]).expand(batch, 2, 4)
    q = (2 * p[:, :1]).contiguous()  # q >= p everywhere: max(0, p - q) = 0 on rejection
    drafts = torch.zeros(batch, 1, dtype=torch.long)
    num_accepted, next_token = rejection_sample(p, q, drafts, gen)
    rejected = num_accepted == 0
    assert 0 < rejected.sum() < batch  # accepted with probability p/q = 1/2
    counts = np.bincount(next_token[rejected].numpy(), minlength=4)
    assert counts[3] == 0
    assert _gof_pvalue(counts, p[0, 0].numpy()) > ALPHA


def test_seeded_generator_is_reproducible_and_shapes_are_checked():
    P, Q = PAIRS["near_uniform_p_peaked_q"]
    a = _first_tokens(P, Q, 3, 2, seed=11)
    b = _first_tokens(P, Q, 3, 2, seed=11)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        rejection_sample(
            torch.rand(2, 3, V), torch.rand(2, 3, V), torch.zeros(2, 3, dtype=torch.long), None
        )
