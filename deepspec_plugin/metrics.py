"""The one definition of every speculative-decoding metric.

Used by the evaluation harness and by the live serving plugin alike, so a number in a report and
the same number on a dashboard are computed by the same lines. Pure Python, no dependencies: it is
imported inside vLLM.

Vocabulary (the same as vLLM's ``spec_decode`` stats):

* a **draft** is one speculative step of one request: the draft proposes up to k tokens and the
  target verifies them in one forward pass;
* ``num_drafts``: the number of drafts;
* ``num_draft_tokens``: tokens proposed, summed over drafts (k per draft, or fewer);
* ``num_accepted_tokens``: proposed tokens the target accepted, summed over drafts;
* ``accepted_per_position[i]``: drafts whose token at position i (0-based) was accepted. Acceptance
  is a prefix, so this list never increases.

Definitions:

* **acceptance rate** (pooled) = accepted / draft tokens.
* **position acceptance** (vLLM's per-position rate) = accepted_per_position[i] / drafts: the
  probability that a draft gets at least i + 1 tokens accepted.
* **conditional position acceptance** = accepted_per_position[i] / accepted_per_position[i - 1]
  (drafts for i = 0): the probability that position i is accepted given that every earlier
  position was. Under the i.i.d. model of Leviathan et al. every entry equals alpha.
* **acceptance length** (tau, mean accepted length) = 1 + accepted / drafts: tokens produced per
  target forward pass, the bonus (or corrected) token included.
* **per-request means**: the same rate and length computed per request, then averaged over
  requests (each request weighs the same, however long it is). Pooled values weigh tokens.
* **expected acceptance length** for an i.i.d. acceptance probability alpha and k draft tokens:
  (1 - alpha^(k+1)) / (1 - alpha)  (Leviathan et al. 2023, eq. 1).
* **alpha from tau**: the alpha whose expected acceptance length equals a measured tau (the
  inverse of the above). The pooled acceptance rate is *not* alpha: it is E[accepted] / k.
* **predicted speedup** (walltime improvement, Leviathan et al. 2023, thm. 3.8, with the
  verification cost measured rather than assumed) = tau / (k c + v): tokens per speculative
  step over its cost in plain-decoding target steps. c is the cost ratio (one draft step over
  one plain target step) and v the verification cost (the target's pass over k + 1 tokens over
  its pass over one; Leviathan's v = 1, on a CPU it is 1.1-1.5). With tau = tau(alpha, k) above
  it is (1 - alpha^(k+1)) / ((1 - alpha) (k c + v)).
* **break-even**: the acceptance at which the predicted speedup is 1, tau = k c + v; as a pooled
  acceptance rate (k c + v - 1) / k (above 1: no acceptance pays at this k), as an i.i.d. alpha
  the one whose expected length is k c + v.
* **recommended k**: the k in 0..K (0: speculation off, speedup 1) that maximises the predicted
  speedup at the measured acceptance: a draft cut to k' <= K tokens is accepted exactly as the
  first k' positions were, so tau(k') = 1 + sum of the first k' position acceptances.
* **measured speedup** = tokens/s with the draft / tokens/s of plain decoding of the same target
  on the same engine, prompts and lengths, in the same run.

TGI exposes no draft counters; ``tgi_spec_counts`` turns the counters it has into these counts
(``deepspec_plugin.serving.tgi_sidecar`` traces them to TGI's source), for the bench's endpoint
engine and the TGI sidecar alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field


@dataclass
class SpecCounts:
    """Raw counts of speculative decoding; everything else is derived from these."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def add(self, other: SpecCounts) -> None:
        """Add ``other`` into these counts in place (per-position lists of any lengths)."""
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        add_positions(self.accepted_per_position, other.accepted_per_position)

    def record_draft(self, num_proposed: int, num_accepted: int) -> None:
        """Count one draft of ``num_proposed`` tokens whose first ``num_accepted`` were accepted."""
        if not 0 <= num_accepted <= num_proposed:
            raise ValueError(f"accepted {num_accepted} of {num_proposed} proposed tokens")
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += num_accepted
        # One entry per proposed position, as vLLM's counters have one per position 0..k-1.
        add_positions(
            self.accepted_per_position, [1] * num_accepted + [0] * (num_proposed - num_accepted)
        )

    def since(self, before: SpecCounts) -> SpecCounts:
        """What was counted after ``before``: the delta of two reads of cumulative counters.

        Per-position entries are kept for every position (0..k-1), zeros included, as
        ``record_draft`` counts them; none when nothing was drafted in between.
        """
        n = max(len(self.accepted_per_position), len(before.accepted_per_position))
        now = self.accepted_per_position + [0] * (n - len(self.accepted_per_position))
        then = before.accepted_per_position + [0] * (n - len(before.accepted_per_position))
        drafts = self.num_drafts - before.num_drafts
        return SpecCounts(
            num_drafts=drafts,
            num_draft_tokens=self.num_draft_tokens - before.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens - before.num_accepted_tokens,
            accepted_per_position=[a - b for a, b in zip(now, then)] if drafts else [],
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpecCounts:
        return cls(
            num_drafts=int(d["num_drafts"]),
            num_draft_tokens=int(d["num_draft_tokens"]),
            num_accepted_tokens=int(d["num_accepted_tokens"]),
            accepted_per_position=[int(x) for x in d.get("accepted_per_position", [])],
        )

    @classmethod
    def total(cls, counts: Iterable[SpecCounts]) -> SpecCounts:
        out = cls()
        for c in counts:
            out.add(c)
        return out


def add_positions(into: list[int], other: Sequence[int]) -> None:
    """Add per-position counts into ``into`` in place, growing it to the longer length."""
    if len(other) > len(into):
        into.extend([0] * (len(other) - len(into)))
    for i, v in enumerate(other):
        into[i] += v


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def acceptance_rate(c: SpecCounts) -> float | None:
    """Accepted over proposed draft tokens, pooled; None when nothing was drafted."""
    return _ratio(c.num_accepted_tokens, c.num_draft_tokens)


def acceptance_length(c: SpecCounts) -> float | None:
    """Mean tokens per target forward pass: 1 + accepted / drafts (the bonus token counts)."""
    r = _ratio(c.num_accepted_tokens, c.num_drafts)
    return None if r is None else 1.0 + r


def position_acceptance(c: SpecCounts) -> list[float | None]:
    """accepted_per_position[i] / drafts: P(at least i + 1 tokens of a draft accepted)."""
    return [_ratio(a, c.num_drafts) for a in c.accepted_per_position]


def conditional_position_acceptance(c: SpecCounts) -> list[float | None]:
    """P(position i accepted | positions 0..i-1 accepted); None where no draft reached i."""
    out: list[float | None] = []
    prev = c.num_drafts
    for a in c.accepted_per_position:
        out.append(_ratio(a, prev))
        prev = a
    return out


def per_request_means(requests: Sequence[SpecCounts]) -> dict[str, float | None]:
    """Acceptance rate and length averaged over requests (each request weighs the same)."""
    rates = [r for r in map(acceptance_rate, requests) if r is not None]
    lengths = [t for t in map(acceptance_length, requests) if t is not None]
    return {
        "acceptance_rate": sum(rates) / len(rates) if rates else None,
        "acceptance_length": sum(lengths) / len(lengths) if lengths else None,
    }


def expected_acceptance_length(alpha: float, k: int) -> float:
    """E[tokens per target pass] for i.i.d. acceptance alpha and k draft tokens."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def alpha_from_acceptance_length(tau: float, k: int, tol: float = 1e-12) -> float:
    """The i.i.d. alpha whose expected acceptance length with k draft tokens is ``tau``.

    The expected length is increasing in alpha on [0, 1], from 1 to k + 1, so bisection is exact
    to ``tol``. Values of tau outside [1, k + 1] are clamped.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    if tau <= 1.0:
        return 0.0
    if tau >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if expected_acceptance_length(mid, k) < tau:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def predicted_speedup(alpha: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Walltime improvement predicted by Leviathan et al. (2023), theorem 3.8, for i.i.d.
    acceptance ``alpha``: ``speedup_at_length(tau(alpha, k), k, cost_ratio, verify_cost)``.

    ``cost_ratio`` (c) is the time of one draft step over the time of one plain target step;
    ``verify_cost`` (v) the target's pass over k + 1 tokens over its pass over one (Leviathan
    assumes 1).
    """
    return speedup_at_length(expected_acceptance_length(alpha, k), k, cost_ratio, verify_cost)


def speedup_at_length(tau: float, k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """Predicted speedup at a measured acceptance length: tau / (k c + v), the tokens of one
    speculative step over its cost in plain target steps (no i.i.d. assumption)."""
    return tau / step_cost(k, cost_ratio, verify_cost)


def static_batch_acceptance_length(
    new_tokens: int, decode_steps: int, baseline_new_tokens: int, baseline_decode_steps: int,
) -> float | None:
    """The acceptance length a static batch gets: its tokens per speculative step over its
    tokens per plain step.

    A static batch (the harness's) steps until its slowest row is done, so its decode steps are
    its longest row's, not the mean row's: rows that accept less hold the others back, and
    ``speedup_at_length`` of this, not of the pooled tau, predicts its speedup. At batch size 1
    (greedy) it is tau, but for the tokens a length limit cuts from the last pass. A
    continuously batched server (vLLM) refills a finished row's slot at once, so live the
    pooled tau applies. Steps count decoding passes, prefill excluded.
    """
    if min(new_tokens, decode_steps, baseline_new_tokens, baseline_decode_steps) <= 0:
        return None
    return (new_tokens / decode_steps) / (baseline_new_tokens / baseline_decode_steps)


def step_cost(k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """One speculative step (k draft steps, one verification) in plain target steps: k c + v."""
    if cost_ratio < 0 or not verify_cost > 0:
        raise ValueError(f"need cost ratio >= 0 and verification cost > 0, got {cost_ratio}, "
                         f"{verify_cost}")
    return k * cost_ratio + verify_cost


def break_even_acceptance_rate(k: int, cost_ratio: float, verify_cost: float = 1.0) -> float:
    """The pooled acceptance rate at which the predicted speedup is 1: (k c + v - 1) / k.

    Above 1, no acceptance pays at this k; at or below 0, any does.
    """
    if k <= 0:
        raise ValueError("k must be positive")
    return (step_cost(k, cost_ratio, verify_cost) - 1.0) / k


def break_even_alpha(k: int, cost_ratio: float, verify_cost: float = 1.0) -> float | None:
    """The i.i.d. alpha at which the predicted speedup is 1; None when none does (k c + v is
    k + 1 or more: even alpha = 1 gives no more than k + 1 tokens per step)."""
    tau = step_cost(k, cost_ratio, verify_cost)
    return None if tau >= k + 1 else alpha_from_acceptance_length(tau, k)


def truncated_acceptance_length(c: SpecCounts, k: int) -> float | None:
    """tau of the same drafts cut to their first ``k`` tokens, from the per-position counts
    (exact: acceptance is a prefix). Without per-position counts (TGI), the i.i.d. alpha of the
    pooled tau stands in. None when nothing was drafted; 1.0 at k = 0."""
    tau = acceptance_length(c)
    if tau is None:
        return None
    if k == 0:
        return 1.0
    positions = position_acceptance(c)
    if positions and k <= len(positions):
        return 1.0 + sum(positions[:k])
    served = len(positions) or (round(c.num_draft_tokens / c.num_drafts) if c.num_drafts else 0)
    if served < 1:
        return None
    return expected_acceptance_length(alpha_from_acceptance_length(tau, served), k)


@dataclass(frozen=True)
class StepCosts:
    """What speculation costs at one batch size, in plain target steps of that batch size.

    ``verify_cost`` maps a k to the measured cost of verifying k + 1 tokens; between the measured
    k (and k = 0, verification of 1 token: cost 1) it is interpolated linearly, beyond the last
    it is extended along the last segment.
    """

    batch_size: int
    cost_ratio: float
    verify_cost: dict[int, float]

    def verify(self, k: int) -> float:
        points = sorted({0: 1.0, **self.verify_cost}.items())
        for (k0, v0), (k1, v1) in zip(points, points[1:]):
            if k <= k1:
                return v0 + (v1 - v0) * (k - k0) / (k1 - k0)
        (k0, v0), (k1, v1) = points[-2:] if len(points) > 1 else ((0, 1.0), (1, 1.0))
        return v1 + (v1 - v0) * (k - k1) / (k1 - k0)

    def speedup(self, c: SpecCounts, k: int) -> float | None:
        """The predicted speedup of these drafts served at ``k`` tokens (1.0 at k = 0)."""
        tau = truncated_acceptance_length(c, k)
        if tau is None:
            return None
        return 1.0 if k == 0 else speedup_at_length(tau, k, self.cost_ratio, self.verify(k))

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "cost_ratio": self.cost_ratio,
                "verify_cost": {str(k): v for k, v in sorted(self.verify_cost.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> StepCosts:
        costs = cls(batch_size=int(d["batch_size"]), cost_ratio=float(d["cost_ratio"]),
                    verify_cost={int(k): float(v) for k, v in dict(d["verify_cost"]).items()})
        if costs.batch_size < 1 or costs.cost_ratio < 0 or any(
                k < 1 or not v > 0 for k, v in costs.verify_cost.items()):
            raise ValueError(f"costs out of range: {d}")
        return costs


def nearest_costs(costs: Sequence[StepCosts], batch_size: float | None) -> StepCosts | None:
    """The costs measured at the batch size nearest ``batch_size`` (the smallest when None)."""
    if not costs:
        return None
    if batch_size is None:
        return min(costs, key=lambda s: s.batch_size)
    return min(costs, key=lambda s: (abs(s.batch_size - batch_size), s.batch_size))


def recommended_k(c: SpecCounts, costs: StepCosts, max_k: int | None = None) -> int | None:
    """The k in 0..max_k (default: the k drafted) with the highest predicted speedup at these
    counts; 0 means plain decoding pays best. Ties go to the smaller k. None without drafts."""
    if max_k is None:
        max_k = len(c.accepted_per_position) or (
            round(c.num_draft_tokens / c.num_drafts) if c.num_drafts else 0)
    best, best_speedup = None, 0.0
    for k in range(0, max_k + 1):
        s = costs.speedup(c, k)
        if s is not None and s > best_speedup + 1e-12:
            best, best_speedup = k, s
    return best


def speedup(tokens_per_s_spec: float, tokens_per_s_plain: float) -> float | None:
    """Measured speedup: throughput with the draft over plain decoding, same run."""
    return _ratio(tokens_per_s_spec, tokens_per_s_plain)


def tgi_decode_steps(request_steps: int, prefills: int | None) -> int:
    """TGI's drafts: request-steps that were decode steps, ``request_steps - prefills``.

    ``request_steps`` is ``tgi_request_skipped_tokens_count`` (one observation per request per
    forward pass, prefills included) and ``prefills`` is ``tgi_batch_next_size_sum`` (requests
    sent to prefill; each is prefilled in one step, since TGI turns prefill chunking off when it
    speculates). A prefill is counted in ``prefills`` just before its step appears, so the
    difference is kept at 0 or more. ``prefills`` None (not exposed): every request-step counts.
    """
    return max(0, request_steps - (prefills or 0))


def tgi_spec_counts(
    request_steps: int, accepted: int, prefills: int | None, speculate: int
) -> SpecCounts:
    """Counts from TGI's counters (cumulative values, or the increase between two reads).

    Every decode step of a request drafts ``speculate`` tokens (TGI's ``--speculate N``, which it
    does not expose); ``accepted`` is ``tgi_request_skipped_tokens_sum``. TGI has no per-position
    data, so ``accepted_per_position`` stays empty.
    """
    drafts = tgi_decode_steps(request_steps, prefills)
    return SpecCounts(drafts, drafts * speculate, accepted)


def summarize(c: SpecCounts) -> dict:
    """All count-derived metrics of one set of counts, as plain JSON-ready values."""
    return {
        **c.to_dict(),
        "acceptance_rate": acceptance_rate(c),
        "acceptance_length": acceptance_length(c),
        "position_acceptance": position_acceptance(c),
        "conditional_position_acceptance": conditional_position_acceptance(c),
    }
