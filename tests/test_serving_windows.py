"""Sliding windows of speculative-decoding counts: expiry, per-position sums, odd clocks."""

from __future__ import annotations

import time

import pytest

from deepspec_plugin import metrics
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts
from deepspec_plugin.serving.windows import SlidingWindow, Windows


def step(c: SpecCounts) -> tuple[int, int, int, list[int]]:
    return c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens, c.accepted_per_position


def draft_counts(*drafts: tuple[int, int]) -> SpecCounts:
    c = SpecCounts()
    for proposed, accepted in drafts:
        c.record_draft(proposed, accepted)
    return c


def test_totals_expire_bucket_by_bucket():
    w = SlidingWindow(10, buckets=10)  # 1 s resolution
    assert w.resolution == 1.0
    w.add(0.5, 1, 4, 4, [1, 1, 1, 1])
    w.add(3.2, 2, 8, 1, [1])
    assert step(w.totals(3.9)) == (3, 12, 5, [2, 1, 1, 1])
    assert step(w.totals(9.99)) == (3, 12, 5, [2, 1, 1, 1])  # bucket 0 is still the oldest
    assert step(w.totals(10.0)) == (2, 8, 1, [1, 0, 0, 0])  # bucket 0 fell out
    assert step(w.totals(12.99)) == (2, 8, 1, [1, 0, 0, 0])
    empty = w.totals(13.0)
    assert step(empty) == (0, 0, 0, [])
    assert w.acceptance_rate(13.0) is None
    assert w.acceptance_length(13.0) is None
    assert w.position_acceptance(13.0) is None
    w.add(13.5, 1, 2, 2, [1, 1])  # the ring is reusable after emptying
    assert step(w.totals(14)) == (1, 2, 2, [1, 1, 0, 0])


def test_gauges_are_the_metrics_definitions():
    c = draft_counts((4, 4), (4, 1), (4, 0), (3, 2))
    w = SlidingWindow(60)
    w.add(100.0, *step(c))
    assert w.totals(100.0) == c
    assert w.acceptance_rate(100.0) == metrics.acceptance_rate(c) == pytest.approx(7 / 15)
    assert w.acceptance_length(100.0) == metrics.acceptance_length(c) == pytest.approx(1 + 7 / 4)
    assert w.position_acceptance(100.0) == metrics.position_acceptance(c)


def test_many_steps_sum_like_speccounts():
    w = SlidingWindow(60, buckets=6)  # 10 s buckets
    steps = [(i * 0.25, draft_counts((4, i % 5), (2, i % 3))) for i in range(400)]
    for t, c in steps:
        w.add(t, *step(c))
    # At t = 99.75 the newest bucket is [90, 100): the window holds buckets [40, 100).
    kept = SpecCounts.total(c for t, c in steps if t >= 40.0)
    assert 0 < kept.num_drafts < SpecCounts.total(c for _, c in steps).num_drafts
    assert w.totals(99.75) == kept


def test_long_gap_is_constant_time_and_clears_everything():
    w = SlidingWindow(3600, buckets=3600)
    w.add(0.0, 1, 4, 3, [1, 1, 1])
    year = 365 * 24 * 3600.0
    start = time.perf_counter()
    for n in range(1, 11):  # ten jumps of a year each
        w.add(n * year, 1, 4, 2, [1, 1])
    assert time.perf_counter() - start < 1.0  # stepping bucket by bucket would take minutes
    assert step(w.totals(10 * year)) == (1, 4, 2, [1, 1, 0])
    w.add(10 * year + 1800, 1, 4, 4, [1, 1, 1, 1])  # and the ring still expires normally
    assert step(w.totals(10 * year + 3600)) == (1, 4, 4, [1, 1, 1, 1])


def test_clock_going_backwards_keeps_totals_consistent():
    w = SlidingWindow(10, buckets=10)
    w.add(100.0, 1, 4, 4, [1, 1, 1, 1])
    w.add(50.0, 1, 4, 0, [0, 0, 0, 0])  # the clock jumped back 50 s: re-anchored, nothing lost
    assert step(w.totals(50.0)) == (2, 8, 4, [1, 1, 1, 1])
    assert step(w.totals(40.0)) == (2, 8, 4, [1, 1, 1, 1])
    w.add(45.0, 1, 2, 1, [1, 0])
    assert step(w.totals(45.0)) == (3, 10, 5, [2, 1, 1, 1])
    assert step(w.totals(55.0)) == (0, 0, 0, [])  # a full window later everything expired once
    assert step(w.totals(200.0)) == (0, 0, 0, [])
    w.add(200.5, 1, 4, 1, [1])
    assert step(w.totals(200.5)) == (1, 4, 1, [1, 0, 0, 0])  # no negative leftovers


def test_windows_fan_out_to_every_span():
    ws = Windows(spans=(60, 300, 3600))
    ws.add(0.0, 1, 4, 4, [1, 1, 1, 1])
    ws.add(200.0, 1, 4, 0, [0, 0, 0, 0])
    totals = ws.totals(299.0)
    assert [t.num_drafts for t in totals.values()] == [0, 2, 2]
    assert ws[300].acceptance_rate(299.0) == 0.5
    assert ws[60].acceptance_rate(299.0) is None
    assert [t.num_drafts for t in ws.totals(301.0).values()] == [0, 1, 2]
    assert ws[3600].resolution == 60.0


@pytest.mark.parametrize("seconds, buckets", [(0, 60), (-1, 60), (float("inf"), 60), (60, 0),
                                              (60, 2.5)])
def test_bad_window_shapes_are_refused(seconds, buckets):
    with pytest.raises(DspecError, match="Fix:"):
        SlidingWindow(seconds, buckets)


def test_bad_counts_are_a_bug():
    with pytest.raises(ValueError):
        SlidingWindow(60).add(0.0, 1, 4, 5)


def test_batch_size_is_drafts_per_drafting_step_and_expires():
    w = SlidingWindow(60.0)
    assert w.batch_size(0.0) is None
    w.add(0.0, 4, 12, 6, (), steps=1)
    w.add(1.0, 2, 6, 3, (), steps=1)
    assert w.batch_size(2.0) == 3.0
    w.add(2.0, 5, 15, 0)  # a source that cannot count steps: drafts without steps
    assert w.batch_size(2.0) == 11 / 2
    assert w.batch_size(200.0) is None  # all expired
