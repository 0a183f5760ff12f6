"""Live speculative-decoding telemetry, independent of the engine: counts in, metric families out.

``SpecTelemetry`` is fed one engine step at a time (``observe``) by the vLLM stat logger or the TGI
sidecar, and turned into Prometheus metric families on demand (``families``). Everything the plugin
exposes is defined here, once:

Counters (labels ``model_name``, ``engine``):
  ``deepspec_drafts_total``, ``deepspec_draft_tokens_total``, ``deepspec_accepted_tokens_total``,
  ``deepspec_accepted_tokens_per_position_total{position}``, ``deepspec_generation_tokens_total``
  (every generated token, speculative or not: traffic without drafts means the draft is off).
Windowed gauges (labels ``model_name``, ``engine``, ``window`` = 1m, 5m, 1h):
  ``deepspec_acceptance_rate``, ``deepspec_acceptance_length``,
  ``deepspec_position_acceptance_rate{position}``; absent while a window holds no drafts.
  With the manifest's measured costs: ``deepspec_predicted_speedup`` (live acceptance at the
  served k, the costs at the window's batch size: drafts per drafting step),
  ``deepspec_break_even_acceptance_rate`` (the acceptance rate at which that prediction is 1)
  and ``deepspec_recommended_k`` (the k in 0..served k that the live per-position acceptance
  predicts fastest; 0: plain decoding would be faster), all from ``deepspec_plugin.metrics``.
From the draft's manifest (label ``model_name``):
  ``deepspec_baseline_acceptance_rate``, ``deepspec_baseline_acceptance_length``,
  ``deepspec_baseline_position_acceptance_rate{position}``, ``deepspec_baseline_speedup`` (the
  speedup the harness measured at the served k),
  ``deepspec_drift_alarm{engine}`` (0/1) and ``deepspec_drift_score{engine}`` (CUSUM S / h),
  ``deepspec_draft_info{draft, revision, method, k, target, target_fingerprint,
  manifest_target_fingerprint}`` (= 1) and ``deepspec_target_fingerprint_mismatch`` (0/1).
The plugin's own health: ``deepspec_plugin_errors_total{kind}``.

Every ratio is computed by ``deepspec_plugin.metrics``, the lines the evaluation reports use.

The hot path. ``observe`` adds the step into a pending accumulator (a few integer additions and
one per draft position) and updates the drift CUSUM; the accumulator is folded into the cumulative
counts and the sliding windows once per ``flush_interval`` (1 s, the finest window resolution) or
when metrics are read. A count is thus filed at most one second early in the windows, and never
lost. A lock guards the state because scrapes may come from another thread.

Pure Python, standard library only (``metrics``, ``windows``, ``drift``): this runs inside vLLM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from deepspec_plugin import metrics
from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import DraftManifest
from deepspec_plugin.metrics import SpecCounts
from deepspec_plugin.serving.drift import (
    DEFAULT_RELATIVE_DROP,
    DEFAULT_TARGET_ARL0_TOKENS,
    Cusum,
)
from deepspec_plugin.serving.windows import DEFAULT_SPANS, SlidingWindow

log = logging.getLogger("deepspec_plugin.serving")

PREFIX = "deepspec_"
ENGINE_LABELS = ("model_name", "engine")
# The plugin's error kinds, exposed at 0 from the start so that the first error is an increase.
ERROR_KINDS = ("record", "scrape", "publish", "fingerprint", "manifest", "config", "source")
INFO_LABELS = ("model_name", "draft", "revision", "method", "k", "target", "target_fingerprint",
               "manifest_target_fingerprint")


@dataclass(frozen=True)
class MetricSpec:
    """One exposed metric: its name (``_total`` included for counters), type, help and labels."""

    name: str
    kind: str  # "counter" or "gauge"
    doc: str
    labels: tuple[str, ...]
    # How a gauge combines over the processes of a multi-process server (prometheus_client's
    # multiprocess_mode): sums for counts, the worst case for alarms.
    multiprocess_mode: str = "mostrecent"


def _c(name: str, doc: str, labels: tuple[str, ...] = ENGINE_LABELS) -> MetricSpec:
    return MetricSpec(PREFIX + name, "counter", doc, labels)


def _g(name: str, doc: str, labels: tuple[str, ...], mode: str = "mostrecent") -> MetricSpec:
    return MetricSpec(PREFIX + name, "gauge", doc, labels, mode)


WINDOWED = ENGINE_LABELS + ("window",)
SPECS = {s.name: s for s in (
    _c("drafts_total", "Drafts proposed (one per request per speculative step)."),
    _c("draft_tokens_total", "Draft tokens proposed."),
    _c("accepted_tokens_total", "Draft tokens accepted by the target."),
    _c("accepted_tokens_per_position_total",
       "Drafts whose token at this position (0-based) was accepted.",
       ENGINE_LABELS + ("position",)),
    _c("generation_tokens_total", "Tokens generated, with or without speculation."),
    _g("acceptance_rate", "Accepted / proposed draft tokens over the window.", WINDOWED),
    _g("acceptance_length",
       "Mean tokens per target forward pass over the window: 1 + accepted / drafts.", WINDOWED),
    _g("position_acceptance_rate",
       "Drafts with this position accepted / drafts, over the window.", WINDOWED + ("position",)),
    _g("predicted_speedup",
       "Speedup over plain decoding predicted from the window's acceptance and the measured "
       "costs: tau / (k c + v).", WINDOWED),
    _g("break_even_acceptance_rate",
       "Acceptance rate at which the predicted speedup is 1, at the window's batch size.",
       WINDOWED),
    _g("recommended_k",
       "Draft length (0..served k) with the highest predicted speedup at the window's "
       "per-position acceptance; 0: plain decoding is faster.", WINDOWED),
    _g("baseline_speedup", "Speedup over plain decoding measured offline at export, served k.",
       ("model_name",)),
    _g("baseline_acceptance_rate", "Acceptance rate measured offline at export (the manifest).",
       ("model_name",)),
    _g("baseline_acceptance_length", "Acceptance length measured offline at export.",
       ("model_name",)),
    _g("baseline_position_acceptance_rate", "Per-position acceptance measured offline at export.",
       ("model_name", "position")),
    _g("drift_alarm", "1 once the CUSUM test finds acceptance below the baseline (latched).",
       ENGINE_LABELS, "max"),
    _g("drift_score", "CUSUM statistic over its alarm threshold (the alarm fires at 1).",
       ENGINE_LABELS, "max"),
    _g("draft_info", "The draft being served and the target it was made for.", INFO_LABELS, "max"),
    _g("target_fingerprint_mismatch",
       "1 when the served target's fingerprint differs from the draft manifest's.",
       ("model_name",), "max"),
    _c("plugin_errors_total", "Errors inside the deepspec plugin (counted, never raised).",
       ("kind",)),
)}


def window_label(seconds: float) -> str:
    """60 -> "1m", 300 -> "5m", 3600 -> "1h", 90 -> "90s"."""
    s = int(seconds)
    if s != seconds:
        return f"{seconds:g}s"
    for unit, size in (("h", 3600), ("m", 60)):
        if s % size == 0:
            return f"{s // size}{unit}"
    return f"{s}s"


@dataclass
class DraftInfo:
    """What is being served, for ``deepspec_draft_info`` and the fingerprint check."""

    model_name: str
    draft: str = ""
    revision: str = ""
    method: str = ""
    k: int | None = None
    target: str = ""
    target_fingerprint: str = ""  # measured on the served target; "" until known
    manifest_target_fingerprint: str = ""  # what the draft was made for

    @property
    def mismatch(self) -> bool:
        """True only when both fingerprints are known and differ."""
        return bool(self.target_fingerprint and self.manifest_target_fingerprint
                    and self.target_fingerprint != self.manifest_target_fingerprint)


@dataclass
class DriftSettings:
    """The CUSUM's tuning; see ``deepspec_plugin.serving.drift`` for the guarantees."""

    relative_drop: float = DEFAULT_RELATIVE_DROP
    target_arl0_tokens: float = DEFAULT_TARGET_ARL0_TOKENS


