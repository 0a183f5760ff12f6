"""Acceptance-drift alarm: a one-sided Bernoulli CUSUM against the draft's baseline acceptance.

Model. Each proposed draft token is a Bernoulli trial, accepted with probability p0 (the baseline
acceptance rate of the draft manifest: accepted / draft tokens) while all is well, and p1 < p0
after a drift (default p1 = 0.8 p0, a 20 % relative drop). The log-likelihood ratio of p1 against
p0 is ``a = log(p1/p0) < 0`` per accepted token and ``b = log((1-p1)/(1-p0)) > 0`` per rejected one,
and Page's CUSUM ``S = max(0, S + llr)`` raises the alarm when ``S >= h``.

One engine step reports ``accepted`` of ``drafted`` tokens, summed over every draft in its batch,
and is one observation: ``S = max(0, S + accepted*a + rejected*b)``, O(1) per step. Clamping
inside a step would need the order of its tokens, which a batched step does not keep; taking all
accepted tokens first (then all rejections) biases S upward by the whole batch's rejections and
raises false alarms at the baseline rate for large batches. The grouped statistic is the
per-token one observed only at step boundaries (S_n = X_n - min X_m over fewer m), so it never
exceeds it: false alarms are only rarer than the per-token ARL0 below, and detection is later by
at most about one step's tokens.

Choosing h. With I0 = KL(p0 || p1) and I1 = KL(p1 || p0) (nats per token), Siegmund's
approximation for a log-likelihood-ratio CUSUM (Siegmund 1985, Sequential Analysis, ch. X; the
Gaussian case with its overshoot term dropped) gives

* ARL0 (mean tokens to a false alarm at p0)  ~= (exp(h) - h - 1) / I0
* ARL1 (mean tokens to detect a drop to p1)  ~= (exp(-h) + h - 1) / I1  ~= h / I1 for large h

and Lorden's bound ARL0 >= exp(h) holds exactly. ``h`` is the solution of ARL0(h) =
``target_arl0_tokens``. Dropping the overshoot makes both figures slightly low (the walk ends a
little past h), i.e. the documented false-alarm rate errs on the safe side. In simulation (p0 =
0.6, steps of 4 tokens, targets 2e3 and 2e4) the measured ARL0 is 3-13 % above the target and the
measured delay 8-10 % above the approximation.

Example, p0 = 0.6, p1 = 0.48: I0 = 0.0289, I1 = 0.0293 nats/token; for a target ARL0 of 1e8
tokens h = 14.9 and the expected delay is 474 tokens (about 120 steps of k = 4 drafts).

Caveat: real acceptances are not i.i.d. (acceptance stops at the first rejection inside a draft,
and prompts differ), so in service the counts are over-dispersed and false alarms come sooner
than ARL0; the default target is generous for that reason.

Pure Python, standard library only: this runs inside vLLM's engine loop.
"""

from __future__ import annotations

import math

from deepspec_plugin.errors import DspecError

DEFAULT_RELATIVE_DROP = 0.2
DEFAULT_TARGET_ARL0_TOKENS = 1e8


def bernoulli_kl(p: float, q: float) -> float:
    """KL(Bernoulli(p) || Bernoulli(q)) in nats; p and q in (0, 1)."""
    return p * math.log(p / q) + (1.0 - p) * math.log((1.0 - p) / (1.0 - q))


def siegmund_arl0(h: float, kl0: float) -> float:
    """Approximate mean number of trials to a false alarm for threshold h, KL(p0||p1) = kl0."""
    return (math.expm1(h) - h) / kl0


def siegmund_delay(h: float, kl1: float) -> float:
    """Approximate mean number of trials to detection after a change, KL(p1||p0) = kl1."""
    return (math.expm1(-h) + h) / kl1


def threshold_for_arl0(target_arl0: float, kl0: float) -> float:
    """The h whose approximate ARL0 (``siegmund_arl0``) equals ``target_arl0``."""
    lo, hi = 0.0, 1.0
    while siegmund_arl0(hi, kl0) < target_arl0:
        hi *= 2.0
    for _ in range(100):  # bisection: ARL0 increases with h
        mid = (lo + hi) / 2.0
        if siegmund_arl0(mid, kl0) < target_arl0:
            lo = mid
        else:
            hi = mid
    return hi


