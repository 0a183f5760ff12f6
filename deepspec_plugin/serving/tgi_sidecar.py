"""The TGI sidecar: deepspec metrics and the drift alarm for Hugging Face TGI, from its /metrics.

TGI has no plugin hook, so a small process beside it (``dspec monitor tgi``) scrapes TGI's
Prometheus text every ``interval`` seconds, turns the increases into ``SpecTelemetry.observe``
calls and serves the same ``deepspec_*`` metrics as the vLLM plugin on its own port.

What TGI records (read in huggingface/text-generation-inference at commit db931fcf42da, Jan 2026):

* ``tgi_request_skipped_tokens``: ``backends/v3/src/backend.rs::send_responses`` (same line in
  ``backends/v2``) records ``n - 1`` once per request per forward pass that returned a
  ``Generation`` for it, ``n`` being the tokens of that generation. The Python server
  (``server/.../models/flash_causal_lm.py::generate_token``) emits ``n = accepted_ids - left``:
  the accepted draft tokens plus the target's own token, cut after a stop token. A prefill has no
  speculative ids yet (``batch.speculative_ids`` is None), so it records 0. So ``_sum`` is
  accepted draft tokens and ``_count`` is request-steps, prefills included. Its bucket matcher is
  commented out in ``router/src/server.rs::start`` (since #2331), so metrics-exporter-prometheus
  0.15 renders it as a *summary* (quantiles over a rolling window; ``_sum`` and ``_count``
  cumulative); the docs and Grafana board call it a histogram. Both forms are read here.
* ``tgi_batch_next_size`` (histogram, ``backends/v3/src/queue.rs::State::next_batch``): the size of
  every batch sent to prefill, recorded just before the prefill call. Its ``_sum`` is prefill
  request-steps: with ``--speculate`` prefill chunking is off
  (``server/.../models/model.py::Model.__init__``), so each request is prefilled in one step.
  ``tgi_request_count`` (``router/src/server.rs``, counted at every request's arrival, validation
  failures included) and ``tgi_request_success`` (at the end) cannot stand in for it.
* ``tgi_request_generated_tokens`` (histogram, ``router/src/server.rs::generate_internal`` and
  ``generate_stream_internal``): tokens of each *successful* request, recorded when it ends.
* No drafted-token counter exists: every decode step of a request drafts exactly ``N`` tokens
  (``--speculate N``). The Medusa and MLP-speculator heads (``server/.../layers/medusa.py``,
  ``layers/mlp.py``) return no speculative logits when they see more than 128 rows (a decode
  step has batch x (N + 1) rows), and ``utils/tokens.py::HeterogeneousNextTokenChooser`` then
  drafts with n-gram matching instead (``create_n_gram_speculation``). Still N drafted tokens,
  but not the exported draft's: above 128 / (N + 1) concurrent requests live acceptance measures
  n-gram speculation. Verification is greedy prefix matching.

The mapping onto ``observe(engine="0", ...)``, from the increase between two scrapes:

* drafts = increase of decode request-steps, ``skipped_count - next_size_sum``
  (``metrics.tgi_decode_steps``, the formula of the bench's endpoint engine too; kept
  non-decreasing: a prefill batch is counted in ``next_size`` just before its steps appear);
* draft_tokens = drafts x N;  accepted = increase of ``skipped_sum``;
* per_position = () (TGI has no per-position data: those gauges stay absent);
* generation_tokens = increase of ``tgi_request_generated_tokens_sum``;
* steps = 0 (unknown), so the predicted speedup and break-even use the manifest's costs at its
  smallest batch size, and the recommended k the i.i.d. alpha of the pooled acceptance.

Remaining bias: the accepted tokens of a request's last step after its stop token are not
recorded (at most N - 1 per request, so acceptance reads slightly low for short answers); a
failed prefill or a client gone before its prefill returned leaves its requests in ``next_size``
without their 0 observations (drafts read low, rarely); generated tokens of failed or cancelled
requests are not counted. One scrape interval is one observation of the drift CUSUM, like one
batched vLLM step (``drift.py``: false alarms only rarer than its per-token ARL0, detection later
by at most one interval's tokens).

Counting starts at the first successful scrape (TGI's earlier history has no time and would
distort the windows). A counter lower than at the previous scrape means TGI restarted: the new
values count from 0. An unreachable TGI, a malformed page or missing metrics are counted in
``deepspec_plugin_errors_total{kind="source"}`` and the sidecar keeps scraping; an idle TGI that
has not generated yet (its histograms appear at the first observation) is not an error. Label sets
on TGI's series are summed. TGI's page is read by ``deepspec_plugin.bench.promparse`` and fetched
by ``deepspec_plugin.openai_http``, as in the bench's endpoint engine.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from deepspec_plugin import metrics
from deepspec_plugin.bench import promparse
from deepspec_plugin.bench.promparse import TGI_SKIPPED, TgiTotals
from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import manifest_path, read_manifest
from deepspec_plugin.metrics import SpecCounts
from deepspec_plugin.openai_http import Client
from deepspec_plugin.serving.exposition import TelemetryCollector
from deepspec_plugin.serving.telemetry import DraftInfo, DriftSettings, SpecTelemetry
from deepspec_plugin.serving.windows import DEFAULT_SPANS

log = logging.getLogger("deepspec_plugin.serving")

ENGINE = "0"
TGI_METHODS = ("medusa", "mlp_speculator")  # what TGI can serve as a trained draft
METRICS_URL_FIX = "point --metrics-url at TGI's /metrics, e.g. http://HOST:8080/metrics"


def parse_tgi_metrics(text: str) -> TgiTotals:
    """The values the sidecar needs from TGI's Prometheus text (either exporter form)."""
    try:
        samples = promparse.parse_samples(text)
    except ValueError as e:
        raise DspecError(f"the metrics page is not Prometheus text ({e})",
                         METRICS_URL_FIX) from None
    return promparse.tgi_totals(samples)