@dataclass
class _Engine:
    """One engine's state: counts flushed so far, the pending step sums, windows and CUSUM."""

    windows: list[SlidingWindow]
    cusum: Cusum | None
    total: SpecCounts = field(default_factory=SpecCounts)
    generation_tokens: int = 0
    # Pending since the last flush (plain attributes: the cheapest thing to add to).
    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    per_position: list[int] = field(default_factory=list)
    pending_generation: int = 0
    steps: int = 0

    def flush(self, now: float) -> None:
        if self.drafts or self.draft_tokens:
            for w in self.windows:
                w.add(now, self.drafts, self.draft_tokens, self.accepted, self.per_position,
                      self.steps)
            t = self.total
            t.num_drafts += self.drafts
            t.num_draft_tokens += self.draft_tokens
            t.num_accepted_tokens += self.accepted
            metrics.add_positions(t.accepted_per_position, self.per_position)
            self.drafts = self.draft_tokens = self.accepted = self.steps = 0
            self.per_position = [0] * len(self.per_position)
        self.generation_tokens += self.pending_generation
        self.pending_generation = 0


class SpecTelemetry:
    """Counts, windows and the drift alarm of one served model, for one or more engines."""

    def __init__(
        self,
        info: DraftInfo,
        manifest: DraftManifest | None = None,
        engines: Iterable[int | str] = (0,),
        spans: Sequence[float] = DEFAULT_SPANS,
        drift: DriftSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        flush_interval: float = 1.0,
    ):
        self.info = info
        self.manifest = manifest
        self.spans = tuple(float(s) for s in spans)
        if not self.spans:
            raise DspecError("no window spans given", "give at least one span, e.g. 60,300")
        self.window_labels = tuple(window_label(s) for s in self.spans)
        self.drift = drift or DriftSettings()
        self.clock = clock
        self.flush_interval = flush_interval
        self.baseline = manifest.baseline if manifest else None
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self._logged_errors: set[str] = set()
        self._lock = threading.Lock()
        self._errors_lock = threading.Lock()
        self._engines: dict[str, _Engine] = {}
        self._pending_since: float | None = None  # time of the first step not yet flushed
        p0 = self.baseline.acceptance_rate if self.baseline else None
        if p0 is not None and not 0.0 < p0 < 1.0:
            log.warning("deepspec: baseline acceptance rate %s is not inside (0, 1); the drift "
                        "alarm is off for this draft", p0)
        self._p0 = p0 if p0 is not None and 0.0 < p0 < 1.0 else None
        # The k served, for the predicted speedup: the engine's, else the manifest's.
        self.k = info.k or (manifest.k if manifest else None) or (
            self.baseline.k if self.baseline else None)
        for e in engines:
            self._engine(str(e))

    # --- the hot path ------------------------------------------------------------------------

    def observe(
        self,
        engine: str,
        drafts: int,
        draft_tokens: int,
        accepted: int,
        per_position: Sequence[int] = (),
        generation_tokens: int = 0,
        steps: int = 1,
    ) -> None:
        """Count one engine step: its drafts, proposed and accepted draft tokens, the drafts
        accepted at each position, and every token it generated. ``engine`` is a string label;
        ``steps`` is 0 where one observation sums unknown many steps (the TGI sidecar's)."""
        if not 0 <= accepted <= draft_tokens or drafts < 0 or generation_tokens < 0:
            raise ValueError(f"bad counts: drafts={drafts}, draft_tokens={draft_tokens}, "
                             f"accepted={accepted}, generation_tokens={generation_tokens}")
        with self._lock:
            now = self.clock()
            if self._pending_since is not None and now - self._pending_since >= self.flush_interval:
                # File the earlier steps before adding this one: after an idle gap, this step
                # must not be filed at the gap's start (it would miss the short windows).
                self._flush(now)
            e = self._engines.get(engine) or self._engine(engine)
            if per_position:
                # Summed into a copy: a malformed entry raises before anything is counted.
                pp = e.per_position + [0] * (len(per_position) - len(e.per_position))
                for i, v in enumerate(per_position):
                    pp[i] += v
                e.per_position = pp
            e.drafts += drafts
            e.draft_tokens += draft_tokens
            e.accepted += accepted
            e.pending_generation += generation_tokens
            if drafts:
                e.steps += steps
            if e.cusum is not None and draft_tokens:
                e.cusum.update(accepted, draft_tokens)
            if self._pending_since is None:
                self._pending_since = now

    def _engine(self, engine: str) -> _Engine:
        cusum = None
        if self._p0 is not None:
            cusum = Cusum(self._p0, relative_drop=self.drift.relative_drop,
                          target_arl0_tokens=self.drift.target_arl0_tokens)
        e = _Engine(windows=[SlidingWindow(s) for s in self.spans], cusum=cusum)
        self._engines[engine] = e
        return e

    def _flush(self, now: float) -> None:
        # Pending steps are filed at the time of the first of them: at most flush_interval early.
        at = self._pending_since if self._pending_since is not None else now
        for e in self._engines.values():
            e.flush(at)
        self._pending_since = None

    # --- errors ------------------------------------------------------------------------------

    def count_error(self, kind: str, error: BaseException | str) -> None:
        """Count one of the plugin's own errors; log each kind once (the server's log stays
        readable when a broken stats field fails on every step)."""
        with self._errors_lock:  # errors come from the engine loop, scrapes and the checker
            self.errors[kind] = self.errors.get(kind, 0) + 1
            first = kind not in self._logged_errors
            self._logged_errors.add(kind)
        if first:
            log.warning("deepspec plugin error (%s), counted in deepspec_plugin_errors_total; "
                        "logged once: %s", kind, error,
                        exc_info=error if isinstance(error, BaseException) else None)

    # --- reading -----------------------------------------------------------------------------

    @property
    def mismatch(self) -> bool:
        return self.info.mismatch

    def drift_state(self, engine: str = "0") -> Cusum | None:
        e = self._engines.get(engine)
        return e.cusum if e else None

    def counts(self, engine: str = "0") -> SpecCounts:
        """Cumulative counts of one engine, pending steps included."""
        with self._lock:
            self._flush(self.clock())
            t = self._engines[engine].total
            return SpecCounts(t.num_drafts, t.num_draft_tokens, t.num_accepted_tokens,
                              list(t.accepted_per_position))

    def families(self) -> list[tuple[MetricSpec, list[tuple[tuple[str, ...], float]]]]:
        """Every metric with its samples (label values, value), as of now."""
        with self._lock:
            now = self.clock()
            self._flush(now)
            return self._families(now)

    def _families(self, now: float):
        name = self.info.model_name
        out: dict[str, list[tuple[tuple[str, ...], float]]] = {n: [] for n in SPECS}

        def add(metric: str, labels: tuple[str, ...], value: float | None) -> None:
            if value is not None:
                out[PREFIX + metric].append((labels, float(value)))

        for eng, e in self._engines.items():
            t = e.total
            add("drafts_total", (name, eng), t.num_drafts)
            add("draft_tokens_total", (name, eng), t.num_draft_tokens)
            add("accepted_tokens_total", (name, eng), t.num_accepted_tokens)
            for i, v in enumerate(t.accepted_per_position):
                add("accepted_tokens_per_position_total", (name, eng, str(i)), v)
            add("generation_tokens_total", (name, eng), e.generation_tokens)
            for label, w in zip(self.window_labels, e.windows):
                c = w.totals(now)
                add("acceptance_rate", (name, eng, label), metrics.acceptance_rate(c))
                add("acceptance_length", (name, eng, label), metrics.acceptance_length(c))
                if c.num_drafts:
                    for i, r in enumerate(metrics.position_acceptance(c)):
                        add("position_acceptance_rate", (name, eng, label, str(i)), r)
                    self._add_break_even(add, (name, eng, label), c, w.batch_size(now))
            if e.cusum is not None:
                add("drift_alarm", (name, eng), 1.0 if e.cusum.alarm else 0.0)
                add("drift_score", (name, eng), e.cusum.score)
        b = self.baseline
        if b is not None:
            add("baseline_acceptance_rate", (name,), b.acceptance_rate)
            add("baseline_acceptance_length", (name,), b.acceptance_length)
            for i, r in enumerate(b.per_position):
                add("baseline_position_acceptance_rate", (name, str(i)), r)
            measured = b.speedup_at(self.k) if self.k else None
            add("baseline_speedup", (name,), measured["measured"] if measured else None)
        i = self.info
        add("draft_info", (name, i.draft, i.revision, i.method, "" if i.k is None else str(i.k),
                           i.target, i.target_fingerprint, i.manifest_target_fingerprint), 1.0)
        add("target_fingerprint_mismatch", (name,), 1.0 if i.mismatch else 0.0)
        for kind, n in sorted(self.errors.items()):
            add("plugin_errors_total", (kind,), n)
        return [(SPECS[n], samples) for n, samples in out.items()]

    def _add_break_even(self, add, labels: tuple[str, ...], c: SpecCounts,
                        batch_size: float | None) -> None:
        costs = self.baseline.costs_at(batch_size) if self.baseline else None
        k = self.k or len(c.accepted_per_position)
        if costs is None or not k:
            return
        add("predicted_speedup", labels, costs.speedup(c, k))
        add("break_even_acceptance_rate", labels,
            metrics.break_even_acceptance_rate(k, costs.cost_ratio, costs.verify(k)))
        add("recommended_k", labels, metrics.recommended_k(c, costs, k))