class Cusum:
    """One-sided CUSUM alarm for a drop of per-token acceptance from ``p0`` to ``p1``.

    ``h`` overrides the threshold derived from ``target_arl0_tokens``. ``alarm`` latches until
    ``reset()``; ``score`` is S / h (1 is the alarm threshold).
    """

    def __init__(
        self,
        p0: float,
        p1: float | None = None,
        h: float | None = None,
        target_arl0_tokens: float = DEFAULT_TARGET_ARL0_TOKENS,
        relative_drop: float = DEFAULT_RELATIVE_DROP,
    ):
        if not 0.0 < p0 < 1.0:
            raise DspecError(
                f"baseline acceptance rate p0 = {p0!r} is not strictly between 0 and 1",
                "take p0 from the draft manifest's measured acceptance rate (0 < p0 < 1)",
            )
        if p1 is None:
            if not 0.0 < relative_drop < 1.0:
                raise DspecError(
                    f"relative drop {relative_drop!r} is not strictly between 0 and 1",
                    "use e.g. 0.2 for a 20 % drop of the acceptance rate",
                )
            p1 = p0 * (1.0 - relative_drop)
        if not 0.0 < p1 < p0:
            raise DspecError(
                f"alarm acceptance rate p1 = {p1!r} is not between 0 and p0 = {p0}",
                "give p1 below the baseline p0, or leave it unset for a 20 % relative drop",
            )
        if not target_arl0_tokens > 1.0:
            raise DspecError(
                f"target false-alarm ARL0 {target_arl0_tokens!r} tokens is not > 1",
                "give the mean number of tokens between false alarms, e.g. 1e8",
            )
        if h is not None and not h > 0.0:
            raise DspecError(f"CUSUM threshold h = {h!r} is not positive", "give h > 0")
        self.p0 = float(p0)
        self.p1 = float(p1)
        self.kl0 = bernoulli_kl(self.p0, self.p1)  # nats per token before the change
        self.kl1 = bernoulli_kl(self.p1, self.p0)  # nats per token after the change
        self.h = float(h) if h is not None else threshold_for_arl0(target_arl0_tokens, self.kl0)
        self._llr_accepted = math.log(self.p1 / self.p0)  # < 0
        self._llr_rejected = math.log((1.0 - self.p1) / (1.0 - self.p0))  # > 0
        self.statistic = 0.0  # S
        self.alarm = False
        self.tokens = 0  # tokens seen since the last reset

    @property
    def score(self) -> float:
        """S / h: 0 when acceptance looks like p0, >= 1 once the alarm threshold is reached."""
        return self.statistic / self.h

    @property
    def arl0_tokens(self) -> float:
        """Approximate mean tokens between false alarms at acceptance p0 (Siegmund)."""
        return siegmund_arl0(self.h, self.kl0)

    @property
    def expected_delay_tokens(self) -> float:
        """Approximate mean tokens from a drop to p1 until the alarm (Siegmund)."""
        return siegmund_delay(self.h, self.kl1)

    def update(self, accepted: int, drafted: int) -> bool:
        """Feed one step's ``accepted`` of ``drafted`` tokens; return the (latched) alarm."""
        if not 0 <= accepted <= drafted:
            raise ValueError(f"accepted {accepted} of {drafted} drafted tokens")
        # One observation per step (module docstring): the tokens' LLRs summed, then clamped.
        s = (self.statistic + accepted * self._llr_accepted
             + (drafted - accepted) * self._llr_rejected)
        self.statistic = s if s > 0.0 else 0.0
        self.tokens += drafted
        if self.statistic >= self.h:
            self.alarm = True
        return self.alarm

    def reset(self) -> None:
        """Clear the statistic and the latched alarm (e.g. after a new draft is deployed)."""
        self.statistic = 0.0
        self.alarm = False
        self.tokens = 0