def _tgi(timeout: float) -> Client:
    return Client(timeout=timeout, name="TGI",
                  fix="start TGI or fix --metrics-url (e.g. http://127.0.0.1:8080/metrics)")


def fetch_text(url: str, timeout: float = 5.0) -> str:
    """GET ``url`` as text; DspecError when it cannot be read."""
    return _tgi(timeout).get_text(url, METRICS_URL_FIX)


def tgi_model_id(metrics_url: str, timeout: float = 5.0) -> str | None:
    """TGI's ``/info`` ``model_id`` beside its /metrics, or None if it does not answer."""
    parts = urllib.parse.urlsplit(metrics_url)
    info_url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/info", "", ""))
    try:
        response = _tgi(timeout).get(info_url)
        model_id = response.json().get("model_id") if response.status == 200 else None
    except (DspecError, ValueError, AttributeError):
        return None
    return str(model_id) if model_id else None


def _check_speculate(speculate: int) -> None:
    if not isinstance(speculate, int) or speculate < 1:
        raise DspecError(f"--speculate must be a positive integer, got {speculate!r}",
                         "pass the N TGI was started with (its --speculate / SPECULATE)")


def build_telemetry(
    speculate: int,
    manifest: str | Path | None = None,
    target: str | Path | None = None,
    model_name: str | None = None,
    metrics_url: str | None = None,
    drift: DriftSettings | None = None,
    spans=DEFAULT_SPANS,
    clock: Callable[[], float] = time.monotonic,
    timeout: float = 5.0,
) -> SpecTelemetry:
    """The telemetry of a TGI server: draft info from the manifest, the fingerprint check of a
    local copy of the served target (``target``), the name from ``model_name``, TGI's /info or
    "tgi"."""
    _check_speculate(speculate)
    m = read_manifest(manifest) if manifest is not None else None
    model_id = tgi_model_id(metrics_url, timeout) if metrics_url else None
    info = DraftInfo(
        model_name=model_name or model_id or "tgi",
        draft=str(manifest_path(manifest).parent) if manifest is not None else "",
        method=m.method if m else "", k=speculate,
        target=model_id or (str(target) if target is not None else ""),
        manifest_target_fingerprint=m.target_fingerprint if m else "",
    )
    if target is not None:
        from deepspec_plugin.models import fingerprint

        info.target_fingerprint = fingerprint(Path(target))
    telemetry = SpecTelemetry(info, m, engines=(ENGINE,), spans=spans,
                              drift=drift or DriftSettings(), clock=clock)
    _warn_about(info, m, speculate)
    return telemetry


def _warn_about(info: DraftInfo, m, speculate: int) -> None:
    if info.mismatch:
        log.warning("deepspec: the target %s (%s) is not the target the draft was made for (%s): "
                    "acceptance will differ from the baseline. Fix: re-export the draft for this "
                    "target (dspec export tgi --target ...), or serve the original target.",
                    info.target, info.target_fingerprint, info.manifest_target_fingerprint)
    if m is None:
        log.warning("deepspec: no --manifest: no baseline, no drift alarm, no fingerprint check.")
        return
    if m.baseline is None:
        log.warning("deepspec: the draft manifest has no baseline: no drift alarm. Fix: export "
                    "the draft with --report.")
    elif m.baseline.k != speculate:
        log.warning("deepspec: the baseline was measured at k = %d but TGI speculates %d tokens: "
                    "the drift alarm compares different things. Fix: pass the --speculate TGI "
                    "runs with, or re-export with a report at k = %d.",
                    m.baseline.k, speculate, speculate)
    if m.method not in TGI_METHODS:
        log.warning("deepspec: the manifest's method %r is not one TGI serves (%s)",
                    m.method, ", ".join(TGI_METHODS))


