"""Live serving telemetry, its Prometheus exposition and the vLLM stat-logger plugin.

Part A drives ``SpecTelemetry`` with a fake clock; part B reads its exposition back with
prometheus_client's own parser (and a real multiprocess directory written by two processes);
part C runs ``DeepSpecStatLogger`` on real vLLM config and stats objects (skipped without vLLM).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from real_servers import needs_vllm

from deepspec_plugin import metrics
from deepspec_plugin.manifest import Baseline, DraftManifest, write_manifest
from deepspec_plugin.metrics import SpecCounts, StepCosts
from deepspec_plugin.serving import exposition
from deepspec_plugin.serving.telemetry import (
    ERROR_KINDS,
    SPECS,
    DraftInfo,
    DriftSettings,
    SpecTelemetry,
)
from deepspec_plugin.serving.windows import DEFAULT_SPANS

FP_A = "sha256:" + "a" * 64
FP_B = "sha256:" + "b" * 64
WINDOW_GAUGES = ("deepspec_acceptance_rate", "deepspec_acceptance_length",
                 "deepspec_position_acceptance_rate")


class FakeClock:
    """Stand-in for ``time.monotonic``: returns ``t``, which the test sets."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


# Made-up costs at two batch sizes: at 8 the draft costs more per plain step and verifying is
# dearer, as on a GPU once the batch fills it.
COSTS = (StepCosts(1, 0.05, {1: 1.05, 3: 1.2}), StepCosts(8, 0.1, {3: 1.6}))


def make_manifest(p0: float = 0.6, per_position=(0.8, 0.55, 0.35),
                  target_fingerprint: str = FP_A, tokenizer_fingerprint: str = FP_B,
                  baseline: bool = True) -> DraftManifest:
    b = Baseline(k=len(per_position), temperature=0.0, acceptance_rate=p0,
                 acceptance_length=1.0 + sum(per_position), per_position=list(per_position),
                 report={"batch_size": 1}, costs=list(COSTS),
                 speedups=[{"k": len(per_position), "batch_size": 1, "measured": 1.4,
                            "ci95": [1.3, 1.5], "predicted": 1.5}])
    return DraftManifest(target_fingerprint, tokenizer_fingerprint, k=len(per_position),
                         baseline=b if baseline else None)


def make_telemetry(clock: FakeClock | None = None, **kwargs) -> SpecTelemetry:
    return SpecTelemetry(DraftInfo("m"), clock=clock or FakeClock(), **kwargs)


def samples(t: SpecTelemetry) -> dict[str, dict[tuple[str, ...], float]]:
    """{metric name: {label values: value}} of one read of ``families()``."""
    return {spec.name: dict(found) for spec, found in t.families()}


def windowed(found: dict, metric: str, window: str, engine: str = "0") -> dict[tuple, float]:
    """The samples of one windowed gauge for one window, keyed by their labels after ``window``."""
    return {labels[3:]: v for labels, v in found[metric].items()
            if labels[1] == engine and labels[2] == window}


def counters(found: dict, engine: str = "0") -> tuple:
    """drafts, draft tokens, accepted, per position, generated tokens of one engine."""

    def of(metric: str) -> dict[tuple[str, ...], float]:
        return {labels[2:]: v for labels, v in found[metric].items() if labels[1] == engine}

    per_position = sorted((int(p), v) for (p,), v in
                          of("deepspec_accepted_tokens_per_position_total").items())
    return (of("deepspec_drafts_total")[()], of("deepspec_draft_tokens_total")[()],
            of("deepspec_accepted_tokens_total")[()], [v for _, v in per_position],
            of("deepspec_generation_tokens_total")[()])


# --- A. SpecTelemetry ------------------------------------------------------------------------

STEPS = [  # drafts, draft tokens, accepted, per position, generated tokens
    (2, 6, 4, [2, 1, 1], 6),
    (1, 3, 0, [0, 0, 0], 1),
    (3, 9, 7, [3, 3, 1], 10),
    (0, 0, 0, [], 5),  # tokens generated without speculation
]


def test_counters_are_the_sums_of_the_steps_pending_ones_included():
    clock = FakeClock()
    t = make_telemetry(clock)
    for i, s in enumerate(STEPS):
        clock.t = i * 0.1  # all inside one flush interval: most stay in the accumulator
        t.observe("0", *s)
    want = SpecCounts(6, 18, 11, [5, 4, 2])
    assert t.counts("0") == want
    assert counters(samples(t)) == (6, 18, 11, [5, 4, 2], 22)
    t.observe("0", 1, 3, 3, [1, 1, 1], 4)  # pending again: read without any flush in between
    assert counters(samples(t)) == (7, 21, 14, [6, 5, 3], 26)
    assert t.counts("0") == SpecCounts(7, 21, 14, [6, 5, 3])


