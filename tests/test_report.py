"""Entries, intervals, report files and comparisons, on hand-made units (no models needed).

The units are made-up numbers in the exact layout the harness stores; everything computed from
them goes through the real summarizer, bootstrap, writers and comparison.
"""

from __future__ import annotations

import json

import pytest

from deepspec_plugin import metrics
from deepspec_plugin.bench import stats
from deepspec_plugin.bench.compare import compare_reports, render_comparison
from deepspec_plugin.bench.report import (
    ACCEPTANCE_PNG,
    SPEEDUP_PNG,
    summary_rows,
    write_json_atomic,
    write_report,
)
from deepspec_plugin.bench.report_schema import EvalReport, ReportEntry, ReportModels, load_report
from deepspec_plugin.bench.run import OVERALL, environment, summarize_entry
from deepspec_plugin.bench.spec import SCHEMA, load_bench
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = ReportModels.from_dict({
    "target": {"path": "/m/target", "fingerprint": "sha256:t", "tokenizer_fingerprint": "sha256:x",
               "params": 1000},
    "draft": {"path": "/m/draft", "fingerprint": "sha256:d", "tokenizer_fingerprint": "sha256:x",
              "params": 100},
})


def _unit(category, accepted, k, *, batch=0, new=32, elapsed=1.0, base_new=32, base_elapsed=2.0,
          draft_s=0.001, target_s=0.01):
    """One unit with one request whose drafts accepted ``accepted`` tokens each."""
    c = SpecCounts()
    for a in accepted:
        c.record_draft(k, a)
    return {
        "category": category, "seed": 0, "batch": batch, "prompts": [f"{category}.jsonl:{batch}"],
        "counts": c.to_dict(), "request_counts": [c.to_dict()],
        "new_tokens": new, "elapsed_s": elapsed,
        "baseline_new_tokens": base_new, "baseline_elapsed_s": base_elapsed,
        "draft_step_s": draft_s, "target_step_s": target_s,
    }


def _report(accept_shift=0, draft_fp="sha256:d", temperatures=(0.0, 0.7),
            batch_sizes=(1, 2)) -> EvalReport:
    """A complete report: 2 categories x temperatures x k=3 x batch sizes, 6 units each."""
    k = 3
    results, overall = [], []
    for t in temperatures:
        for b in batch_sizes:
            entries = []
            for ci, category in enumerate(("chat", "code")):
                units = [
                    _unit(category, [min(k, (i + j + ci + accept_shift) % (k + 1))
                                     for j in range(5)], k, batch=i,
                          elapsed=1.0 + 0.1 * i, base_elapsed=2.0 + 0.05 * i * b)
                    for i in range(6)
                ]
                entries.append(summarize_entry(category, t, k, b, units, num_prompts=6 * b,
                                               models_info=MODELS))
            results += entries
            overall.append(summarize_entry(OVERALL, t, k, b,
                                           [u for e in entries for u in e.units],
                                           num_prompts=12 * b, models_info=MODELS, stratify=True))
    models = ReportModels.from_dict(json.loads(json.dumps(MODELS.to_dict())))
    models.draft.fingerprint = draft_fp
    bench = load_bench("quick").with_overrides(k=[k], temperatures=list(temperatures),
                                               batch_sizes=list(batch_sizes))
    return EvalReport(
        schema=SCHEMA, created="2025-01-01T00:00:00+00:00", complete=True,
        interrupted=False, bench=bench.to_dict(), bench_source=bench.source,
        overrides=bench.overrides, engine={"name": "synthetic"},
        environment=environment(), models=models, stop_token_ids=[2], notes=[],
        results=results, overall=overall,
    )


# ------------------------------------------------------------------------------------ entries


