"""The transformers assisted-generation engine: lossless greedy output and exact derived counts."""

from __future__ import annotations

import importlib.util

import pytest

from deepspec_plugin.bench.engines.base import GenerationConfig
from deepspec_plugin.bench.engines.factory import make_engine
from deepspec_plugin.bench.engines.hf import HFAssistedEngine, _Verification, derive_counts
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts

TEXTS = ["Janet has three apples and", "def add(a, b):", "The train leaves at"]


@pytest.fixture(scope="module")
def engine(tiny):
    e = make_engine("hf", target=tiny.target, draft=tiny.draft, device="cpu", dtype="float32")
    assert isinstance(e, HFAssistedEngine)
    yield e
    e.close()


@pytest.fixture(scope="module")
def prompts(tiny):
    from deepspec_plugin.models import load_tokenizer

    tok = load_tokenizer(tiny.target)
    return [tok(t).input_ids for t in TEXTS]


def _identity_holds(engine, result) -> None:
    """new tokens = accepted + drafts + plain steps - (1 if it ended on an accepted drafted stop)"""
    assert len(engine.last_derivations) == len(result.generations)
    for gen, d in zip(result.generations, engine.last_derivations):
        c = d.counts
        assert gen.counts == c
        assert len(gen.token_ids) == (
            c.num_accepted_tokens + c.num_drafts + d.plain_steps - int(d.ended_on_accepted_stop)
        )
        assert sum(c.accepted_per_position) == c.num_accepted_tokens


# --- the derivation on hand-made forwards ---------------------------------------------------------


def test_derive_counts_full_partial_and_plain_steps():
    prompt = [1, 2, 3]
    new = [10, 11, 12, 13, 14, 15, 16]
    seq = prompt + new
    forwards = [
        _Verification(0, prompt + [10, 11, 99]),  # drafts 10 11 99: 2 accepted, target says 12
        _Verification(5, [12, 13, 14, 15]),  # drafts 13 14 15: all accepted, bonus 16
        _Verification(9, [16]),  # no room to draft: a plain step (not in this sequence's length)
    ]
    # The plain step would emit one more token; give the sequence that token.
    seq = seq + [17]
    d = derive_counts(len(prompt), forwards, seq, stop_token_ids=())
    assert d.counts == SpecCounts(2, 6, 5, [2, 2, 1])
    assert d.plain_steps == 1 and not d.ended_on_accepted_stop
    assert len(seq) - len(prompt) == 5 + 2 + 1


def test_derive_counts_stop_token_accepted_from_the_draft():
    """transformers cuts the bonus token after an accepted drafted stop token: still 2 accepted."""
    prompt = [1, 2]
    stop = 7
    seq = prompt + [10, stop]
    d = derive_counts(
        len(prompt), [_Verification(0, prompt + [10, stop])], seq, stop_token_ids=(stop,)
    )
    assert d.counts == SpecCounts(1, 2, 2, [1, 1])
    assert d.ended_on_accepted_stop


def test_derive_counts_refuses_forwards_that_do_not_explain_the_sequence():
    prompt = [1, 2]
    with pytest.raises(RuntimeError, match="assisted decoding changed"):
        # 2 of 2 accepted would grow the sequence by 3; it grew by 1.
        derive_counts(len(prompt), [_Verification(0, prompt + [10, 11])], prompt + [10], ())


# --- the engine on the tiny pair ----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_assisted_equals_plain_greedy(engine, prompts, k):
    plain = engine.generate(prompts, GenerationConfig(max_new_tokens=24))
    spec = engine.generate(prompts, GenerationConfig(max_new_tokens=24, k=k))
    assert [g.token_ids for g in spec.generations] == [g.token_ids for g in plain.generations]
    assert all(len(g.token_ids) == 24 for g in plain.generations)
    assert plain.counts == SpecCounts() and plain.target_step_s and plain.draft_step_s is None
    assert spec.draft_step_s and spec.target_step_s is None
    _identity_holds(engine, spec)
    assert spec.counts == SpecCounts.total(g.counts for g in spec.generations)
    assert spec.counts.num_drafts > 0
    # Constant k: every draft proposes k tokens except where the length cap shortens it.
    assert spec.counts.num_draft_tokens > k * (spec.counts.num_drafts - len(prompts))
    assert 0 < spec.counts.num_accepted_tokens < spec.counts.num_draft_tokens
    assert len(spec.counts.accepted_per_position) <= k


def test_stop_token_ends_both_the_same(engine, prompts):
    plain = engine.generate(prompts[:1], GenerationConfig(max_new_tokens=24))
    stop = plain.generations[0].token_ids[9]
    first = plain.generations[0].token_ids.index(stop)
    cfg = GenerationConfig(max_new_tokens=24, stop_token_ids=(stop,))
    plain_stop = engine.generate(prompts[:1], cfg)
    spec_stop = engine.generate(
        prompts[:1], GenerationConfig(max_new_tokens=24, k=3, stop_token_ids=(stop,))
    )
    assert plain_stop.generations[0].token_ids == plain.generations[0].token_ids[: first + 1]
    assert spec_stop.generations[0].token_ids == plain_stop.generations[0].token_ids
    _identity_holds(engine, spec_stop)


