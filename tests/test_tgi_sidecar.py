"""The TGI sidecar (`dspec monitor tgi`) against a stand-in for TGI's /metrics.

TGI cannot run here. ``StandInTgi`` (tests/tgi_standin.py) records what TGI records at the same
events, read in TGI's source, and renders it as TGI's exporter does.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time
import urllib.request

import pytest
from local_http import free_port  # tests/ is on sys.path: no __init__.py
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tgi_standin import StandInTgi
from typer.testing import CliRunner

from deepspec_plugin import metrics
from deepspec_plugin.cli import app, main
from deepspec_plugin.errors import DspecError
from deepspec_plugin.manifest import Baseline, DraftManifest, write_manifest
from deepspec_plugin.metrics import SpecCounts, StepCosts
from deepspec_plugin.serving.exposition import TelemetryCollector
from deepspec_plugin.serving.telemetry import DriftSettings
from deepspec_plugin.serving.tgi_sidecar import (
    TgiSidecar,
    build_telemetry,
    parse_tgi_metrics,
    read_tgi_once,
    start_tgi_sidecar,
)

N = 4  # TGI's --speculate in these tests (StandInTgi's default)
FAKE_FP = "sha256:" + "0" * 64


class StandInServer:
    """The stand-in's HTTP side: /metrics and /info on 127.0.0.1, stoppable and restartable on the
    same port (a TGI restart). ``page`` overrides the metrics text."""

    def __init__(self, tgi: StandInTgi, model_id: str = "stand-in/tgi-model"):
        self.tgi, self.model_id, self.page = tgi, model_id, None
        self.port = 0
        self._httpd = None
        self.start()

    def start(self) -> None:
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/info":
                    body, kind = json.dumps({"model_id": stand_in.model_id}), "application/json"
                else:
                    body = stand_in.page if stand_in.page is not None else stand_in.tgi.render()
                    kind = "text/plain; version=0.0.4"
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._httpd.server_port
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"


@pytest.fixture
def tgi():
    server = StandInServer(StandInTgi())
    yield server
    server.stop()


def sample(telemetry, name: str, **labels) -> float | None:
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(telemetry))
    return registry.get_sample_value(name, labels)


def write_test_manifest(path, acceptance_rate=0.6, target_fingerprint=FAKE_FP, costs=()):
    baseline = Baseline(k=N, temperature=0.0, acceptance_rate=acceptance_rate,
                        acceptance_length=1 + N * acceptance_rate, per_position=[],
                        costs=list(costs))
    manifest = DraftManifest(target_fingerprint, FAKE_FP, method="medusa", k=N, baseline=baseline)
    path.mkdir(parents=True, exist_ok=True)
    return write_manifest(manifest, path / "deepspec.json")


def steps_at(rate: float, drafts: int) -> list[int]:
    """Accepted tokens of ``drafts`` drafts whose pooled acceptance is ``rate`` (as even as can
    be)."""
    return [round(rate * N * (i + 1)) - round(rate * N * i) for i in range(drafts)]


# --- parsing -------------------------------------------------------------------------------------


def test_parse_reads_both_exporter_forms_and_sums_label_sets():
    for form in ("summary", "histogram"):
        t = StandInTgi(skipped_form=form)
        t.prefill(2)
        t.decode([3, 1])
        t.decode([4, 0])
        t.finish(7)
        totals = parse_tgi_metrics(t.render())
        assert (totals.request_steps, totals.accepted, totals.prefills) == (6, 8, 2)
        assert (totals.generated_tokens, totals.prefill_calls, totals.requests) == (7, 1, 2)
        assert totals.decode_steps == 4 and totals.is_tgi and totals.has_speculation
    labelled = ("# TYPE tgi_request_skipped_tokens summary\n"
                'tgi_request_skipped_tokens_sum{shard="a"} 5\n'
                'tgi_request_skipped_tokens_count{shard="a"} 4\n'
                'tgi_request_skipped_tokens_sum{shard="b"} 2.5\n'
                'tgi_request_skipped_tokens_count{shard="b"} 3\n')
    totals = parse_tgi_metrics(labelled)
    assert (totals.request_steps, totals.accepted, totals.prefills) == (7, 8, None)
    idle = parse_tgi_metrics(StandInTgi().render())
    assert idle.is_tgi and not idle.has_speculation and not idle.served
    with pytest.raises(DspecError, match="not Prometheus text"):
        parse_tgi_metrics("<html>not metrics</html>")


# --- feeding the telemetry -----------------------------------------------------------------------


def test_scrape_deltas_become_counts_and_the_acceptance_gauge(tgi):
    tgi.tgi.prefill(1)
    tgi.tgi.decode([4])  # history before the sidecar's first scrape: not counted
    telemetry = build_telemetry(N, metrics_url=tgi.url)
    assert telemetry.info.model_name == "stand-in/tgi-model" and telemetry.info.k == N
    sidecar = TgiSidecar(tgi.url, N, telemetry)
    assert sidecar.scrape_once().drafts == 0
    tgi.tgi.prefill(3)
    tgi.tgi.decode([2, 3, 4, 0])  # the old request and the three new ones
    tgi.tgi.decode([1, 1, 0, 4])
    tgi.tgi.finish(12)
    fed = sidecar.scrape_once()
    assert (fed.drafts, fed.draft_tokens, fed.accepted, fed.generation_tokens) == (8, 32, 15, 12)
    expected = SpecCounts(8, 32, 15, [])
    assert telemetry.counts("0") == expected
    assert sample(telemetry, "deepspec_generation_tokens_total",
                  model_name="stand-in/tgi-model", engine="0") == 12
    rate = sample(telemetry, "deepspec_acceptance_rate", model_name="stand-in/tgi-model",
                  engine="0", window="1m")
    assert rate == pytest.approx(metrics.acceptance_rate(expected)) == pytest.approx(15 / 32)
    assert sample(telemetry, "deepspec_position_acceptance_rate", model_name="stand-in/tgi-model",
                  engine="0", window="1m", position="0") is None  # TGI has no per-position data
    assert sidecar.scrape_once().drafts == 0  # nothing new, nothing counted
    assert telemetry.errors["source"] == 0


def test_a_prefill_counted_before_its_steps_is_caught_up(tgi):
    telemetry = build_telemetry(N, model_name="m")
    sidecar = TgiSidecar(tgi.url, N, telemetry)
    tgi.tgi.prefill(2)
    sidecar.scrape_once()
    tgi.tgi.decode([4, 4])
    tgi.tgi.queue_batch(3)  # next_size has the batch, its prefill steps are not in yet
    fed = sidecar.scrape_once()
    assert fed.accepted <= fed.draft_tokens  # 8 accepted, but only 2 - 3 < 0 -> 0 steps visible
    tgi.tgi.prefill_done(3)
    tgi.tgi.decode([1, 1, 1, 1, 1])
    sidecar.scrape_once()
    assert telemetry.counts("0") == SpecCounts(7, 28, 13, [])
    assert telemetry.errors["config"] == 0


def test_tgi_restart_counts_from_zero(tgi):
    telemetry = build_telemetry(N, model_name="m")
    sidecar = TgiSidecar(tgi.url, N, telemetry)
    sidecar.scrape_once()
    tgi.tgi.prefill(2)
    tgi.tgi.decode([3, 3])
    tgi.tgi.decode([3, 3])
    sidecar.scrape_once()
    tgi.tgi = StandInTgi()  # TGI restarted between two scrapes and served one request
    tgi.tgi.prefill(1)
    tgi.tgi.decode([2])
    fed = sidecar.scrape_once()
    assert fed.restarted and (fed.drafts, fed.accepted) == (1, 2)
    assert telemetry.counts("0") == SpecCounts(5, 20, 14, [])


def test_unreachable_tgi_is_counted_and_the_sidecar_recovers(tgi):
    telemetry = build_telemetry(N, model_name="m")
    sidecar = TgiSidecar(tgi.url, N, telemetry, timeout=2)
    sidecar.scrape_once()
    tgi.stop()
    assert sidecar.scrape_once() is None
    assert sidecar.scrape_once() is None
    assert telemetry.errors["source"] == 2
    tgi.tgi.prefill(1)
    tgi.tgi.decode([4])
    tgi.start()  # back on the same port, counters intact
    assert sidecar.scrape_once().drafts == 1
    assert telemetry.counts("0") == SpecCounts(1, 4, 4, [])
    assert sample(telemetry, "deepspec_plugin_errors_total", kind="source") == 2


def test_missing_metrics_are_counted_as_source_errors_not_raised(tgi):
    telemetry = build_telemetry(N, model_name="m")
    sidecar = TgiSidecar(tgi.url, N, telemetry)
    assert sidecar.scrape_once() is not None  # an idle TGI has no histograms yet: no error
    assert telemetry.errors["source"] == 0
    tgi.tgi.prefill(2)
    tgi.tgi.decode([1, 2])
    served = tgi.tgi.render()
    tgi.page = "\n".join(line for line in served.splitlines()
                         if "skipped_tokens" not in line) + "\n"
    assert sidecar.scrape_once() is None
    tgi.page = "# TYPE other_metric counter\nother_metric 3\n"  # not TGI
    assert sidecar.scrape_once() is None
    tgi.page = "<html>a proxy's error page</html>"
    assert sidecar.scrape_once() is None
    assert telemetry.errors["source"] == 3
    tgi.page = None
    assert sidecar.scrape_once().drafts == 2  # back: the steps since the idle scrape count
    assert telemetry.counts("0") == SpecCounts(2, 8, 3, [])


def test_a_wrong_speculate_is_counted_as_a_config_error(tgi):
    telemetry = build_telemetry(2, model_name="m")
    sidecar = TgiSidecar(tgi.url, 2, telemetry)  # TGI runs with 4
    sidecar.scrape_once()
    tgi.tgi.prefill(1)
    tgi.tgi.decode([4])
    tgi.tgi.decode([4])  # 8 accepted in 3 request-steps: more than 2 per step even with prefills
    sidecar.scrape_once()
    assert telemetry.errors["config"] == 1
    assert telemetry.counts("0") == SpecCounts(2, 4, 4, [])  # capped: never above 1


# --- serving -------------------------------------------------------------------------------------


def test_the_sidecar_serves_deepspec_metrics_over_http(tgi, tmp_path):
    manifest = write_test_manifest(tmp_path / "draft")
    sidecar = start_tgi_sidecar(tgi.url, N, port=0, interval=0.02, manifest=manifest)
    try:
        deadline = time.monotonic() + 10
        while sidecar.last_totals is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the first scrape is the starting point
        tgi.tgi.prefill(2)
        tgi.tgi.decode([3, 2])
        while telemetry_drafts(sidecar) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        with urllib.request.urlopen(sidecar.url, timeout=5) as r:
            text = r.read().decode()
    finally:
        sidecar.stop()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families and all(name.startswith("deepspec_") for name in families), sorted(families)
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in families.values() for s in f.samples}
    key = (("engine", "0"), ("model_name", "stand-in/tgi-model"))
    assert values[("deepspec_drafts_total", key)] == 2
    assert values[("deepspec_accepted_tokens_total", key)] == 5
    assert values[("deepspec_drift_alarm", key)] == 0
    assert values[("deepspec_baseline_acceptance_rate",
                   (("model_name", "stand-in/tgi-model"),))] == 0.6
    info = next(s for s in families["deepspec_draft_info"].samples)
    assert info.labels["method"] == "medusa" and info.labels["k"] == str(N)


def telemetry_drafts(sidecar) -> int:
    return sidecar.telemetry.counts("0").num_drafts


# --- drift alarm and fingerprint -----------------------------------------------------------------


def test_drift_alarm_fires_below_the_baseline_and_not_at_it(tgi, tmp_path):
    manifest = write_test_manifest(tmp_path / "draft", acceptance_rate=0.6)
    telemetry = build_telemetry(N, manifest=manifest, model_name="m",
                                drift=DriftSettings(target_arl0_tokens=1e4))
    sidecar = TgiSidecar(tgi.url, N, telemetry)
    sidecar.scrape_once()
    tgi.tgi.prefill(8)
    for _ in range(30):  # 30 scrapes of 25 decode steps of 8 requests at the baseline
        for _ in range(25):
            tgi.tgi.decode(steps_at(0.6, 8))
        sidecar.scrape_once()
    assert telemetry.counts("0").num_draft_tokens == 30 * 25 * 8 * N  # 24000 tokens > ARL0
    # One observation per scrape; clamping after the accepted tokens only would alarm here.
    assert sample(telemetry, "deepspec_drift_alarm", model_name="m", engine="0") == 0
    for _ in range(3):
        for _ in range(5):
            tgi.tgi.decode(steps_at(0.25, 8))
        sidecar.scrape_once()
    assert sample(telemetry, "deepspec_drift_alarm", model_name="m", engine="0") == 1
    assert sample(telemetry, "deepspec_acceptance_rate", model_name="m", engine="0",
                  window="1m") < 0.6


def test_the_break_even_gauges_come_from_speculate_and_the_smallest_batch_costs(tgi, tmp_path):
    """TGI has no step count and no positions: the prediction takes --speculate as k, the costs
    at the manifest's smallest batch size, and the i.i.d. alpha for the recommended k."""
    costs = [StepCosts(1, 0.05, {1: 1.1, N: 1.3}), StepCosts(16, 0.2, {N: 2.0})]
    manifest = write_test_manifest(tmp_path / "draft", costs=costs)
    telemetry = build_telemetry(N, manifest=manifest, model_name="m")
    sidecar = TgiSidecar(tgi.url, N, telemetry)
    sidecar.scrape_once()
    tgi.tgi.prefill(8)
    for _ in range(10):
        tgi.tgi.decode(steps_at(0.6, 8))
    sidecar.scrape_once()
    where = dict(model_name="m", engine="0", window="1m")
    tau = metrics.acceptance_length(telemetry.counts("0"))  # 1 + 19 / 8 (steps_at rounds)
    assert sample(telemetry, "deepspec_predicted_speedup", **where) == pytest.approx(
        tau / (N * 0.05 + 1.3))
    assert sample(telemetry, "deepspec_break_even_acceptance_rate", **where) == pytest.approx(
        (N * 0.05 + 1.3 - 1) / N)
    counts = telemetry.counts("0")
    assert sample(telemetry, "deepspec_recommended_k", **where) == metrics.recommended_k(
        counts, costs[0], N)
    for _ in range(10):  # nothing accepted: the window's prediction falls
        tgi.tgi.decode([0] * 8)
    sidecar.scrape_once()
    assert sample(telemetry, "deepspec_predicted_speedup", **where) < tau / (N * 0.05 + 1.3)


