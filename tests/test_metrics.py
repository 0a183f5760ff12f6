"""The metric definitions, on counts whose answers are known by hand."""

from __future__ import annotations

import math

import pytest

from deepspec_plugin import metrics
from deepspec_plugin.metrics import SpecCounts


def counts_of(drafts: list[tuple[int, int]]) -> SpecCounts:
    """Counts of drafts given as (proposed, accepted)."""
    c = SpecCounts()
    for proposed, accepted in drafts:
        c.record_draft(proposed, accepted)
    return c


def test_pooled_rate_length_and_positions():
    # Three drafts of k = 4: 4 accepted, 1 accepted, 0 accepted.
    c = counts_of([(4, 4), (4, 1), (4, 0)])
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (3, 12, 5)
    assert c.accepted_per_position == [2, 1, 1, 1]
    assert metrics.acceptance_rate(c) == pytest.approx(5 / 12)
    assert metrics.acceptance_length(c) == pytest.approx(1 + 5 / 3)  # the bonus token counts
    assert metrics.position_acceptance(c) == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert metrics.conditional_position_acceptance(c) == pytest.approx([2 / 3, 1 / 2, 1, 1])


def test_empty_counts_give_none_not_zero():
    c = SpecCounts()
    assert metrics.acceptance_rate(c) is None
    assert metrics.acceptance_length(c) is None
    # Position 0 rejected in every draft: positions 1 and 2 were never reached.
    c = counts_of([(3, 0), (3, 0)])
    assert c.accepted_per_position == [0, 0, 0]
    assert metrics.conditional_position_acceptance(c) == [0.0, None, None]


def test_add_and_total_merge_positions_of_different_lengths():
    a = counts_of([(2, 2)])
    b = counts_of([(4, 3)])
    total = SpecCounts.total([a, b])
    assert total.accepted_per_position == [2, 2, 1, 0]
    assert total.num_draft_tokens == 6 and total.num_accepted_tokens == 5
    assert SpecCounts.from_dict(total.to_dict()) == total


def test_record_draft_refuses_impossible_counts():
    with pytest.raises(ValueError):
        SpecCounts().record_draft(2, 3)


def test_per_request_means_weigh_requests_equally():
    long = counts_of([(4, 4)] * 9)  # rate 1.0, tau 5
    short = counts_of([(4, 0)])  # rate 0.0, tau 1
    means = metrics.per_request_means([long, short])
    assert means["acceptance_rate"] == pytest.approx(0.5)
    assert means["acceptance_length"] == pytest.approx(3.0)
    pooled = SpecCounts.total([long, short])
    assert metrics.acceptance_rate(pooled) == pytest.approx(36 / 40)


