"""Publishing ``SpecTelemetry`` to Prometheus: a collector, or mirrored multiprocess metrics.

* One server process (the usual ``vllm serve``, the TGI sidecar): ``TelemetryCollector`` is a
  custom collector in prometheus_client's registry; every value is computed when scraped, so the
  engine step pays nothing for exposition.
* Several API-server processes (``vllm serve --api-server-count N``): vLLM sets
  ``PROMETHEUS_MULTIPROC_DIR`` and its ``/metrics`` reads only prometheus_client's multiprocess
  files, which custom collectors cannot write. ``MultiprocessPublisher`` mirrors the telemetry into
  ordinary ``Counter``/``Gauge`` objects once a second from a daemon thread. Counters sum over the
  processes exactly; gauges combine by their ``MetricSpec.multiprocess_mode`` (alarms: max; window
  ratios: the most recent process's, an estimate from the steps that process saw, since vLLM hands
  each step's stats to one front-end). Exact fleet-wide ratios come from the counters with PromQL
  (the recording rules in ``monitoring/alerts.yml``). A gauge sample that disappears (a window
  that emptied) is set to NaN there, as multiprocess files cannot delete a sample.
"""

from __future__ import annotations

import math
import os
import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from deepspec_plugin.serving.telemetry import SPECS, SpecTelemetry

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _family(spec, samples=()):
    cls = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
    fam = cls(spec.name, spec.doc, labels=list(spec.labels))  # counters drop "_total" themselves
    for labels, value in samples:
        fam.add_metric(list(labels), value)
    return fam


class TelemetryCollector(Collector):
    """Computes every deepspec metric at scrape time from a ``SpecTelemetry``."""

    def __init__(self, telemetry: SpecTelemetry):
        self.telemetry = telemetry

    def describe(self):
        # Names only: registration must not compute values (nor take the telemetry's lock).
        return [_family(spec) for spec in SPECS.values()]

    def collect(self):
        try:
            families = self.telemetry.families()
        except Exception as e:  # a scrape must never fail the server's /metrics
            self.telemetry.count_error("scrape", e)
            families = [(SPECS["deepspec_plugin_errors_total"],
                         [((k,), n) for k, n in sorted(self.telemetry.errors.items())])]
        return [_family(spec, samples) for spec, samples in families]


class MultiprocessPublisher:
    """Mirrors a ``SpecTelemetry`` into prometheus_client multiprocess metrics, every second."""

    def __init__(self, telemetry: SpecTelemetry, interval: float = 1.0):
        self.telemetry = telemetry
        self.interval = interval
        # registry=None: the values live in the multiprocess files; vLLM's /metrics reads those.
        self._metrics = {
            spec.name: (Counter(spec.name, spec.doc, list(spec.labels), registry=None)
                        if spec.kind == "counter" else
                        Gauge(spec.name, spec.doc, list(spec.labels), registry=None,
                              multiprocess_mode=spec.multiprocess_mode))
            for spec in SPECS.values()
        }
        self._published: dict[tuple[str, tuple[str, ...]], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        seen: set[tuple[str, tuple[str, ...]]] = set()
        for spec, samples in self.telemetry.families():
            metric = self._metrics[spec.name]
            for labels, value in samples:
                key = (spec.name, labels)
                seen.add(key)
                child = metric.labels(*labels)
                if spec.kind == "counter":
                    delta = value - self._published.get(key, 0.0)
                    if delta > 0:
                        child.inc(delta)
                else:
                    child.set(value)
                self._published[key] = value
        for key in [k for k in self._published if k not in seen]:
            name, labels = key
            if SPECS[name].kind == "gauge":
                self._metrics[name].labels(*labels).set(math.nan)
                del self._published[key]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="deepspec-publisher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.publish()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.publish()
            except Exception as e:  # never let the thread die silently, never raise into vLLM
                self.telemetry.count_error("publish", e)


_installed: TelemetryCollector | MultiprocessPublisher | None = None


def install(telemetry: SpecTelemetry, registry: CollectorRegistry = REGISTRY):
    """Expose ``telemetry`` the way this process serves metrics; replaces an earlier install (a
    second engine client in one process would otherwise register the same names twice)."""
    global _installed
    uninstall(registry)
    if os.environ.get(MULTIPROC_ENV):
        publisher = MultiprocessPublisher(telemetry)
        publisher.publish()
        publisher.start()
        _installed = publisher
    else:
        collector = TelemetryCollector(telemetry)
        registry.register(collector)
        _installed = collector
    return _installed


def uninstall(registry: CollectorRegistry = REGISTRY) -> None:
    global _installed
    if isinstance(_installed, TelemetryCollector):
        try:
            registry.unregister(_installed)
        except KeyError:
            pass
    elif isinstance(_installed, MultiprocessPublisher):
        _installed.stop()
    _installed = None