def test_windowed_gauges_are_the_metrics_of_the_window_and_expire():
    clock = FakeClock(1000.0)
    t = make_telemetry(clock)
    t.observe("0", 2, 6, 4, [2, 1, 1])
    clock.t = 1030.0
    t.observe("0", 1, 3, 1, [1, 0, 0])
    clock.t = 1065.0  # the 1m window now holds the second step only; 5m and 1h hold both
    found = samples(t)
    both, second = SpecCounts(3, 9, 5, [3, 1, 1]), SpecCounts(1, 3, 1, [1, 0, 0])
    for window, c in (("1m", second), ("5m", both), ("1h", both)):
        assert windowed(found, "deepspec_acceptance_rate", window) == {
            (): metrics.acceptance_rate(c)}
        assert windowed(found, "deepspec_acceptance_length", window) == {
            (): metrics.acceptance_length(c)}
        assert windowed(found, "deepspec_position_acceptance_rate", window) == {
            (str(i),): r for i, r in enumerate(metrics.position_acceptance(c))}
    clock.t = 1091.0  # past 60 s after the last step: the 1m gauges are absent, not 0
    found = samples(t)
    for metric in WINDOW_GAUGES:
        assert windowed(found, metric, "1m") == {}
        assert windowed(found, metric, "5m") and windowed(found, metric, "1h")
    assert windowed(found, "deepspec_acceptance_rate", "5m") == {(): 5 / 9}
    assert counters(found)[:3] == (3, 9, 5)  # the counters never expire


def test_steps_within_a_flush_interval_are_filed_at_the_first_ones_time():
    clock = FakeClock()
    t = make_telemetry(clock, flush_interval=1.0)
    for at in (0.0, 0.2, 0.7):
        clock.t = at
        t.observe("0", 1, 3, 2, [1, 1])
    clock.t = 59.9
    assert windowed(samples(t), "deepspec_acceptance_length", "1m") == {(): 1 + 6 / 3}
    clock.t = 60.0  # filed at 0.0 (not at 0.7, nor at the read): bucket 0 has just expired
    assert windowed(samples(t), "deepspec_acceptance_length", "1m") == {}


def test_a_step_after_an_idle_gap_is_filed_at_its_own_time():
    clock = FakeClock()
    t = make_telemetry(clock, flush_interval=1.0)
    for at, accepted in ((0.0, 3), (0.5, 3), (100.0, 0)):  # idle between 0.5 and 100
        clock.t = at
        t.observe("0", 1, 3, accepted, [1] * accepted)
    clock.t = 100.5
    found = samples(t)
    # The step at 100 s belongs to the 1m window; the two early ones do not.
    assert windowed(found, "deepspec_acceptance_rate", "1m") == {(): 0.0}
    assert windowed(found, "deepspec_acceptance_rate", "5m") == {(): 6 / 9}


def test_per_position_lists_of_different_lengths():
    clock = FakeClock()
    t = make_telemetry(clock)
    t.observe("0", 1, 1, 1, [1])
    t.observe("0", 1, 3, 3, [1, 1, 1])
    t.observe("0", 2, 4, 1, [1, 0])
    t.observe("0", 1, 2, 0, ())
    c = SpecCounts(5, 10, 5, [3, 1, 1])
    assert t.counts("0") == c
    found = samples(t)
    assert counters(found)[3] == [3, 1, 1]
    assert windowed(found, "deepspec_position_acceptance_rate", "1m") == {
        ("0",): 3 / 5, ("1",): 1 / 5, ("2",): 1 / 5}


@pytest.mark.parametrize("bad", [
    dict(drafts=1, draft_tokens=3, accepted=4),
    dict(drafts=-1, draft_tokens=3, accepted=1),
    dict(drafts=1, draft_tokens=3, accepted=-1),
    dict(drafts=1, draft_tokens=-3, accepted=0),
    dict(drafts=1, draft_tokens=3, accepted=1, generation_tokens=-2),
])
def test_bad_counts_raise_value_error_and_count_nothing(bad):
    t = make_telemetry(manifest=make_manifest())
    t.observe("0", 1, 3, 2, [1, 1], 3)
    with pytest.raises(ValueError, match="bad counts"):
        t.observe("0", **bad)
    assert counters(samples(t)) == (1, 3, 2, [1, 1], 3)
    assert t.drift_state("0").tokens == 3


def test_a_malformed_per_position_entry_counts_nothing():
    t = make_telemetry()
    t.observe("0", 1, 3, 2, [1, 1], 3)
    with pytest.raises(TypeError):
        t.observe("0", 1, 3, 2, [1, None], 3)
    assert counters(samples(t)) == (1, 3, 2, [1, 1], 3)


def test_baseline_gauges_come_from_the_manifest():
    t = make_telemetry(manifest=make_manifest(0.6, (0.8, 0.55, 0.35)))
    found = samples(t)
    assert found["deepspec_baseline_acceptance_rate"] == {("m",): 0.6}
    assert found["deepspec_baseline_acceptance_length"] == {("m",): pytest.approx(2.7)}
    assert found["deepspec_baseline_position_acceptance_rate"] == {
        ("m", "0"): 0.8, ("m", "1"): 0.55, ("m", "2"): 0.35}
    assert found["deepspec_drift_alarm"] == {("m", "0"): 0.0}
    assert found["deepspec_drift_score"] == {("m", "0"): 0.0}


@pytest.mark.parametrize("manifest", [None, make_manifest(baseline=False)],
                         ids=["no-manifest", "no-baseline"])
def test_no_baseline_no_baseline_gauges_and_no_drift(manifest):
    t = make_telemetry(manifest=manifest)
    t.observe("0", 1, 3, 0, [0, 0, 0])
    found = samples(t)
    for name in ("deepspec_baseline_acceptance_rate", "deepspec_baseline_acceptance_length",
                 "deepspec_baseline_position_acceptance_rate", "deepspec_drift_alarm",
                 "deepspec_drift_score"):
        assert found[name] == {}, name
    assert t.drift_state("0") is None
    assert found["deepspec_drafts_total"] == {("m", "0"): 1.0}