def test_expected_length_and_its_inverse():
    assert metrics.expected_acceptance_length(0.0, 4) == 1.0
    assert metrics.expected_acceptance_length(1.0, 4) == 5.0
    # 1 + a + a^2 + ... + a^k
    assert metrics.expected_acceptance_length(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    for alpha in (0.05, 0.3, 0.6, 0.9, 0.99):
        for k in (1, 2, 4, 7):
            tau = metrics.expected_acceptance_length(alpha, k)
            assert metrics.alpha_from_acceptance_length(tau, k) == pytest.approx(alpha, abs=1e-9)
    assert metrics.alpha_from_acceptance_length(0.5, 4) == 0.0
    assert metrics.alpha_from_acceptance_length(9.0, 4) == 1.0


def test_acceptance_rate_is_not_alpha():
    # Under i.i.d. acceptance alpha, E[accepted] = alpha (1 - alpha^k) / (1 - alpha), so the pooled
    # rate E[accepted] / k is below alpha: the inverse of tau is what recovers alpha.
    alpha, k = 0.8, 4
    tau = metrics.expected_acceptance_length(alpha, k)
    rate = (tau - 1) / k
    assert rate < alpha - 0.1
    assert metrics.alpha_from_acceptance_length(tau, k) == pytest.approx(alpha)


def test_predicted_speedup_matches_leviathan():
    # Leviathan et al. (2023), thm 3.8: (1 - a^(k+1)) / ((1 - a)(k c + 1)).
    a, k, c = 0.8, 4, 0.05
    expected = (1 - a ** (k + 1)) / ((1 - a) * (k * c + 1))
    assert metrics.predicted_speedup(a, k, c) == pytest.approx(expected)
    assert metrics.predicted_speedup(1.0, 3, 0.0) == 4.0
    # A useless draft that costs nothing changes nothing; one that costs something slows down.
    assert metrics.predicted_speedup(0.0, 4, 0.0) == 1.0
    assert metrics.predicted_speedup(0.0, 4, 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.predicted_speedup(0.5, 4, -1)


def test_predicted_speedup_with_the_verification_cost():
    # tau = 2.2 at k = 3, c = 0.05, v = 1.3: 2.2 / (0.15 + 1.3).
    assert metrics.speedup_at_length(2.2, 3, 0.05, 1.3) == pytest.approx(2.2 / 1.45)
    assert metrics.speedup_at_length(2.2, 3, 0.05) == pytest.approx(2.2 / 1.15)  # Leviathan's v
    a = 0.6
    assert metrics.predicted_speedup(a, 3, 0.05, 1.3) == pytest.approx(
        metrics.expected_acceptance_length(a, 3) / 1.45)
    with pytest.raises(ValueError):
        metrics.speedup_at_length(2.0, 3, 0.05, 0.0)


def test_static_batch_acceptance_length_is_tokens_per_step_over_plain_decodings():
    # Batch 1, greedy: 40 tokens in 13 passes (39 after the prefill's token in plain) is tau.
    assert metrics.static_batch_acceptance_length(40, 13, 40, 39) == pytest.approx(39 / 13)
    # Batch 4: the slowest row takes 20 passes for 4 x 40 tokens; plain takes 39 for the same.
    assert metrics.static_batch_acceptance_length(160, 20, 160, 39) == pytest.approx(1.95)
    assert metrics.static_batch_acceptance_length(160, 0, 160, 39) is None


def test_break_even_is_where_the_predicted_speedup_is_one():
    k, c, v = 3, 0.05, 1.3
    rate = metrics.break_even_acceptance_rate(k, c, v)
    assert rate == pytest.approx((k * c + v - 1) / k)
    # At that pooled rate tau = 1 + k * rate, and the predicted speedup is exactly 1.
    assert metrics.speedup_at_length(1 + k * rate, k, c, v) == pytest.approx(1.0)
    alpha = metrics.break_even_alpha(k, c, v)
    assert metrics.predicted_speedup(alpha, k, c, v) == pytest.approx(1.0)
    # Just above break-even pays, just below does not.
    assert metrics.predicted_speedup(alpha + 0.01, k, c, v) > 1 > metrics.predicted_speedup(
        alpha - 0.01, k, c, v)
    # A step costing k + 1 plain steps or more never pays: no alpha, a rate above 1.
    assert metrics.break_even_alpha(1, 0.6, 1.5) is None
    assert metrics.break_even_acceptance_rate(1, 0.6, 1.5) > 1
    # Free drafts and free verification: any acceptance pays.
    assert metrics.break_even_acceptance_rate(2, 0.0, 1.0) == 0.0


def test_truncated_length_equals_the_drafts_cut_short():
    drafts = [(4, 4), (4, 1), (4, 0), (4, 2), (4, 3), (4, 2)]
    c = counts_of(drafts)
    for k in range(1, 5):
        cut = counts_of([(k, min(a, k)) for _, a in drafts])
        assert metrics.truncated_acceptance_length(c, k) == pytest.approx(
            metrics.acceptance_length(cut))
    assert metrics.truncated_acceptance_length(c, 0) == 1.0
    assert metrics.truncated_acceptance_length(SpecCounts(), 2) is None
    # Without per-position counts (TGI), the i.i.d. alpha of the pooled tau stands in.
    pooled = SpecCounts(c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens)
    alpha = metrics.alpha_from_acceptance_length(metrics.acceptance_length(c), 4)
    assert metrics.truncated_acceptance_length(pooled, 2) == pytest.approx(
        metrics.expected_acceptance_length(alpha, 2))
    assert metrics.truncated_acceptance_length(pooled, 4) == pytest.approx(
        metrics.acceptance_length(c))


def test_step_costs_interpolate_the_verification_cost():
    costs = metrics.StepCosts(batch_size=1, cost_ratio=0.05, verify_cost={1: 1.1, 3: 1.5})
    assert costs.verify(0) == 1.0  # plain decoding: one token
    assert costs.verify(1) == 1.1 and costs.verify(3) == 1.5
    assert costs.verify(2) == pytest.approx(1.3)
    assert costs.verify(5) == pytest.approx(1.9)  # along the last segment
    only_c = metrics.StepCosts(1, 0.05, {})
    assert only_c.verify(4) == 1.0  # nothing measured: Leviathan's assumption
    assert metrics.StepCosts.from_dict(costs.to_dict()) == costs
    for bad in ({"batch_size": 0, "cost_ratio": 0.1, "verify_cost": {}},
                {"batch_size": 1, "cost_ratio": -1, "verify_cost": {}},
                {"batch_size": 1, "cost_ratio": 0.1, "verify_cost": {"2": 0}}):
        with pytest.raises(ValueError):
            metrics.StepCosts.from_dict(bad)
    at = [metrics.StepCosts(1, 0.05, {}), metrics.StepCosts(8, 0.1, {})]
    assert metrics.nearest_costs(at, None).batch_size == 1
    assert metrics.nearest_costs(at, 3.0).batch_size == 1
    assert metrics.nearest_costs(at, 6.0).batch_size == 8
    assert metrics.nearest_costs([], 2.0) is None


def test_recommended_k_follows_the_acceptance_per_position():
    costs = metrics.StepCosts(1, 0.05, {1: 1.1, 3: 1.5})
    # Drafts accepted almost fully: the longest k pays best.
    good = counts_of([(3, 3)] * 8 + [(3, 2)] * 2)
    assert metrics.recommended_k(good, costs) == 3
    # Only the first token is ever accepted: k = 1.
    first = counts_of([(3, 1)] * 9 + [(3, 0)])
    assert metrics.recommended_k(first, costs) == 1
    speeds = [costs.speedup(first, k) for k in range(4)]
    assert speeds[1] == max(speeds) and speeds[0] == 1.0
    # Collapsed acceptance: speculation off (k = 0), and the prediction at k = 3 is below 1.
    bad = counts_of([(3, 0)] * 9 + [(3, 1)])
    assert metrics.recommended_k(bad, costs) == 0
    assert costs.speedup(bad, 3) < 1
    assert metrics.recommended_k(SpecCounts(), costs) is None


def test_measured_speedup_and_summary():
    assert metrics.speedup(30.0, 20.0) == 1.5
    assert metrics.speedup(30.0, 0.0) is None
    s = metrics.summarize(counts_of([(2, 1), (2, 2)]))
    assert s["acceptance_rate"] == pytest.approx(0.75)
    assert s["acceptance_length"] == pytest.approx(2.5)
    assert not any(isinstance(v, float) and math.isnan(v) for v in s.values())


def test_tgi_counts_from_its_counters():
    # 3 requests prefilled (3 request-steps recording 0), then 5 decode steps drafting 4 tokens
    # each, 9 of them accepted: tgi_request_skipped_tokens_count 8, _sum 9; next_size_sum 3.
    c = metrics.tgi_spec_counts(request_steps=8, accepted=9, prefills=3, speculate=4)
    assert c == SpecCounts(5, 20, 9, [])
    assert metrics.acceptance_rate(c) == pytest.approx(9 / 20)
    assert metrics.acceptance_length(c) == pytest.approx(1 + 9 / 5)
    assert metrics.tgi_decode_steps(8, 3) == 5
    # A prefill batch counted in next_size before its steps appear: never below 0 drafts.
    assert metrics.tgi_decode_steps(2, 3) == 0
    # tgi_batch_next_size not exposed: every request-step counts as a draft.
    assert metrics.tgi_spec_counts(8, 9, None, 4) == SpecCounts(8, 32, 9, [])
