"""The reference engine is lossless: greedy speculation reproduces plain decoding, sampling keeps
the target's distribution, and lengths, stop tokens and counts follow the documented rules.

The statistical checks are chi-square goodness-of-fit tests at ALPHA = 1e-3 against the target's
exact probabilities, three checks in all: a correct engine fails this file by chance with
probability <= 3 x 1e-3 over seeds (Bonferroni); the seeds are fixed, so runs are reproducible.
A negative control (a broken rule) shows the checks have power at this N.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from helpers import exact_cells, gof_pvalue

from deepspec_plugin.bench.engines.base import GenerationConfig
from deepspec_plugin.bench.engines.reference import ReferenceEngine
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import acceptance_rate

PROMPTS = [[5, 17, 33, 80, 12, 9, 100], [7, 8], [40, 41, 42, 43, 44]]
EOS = 2  # the tiny models' end-of-sequence id
ALPHA = 1e-3
GREEDY = GenerationConfig(max_new_tokens=40)



@pytest.fixture(scope="module")
def engine(tiny):
    e = ReferenceEngine.from_paths(tiny.target, tiny.draft)
    yield e
    e.close()


@pytest.fixture(scope="module")
def plain_rows(engine):
    """Each prompt decoded alone, greedily, without a draft."""
    return [engine.generate([p], GREEDY).generations[0].token_ids for p in PROMPTS]


def _tokens(result):
    return [g.token_ids for g in result.generations]


def test_plain_decoding_matches_hf_generate(engine, plain_rows):
    cfg = replace(GREEDY, stop_token_ids=(EOS,))
    for prompt, alone in zip(PROMPTS, plain_rows):
        ids = torch.tensor([prompt])
        out = engine.target.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40
        )[0, len(prompt) :].tolist()
        if EOS in out:
            out = out[: out.index(EOS) + 1]
        assert engine.generate([prompt], cfg).generations[0].token_ids == out
        assert alone[: len(out)] == out


def test_padded_batch_matches_rows_decoded_alone(engine, plain_rows):
    result = engine.generate(PROMPTS, GREEDY)
    assert _tokens(result) == plain_rows
    assert all(len(t) == GREEDY.max_new_tokens for t in plain_rows)
    assert result.counts.num_drafts == 0 and result.draft_step_s is None
    assert result.target_step_s is not None and result.target_step_s > 0
    assert result.elapsed_s > 0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculation_equals_plain_decoding(engine, plain_rows, k):
    cfg = replace(GREEDY, k=k)
    batched = engine.generate(PROMPTS, cfg)
    assert _tokens(batched) == plain_rows
    for prompt, alone, in_batch in zip(PROMPTS, plain_rows, batched.generations):
        single = engine.generate([prompt], cfg).generations[0]
        assert single.token_ids == alone
        # the draft sees the same context in a batch as alone, so it proposes the same tokens
        assert single.counts == in_batch.counts
    # the tiny pair agrees often but not always: both paths of the rule ran
    assert 0 < batched.counts.num_accepted_tokens < batched.counts.num_draft_tokens
    assert batched.draft_step_s is not None and batched.draft_step_s > 0
    assert batched.target_step_s is None


@pytest.mark.parametrize("k", [None, 1, 3, 5])
def test_stop_tokens_and_length_limits(engine, plain_rows, k):
    stop = plain_rows[0][6]
    expected = [row[: row.index(stop) + 1] if stop in row else row for row in plain_rows]
    assert len(expected[0]) <= 7
    stopped = engine.generate(PROMPTS, replace(GREEDY, k=k, stop_token_ids=(stop, 511)))
    assert _tokens(stopped) == expected
    for limit in (1, 2, 7):
        short = engine.generate(PROMPTS, replace(GREEDY, k=k, max_new_tokens=limit))
        assert _tokens(short) == [row[:limit] for row in plain_rows]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_counts_are_consistent(engine, k):
    result = engine.generate(PROMPTS, replace(GREEDY, k=k, max_new_tokens=37))
    total = result.counts
    assert total.num_draft_tokens == k * total.num_drafts
    for g in result.generations:
        c = g.counts
        assert c.num_draft_tokens == k * c.num_drafts
        assert len(c.accepted_per_position) <= k
        assert all(a >= b for a, b in zip(c.accepted_per_position, c.accepted_per_position[1:]))
        assert sum(c.accepted_per_position) == c.num_accepted_tokens
        # prefill token + (accepted + 1) per draft, minus what the last draft emitted past the limit
        dropped = 1 + c.num_accepted_tokens + c.num_drafts - len(g.token_ids)
        assert 0 <= dropped <= k
    assert total.num_drafts == sum(g.counts.num_drafts for g in result.generations)
    assert total.num_accepted_tokens == sum(
        g.counts.num_accepted_tokens for g in result.generations
    )


@pytest.fixture(scope="module")
def self_draft(engine):
    """The target drafting for itself: every draft token must be accepted."""
    return ReferenceEngine(engine.target, engine.target)


@pytest.mark.parametrize("k", [1, 3])
def test_draft_equal_to_target_is_fully_accepted(self_draft, plain_rows, k):
    m = 4
    exact = self_draft.generate(PROMPTS, replace(GREEDY, k=k, max_new_tokens=1 + (k + 1) * m))
    assert _tokens(exact) == [row[: 1 + (k + 1) * m] for row in plain_rows]
    assert acceptance_rate(exact.counts) == 1.0
    for g in exact.generations:  # no token dropped: drafts x (k + 1) + the prefill token
        assert (g.counts.num_drafts, g.counts.num_accepted_tokens) == (m, k * m)
        assert g.counts.accepted_per_position == [m] * k
    # one token more: vLLM's rule proposes a full draft of k and counts all k as accepted, though
    # only one of its k + 1 tokens is kept
    over = self_draft.generate(PROMPTS, replace(GREEDY, k=k, max_new_tokens=2 + (k + 1) * m))
    for g in over.generations:
        assert (g.counts.num_drafts, g.counts.num_draft_tokens) == (m + 1, k * (m + 1))
        assert g.counts.num_accepted_tokens == k * (m + 1)
    sampled = self_draft.generate(PROMPTS, replace(GREEDY, k=k, temperature=1.0, seed=1))
    assert acceptance_rate(sampled.counts) > 0.99  # p == q up to float rounding


@pytest.mark.parametrize("k", [None, 3])
def test_sampling_is_reproducible_with_a_seed(engine, k):
    cfg = replace(GREEDY, k=k, temperature=1.0, seed=3)
    first, again = engine.generate(PROMPTS, cfg), engine.generate(PROMPTS, cfg)
    assert _tokens(first) == _tokens(again)
    assert first.counts == again.counts
    other = engine.generate(PROMPTS, replace(cfg, seed=4))
    assert _tokens(other) != _tokens(first)


def _sample_and_test(engine, k, temperature, depth, n=3000, seed=9):
    prompt = PROMPTS[1]
    result = engine.generate(
        [prompt] * n,
        GenerationConfig(max_new_tokens=depth, temperature=temperature, k=k, seed=seed),
    )
    samples = [tuple(g.token_ids) for g in result.generations]
    assert all(len(s) == depth for s in samples)
    cells = exact_cells(engine.target, prompt, depth, n, temperature)
    assert len(cells) >= 20 and sum(cells.values()) > 0.1  # enough spread to mean something
    return gof_pvalue(samples, cells, n), result.counts


@pytest.mark.parametrize(("k", "temperature", "depth"), [(None, 0.5, 3), (2, 0.5, 3), (2, 1.0, 2)])
def test_sampled_tokens_follow_the_target_distribution(engine, k, temperature, depth):
    """The first tokens after a prompt, sampled N times in one batch, against exact p.

    With k = 2 the first token comes from the prefill and the next ones from the first draft:
    accepted draft tokens, resampled residuals and bonus tokens all take part, in a batch whose
    rows accept different numbers of tokens.
    """
    pvalue, counts = _sample_and_test(engine, k, temperature, depth)
    assert pvalue > ALPHA
    if k is not None:
        assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens


def test_distribution_check_catches_a_broken_rule(engine, monkeypatch):
    """Negative control: resampling from p instead of the residual must fail the check."""
    from deepspec_plugin.bench.engines import rejection

    correct = rejection.rejection_sample

    def resample_from_p(target_probs, draft_probs, draft_tokens, generator):
        num_accepted, _ = correct(target_probs, draft_probs, draft_tokens, generator)
        rows = torch.arange(draft_tokens.shape[0])
        return num_accepted, rejection.sample_from_probs(
            target_probs[rows, num_accepted], generator
        )

    monkeypatch.setattr(rejection, "rejection_sample", resample_from_p)
    pvalue, _ = _sample_and_test(engine, 2, 0.5, 3)
    assert pvalue < 1e-6


def test_expected_errors(engine, tiny):
    from deepspec_plugin.models import load_causal_lm

    plain_only = ReferenceEngine(load_causal_lm(tiny.target))
    with pytest.raises(DspecError, match="draft"):
        plain_only.generate(PROMPTS, replace(GREEDY, k=3))
    with pytest.raises(DspecError):
        engine.generate(PROMPTS, replace(GREEDY, k=0))
    with pytest.raises(DspecError):
        engine.generate([[]], GREEDY)
    with pytest.raises(DspecError):
        engine.generate(PROMPTS, replace(GREEDY, max_new_tokens=0))
    with pytest.raises(DspecError):
        engine.generate(PROMPTS, replace(GREEDY, temperature=-1.0))


def test_describe(engine):
    d = engine.describe()
    assert d["engine"] == "reference" and d["device"] == "cpu" and d["dtype"] == "float32"
    assert d["torch"] == torch.__version__ and d["torch_threads"] >= 1


def test_a_proposer_plugs_in_without_a_draft_model(engine):
    """The accept / resample loop sees only the Proposer seam: a proposer passed in (here the
    draft model's, behind a recorder) gives the same tokens and counts as the built-in one."""
    from deepspec_plugin.bench.engines.cached_lm import CachedLM
    from deepspec_plugin.bench.engines.proposer import DraftModelProposer

    calls = []

    class Recorder(DraftModelProposer):
        def prefill(self, *args):
            calls.append("prefill")
            super().prefill(*args)

        def rollback(self, num_accepted, accepted):
            calls.append("rollback")
            super().rollback(num_accepted, accepted)

    plugged = ReferenceEngine(
        engine.target, proposer=Recorder(CachedLM(engine.draft), engine.device)
    )
    for cfg in (replace(GREEDY, k=3), replace(GREEDY, k=2, temperature=1.0, seed=5)):
        calls.clear()
        got, want = plugged.generate(PROMPTS, cfg), engine.generate(PROMPTS, cfg)
        assert _tokens(got) == _tokens(want)
        assert [g.counts for g in got.generations] == [g.counts for g in want.generations]
        assert calls[0] == "prefill" and calls.count("prefill") == 1
        assert calls.count("rollback") > 0


def test_step_timer_keeps_the_first_width_that_has_forwards(monkeypatch):
    from deepspec_plugin.bench.engines import timing

    clock = iter([0.0, 10.0, 15.0, 20.0, 22.0, 30.0, 34.0, 40.0, 41.0, 50.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    timer = timing.StepTimer("cpu", widths=(1, 2))
    assert timer.mean_s() is None
    timer.stop(timer.start(), width=3)  # not a width it records
    assert timer.mean_s() is None
    timer.stop(timer.start(), width=2)
    assert timer.mean_s() == 5.0  # no single-token forward yet: the two-token ones
    timer.stop(timer.start(), width=1)
    timer.stop(timer.start(), width=1)
    assert timer.mean_s() == 3.0  # single-token forwards take precedence
    module = torch.nn.Embedding(4, 2)
    hooked = timing.StepTimer("cpu")
    handles = hooked.attach(module)
    module(torch.tensor([[1]]))  # 40 -> 41
    module(torch.tensor([[1, 2]]))  # width 2: not timed by a width-1 timer
    for h in handles:
        h.remove()
    module(torch.tensor([[1]]))  # detached
    assert hooked.mean_s() == 1.0