def test_plain_only_engine_refuses_speculation(tiny, prompts):
    plain_only = HFAssistedEngine.from_paths(tiny.target)
    try:
        out = plain_only.generate(prompts[:1], GenerationConfig(max_new_tokens=3))
        assert len(out.generations[0].token_ids) == 3
        with pytest.raises(DspecError, match="without a draft"):
            plain_only.generate(prompts[:1], GenerationConfig(max_new_tokens=3, k=2))
    finally:
        plain_only.close()


def test_sampling_is_seeded_and_counts_consistent(engine, prompts):
    cfg = GenerationConfig(max_new_tokens=20, k=3, temperature=0.8, seed=5)
    a = engine.generate(prompts[:2], cfg)
    b = engine.generate(prompts[:2], cfg)
    assert [g.token_ids for g in a.generations] == [g.token_ids for g in b.generations]
    assert a.counts == b.counts
    _identity_holds(engine, a)


# --- both schedules against one model of greedy speculation --------------------------------------
#
# In greedy decoding a draft proposed after the first p new tokens is the draft model's greedy
# continuation of prompt + G[:p] (G: the target's greedy tokens), and it is accepted up to its
# first disagreement with G. The engines differ only in WHERE they draft (the schedule):
#
# * transformers drafts from the prompt itself (p = 0; the first target token is verified as part
#   of the first draft) and caps each draft at max_new_tokens - p - 1 tokens (a final step with no
#   room left is a plain target step); accepted tokens never pass max_new_tokens.
# * the reference engine (like vLLM) emits the first token from the prefill without drafting
#   (p = 1), always drafts k, and counts acceptance before the output is cut at max_new_tokens.
#
# So their greedy counts differ (other draft positions, other caps) while their tokens are equal;
# each must equal its own schedule replayed on the same proposals.


def _greedy(model, ids: list[int], n: int) -> list[int]:
    import torch

    x = torch.tensor([ids])
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        eos_token_id=[],
        pad_token_id=0,
    )
    return out[0, len(ids) :].tolist()


def _replay(propose, target_tokens, k: int, max_new: int, start: int, cap: bool) -> SpecCounts:
    counts, p = SpecCounts(), start
    while p < max_new:
        n = min(k, max_new - p - 1) if cap else k
        if n == 0:  # no room to draft: one plain target step
            p += 1
            continue
        proposal = propose(p)[:n]
        a = 0
        while a < n and proposal[a] == target_tokens[p + a]:
            a += 1
        counts.record_draft(n, a)
        p += a + 1
    return counts


_SCHEDULES: dict = {}


def _schedules(tiny, engine, prompt, k, max_new):
    key = (tuple(prompt), k, max_new)
    if key not in _SCHEDULES:
        _SCHEDULES[key] = _replays(engine, prompt, k, max_new)
    return _SCHEDULES[key]


def _replays(engine, prompt, k, max_new):
    target_tokens = _greedy(engine.target, prompt, max_new + k + 1)
    proposals: dict[int, list[int]] = {}

    def propose(p):
        if p not in proposals:
            proposals[p] = _greedy(engine.draft, prompt + target_tokens[:p], k)
        return proposals[p]

    hf = _replay(propose, target_tokens, k, max_new, start=0, cap=True)
    vllm_like = _replay(propose, target_tokens, k, max_new, start=1, cap=False)
    return target_tokens[:max_new], hf, vllm_like


def test_hf_counts_equal_a_replay_of_its_schedule(tiny, engine, prompts):
    k, max_new = 3, 24
    result = engine.generate(prompts, GenerationConfig(max_new_tokens=max_new, k=k))
    for prompt, gen in zip(prompts, result.generations):
        tokens, hf, _ = _schedules(tiny, engine, prompt, k, max_new)
        assert gen.token_ids == tokens
        assert gen.counts == hf


@pytest.mark.skipif(
    importlib.util.find_spec("deepspec_plugin.bench.engines.reference") is None,
    reason="deepspec_plugin/bench/engines/reference.py is not written yet",
)
def test_greedy_counts_versus_the_reference_engine(tiny, engine, prompts):
    """Same tokens as our own speculative decoding at k=3; counts differ by schedule only.

    See the comment above `_greedy`: the reference engine's counts equal the vLLM-like replay,
    ours the transformers replay, on the same draft proposals; and the two replays differ.
    """
    from deepspec_plugin.bench.engines.reference import ReferenceEngine

    k, max_new = 3, 24
    cfg = GenerationConfig(max_new_tokens=max_new, k=k)
    ref = ReferenceEngine.from_paths(tiny.target, tiny.draft, device="cpu", dtype="float32")
    try:
        theirs = ref.generate(prompts, cfg)
    finally:
        ref.close()
    ours = engine.generate(prompts, cfg)
    assert [g.token_ids for g in ours.generations] == [g.token_ids for g in theirs.generations]
    differ = 0
    for prompt, mine, ref_gen in zip(prompts, ours.generations, theirs.generations):
        _, hf, vllm_like = _schedules(tiny, engine, prompt, k, max_new)
        assert mine.counts == hf
        assert ref_gen.counts == vllm_like
        differ += hf != vllm_like
    assert differ > 0  # the schedules are really different, so equal counts could not be asked