def test_entry_pools_units_and_uses_the_metric_definitions():
    units = [_unit("chat", [3, 1, 0], 3, batch=0), _unit("chat", [2, 2], 3, batch=1, new=20)]
    e = summarize_entry("chat", 0.0, 3, 1, units, num_prompts=2, models_info=MODELS)
    pooled = SpecCounts.total(SpecCounts.from_dict(u["counts"]) for u in units)
    c = e.counts
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (5, 15, 8)
    assert c.accepted_per_position == pooled.accepted_per_position == [4, 3, 1]
    assert e.acceptance_rate == metrics.acceptance_rate(pooled) == 8 / 15
    assert e.acceptance_length == metrics.acceptance_length(pooled) == 1 + 8 / 5
    assert e.conditional_position_acceptance == metrics.conditional_position_acceptance(pooled)
    assert e.alpha == metrics.alpha_from_acceptance_length(e.acceptance_length, 3)
    assert e.cost_ratio == pytest.approx(0.1) and e.cost_ratio_source == "measured"
    # No plain or verification step times in these units: c over the target steps, v assumed 1.
    assert e.verify_cost == 1.0 and e.verify_cost_source.startswith("assumed")
    assert e.predicted_speedup == metrics.speedup_at_length(e.acceptance_length, 3,
                                                            e.cost_ratio, 1.0)
    assert e.predicted_speedup == pytest.approx(metrics.predicted_speedup(e.alpha, 3,
                                                                          e.cost_ratio))
    assert e.break_even_acceptance_rate == pytest.approx((3 * 0.1 + 1.0 - 1.0) / 3)
    assert e.tokens_per_s == 52 / 2.0 and e.tokens_per_s_baseline == 64 / 4.0
    assert e.speedup == metrics.speedup(26.0, 16.0)
    assert e.per_request == metrics.per_request_means(
        [SpecCounts.from_dict(u["counts"]) for u in units])
    for m in stats.CI_METRICS:
        lo, hi = e.ci95[m]
        assert lo <= getattr(e, m) <= hi


def test_cost_ratio_falls_back_to_parameters_then_to_nothing():
    units = [_unit("chat", [1], 2, draft_s=None, target_s=None)]
    e = summarize_entry("chat", 0.0, 2, 1, units, num_prompts=1, models_info=MODELS)
    assert e.cost_ratio == 0.1 and e.cost_ratio_source == "parameter ratio"
    none = summarize_entry("chat", 0.0, 2, 1, units, num_prompts=1,
                           models_info=ReportModels(target=MODELS.target, draft=None))
    assert none.cost_ratio is None and none.predicted_speedup is None
    assert none.cost_ratio_source.startswith("unavailable")


def test_no_baseline_means_no_speedup_and_a_reason():
    units = [dict(_unit("chat", [1, 2], 2), baseline_new_tokens=None, baseline_elapsed_s=None)]
    e = summarize_entry("chat", 0.0, 2, 1, units, num_prompts=1, models_info=MODELS,
                        supports_baseline=False)
    assert e.speedup is None and e.ci95["speedup"] is None
    assert "baseline" in e.speedup_note
    assert e.acceptance_rate == 0.75


# ------------------------------------------------------------------------------------ stats


def test_bootstrap_is_deterministic_and_degenerate_for_identical_units():
    same = [_unit("chat", [2, 1], 3, batch=i) for i in range(5)]
    assert stats.metric_ci(same, "acceptance_rate") == [0.5, 0.5]
    assert stats.metric_ci(same[:1], "acceptance_rate") is None  # one unit: no interval
    varied = [_unit("chat", [i % 4, 1], 3, batch=i) for i in range(8)]
    assert stats.metric_ci(varied, "acceptance_length") == stats.metric_ci(
        varied, "acceptance_length")
    lo, hi = stats.metric_ci(varied, "acceptance_length")
    assert lo < stats.pooled_metric(varied, "acceptance_length") < hi


def test_speedup_interval_is_paired():
    # Machine drift slows unit i's speculative and plain run alike: the ratio never moves.
    drifting = [_unit("chat", [1], 2, batch=i, elapsed=1.0 * (1 + i), base_elapsed=3.0 * (1 + i))
                for i in range(8)]
    lo, hi = stats.metric_ci(drifting, "speedup")
    assert lo == pytest.approx(3.0) and hi == pytest.approx(3.0)


def test_overall_interval_is_stratified_by_category():
    units = [_unit("chat", [3], 3, batch=i) for i in range(4)]
    units += [_unit("code", [0], 3, batch=i) for i in range(4)]
    # Within each category every unit is the same, so a stratified resample cannot move.
    assert stats.metric_ci(units, "acceptance_rate", stratify=True) == [0.5, 0.5]
    lo, hi = stats.metric_ci(units, "acceptance_rate", stratify=False)
    assert lo < 0.5 < hi


