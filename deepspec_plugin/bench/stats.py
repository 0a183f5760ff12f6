"""Confidence intervals for pooled metrics: percentile bootstrap over units.

A **unit** is one measured batch (with batch size 1, one prompt): its raw counts, new tokens and
times, as stored in a report's ``units``. Units are the independent pieces of a run, so they are
what the bootstrap resamples (with replacement, 2000 times, fixed seed). Each resample pools its
units' additive quantities and recomputes the metric from the pooled sums with the functions of
:mod:`deepspec_plugin.metrics`, exactly as the point estimate is computed. The 95% interval is the
2.5th to 97.5th percentile of the resampled values.

* Speedup is **paired**: a unit's speculative and baseline numbers are resampled together (they
  ran back to back on the same prompts), which keeps machine drift out of the interval.
* Pooled entries across categories resample **within** each category (stratified), so the mix of
  categories stays that of the bench.
* Where no stratum has two units, resampling cannot vary anything: there is no interval (None).
* A difference between two reports (``compare``) is **paired** when both measured the same units
  (same prompts and seeds: two drafts on one bench): each resample takes the same units from
  both. Otherwise each report's units are resampled independently. Either way the interval is
  the percentile interval of the differences.

numpy is imported lazily: the CLI imports this module without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from deepspec_plugin import metrics
from deepspec_plugin.metrics import SpecCounts

RESAMPLES = 2000
SEED = 20240601
CONFIDENCE = 0.95
CI_METRICS = ("acceptance_rate", "acceptance_length", "speedup")


def tokens_per_s(new_tokens: float, elapsed_s: float) -> float | None:
    """Throughput of a run: new tokens over wall time; None without time."""
    return new_tokens / elapsed_s if elapsed_s and elapsed_s > 0 else None


# Each metric: the additive quantities of one unit, and the metric of pooled quantities.
def _counts_vector(u: dict) -> list[float]:
    c = u["counts"]
    return [c["num_accepted_tokens"], c["num_draft_tokens"], c["num_drafts"]]


def _counts_from(s) -> SpecCounts:
    return SpecCounts(num_accepted_tokens=int(round(s[0])), num_draft_tokens=int(round(s[1])),
                      num_drafts=int(round(s[2])))


def _speed_vector(u: dict) -> list[float] | None:
    if u.get("baseline_elapsed_s") is None:
        return None
    return [u["new_tokens"], u["elapsed_s"], u["baseline_new_tokens"], u["baseline_elapsed_s"]]


def _speedup_of(s) -> float | None:
    spec, plain = tokens_per_s(s[0], s[1]), tokens_per_s(s[2], s[3])
    return metrics.speedup(spec, plain) if spec is not None and plain else None


_METRICS: dict[str, tuple[Callable[[dict], list[float] | None], Callable]] = {
    "acceptance_rate": (_counts_vector, lambda s: metrics.acceptance_rate(_counts_from(s))),
    "acceptance_length": (_counts_vector, lambda s: metrics.acceptance_length(_counts_from(s))),
    "speedup": (_speed_vector, _speedup_of),
}


def pooled_metric(units: Sequence[dict], metric: str) -> float | None:
    """The metric of all units pooled (the point estimate the interval belongs to)."""
    vector, statistic = _METRICS[metric]
    rows = [vector(u) for u in units]
    if not rows or any(r is None for r in rows):
        return None
    return statistic([sum(col) for col in zip(*rows)])


def metric_ci(
    units: Sequence[dict], metric: str, *, stratify: bool = True,
    resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE,
) -> list[float] | None:
    """Percentile bootstrap interval of a pooled metric over units; None where undefined."""
    vector, statistic = _METRICS[metric]
    sums = _resampled_sums(units, vector, stratify, resamples, seed)
    if sums is None:
        return None
    return _percentile_interval([statistic(s) for s in sums], confidence)


def unit_key(u: dict) -> tuple:
    """What a unit measured: its category, seed and prompts (not how it came out)."""
    return (u.get("category", ""), u.get("seed"), tuple(u.get("prompts") or ()))


def paired_units(units_a: Sequence[dict], units_b: Sequence[dict]):
    """Both lists in one order when they measured the same units (same prompts, seeds, split),
    else None."""
    ka, kb = [unit_key(u) for u in units_a], [unit_key(u) for u in units_b]
    if not ka or len(set(ka)) != len(ka) or sorted(ka, key=repr) != sorted(kb, key=repr):
        return None
    return (sorted(units_a, key=lambda u: repr(unit_key(u))),
            sorted(units_b, key=lambda u: repr(unit_key(u))))


def metric_diff_ci(
    units_a: Sequence[dict], units_b: Sequence[dict], metric: str, *, stratify: bool = True,
    resamples: int = RESAMPLES, seed: int = SEED, confidence: float = CONFIDENCE,
    paired: bool | None = None,
) -> list[float] | None:
    """Interval of metric(b) - metric(a).

    Paired where both reports measured the same units (``paired=None`` decides by
    :func:`paired_units`): each resample takes the same prompts from both, so the difference
    between prompts (some are easy to draft for, some hard) cancels, as in a paired test.
    Otherwise each report's units are resampled independently.
    """
    vector, statistic = _METRICS[metric]
    pair = paired_units(units_a, units_b) if paired is not False else None
    if paired and pair is None:
        raise ValueError("the two unit lists did not measure the same prompts")
    if pair is not None:
        units_a, units_b = pair
    sums_a = _resampled_sums(units_a, vector, stratify, resamples, seed)
    # The same seed over the same strata sizes draws the same indices: that is the pairing.
    sums_b = _resampled_sums(units_b, vector, stratify, resamples, seed if pair else seed + 1)
    if sums_a is None or sums_b is None:
        return None
    diffs = []
    for sa, sb in zip(sums_a, sums_b):
        va, vb = statistic(sa), statistic(sb)
        diffs.append(None if va is None or vb is None else vb - va)
    return _percentile_interval(diffs, confidence)


def _resampled_sums(units, vector, stratify, resamples, seed):
    """Per resample, the column sums of resampled unit vectors (shape resamples x columns)."""
    import numpy as np

    rows = [vector(u) for u in units]
    if not rows or any(r is None for r in rows):
        return None
    data = np.asarray(rows, dtype=np.float64)
    if stratify:
        keys = [u.get("category", "") for u in units]
        strata = [np.flatnonzero(np.asarray([k == s for k in keys])) for s in dict.fromkeys(keys)]
    else:
        strata = [np.arange(len(rows))]
    if max(len(m) for m in strata) < 2:
        return None  # one unit per stratum: resampling cannot vary, so there is no interval
    rng = np.random.default_rng(seed)
    sums = np.zeros((resamples, data.shape[1]))
    for members in strata:
        picks = members[rng.integers(0, len(members), size=(resamples, len(members)))]
        sums += data[picks].sum(axis=1)
    return sums.tolist()  # plain floats: the metric functions run on them 2000 times


def _percentile_interval(values: list[float | None], confidence: float) -> list[float] | None:
    import numpy as np

    finite = np.asarray([v for v in values if v is not None], dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]