def test_target_fingerprint_mismatch(tiny, tmp_path, caplog):
    from deepspec_plugin.models import fingerprint

    manifest = write_test_manifest(tmp_path / "draft", target_fingerprint=fingerprint(tiny.target))
    same = build_telemetry(N, manifest=manifest, target=tiny.target, model_name="m")
    assert sample(same, "deepspec_target_fingerprint_mismatch", model_name="m") == 0
    with caplog.at_level(logging.WARNING, logger="deepspec_plugin.serving"):
        other = build_telemetry(N, manifest=manifest, target=tiny.target_updated, model_name="m")
    assert sample(other, "deepspec_target_fingerprint_mismatch", model_name="m") == 1
    assert other.info.target_fingerprint == fingerprint(tiny.target_updated)
    assert any("not the target the draft was made for" in r.message for r in caplog.records)


def test_bad_input_names_the_fix(tmp_path):
    with pytest.raises(DspecError, match="--speculate"):
        build_telemetry(0, model_name="m")
    broken = tmp_path / "deepspec.json"
    broken.write_text("{not json")
    with pytest.raises(DspecError, match="not valid JSON"):
        build_telemetry(N, manifest=broken, model_name="m")
    with pytest.raises(DspecError, match="cannot reach TGI"):
        read_tgi_once(f"http://127.0.0.1:{free_port()}/metrics", N, timeout=2)