# ------------------------------------------------------------------------------------ files


def test_write_report_files_and_load_back(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["report.json", "report.md", ACCEPTANCE_PNG, SPEEDUP_PNG])
    for name in (ACCEPTANCE_PNG, SPEEDUP_PNG):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        import matplotlib.image

        image = matplotlib.image.imread(tmp_path / "out" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    loaded = load_report(tmp_path / "out")
    assert loaded.to_dict() == json.loads(json.dumps(report.to_dict()))
    assert load_report(paths["json"]).results[0].units == report.results[0].units

    md = paths["md"].read_text()
    assert "### Temperature 0" in md and "### Temperature 0.7" in md
    assert "| category | T | k | batch | alpha | tau [95% CI]" in md
    assert "| chat | 0 | 3 | 1 |" in md and "| overall | 0.7 | 3 | 2 |" in md
    assert "Metrics" in md and ACCEPTANCE_PNG in md


def test_summary_rows_put_overall_after_its_categories():
    rows = summary_rows(_report(temperatures=(0.0,), batch_sizes=(1, 2)))
    assert [(r["category"], r["batch"]) for r in rows] == [
        ("chat", "1"), ("code", "1"), ("overall", "1"),
        ("chat", "2"), ("code", "2"), ("overall", "2"),
    ]
    assert all(isinstance(v, str) for r in rows for v in r.values())
    assert "[" in rows[0]["tau [95% CI]"]


def test_load_report_errors(tmp_path):
    with pytest.raises(DspecError, match="does not exist"):
        load_report(tmp_path / "nope.json")
    truncated = tmp_path / "t.json"
    truncated.write_text(json.dumps(_report().to_dict())[:500])
    with pytest.raises(DspecError, match="not valid JSON"):
        load_report(truncated)
    other = tmp_path / "o.json"
    other.write_text(json.dumps({"schema": "something-else"}))
    with pytest.raises(DspecError, match="schema"):
        load_report(other)


def _write(path, report: dict):
    path.write_text(json.dumps(report))
    return path


def test_load_report_refuses_malformed_parts(tmp_path):
    good = _report().to_dict()
    for edit, needle in (
        (lambda d: d.update(results={}), "has no valid 'results'"),
        (lambda d: d.pop("models"), "has no valid 'models'"),
        (lambda d: d.update(complete="yes"), "has no valid 'complete'"),
        (lambda d: d["results"][1].pop("k"), r"results\[1\] has no valid 'k'"),
        (lambda d: d["overall"][0].update(temperature="hot"),
         r"overall\[0\] has no valid 'temperature'"),
        (lambda d: d["results"][0].pop("num_drafts"), r"results\[0\] has no valid counts"),
        (lambda d: d["models"].update(draft={"params": "many"}), "models.draft has no valid"),
    ):
        bad = json.loads(json.dumps(good))
        edit(bad)
        with pytest.raises(DspecError, match=needle) as e:
            load_report(_write(tmp_path / "bad.json", bad))
        assert "\n" not in str(e.value) and "Fix:" in str(e.value)
    with pytest.raises(DspecError, match="is not a deepspec-bench/v1 report"):
        load_report(_write(tmp_path / "list.json", [good]))


def test_a_partial_report_loads_but_is_refused_where_completeness_is_required(tmp_path):
    good = _report().to_dict()
    assert load_report(_write(tmp_path / "r.json", good), require_complete=True).complete
    for partial, status, why in (
        ({"complete": False, "interrupted": True}, "interrupted", "the run was interrupted"),
        ({"complete": False, "error": "ValueError: x"}, "failed", r"the run failed \(ValueError"),
        ({"complete": False}, "incomplete", "the run has not finished"),
    ):
        path = _write(tmp_path / "r.json", {**good, **partial})
        assert load_report(path).status == status  # compare and inspection read it
        with pytest.raises(DspecError, match=f"report {path} is partial: {why}") as e:
            load_report(path, require_complete=True)
        assert "Fix:" in str(e.value)


def test_report_round_trips_through_its_dict_in_file_order():
    d = json.loads(json.dumps(_report().to_dict()))
    again = EvalReport.from_dict(d).to_dict()
    assert json.dumps(again) == json.dumps(d)  # the same keys in the same order
    entry = ReportEntry.from_dict(d["results"][0])
    assert entry.to_dict() == d["results"][0]


def test_accessors_find_entries_and_fingerprints():
    report = _report(temperatures=(0.0, 0.7), batch_sizes=(1, 2))
    e = report.entry(k=3, temperature=0.7, batch_size=2)
    assert e is report.overall[-1] and e.category == OVERALL
    chat = report.entry(k=3, temperature=0, batch_size=1, category="chat")
    assert chat is report.results[0] and chat.key == ("chat", 0.0, 3, 1)
    assert report.entry(k=4, temperature=0.0, batch_size=1) is None
    assert report.entries() == report.results + report.overall
    assert (report.target_fingerprint, report.draft_fingerprint) == ("sha256:t", "sha256:d")
    assert (report.bench_name, report.engine_name, report.status) == (
        "quick", "synthetic", "complete")


def test_json_writes_are_atomic_and_finite(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic({"schema": SCHEMA, "x": float("nan"), "y": [float("inf"), 1.5]}, path)
    assert json.loads(path.read_text()) == {"schema": SCHEMA, "x": None, "y": [None, 1.5]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ------------------------------------------------------------------------------------ compare


def test_compare_with_itself_shows_no_difference():
    report = _report()
    rows = compare_reports(report, report)
    assert len(rows) == 3 * (len(report.results) + len(report.overall))
    for r in rows:
        assert r["difference"] == 0.0
        assert r["ci95"][0] <= 0.0 <= r["ci95"][1]
        assert not r["significant"]
        assert r["notes"] == []
    assert render_comparison(rows).row_count == len(rows)


def test_compare_flags_a_real_difference_and_notes_the_other_draft():
    a = _report()
    b = _report(accept_shift=0, draft_fp="sha256:other").to_dict()
    for e in b["results"] + b["overall"]:  # B accepted every token
        for u in e["units"]:
            c = SpecCounts()
            for _ in range(u["counts"]["num_drafts"]):
                c.record_draft(3, 3)
            u["counts"] = c.to_dict()
        pooled = SpecCounts.total(SpecCounts.from_dict(u["counts"]) for u in e["units"])
        e.update(metrics.summarize(pooled))
    rows = compare_reports(a, EvalReport.from_dict(b))
    acc = [r for r in rows if r["metric"] == "acceptance_rate"]
    assert acc and all(r["b"] == 1.0 and r["difference"] > 0 and r["significant"] for r in acc)
    assert all(r["ci95"][0] > 0 for r in acc)
    assert any("drafts differ" in n for n in rows[0]["notes"])
    speed = [r for r in rows if r["metric"] == "speedup"]
    assert all(r["difference"] == 0.0 and not r["significant"] for r in speed)


def test_compare_needs_shared_entries():
    with pytest.raises(DspecError, match="share no"):
        compare_reports(_report(temperatures=(0.0,)), _report(temperatures=(1.0,)))


def test_compare_pairs_units_of_the_same_prompts():
    """Two drafts on the same prompts: B accepts one more token on every prompt. The paired
    interval excludes 0; resampled independently the prompt-to-prompt spread hides it."""
    def units(extra):
        # Prompts of very different difficulty (0 .. 5 accepted of 3 drafts x k=3), B +1 each.
        return [_unit("chat", [min(3, a + extra)] + [0, 0], 3, batch=i)
                for i, a in enumerate([0, 0, 1, 1, 2, 2, 0, 1])]

    a, b = units(0), units(1)
    assert stats.paired_units(a, b) is not None
    paired = stats.metric_diff_ci(a, b, "acceptance_rate", stratify=False)
    independent = stats.metric_diff_ci(a, b, "acceptance_rate", stratify=False, paired=False)
    assert paired[0] > 0 and independent[0] <= paired[0]
    assert independent[1] - independent[0] > paired[1] - paired[0]
    # Other prompts: no pairing.
    other = [dict(u, prompts=[f"x:{i}"]) for i, u in enumerate(b)]
    assert stats.paired_units(a, other) is None
    with pytest.raises(ValueError):
        stats.metric_diff_ci(a, other, "acceptance_rate", paired=True)