def _cumulative(t: TgiTotals) -> tuple[int, int, int, int]:
    """(request-steps, accepted, prefills, generated tokens): the counters that only grow while
    TGI runs (absent: 0, as on an idle TGI)."""
    return (t.request_steps or 0, t.accepted or 0, t.prefills or 0, t.generated_tokens or 0)


@dataclass
class Fed:
    """What one scrape added to the telemetry."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted: int = 0
    generation_tokens: int = 0
    restarted: bool = False


class TgiSidecar:
    """Scrapes TGI's /metrics into a ``SpecTelemetry`` and serves it; never raises while running."""

    def __init__(self, metrics_url: str, speculate: int, telemetry: SpecTelemetry,
                 timeout: float = 5.0):
        _check_speculate(speculate)
        self.metrics_url = metrics_url
        self.speculate = speculate
        self.telemetry = telemetry
        self.timeout = timeout
        self.last_totals: TgiTotals | None = None
        self.host: str | None = None
        self.port: int | None = None
        self._seen: tuple[int, int, int, int] | None = None  # _cumulative at the last scrape
        self._decode_fed = 0  # decode steps already observed (never decreases between restarts)
        self._carry = 0  # accepted tokens waiting for their steps (a prefill counted early)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._server = None

    # --- scraping ----------------------------------------------------------------------------

    def scrape_once(self) -> Fed | None:
        """Fetch, parse and feed one scrape; errors are counted (kind "source"), not raised."""
        try:
            totals = parse_tgi_metrics(fetch_text(self.metrics_url, self.timeout))
        except DspecError as e:
            self.telemetry.count_error("source", e)
            return None
        return self.feed(totals)

    def feed(self, totals: TgiTotals) -> Fed | None:
        """Turn the increase since the previous scrape into ``observe`` calls."""
        with self._lock:
            return self._feed(totals)

    def _feed(self, totals: TgiTotals) -> Fed | None:
        t = self.telemetry
        if not totals.is_tgi:
            t.count_error("source", f"{self.metrics_url} has no tgi_* metrics; is it TGI's "
                                    "/metrics?")
            return None
        if not totals.has_speculation and totals.served:
            t.count_error("source", f"{self.metrics_url} lacks {TGI_SKIPPED} although TGI has "
                                    "served requests; is this a TGI backend that records it?")
            return None
        self.last_totals = totals
        # An idle TGI (or one just restarted) has no histograms yet: all zeros.
        cur, decode = _cumulative(totals), totals.decode_steps
        if self._seen is None:  # the starting point: TGI's history before it is not counted
            self._seen, self._decode_fed = cur, decode
            return Fed()
        restarted = any(now < before for now, before in zip(cur, self._seen))
        base, decode_fed = ((0, 0, 0, 0), 0) if restarted else (self._seen, self._decode_fed)
        if restarted:
            self._carry = 0
            log.info("deepspec: TGI's counters went down: TGI restarted; counting from 0")
        n = self.speculate
        drafts = max(0, decode - decode_fed)
        steps_new, accepted_new, _, generated = (now - before for now, before in zip(cur, base))
        if accepted_new > steps_new * n:
            # More accepted tokens than N per step, prefills included, can only mean a wrong N.
            t.count_error("config", f"TGI accepted {accepted_new} draft tokens in "
                                    f"{steps_new} request-steps: "
                                    f"more than --speculate {n} per step; pass TGI's --speculate")
            self._carry = 0
        pending = accepted_new + self._carry
        accepted = min(pending, drafts * n)
        self._carry = pending - accepted
        self._seen, self._decode_fed = cur, max(decode_fed, decode)
        self._observe(drafts, accepted, generated)
        return Fed(drafts, drafts * n, accepted, generated, restarted)

    def _observe(self, drafts: int, accepted: int, generated: int) -> None:
        # One observation per scrape interval, as a batched engine step is one (drift.py).
        if drafts or generated:
            # steps=0: one scrape sums unknown many steps, so the predicted speedup takes the
            # costs at the manifest's smallest batch size.
            self.telemetry.observe(ENGINE, drafts, drafts * self.speculate, accepted, (),
                                   generated, steps=0)

    # --- running -----------------------------------------------------------------------------

    def start(self, interval: float = 5.0) -> None:
        """Scrape now and then every ``interval`` seconds, in a daemon thread."""
        if not interval > 0:
            raise DspecError(f"--interval must be positive, got {interval!r}", "e.g. --interval 5")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, args=(interval,),
                                        name="deepspec-tgi-scrape", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while True:
            try:
                self.scrape_once()
            except Exception as e:  # a bug must not end the scraping; it is counted
                self.telemetry.count_error("record", e)
            if self._stop.wait(interval):
                return

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve /metrics (only the deepspec_* metrics) on host:port; returns the bound port."""
        registry = CollectorRegistry()
        registry.register(TelemetryCollector(self.telemetry))
        try:
            server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise DspecError(f"cannot listen on {host}:{port} ({e})",
                             "choose a free --port, or another --host") from None
        self._server, self.host, self.port = server, host, server.server_port
        return self.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def wait(self) -> None:
        """Block until ``stop`` (from another thread) or Ctrl-C, then stop."""
        try:
            while not self._stop.wait(3600):
                pass
        finally:
            self.stop()


def start_tgi_sidecar(
    metrics_url: str,
    speculate: int,
    port: int,
    host: str = "127.0.0.1",
    interval: float = 5.0,
    manifest: str | Path | None = None,
    target: str | Path | None = None,
    model_name: str | None = None,
    drift: DriftSettings | None = None,
    spans=DEFAULT_SPANS,
    timeout: float = 5.0,
) -> TgiSidecar:
    """Build the telemetry, serve /metrics on host:port and start scraping; returns at once."""
    if not interval > 0:
        raise DspecError(f"--interval must be positive, got {interval!r}", "e.g. --interval 5")
    telemetry = build_telemetry(speculate, manifest, target, model_name, metrics_url, drift,
                                spans, timeout=min(timeout, interval))
    sidecar = TgiSidecar(metrics_url, speculate, telemetry, timeout=min(timeout, interval))
    sidecar.serve(host, port)
    sidecar.start(interval)
    return sidecar


def monitor_tgi(echo: Callable[[str], object] = print, **options) -> None:
    """``start_tgi_sidecar(**options)``, say where it serves, and run until Ctrl-C."""
    sidecar = start_tgi_sidecar(**options)
    echo(f"deepspec metrics for TGI at {sidecar.metrics_url} on {sidecar.url} "
         f"(model {sidecar.telemetry.info.model_name}, --speculate {sidecar.speculate}); "
         "Ctrl-C stops")
    sidecar.wait()


@dataclass
class TgiReading:
    """TGI's cumulative metrics since it started, read once (``dspec monitor tgi --once``)."""

    metrics_url: str
    speculate: int
    totals: TgiTotals
    counts: SpecCounts
    acceptance_rate: float | None
    acceptance_length: float | None
    baseline_acceptance_rate: float | None = None

    def lines(self) -> list[str]:
        t = self.totals
        prefills = "not exposed: counted as drafts" if t.prefills is None else t.prefills
        out = [
            f"TGI {self.metrics_url} since it started:",
            f"  request-steps {t.request_steps}  prefills {prefills}  "
            f"decode steps {t.decode_steps}",
            f"  accepted draft tokens {t.accepted}  of drafted {self.counts.num_draft_tokens} "
            f"(= decode steps x --speculate {self.speculate})",
            f"  generated tokens {t.generated_tokens if t.generated_tokens is not None else 0}"
            f"  requests {t.requests if t.requests is not None else 0}",
        ]
        if self.acceptance_rate is None:
            out.append("  acceptance: no decode step yet")
        else:
            out.append(f"  acceptance rate {self.acceptance_rate:.4f}  acceptance length "
                       f"{self.acceptance_length:.3f} tokens per step")
        if self.baseline_acceptance_rate is not None:
            out.append(f"  baseline acceptance rate {self.baseline_acceptance_rate:.4f} "
                       "(the manifest)")
        return out