@pytest.mark.parametrize("p0", [0.0, 1.0, 1.5, -0.1])
def test_a_baseline_acceptance_outside_0_1_turns_the_drift_alarm_off(p0, caplog):
    with caplog.at_level(logging.WARNING, "deepspec_plugin.serving"):
        t = make_telemetry(manifest=make_manifest(p0))
    t.observe("0", 1, 3, 0, [0, 0, 0])
    found = samples(t)
    assert found["deepspec_drift_alarm"] == {} and found["deepspec_drift_score"] == {}
    assert found["deepspec_baseline_acceptance_rate"] == {("m",): p0}  # still shown as it is
    assert "drift alarm is off" in caplog.text


def test_the_drift_alarm_is_quiet_at_the_baseline_and_fires_after_a_drop():
    k, p0 = 4, 0.6
    clock = FakeClock()
    t = make_telemetry(clock, manifest=make_manifest(p0),
                       drift=DriftSettings(target_arl0_tokens=1e4))
    cusum = t.drift_state("0")
    rng = random.Random(0)

    def step(p: float) -> None:
        clock.t += 0.05
        accepted = sum(rng.random() < p for _ in range(k))
        t.observe("0", 1, k, accepted)

    for _ in range(250):  # 1000 tokens at p0: a tenth of the false-alarm ARL0
        step(p0)
        assert not cusum.alarm
    found = samples(t)
    assert found["deepspec_drift_alarm"] == {("m", "0"): 0.0}
    assert 0.0 <= found["deepspec_drift_score"][("m", "0")] < 1.0

    start = cusum.tokens
    while not cusum.alarm and cusum.tokens - start < 10 * cusum.expected_delay_tokens:
        step(0.3)
    # A drop to 0.3 is deeper than the p1 = 0.48 the delay is documented for: faster than that.
    assert cusum.alarm and cusum.tokens - start <= 2 * cusum.expected_delay_tokens
    found = samples(t)
    assert found["deepspec_drift_alarm"] == {("m", "0"): 1.0}
    assert found["deepspec_drift_score"][("m", "0")] >= 1.0
    for _ in range(20):  # latched: good steps afterwards do not clear it
        step(1.0)
    assert samples(t)["deepspec_drift_alarm"] == {("m", "0"): 1.0}


def break_even_gauges(t: SpecTelemetry, window: str = "1m") -> tuple:
    found = samples(t)
    return tuple(windowed(found, f"deepspec_{m}", window).get(())
                 for m in ("predicted_speedup", "break_even_acceptance_rate", "recommended_k"))


def test_break_even_gauges_use_the_costs_at_the_live_batch_size():
    clock = FakeClock()
    t = SpecTelemetry(DraftInfo("m", k=3), make_manifest(), clock=clock)
    # Steps of one draft each: batch 1, the costs at batch 1.
    for _ in range(4):
        t.observe("0", 1, 3, 2, [1, 1, 0])
    predicted, rate, k = break_even_gauges(t)
    assert predicted == pytest.approx(3 / (3 * 0.05 + 1.2))
    assert rate == pytest.approx((3 * 0.05 + 1.2 - 1) / 3)
    assert k == 2  # the third token is never accepted: cutting it saves its draft step
    # A minute later, steps of 8 drafts: batch 8, the costs at batch 8 (v = 1.6, c = 0.1).
    clock.t = 120.0
    for _ in range(3):
        t.observe("0", 8, 24, 16, [8, 8, 0])
    predicted, rate, k = break_even_gauges(t)
    assert predicted == pytest.approx(3 / (3 * 0.1 + 1.6))
    assert rate == pytest.approx((3 * 0.1 + 1.6 - 1) / 3)
    # Collapsed acceptance: below break-even, and speculation off pays best.
    clock.t = 240.0
    t.observe("0", 8, 24, 0, [0, 0, 0])
    predicted, rate, k = break_even_gauges(t)
    assert predicted < 1 and k == 0


def test_break_even_gauges_need_the_measured_costs():
    t = SpecTelemetry(DraftInfo("m", k=3), make_manifest(), clock=FakeClock())
    t.baseline.costs = []
    t.observe("0", 1, 3, 2, [1, 1, 0])
    assert break_even_gauges(t) == (None, None, None)
    assert samples(t)["deepspec_acceptance_rate"]  # the rest is there


def test_observations_of_unknown_steps_take_the_smallest_batch_costs():
    # The TGI sidecar sums a scrape interval in one observation (steps=0), with no positions.
    t = SpecTelemetry(DraftInfo("m", k=3), make_manifest(), clock=FakeClock())
    t.observe("0", 40, 120, 60, (), 100, steps=0)
    predicted, rate, k = break_even_gauges(t)
    assert predicted == pytest.approx((1 + 60 / 40) / (3 * 0.05 + 1.2))
    assert rate == pytest.approx((3 * 0.05 + 1.2 - 1) / 3)
    assert k in (1, 2, 3)


