"""The acceptance-drift CUSUM: quiet at the baseline, fast after a drop, as documented."""

from __future__ import annotations

import math
import random

import pytest

from deepspec_plugin.errors import DspecError
from deepspec_plugin.serving.drift import Cusum, bernoulli_kl

K = 4  # draft tokens per step in the simulations


def run_steps(cusum: Cusum, rng: random.Random, p: float, max_tokens: int) -> bool:
    """Feed i.i.d. Bernoulli(p) acceptances in steps of K tokens; True when the alarm fired."""
    while cusum.tokens < max_tokens:
        accepted = sum(rng.random() < p for _ in range(K))
        if cusum.update(accepted, K):
            return True
    return False


def test_documented_numbers_for_a_typical_draft():
    c = Cusum(0.6)  # default: 20 % relative drop, ARL0 1e8 tokens
    assert c.p1 == pytest.approx(0.48)
    assert c.kl0 == pytest.approx(bernoulli_kl(0.6, 0.48)) and c.kl0 == pytest.approx(0.02894, 1e-3)
    assert c.h == pytest.approx(14.88, abs=0.01)
    assert c.arl0_tokens == pytest.approx(1e8)
    assert c.arl0_tokens >= math.exp(c.h)  # never below Lorden's exact bound
    assert c.expected_delay_tokens == pytest.approx(473.3, abs=0.5)


def test_false_alarm_rate_matches_arl0():
    # 1000 streams of 1000 tokens at p0 with ARL0 = 20 000: at most about 1000 / 20 000 = 5 %
    # raise a false alarm (fewer in fact: each stream starts from S = 0).
    arl0, length, streams = 20_000, 1000, 1000
    c = Cusum(0.6, target_arl0_tokens=arl0)
    rng = random.Random(0)
    alarms = 0
    for _ in range(streams):
        c.reset()
        alarms += run_steps(c, rng, 0.6, length)
    fraction = alarms / streams
    assert fraction <= 1.5 * length / arl0  # 7.5 %: 3.5 sd above 5 % for 1000 streams
    assert fraction >= 0.1 * length / arl0  # not so conservative that it never fires


def test_drop_to_p1_is_detected_within_the_documented_delay():
    c = Cusum(0.6)
    delay = c.expected_delay_tokens
    rng = random.Random(1)
    times = []
    for _ in range(40):
        c.reset()
        assert run_steps(c, rng, c.p1, int(3 * delay)), "no alarm within 3x the expected delay"
        times.append(c.tokens)
    assert 0.7 * delay <= sum(times) / len(times) <= 1.4 * delay


def test_score_rises_on_rejections_falls_on_acceptances_and_alarm_latches():
    c = Cusum(0.6, h=5.0)
    scores = [c.score]
    while not c.alarm:
        c.update(0, K)  # every token rejected
        scores.append(c.score)
    assert all(b > a for a, b in zip(scores, scores[1:]))
    assert scores[-1] >= 1.0 and scores[-2] < 1.0
    for _ in range(100):  # a perfect run afterwards lowers S to 0, but the alarm stays raised
        assert c.update(K, K) is True
    assert c.score == 0.0 and c.alarm
    c.reset()
    assert (c.alarm, c.score, c.tokens) == (False, 0.0, 0)
    assert c.update(K, K) is False and c.score == 0.0  # never below zero


def test_a_step_is_one_observation_and_never_above_the_per_token_cusum():
    """S is the CUSUM of the steps' summed LLRs, and at every step boundary at most the per-token
    CUSUM (whatever the token order inside a step): false alarms are only rarer."""
    c = Cusum(0.6, h=1e9)
    grouped, per_token, rng = 0.0, 0.0, random.Random(2)
    a, b = math.log(c.p1 / c.p0), math.log((1 - c.p1) / (1 - c.p0))
    for _ in range(500):
        accepted = rng.randint(0, K)
        c.update(accepted, K)
        grouped = max(0.0, grouped + accepted * a + (K - accepted) * b)
        order = [a] * accepted + [b] * (K - accepted)
        rng.shuffle(order)
        for llr in order:
            per_token = max(0.0, per_token + llr)
        assert c.statistic == pytest.approx(grouped, abs=1e-9)
        assert c.statistic <= per_token + 1e-9


def test_a_large_batch_at_the_baseline_rate_is_no_alarm():
    """A step of 256 drafts x 4 tokens at exactly the baseline acceptance. Taking its accepted
    tokens first and its rejections after would put S at 107 h-units over the threshold."""
    c = Cusum(0.6)
    for _ in range(1000):
        assert c.update(614, 1024) is False
    assert c.score == 0.0


@pytest.mark.parametrize("kwargs", [
    {"p0": 0.0}, {"p0": 1.0}, {"p0": -0.1}, {"p0": 1.5}, {"p0": float("nan")},
    {"p0": 0.6, "p1": 0.7}, {"p0": 0.6, "h": 0.0}, {"p0": 0.6, "relative_drop": 1.0},
    {"p0": 0.6, "target_arl0_tokens": 0.5},
])
def test_bad_parameters_are_refused(kwargs):
    with pytest.raises(DspecError, match="Fix:"):
        Cusum(**kwargs)


def test_bad_counts_are_a_bug():
    with pytest.raises(ValueError):
        Cusum(0.6).update(5, 4)