def read_tgi_once(metrics_url: str, speculate: int, manifest: str | Path | None = None,
                  timeout: float = 5.0) -> TgiReading:
    """Scrape once and compute the acceptance since TGI started; DspecError when TGI cannot be
    read or has no ``tgi_request_skipped_tokens``."""
    _check_speculate(speculate)
    m = read_manifest(manifest) if manifest is not None else None
    totals = parse_tgi_metrics(fetch_text(metrics_url, timeout))
    if not totals.is_tgi:
        raise DspecError(f"{metrics_url} has no tgi_* metrics", METRICS_URL_FIX)
    if not totals.has_speculation:
        raise DspecError(
            f"{metrics_url} has no {TGI_SKIPPED}"
            + (" although TGI has served requests" if totals.served else " yet"),
            "send TGI a request first (the metric appears with the first generated token); "
            "check that TGI runs with --speculate")
    counts = totals.counts(speculate)
    if counts.num_accepted_tokens > counts.num_draft_tokens:
        raise DspecError(f"TGI accepted {counts.num_accepted_tokens} draft tokens in "
                         f"{counts.num_drafts} decode steps: more than --speculate {speculate} "
                         "per step",
                         "pass the --speculate TGI was started with")
    baseline = m.baseline.acceptance_rate if m is not None and m.baseline is not None else None
    return TgiReading(metrics_url, speculate, totals, counts, metrics.acceptance_rate(counts),
                      metrics.acceptance_length(counts), baseline)