def test_engines_have_their_own_labels_counts_and_cusums():
    t = make_telemetry(manifest=make_manifest(0.6), engines=(0, 1),
                       drift=DriftSettings(target_arl0_tokens=1e4))
    found = samples(t)
    assert counters(found, "0") == counters(found, "1") == (0, 0, 0, [], 0)  # both from the start
    for _ in range(50):
        t.observe("0", 1, 3, 0, [0, 0, 0], 1)  # everything rejected on engine 0
        t.observe("1", 1, 3, 3, [1, 1, 1], 4)
    t.observe("7", 1, 2, 1, [1, 0])  # an engine not announced at start
    found = samples(t)
    assert counters(found, "0") == (50, 150, 0, [0, 0, 0], 50)
    assert counters(found, "1") == (50, 150, 150, [50, 50, 50], 200)
    assert counters(found, "7") == (1, 2, 1, [1, 0], 0)
    assert found["deepspec_drift_alarm"] == {
        ("m", "0"): 1.0, ("m", "1"): 0.0, ("m", "7"): 0.0}
    assert windowed(found, "deepspec_acceptance_rate", "1m", "0") == {(): 0.0}
    assert windowed(found, "deepspec_acceptance_rate", "1m", "1") == {(): 1.0}
    assert t.drift_state("0") is not t.drift_state("1")


def test_errors_are_counted_per_kind_and_logged_once_per_kind(caplog):
    t = make_telemetry()
    assert samples(t)["deepspec_plugin_errors_total"] == {(k,): 0.0 for k in ERROR_KINDS}
    with caplog.at_level(logging.WARNING, "deepspec_plugin.serving"):
        for _ in range(3):
            t.count_error("record", ValueError("bad stats"))
        t.count_error("config", "bad DSPEC_WINDOWS")
    errors = samples(t)["deepspec_plugin_errors_total"]
    assert errors[("record",)] == 3 and errors[("config",)] == 1
    assert sum(errors.values()) == 4
    logged = [r for r in caplog.records if r.name == "deepspec_plugin.serving"]
    assert len(logged) == 2
    assert "(record)" in logged[0].getMessage() and "bad stats" in logged[0].getMessage()
    assert logged[0].exc_info is not None  # the traceback of an exception is kept
    assert "(config)" in logged[1].getMessage()


def test_draft_info_mismatch_needs_both_fingerprints():
    assert not DraftInfo("m").mismatch
    assert not DraftInfo("m", target_fingerprint=FP_A).mismatch
    assert not DraftInfo("m", manifest_target_fingerprint=FP_A).mismatch
    assert not DraftInfo("m", target_fingerprint=FP_A, manifest_target_fingerprint=FP_A).mismatch
    assert DraftInfo("m", target_fingerprint=FP_B, manifest_target_fingerprint=FP_A).mismatch
    t = SpecTelemetry(DraftInfo("m", target_fingerprint=FP_B, manifest_target_fingerprint=FP_A))
    assert samples(t)["deepspec_target_fingerprint_mismatch"] == {("m",): 1.0}


# --- B. exposition ---------------------------------------------------------------------------

# The names and labels documented in deepspec_plugin.serving.telemetry.
ENGINE = {"model_name", "engine"}
DOCUMENTED = {
    "deepspec_drafts_total": ("counter", ENGINE),
    "deepspec_draft_tokens_total": ("counter", ENGINE),
    "deepspec_accepted_tokens_total": ("counter", ENGINE),
    "deepspec_accepted_tokens_per_position_total": ("counter", ENGINE | {"position"}),
    "deepspec_generation_tokens_total": ("counter", ENGINE),
    "deepspec_acceptance_rate": ("gauge", ENGINE | {"window"}),
    "deepspec_acceptance_length": ("gauge", ENGINE | {"window"}),
    "deepspec_position_acceptance_rate": ("gauge", ENGINE | {"window", "position"}),
    "deepspec_predicted_speedup": ("gauge", ENGINE | {"window"}),
    "deepspec_break_even_acceptance_rate": ("gauge", ENGINE | {"window"}),
    "deepspec_recommended_k": ("gauge", ENGINE | {"window"}),
    "deepspec_baseline_speedup": ("gauge", {"model_name"}),
    "deepspec_baseline_acceptance_rate": ("gauge", {"model_name"}),
    "deepspec_baseline_acceptance_length": ("gauge", {"model_name"}),
    "deepspec_baseline_position_acceptance_rate": ("gauge", {"model_name", "position"}),
    "deepspec_drift_alarm": ("gauge", ENGINE),
    "deepspec_drift_score": ("gauge", ENGINE),
    "deepspec_draft_info": ("gauge", {"model_name", "draft", "revision", "method", "k", "target",
                                      "target_fingerprint", "manifest_target_fingerprint"}),
    "deepspec_target_fingerprint_mismatch": ("gauge", {"model_name"}),
    "deepspec_plugin_errors_total": ("counter", {"kind"}),
}


def scrape(registry) -> dict[str, Any]:
    """The registry's exposition text parsed back by prometheus_client: {family name: family}."""
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def deepspec_families(registry) -> dict[str, Any]:
    return {n: f for n, f in scrape(registry).items() if n.startswith("deepspec_")}


def full_telemetry() -> SpecTelemetry:
    info = DraftInfo("m", draft="/d", revision="r1", method="draft_model", k=3, target="/t",
                     target_fingerprint=FP_A, manifest_target_fingerprint=FP_A)
    t = SpecTelemetry(info, make_manifest(), clock=FakeClock())
    t.observe("0", 2, 6, 4, [2, 1, 1], 7)
    return t


