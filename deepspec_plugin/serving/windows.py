"""Sliding-window speculative-decoding counts, cheap enough to update on every engine step.

A ``SlidingWindow`` is a ring of ``buckets`` time buckets of width ``seconds / buckets`` (the
resolution: 1 s for the default 60 s / 60 buckets, 5 s for 300 s, 60 s for 3600 s). Each bucket
sums the counts added during its time slice, and running totals over the whole ring are kept, so
``add`` costs O(1) amortised (O(k) for the per-position list of a k-token draft): moving forward
subtracts and clears each expired bucket once, and a gap of a whole window or more clears the ring
at once instead of stepping through every elapsed bucket.

The window covers the current (partial) bucket and the ``buckets - 1`` before it, i.e. between
``seconds - width`` and ``seconds`` of history. Counts are exact integers, so totals never drift.

Time is passed in (``now``, seconds on any monotonic clock, e.g. ``time.monotonic()``), which keeps
tests deterministic. A clock that goes backwards re-anchors the ring at the earlier time: nothing
is lost or double-subtracted, and later counts land in the newest bucket.

Gauges are computed by ``deepspec_plugin.metrics``, the same lines as the evaluation reports.
Pure Python, standard library only: this runs inside vLLM's engine loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from deepspec_plugin import metrics
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts

DEFAULT_SPANS = (60.0, 300.0, 3600.0)


class SlidingWindow:
    """Summed speculative-decoding counts over the last ``seconds`` (resolution seconds/buckets)."""

    def __init__(self, seconds: float, buckets: int = 60):
        if not (seconds > 0 and math.isfinite(seconds)):
            raise DspecError(f"window span {seconds!r} s is not a positive number",
                             "give a span in seconds > 0, e.g. 60")
        if int(buckets) != buckets or buckets < 1:
            raise DspecError(f"window bucket count {buckets!r} is not a positive integer",
                             "use buckets >= 1, e.g. 60")
        self.seconds = float(seconds)
        self.buckets = int(buckets)
        self.resolution = self.seconds / self.buckets  # bucket width in seconds
        # Per-bucket sums, as parallel lists (cheaper than objects in the hot path).
        self._drafts = [0] * self.buckets
        self._draft_tokens = [0] * self.buckets
        self._accepted = [0] * self.buckets
        self._steps = [0] * self.buckets  # engine steps that drafted: drafts / steps = batch
        self._positions: list[list[int]] = [[] for _ in range(self.buckets)]
        # Running totals over the ring.
        self._total = SpecCounts()
        self._total_steps = 0
        self._head = 0  # ring slot of the newest bucket
        self._head_index: int | None = None  # absolute bucket number (floor(now / width)) of it

    def _advance(self, now: float) -> None:
        """Move the ring to the bucket of ``now``, expiring what fell out of the window."""
        index = math.floor(now / self.resolution)
        if self._head_index is None or index < self._head_index:
            # First call, or the clock went backwards: re-anchor without touching any count.
            self._head_index = index
            return
        steps = index - self._head_index
        if steps == 0:
            return
        if steps >= self.buckets:
            # A gap of a whole window or more expires everything: clear once, whatever its length.
            self._clear()
        else:
            for _ in range(steps):
                self._head = (self._head + 1) % self.buckets
                self._expire(self._head)
        self._head_index = index

    def _clear(self) -> None:
        n = self.buckets
        self._drafts, self._draft_tokens, self._accepted = [0] * n, [0] * n, [0] * n
        self._steps, self._total_steps = [0] * n, 0
        self._positions = [[] for _ in range(n)]
        # Keep one (zero) entry per position seen, as partial expiry does.
        self._total = SpecCounts(accepted_per_position=[0] * len(self._total.accepted_per_position))

    def _expire(self, slot: int) -> None:
        t = self._total
        t.num_drafts -= self._drafts[slot]
        t.num_draft_tokens -= self._draft_tokens[slot]
        t.num_accepted_tokens -= self._accepted[slot]
        self._total_steps -= self._steps[slot]
        self._steps[slot] = 0
        old = self._positions[slot]
        for i, v in enumerate(old):
            t.accepted_per_position[i] -= v
        self._drafts[slot] = self._draft_tokens[slot] = self._accepted[slot] = 0
        old.clear()

    def add(
        self,
        now: float,
        drafts: int,
        draft_tokens: int,
        accepted: int,
        per_position: Sequence[int] = (),
        steps: int = 0,
    ) -> None:
        """Count one engine step's drafts, proposed tokens, accepted tokens and per-position
        acceptances (``per_position[i]``: drafts whose position i was accepted); ``steps``: the
        engine steps these drafts came in (0 where the source cannot tell, as TGI's)."""
        if drafts < 0 or draft_tokens < 0 or not 0 <= accepted <= draft_tokens:
            raise ValueError(
                f"bad counts: drafts={drafts}, draft_tokens={draft_tokens}, accepted={accepted}"
            )
        self._advance(now)
        slot = self._head
        self._drafts[slot] += drafts
        self._draft_tokens[slot] += draft_tokens
        self._accepted[slot] += accepted
        if steps:
            self._steps[slot] += steps
            self._total_steps += steps
        t = self._total
        t.num_drafts += drafts
        t.num_draft_tokens += draft_tokens
        t.num_accepted_tokens += accepted
        if per_position:
            metrics.add_positions(self._positions[slot], per_position)
            metrics.add_positions(t.accepted_per_position, per_position)

    def totals(self, now: float) -> SpecCounts:
        """A copy of the counts in the window ending at ``now`` (no per-position entries when the
        window holds no drafts, as ``SpecCounts.since``)."""
        self._advance(now)
        t = self._total
        return SpecCounts(
            num_drafts=t.num_drafts,
            num_draft_tokens=t.num_draft_tokens,
            num_accepted_tokens=t.num_accepted_tokens,
            accepted_per_position=list(t.accepted_per_position) if t.num_drafts else [],
        )

    def batch_size(self, now: float) -> float | None:
        """Mean drafts per drafting engine step in the window: the speculative batch size; None
        when no step was counted."""
        self._advance(now)
        return self._total.num_drafts / self._total_steps if self._total_steps else None

    def acceptance_rate(self, now: float) -> float | None:
        """Accepted / proposed tokens in the window; None when nothing was drafted."""
        return metrics.acceptance_rate(self.totals(now))

    def acceptance_length(self, now: float) -> float | None:
        """1 + accepted / drafts in the window; None when nothing was drafted."""
        return metrics.acceptance_length(self.totals(now))

    def position_acceptance(self, now: float) -> list[float | None] | None:
        """accepted_per_position[i] / drafts in the window; None when nothing was drafted."""
        c = self.totals(now)
        return metrics.position_acceptance(c) if c.num_drafts else None



class Windows:
    """One ``SlidingWindow`` per span (seconds), all fed by the same ``add``."""

    def __init__(self, spans: Iterable[float] = DEFAULT_SPANS, buckets: int = 60):
        self.windows = {float(s): SlidingWindow(s, buckets) for s in spans}
        if not self.windows:
            raise DspecError("no window spans given", "give at least one span, e.g. (60, 300)")

    def add(self, now: float, *counts, **named) -> None:
        """``SlidingWindow.add(now, ...)`` on every window, with the same arguments."""
        for w in self.windows.values():
            w.add(now, *counts, **named)

    def __getitem__(self, span: float) -> SlidingWindow:
        return self.windows[float(span)]

    def totals(self, now: float) -> dict[float, SpecCounts]:
        return {span: w.totals(now) for span, w in self.windows.items()}