# --- the command line ----------------------------------------------------------------------------


def test_cli_once_prints_the_totals_and_acceptance(tgi):
    tgi.tgi.prefill(2)
    tgi.tgi.decode([3, 1])
    tgi.tgi.decode([2, 2])
    tgi.tgi.finish(9)
    result = CliRunner().invoke(app, ["monitor", "tgi", "--metrics-url", tgi.url,
                                      "--speculate", str(N), "--once"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "decode steps 4" in out and "accepted draft tokens 8" in out
    assert f"acceptance rate {8 / 16:.4f}" in out and "generated tokens 9" in out


def test_cli_once_fails_in_one_line_when_tgi_cannot_be_read(tgi, capsys):
    down = f"http://127.0.0.1:{free_port()}/metrics"
    assert main(["monitor", "tgi", "--metrics-url", down, "--speculate", "4", "--once"]) == 2
    assert main(["monitor", "tgi", "--metrics-url", tgi.url, "--speculate", "4", "--once"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err  # rich wraps nothing here: soft lines, one per error
    assert err[0].startswith("error: cannot reach TGI") and "Fix:" in err[0]
    assert "tgi_request_skipped_tokens" in err[1] and "Fix:" in err[1]  # an idle TGI
    assert main(["monitor", "tgi", "--metrics-url", tgi.url, "--speculate", "0", "--once"]) == 2
    assert main(["monitor", "tgi", "--metrics-url", tgi.url, "--speculate", "4"]) == 2  # no port