def test_collector_exposes_the_documented_names_labels_and_values():
    registry = CollectorRegistry()
    registry.register(exposition.TelemetryCollector(full_telemetry()))
    families = scrape(registry)
    assert set(SPECS) == set(DOCUMENTED)
    for name, (kind, labels) in DOCUMENTED.items():
        family = families[name.removesuffix("_total") if kind == "counter" else name]
        assert family.type == kind
        assert family.samples, name  # every metric has a sample once a step was seen
        for s in family.samples:
            assert s.name == name  # counters' samples keep _total
            assert set(s.labels) == labels, name
    value = {(f.name, tuple(sorted(s.labels.items()))): s.value
             for f in families.values() for s in f.samples}
    eng = (("engine", "0"), ("model_name", "m"))
    assert value[("deepspec_drafts", eng)] == 2
    assert value[("deepspec_accepted_tokens", eng)] == 4
    assert value[("deepspec_generation_tokens", eng)] == 7
    assert value[("deepspec_accepted_tokens_per_position",
                  eng + (("position", "2"),))] == 1
    assert value[("deepspec_acceptance_rate", eng + (("window", "5m"),))] == pytest.approx(4 / 6)
    assert value[("deepspec_acceptance_length", eng + (("window", "1h"),))] == 3.0
    assert value[("deepspec_baseline_acceptance_rate", (("model_name", "m"),))] == 0.6
    assert value[("deepspec_baseline_speedup", (("model_name", "m"),))] == 1.4
    # One step of 2 drafts: batch 2, nearest the costs at batch 1; tau = 3 at k = 3.
    one_m = eng + (("window", "1m"),)
    assert value[("deepspec_predicted_speedup", one_m)] == pytest.approx(3 / (3 * 0.05 + 1.2))
    assert value[("deepspec_break_even_acceptance_rate", one_m)] == pytest.approx(
        (3 * 0.05 + 1.2 - 1) / 3)
    assert value[("deepspec_recommended_k", one_m)] == 3
    assert value[("deepspec_plugin_errors", (("kind", "scrape"),))] == 0
    info = families["deepspec_draft_info"].samples[0]
    assert info.value == 1 and info.labels["k"] == "3" and info.labels["revision"] == "r1"


class CountingTelemetry(SpecTelemetry):
    """Stand-in telemetry that counts ``families()`` calls and can be told to fail in them."""

    def __init__(self, fail: bool = False):
        super().__init__(DraftInfo("m"), clock=FakeClock())
        self.calls, self.fail = 0, fail

    def families(self):
        self.calls += 1
        if self.fail:
            raise RuntimeError("broken telemetry")
        return super().families()


def test_registering_the_collector_computes_nothing():
    t = CountingTelemetry()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(exposition.TelemetryCollector(t))
    assert t.calls == 0
    assert "deepspec_drafts" in deepspec_families(registry)
    assert t.calls == 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # describe() names it all
        registry.register(exposition.TelemetryCollector(CountingTelemetry()))


def test_a_failing_scrape_exposes_the_error_count_instead_of_raising():
    t = CountingTelemetry(fail=True)
    registry = CollectorRegistry()
    registry.register(exposition.TelemetryCollector(t))
    for n in (1, 2):
        families = deepspec_families(registry)
        assert set(families) == {"deepspec_plugin_errors"}
        errors = {s.labels["kind"]: s.value for s in families["deepspec_plugin_errors"].samples}
        assert errors["scrape"] == n and set(errors) == set(ERROR_KINDS)


def test_install_twice_and_uninstall_twice(monkeypatch):
    monkeypatch.delenv(exposition.MULTIPROC_ENV, raising=False)
    registry = CollectorRegistry()
    try:
        first, second = make_telemetry(), make_telemetry()
        first.observe("0", 1, 3, 3)
        second.observe("0", 2, 6, 1)
        exposition.install(first, registry)
        exposition.install(second, registry)  # replaces the first: no "Duplicated timeseries"
        drafts = deepspec_families(registry)["deepspec_drafts"].samples
        assert [s.value for s in drafts] == [2.0]
        exposition.uninstall(registry)
        exposition.uninstall(registry)
        assert deepspec_families(registry) == {}
        exposition.install(first, registry)
        assert [s.value for s in deepspec_families(registry)["deepspec_drafts"].samples] == [1.0]
    finally:
        exposition.uninstall(registry)


# Run in a fresh interpreter: prometheus_client reads PROMETHEUS_MULTIPROC_DIR when imported.
PUBLISHER_SCRIPT = textwrap.dedent("""
    import json, sys
    from deepspec_plugin.manifest import Baseline, DraftManifest
    from deepspec_plugin.serving.exposition import MultiprocessPublisher
    from deepspec_plugin.serving.telemetry import DraftInfo, DriftSettings, SpecTelemetry

    job = json.loads(sys.argv[1])
    now = [0.0]
    baseline = Baseline(k=3, temperature=0.0, acceptance_rate=0.6, acceptance_length=2.7,
                        per_position=[0.8, 0.55, 0.35])
    manifest = DraftManifest("sha256:" + "a" * 64, "sha256:" + "b" * 64, k=3, baseline=baseline)
    t = SpecTelemetry(DraftInfo(job["model"]), manifest, clock=lambda: now[0],
                      drift=DriftSettings(target_arl0_tokens=1e4))
    for step in job["steps"]:
        t.observe("0", *step)
    publisher = MultiprocessPublisher(t)
    publisher.publish()
    if job.get("later"):
        now[0] = job["later"]
        publisher.publish()
    print(json.dumps({"alarm": t.drift_state("0").alarm}))
""")


def run_publisher(directory: Path, job: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DSPEC_")}
    env[exposition.MULTIPROC_ENV] = str(directory)
    done = subprocess.run([sys.executable, "-c", PUBLISHER_SCRIPT, json.dumps(job)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_multiprocess_publisher_sums_counters_and_takes_the_worst_alarm(tmp_path):
    quiet = run_publisher(tmp_path, {"model": "m", "steps": [[2, 6, 4, [2, 1, 1], 5]] * 3})
    drifted = run_publisher(tmp_path, {"model": "m", "steps": [[1, 3, 0, [0, 0, 0], 1]] * 40})
    assert quiet == {"alarm": False} and drifted == {"alarm": True}
    # A third process whose 1m window empties between two publishes.
    run_publisher(tmp_path, {"model": "idle", "steps": [[1, 2, 1, [1, 0], 1]], "later": 61.0})

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    value = {}
    for family in registry.collect():
        for s in family.samples:
            value[(s.name, tuple(sorted(s.labels.items())))] = s.value
    m = (("engine", "0"), ("model_name", "m"))
    assert value[("deepspec_drafts_total", m)] == 3 * 2 + 40 * 1
    assert value[("deepspec_draft_tokens_total", m)] == 3 * 6 + 40 * 3
    assert value[("deepspec_accepted_tokens_total", m)] == 3 * 4
    assert value[("deepspec_generation_tokens_total", m)] == 3 * 5 + 40
    assert value[("deepspec_accepted_tokens_per_position_total", m + (("position", "0"),))] == 6
    assert value[("deepspec_drift_alarm", m)] == 1.0  # max over the processes
    assert value[("deepspec_drift_score", m)] >= 1.0
    assert value[("deepspec_plugin_errors_total", (("kind", "record"),))] == 0
    idle = (("engine", "0"), ("model_name", "idle"))
    assert math.isnan(value[("deepspec_acceptance_rate", idle + (("window", "1m"),))])
    assert math.isnan(value[("deepspec_position_acceptance_rate",
                             idle + (("position", "0"), ("window", "1m")))])
    assert value[("deepspec_acceptance_rate", idle + (("window", "5m"),))] == 0.5


# --- C. the vLLM stat logger, on real vLLM objects ------------------------------------------

DSPEC_ENV = ("DSPEC_MANIFEST", "DSPEC_WINDOWS", "DSPEC_DRIFT_RELATIVE_DROP",
             "DSPEC_DRIFT_ARL0_TOKENS")


@dataclass
class Served:
    """Real VllmConfigs over the tiny pair; the draft copy carries a manifest."""

    draft: Path  # a copy of the tiny draft, with deepspec.json
    manifest: DraftManifest
    config: Any  # tiny target + draft copy
    perturbed: Any  # perturbed target + the same draft copy
    bare: Any  # tiny target + the original draft, which has no manifest


def engine_config(target: Path, draft: Path):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(target), max_model_len=256, speculative_config={
        "model": str(draft), "num_speculative_tokens": 3, "method": "draft_model"},
    ).create_engine_config()


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    pytest.importorskip("vllm")
    from deepspec_plugin import models

    root = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSPEC_CACHE", str(root / "cache"))  # the fingerprints' stat cache
        mp.setenv("HF_HUB_OFFLINE", "1")
        draft = root / "draft"
        shutil.copytree(tiny.draft, draft)
        manifest = make_manifest(0.55, (0.7, 0.5, 0.35),
                                 target_fingerprint=models.fingerprint(tiny.target),
                                 tokenizer_fingerprint=models.tokenizer_fingerprint(tiny.target))
        write_manifest(manifest, draft)
        assert not (tiny.draft / "deepspec.json").exists()
        yield Served(draft, manifest, engine_config(tiny.target, draft),
                     engine_config(tiny.target_updated, draft),
                     engine_config(tiny.target, tiny.draft))


def join_fingerprint_checks() -> None:
    """Wait (at most 10 s) for the loggers' fingerprint threads."""
    for thread in threading.enumerate():
        if thread.name == "deepspec-fingerprint":
            thread.join(timeout=10)
            assert not thread.is_alive(), "the fingerprint check did not finish within 10 s"


@pytest.fixture
def make_logger(monkeypatch, tmp_path):
    """Builds DeepSpecStatLoggers as vLLM does; their collector leaves the global registry after."""
    monkeypatch.delenv(exposition.MULTIPROC_ENV, raising=False)
    monkeypatch.setenv("DSPEC_CACHE", str(tmp_path / "cache"))
    for var in DSPEC_ENV:
        monkeypatch.delenv(var, raising=False)
    from deepspec_plugin.serving.vllm_logger import DeepSpecStatLogger

    def make(config, engine_indexes=None) -> DeepSpecStatLogger:
        logger = DeepSpecStatLogger(config, engine_indexes)
        assert logger.telemetry is not None, "the plugin disabled itself"
        return logger

    yield make
    join_fingerprint_checks()
    exposition.uninstall()


def spec_stats(*drafts: tuple[int, int]):
    """A real SpecDecodingStats filled the way vLLM's scheduler does: (proposed, accepted)."""
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    sd = SpecDecodingStats.new(3)
    for proposed, accepted in drafts:
        sd.observe_draft(proposed, accepted)
    return sd


def step_stats(sd, generated: int):
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

    iteration = IterationStats()
    iteration.num_generation_tokens = generated
    return SchedulerStats(spec_decoding_stats=sd), iteration


def summed(sds) -> tuple:
    """What vLLM's own Prometheus logger counts from these stats: the sums of their fields."""
    per_position = [sum(col) for col in zip(*(sd.num_accepted_tokens_per_pos for sd in sds))]
    return (sum(sd.num_drafts for sd in sds), sum(sd.num_draft_tokens for sd in sds),
            sum(sd.num_accepted_tokens for sd in sds), per_position)


@pytest.mark.vllm
@needs_vllm
def test_vllm_loads_the_plugin_through_its_entry_point():
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase, load_stat_logger_plugin_factories

    from deepspec_plugin.serving.vllm_logger import DeepSpecStatLogger

    factories = load_stat_logger_plugin_factories()
    assert DeepSpecStatLogger in factories
    assert issubclass(DeepSpecStatLogger, AggregateStatLoggerBase)  # one logger for all engines


@pytest.mark.vllm
@needs_vllm
def test_record_counts_what_vllm_reports(served, make_logger):
    logger = make_logger(served.config, [0, 1])
    first = [spec_stats((3, 2), (3, 0), (3, 3)), spec_stats((3, 1), (2, 2))]
    second = [spec_stats((3, 3), (1, 0))]
    for sd, generated in zip(first, (7, 5)):
        logger.record(*step_stats(sd, generated), engine_idx=0)
    logger.record(*step_stats(second[0], 4), engine_idx=1)
    logger.record(*step_stats(None, 6), engine_idx=0)  # a step without drafts
    found = samples(logger.telemetry)
    assert counters(found, "0") == (*summed(first), 7 + 5 + 6)
    assert counters(found, "1") == (*summed(second), 4)
    assert found["deepspec_plugin_errors_total"][("record",)] == 0
    # Installed in vLLM's /metrics registry, under the served model's name.
    drafts = deepspec_families(REGISTRY)["deepspec_drafts"].samples
    assert {(s.labels["model_name"], s.labels["engine"], s.value) for s in drafts} == {
        (str(served.config.model_config.served_model_name), "0", 5.0),
        (str(served.config.model_config.served_model_name), "1", 2.0)}


@pytest.mark.vllm
@needs_vllm
def test_record_without_stats_does_nothing(served, make_logger):
    logger = make_logger(served.config)
    before = samples(logger.telemetry)
    logger.record(None, None)
    logger.record(*step_stats(None, 0))
    assert samples(logger.telemetry) == before
    assert counters(before) == (0, 0, 0, [], 0)


@pytest.mark.vllm
@needs_vllm
def test_malformed_stats_are_counted_not_raised(served, make_logger):
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    logger = make_logger(served.config)
    logger.record(*step_stats(spec_stats((3, 1)), 2))
    good = counters(samples(logger.telemetry))
    malformed = [
        step_stats(SpecDecodingStats(3, num_drafts=1, num_draft_tokens=2, num_accepted_tokens=3,
                                     num_accepted_tokens_per_pos=[1, 1, 1]), 2),
        step_stats(SpecDecodingStats(3, num_drafts="1", num_draft_tokens=3,
                                     num_accepted_tokens=1), 2),
        step_stats(SpecDecodingStats(3, num_drafts=1, num_draft_tokens=3, num_accepted_tokens=1,
                                     num_accepted_tokens_per_pos=[1, None, 0]), 2),
        step_stats(spec_stats((3, 1)), "2"),
    ]
    for n, stats in enumerate(malformed, start=1):
        logger.record(*stats)
        found = samples(logger.telemetry)
        assert found["deepspec_plugin_errors_total"][("record",)] == n
        assert counters(found) == good  # a malformed step is dropped whole
    logger.record(*step_stats(spec_stats((3, 3)), 4))  # and the plugin keeps counting
    assert counters(samples(logger.telemetry))[:3] == (2, 6, 4)


@pytest.mark.vllm
@needs_vllm
def test_the_manifest_in_the_draft_directory_is_found(served, make_logger):
    logger = make_logger(served.config)
    t = logger.telemetry
    assert t.info.manifest_target_fingerprint == served.manifest.target_fingerprint
    assert t.info.draft == str(served.draft) and t.info.method == "draft_model" and t.info.k == 3
    found = samples(t)
    name = str(served.config.model_config.served_model_name)
    assert found["deepspec_baseline_acceptance_rate"] == {(name,): 0.55}
    assert found["deepspec_baseline_position_acceptance_rate"][(name, "1")] == 0.5
    assert found["deepspec_drift_alarm"] == {(name, "0"): 0.0}
    assert sum(found["deepspec_plugin_errors_total"].values()) == 0


@pytest.mark.vllm
@needs_vllm
def test_dspec_manifest_overrides_the_draft_directory(served, make_logger, monkeypatch, tmp_path):
    other = make_manifest(0.35, (0.5, 0.3, 0.2),
                          target_fingerprint=served.manifest.target_fingerprint)
    monkeypatch.setenv("DSPEC_MANIFEST", str(write_manifest(other, tmp_path / "other.json")))
    found = samples(make_logger(served.config).telemetry)
    assert list(found["deepspec_baseline_acceptance_rate"].values()) == [0.35]


@pytest.mark.vllm
@needs_vllm
def test_a_corrupt_manifest_is_counted_and_the_plugin_still_counts(served, make_logger,
                                                                   monkeypatch, tmp_path):
    corrupt = tmp_path / "deepspec.json"
    corrupt.write_text('{"schema": "deepspec-draft/v1", "target_fing')
    monkeypatch.setenv("DSPEC_MANIFEST", str(corrupt))
    logger = make_logger(served.config)
    logger.record(*step_stats(spec_stats((3, 2)), 3))
    found = samples(logger.telemetry)
    assert found["deepspec_plugin_errors_total"][("manifest",)] == 1
    assert found["deepspec_baseline_acceptance_rate"] == {} and found["deepspec_drift_alarm"] == {}
    assert counters(found) == (1, 3, 2, [1, 1, 0], 3)


@pytest.mark.vllm
@needs_vllm
def test_no_manifest_means_no_baseline_and_a_warning(served, make_logger, caplog):
    with caplog.at_level(logging.WARNING, "deepspec_plugin.serving"):
        logger = make_logger(served.bare)
    found = samples(logger.telemetry)
    assert found["deepspec_baseline_acceptance_rate"] == {}
    assert found["deepspec_baseline_position_acceptance_rate"] == {}
    assert found["deepspec_drift_alarm"] == {}
    assert "no draft manifest" in caplog.text
    assert sum(found["deepspec_plugin_errors_total"].values()) == 0


@pytest.mark.vllm
@needs_vllm
def test_the_served_target_is_checked_against_the_manifest(served, make_logger, caplog):
    with caplog.at_level(logging.WARNING, "deepspec_plugin.serving"):
        same = make_logger(served.config).telemetry
        other = make_logger(served.perturbed).telemetry
        join_fingerprint_checks()
    assert same.info.target_fingerprint == served.manifest.target_fingerprint
    assert other.info.target_fingerprint.startswith("sha256:")
    assert other.info.target_fingerprint != served.manifest.target_fingerprint
    assert samples(same)["deepspec_target_fingerprint_mismatch"] == {
        (str(served.config.model_config.served_model_name),): 0.0}
    assert samples(other)["deepspec_target_fingerprint_mismatch"] == {
        (str(served.perturbed.model_config.served_model_name),): 1.0}
    warnings = [r.getMessage() for r in caplog.records
                if "is not the target the draft was made for" in r.getMessage()]
    assert len(warnings) == 1 and str(served.perturbed.model_config.model) in warnings[0]
    assert same.errors["fingerprint"] == other.errors["fingerprint"] == 0


@pytest.mark.vllm
@needs_vllm
@pytest.mark.parametrize("var,value", [
    ("DSPEC_WINDOWS", "one minute"),
    ("DSPEC_WINDOWS", "0,60"),
    ("DSPEC_WINDOWS", "60,,300"),
    ("DSPEC_WINDOWS", "inf"),
    ("DSPEC_WINDOWS", "nan"),
    ("DSPEC_WINDOWS", "60,300,60"),
    ("DSPEC_DRIFT_RELATIVE_DROP", "1.5"),
    ("DSPEC_DRIFT_RELATIVE_DROP", "20%"),
    ("DSPEC_DRIFT_ARL0_TOKENS", "0.5"),
    ("DSPEC_DRIFT_ARL0_TOKENS", "1e400"),
])
def test_bad_settings_are_counted_and_the_defaults_used(served, make_logger, monkeypatch,
                                                        var, value):
    monkeypatch.setenv(var, value)
    logger = make_logger(served.config)
    t = logger.telemetry
    assert t.errors["config"] == 1
    assert t.spans == DEFAULT_SPANS and t.drift == DriftSettings()
    logger.record(*step_stats(spec_stats((3, 2)), 3))
    assert counters(samples(t))[:3] == (1, 3, 2)


@pytest.mark.vllm
@needs_vllm
def test_good_settings_are_used(served, make_logger, monkeypatch):
    monkeypatch.setenv("DSPEC_WINDOWS", "30, 120")
    monkeypatch.setenv("DSPEC_DRIFT_RELATIVE_DROP", "0.3")
    monkeypatch.setenv("DSPEC_DRIFT_ARL0_TOKENS", "1e6")
    t = make_logger(served.config).telemetry
    assert t.errors["config"] == 0
    assert t.spans == (30.0, 120.0) and t.window_labels == ("30s", "2m")
    assert t.drift == DriftSettings(relative_drop=0.3, target_arl0_tokens=1e6)
    assert t.drift_state("0").p1 == pytest.approx(0.55 * 0.7)


@pytest.mark.vllm
@needs_vllm
def test_the_plugin_is_off_without_speculative_decoding(tiny, monkeypatch):
    """A plain server gets no deepspec metrics: "tokens but no drafts" would read as a broken
    draft (the DeepSpecNoSpecDecodeTraffic alert)."""
    from prometheus_client import REGISTRY, generate_latest
    from vllm.engine.arg_utils import EngineArgs

    from deepspec_plugin.serving.vllm_logger import DeepSpecStatLogger

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = EngineArgs(model=str(tiny.target), max_model_len=256).create_engine_config()
    logger = DeepSpecStatLogger(config, [0])
    assert logger.telemetry is None
    logger.record(*step_stats(None, 5))  # and recording is a no-op
    assert "deepspec_" not in generate_latest(REGISTRY).decode()
