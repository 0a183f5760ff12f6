"""The serving plugin's alert rules and Grafana dashboard, checked with the real promtool.

promtool (Debian's prometheus package; scripts/setup.sh installs it) parses and type-checks the
rules, runs the unit tests in tests/promtool/alerts_test.yml and evaluates the dashboard's queries
on series shaped like the plugin's. Without promtool these tests skip, unless
DSPEC_REQUIRE_TOOLS=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from helpers import run_promtool

from deepspec_plugin.errors import DspecError
from deepspec_plugin.serving.monitoring import (
    ALERTS_PATH,
    DASHBOARD_PATH,
    dashboard_queries,
    iter_panels,
    load_dashboard,
    queries_as_rules_file,
)

REPO = Path(__file__).resolve().parents[1]
ALERTS_TEST_PATH = Path(__file__).with_name("promtool") / "alerts_test.yml"
RULE_FILES_LINE = "  - ../../deepspec_plugin/serving/monitoring/alerts.yml"


# Everything the plugin exposes (deepspec_plugin/serving/telemetry.py).
EXPOSED_METRICS = {
    "deepspec_drafts_total",
    "deepspec_draft_tokens_total",
    "deepspec_accepted_tokens_total",
    "deepspec_accepted_tokens_per_position_total",
    "deepspec_generation_tokens_total",
    "deepspec_plugin_errors_total",
    "deepspec_acceptance_rate",
    "deepspec_acceptance_length",
    "deepspec_position_acceptance_rate",
    "deepspec_predicted_speedup",
    "deepspec_break_even_acceptance_rate",
    "deepspec_recommended_k",
    "deepspec_baseline_speedup",
    "deepspec_baseline_acceptance_rate",
    "deepspec_baseline_acceptance_length",
    "deepspec_baseline_position_acceptance_rate",
    "deepspec_drift_alarm",
    "deepspec_drift_score",
    "deepspec_draft_info",
    "deepspec_target_fingerprint_mismatch",
}

_PROMQL_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                    "group_right", "offset", "bool", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: what is left once strings, comments, label
    matchers, ranges, grouping label lists, functions and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"#[^\n]*", "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    # "sum by (a) (x)" -> "sum (x)": the aggregation then reads as a call.
    expr = re.sub(r"\b(by|without)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\b(on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.])[A-Za-z_:][\w:]*", expr):
        word = match.group(0)
        if word.lower() in _PROMQL_KEYWORDS or expr[match.end():].lstrip().startswith("("):
            continue  # a keyword or a function call
        names.add(word)
    return names


def recording_rule_names() -> set[str]:
    return set(re.findall(r"^\s*- record:\s*(\S+)", ALERTS_PATH.read_text(), re.M))


def load_rules() -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads alerts.yml here (pip install pyyaml)")
    return [rule for group in yaml.safe_load(ALERTS_PATH.read_text())["groups"]
            for rule in group["rules"]]


# --- the helpers of these tests --------------------------------------------------------------


def test_metric_names_finds_selectors_only():
    expr = ('sum by (model_name) (rate(foo_total{kind="a b"}[5m])) / on (position) group_left () '
            'bar:ratio offset 10m > 0.8 * baz # qux\n or label_replace(vector(1e3), "x", "y", '
            '"", "")')
    assert metric_names(expr) == {"foo_total", "bar:ratio", "baz"}


def test_exposed_metrics_are_the_plugins():
    from deepspec_plugin.serving.telemetry import SPECS

    assert EXPOSED_METRICS == set(SPECS)


# --- alerts.yml -------------------------------------------------------------------------------


def test_alert_rules_pass_promtool_check():
    result = run_promtool("check", "rules", ALERTS_PATH)
    assert result.returncode == 0, result.stdout + result.stderr
    n_rules = len(re.findall(r"^\s*- (record|alert):", ALERTS_PATH.read_text(), re.M))
    assert f"SUCCESS: {n_rules} rules found" in result.stdout


def test_alert_rules_pass_their_promtool_unit_tests():
    result = run_promtool("test", "rules", ALERTS_TEST_PATH)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_groups_alerts_and_annotations():
    text = ALERTS_PATH.read_text()
    assert set(re.findall(r"^\s*- name:\s*(\S+)", text, re.M)) == {
        "deepspec-recording", "deepspec-alerts"}
    alerts = {rule["alert"]: rule for rule in load_rules() if "alert" in rule}
    assert set(alerts) == {"DeepSpecAcceptanceBelowBaseline", "DeepSpecDriftAlarm",
                           "DeepSpecTargetFingerprintMismatch", "DeepSpecPluginErrors",
                           "DeepSpecNoSpecDecodeTraffic", "DeepSpecBelowBreakEven"}
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert set(rule["annotations"]) >= {"summary", "description"}, name
        assert "Runbook:" in rule["annotations"]["description"], name
        assert "$value" in str(rule["annotations"]) or "query" in str(rule["annotations"]), name
    # The end-to-end test needs these two to fire at the first evaluation.
    assert alerts["DeepSpecDriftAlarm"]["for"] == "0m"
    assert alerts["DeepSpecTargetFingerprintMismatch"]["for"] == "0m"
    assert alerts["DeepSpecAcceptanceBelowBaseline"]["for"] == "15m"
    assert alerts["DeepSpecBelowBreakEven"]["for"] == "10m"


def test_alert_rules_use_only_exposed_metrics_and_their_own_recordings():
    known = EXPOSED_METRICS | recording_rule_names()
    for rule in load_rules():
        unknown = metric_names(rule["expr"]) - known
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_unit_tests_make_every_alert_fire_and_stay_silent():
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the promtool test file here")
    spec = yaml.safe_load(ALERTS_TEST_PATH.read_text())
    assert spec["rule_files"] == [RULE_FILES_LINE.strip(" -")]
    cases = [case for test in spec["tests"] for case in test.get("alert_rule_test", [])]
    for name in {rule["alert"] for rule in load_rules() if "alert" in rule}:
        mine = [case for case in cases if case["alertname"] == name]
        firing = [case for case in mine if case.get("exp_alerts")]
        assert firing, f"no case where {name} fires"
        assert any(not case.get("exp_alerts") for case in mine), f"no silent case for {name}"
        for case in firing:
            for alert in case["exp_alerts"]:
                assert alert["exp_labels"]["severity"], name
                assert set(alert["exp_annotations"]) == {"summary", "description"}, name


# Each mutation breaks one property that the unit tests pin; each must make them fail.
MUTATIONS = {
    "margin 0.8 -> 0.9 (m_near would fire)": (
        "0.8 * max by (model_name) (deepspec_baseline_acceptance_rate)",
        "0.9 * max by (model_name) (deepspec_baseline_acceptance_rate)"),
    "for 15m -> 5m (m_brief would fire)": ("for: 15m", "for: 5m"),
    "no traffic floor (m_quiet would fire)": ("rate10m * 600 >= 1000\n        for: 15m",
                                              "rate10m * 600 >= 0\n        for: 15m"),
    "break-even: no traffic floor (m_quiet would fire)": (
        "rate10m * 600 >= 1000\n        for: 10m", "rate10m * 600 >= 0\n        for: 10m"),
    "break-even: best engine instead of worst (m_worst silent)": (
        "min by (model_name) (deepspec_predicted_speedup", "max by (model_name) "
        "(deepspec_predicted_speedup"),
    "break-even: any window (m_short would fire)": (
        'deepspec_predicted_speedup{window="5m"}) < 1', "deepspec_predicted_speedup) < 1"),
    "break-even: for 10m -> 5m (fires at 9m)": (
        "rate10m * 600 >= 1000\n        for: 10m", "rate10m * 600 >= 1000\n        for: 4m"),
    "mean of engine rates instead of pooled": (
        "sum by (model_name) (rate(deepspec_accepted_tokens_total[10m]))",
        "avg by (model_name) (rate(deepspec_accepted_tokens_total[10m])) * 2"),
    "drift alarm on any value (m_ok would fire)": (
        "max by (model_name) (deepspec_drift_alarm) == 1",
        "max by (model_name) (deepspec_drift_alarm) >= 0"),
    "mismatch on any value (m_good would fire)": (
        "max by (model_name) (deepspec_target_fingerprint_mismatch) == 1",
        "max by (model_name) (deepspec_target_fingerprint_mismatch) >= 0"),
    "errors without the new-series term (record would not fire)": (
        "          or\n          sum by (kind) (deepspec_plugin_errors_total unless "
        "deepspec_plugin_errors_total offset 10m) > 0\n", ""),
    "no-speculation alert without for (fires at 5m)": (
        "    model_name:deepspec_draft_tokens:rate10m > 0\n        for: 5m",
        "    model_name:deepspec_draft_tokens:rate10m > 0\n        for: 0m"),
}


@pytest.mark.parametrize("mutation", MUTATIONS, ids=list(MUTATIONS))
def test_unit_tests_catch_a_changed_rule(tmp_path, mutation):
    old, new = MUTATIONS[mutation]
    rules = ALERTS_PATH.read_text()
    assert rules.count(old) == 1, f"alerts.yml changed; update the mutation {mutation!r}"
    (tmp_path / "alerts.yml").write_text(rules.replace(old, new))
    unit_tests = ALERTS_TEST_PATH.read_text()
    assert RULE_FILES_LINE in unit_tests
    (tmp_path / "alerts_test.yml").write_text(
        unit_tests.replace(RULE_FILES_LINE, f"  - {tmp_path / 'alerts.yml'}"))
    assert run_promtool("check", "rules", tmp_path / "alerts.yml").returncode == 0
    result = run_promtool("test", "rules", tmp_path / "alerts_test.yml")
    assert result.returncode != 0, result.stdout
    assert "FAILED" in result.stdout + result.stderr


# --- dashboard.json ---------------------------------------------------------------------------


def test_dashboard_is_grafana_json_with_its_variables():
    dashboard = json.loads(DASHBOARD_PATH.read_text())
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"] and dashboard["description"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["query"] == "label_values(deepspec_draft_info, model_name)"
    assert variables["draft"]["query"] == (
        'label_values(deepspec_draft_info{model_name=~"$model_name"}, draft)')
    panels = list(iter_panels(dashboard))
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert {t["refId"] for t in panel["targets"]} == {
            chr(ord("A") + i) for i in range(len(panel["targets"]))}, panel["title"]
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in ("acceptance rate vs baseline", "acceptance length vs baseline", "per-position",
                  "tokens per second", "drift score", "drift alarm", "fingerprint mismatch",
                  "draft info", "plugin errors"):
        assert topic in titles


def test_dashboard_rates_use_the_grafana_intervals():
    for panel in iter_panels(load_dashboard()):
        for target in panel["targets"]:
            ranges = re.findall(r"\[([^\]]*)\]", target["expr"])
            assert ranges and set(ranges) <= {"$__rate_interval", "$__range"} or (
                not re.search(r"\b(rate|increase)\(", target["expr"])), target["expr"]


def test_dashboard_queries_substitute_the_variables():
    dashboard = load_dashboard()
    n_targets = sum(len(p["targets"]) for p in iter_panels(dashboard))
    queries = dashboard_queries()
    assert len(queries) == n_targets
    assert not any("$" in expr or "[[" in expr for _, expr in queries)
    assert any('model_name=~".*"' in expr for _, expr in queries)
    assert any("[1m]" in expr for _, expr in queries)
    chosen = dashboard_queries(dashboard, {"model_name": "m", "__rate_interval": "30s"})
    assert any('model_name=~"m"' in expr and "[30s]" in expr for _, expr in chosen)
    assert not any('model_name=~".*"' in expr for _, expr in chosen)


def test_dashboard_queries_handle_every_variable_form_and_refuse_unknown_ones():
    dashboard = {"templating": {"list": [{"name": "model_name"}]}, "panels": [
        {"type": "row", "title": "r", "panels": [{"title": "p", "targets": [
            {"expr": 'x{a=~"${model_name:regex}", b=~"[[model_name]]"}[$__range]'}]}]}]}
    assert dashboard_queries(dashboard) == [("p", 'x{a=~".*", b=~".*"}[1h]')]
    dashboard["panels"][0]["panels"][0]["targets"][0]["expr"] = "x{a=~\"$elsewhere\"}"
    with pytest.raises(DspecError, match="elsewhere"):
        dashboard_queries(dashboard)


def test_dashboard_queries_pass_promtool_check(tmp_path):
    queries = dashboard_queries()
    path = tmp_path / "queries.yml"
    path.write_text(queries_as_rules_file(queries))
    result = run_promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_queries_as_rules_file_fails_promtool_on_a_bad_query(tmp_path):
    path = tmp_path / "queries.yml"
    path.write_text(queries_as_rules_file([("bad", "rate(deepspec_drafts_total)")]))
    assert run_promtool("check", "rules", path).returncode != 0


def test_dashboard_queries_use_only_exposed_metrics_and_recordings():
    known = EXPOSED_METRICS | recording_rule_names()
    for title, expr in dashboard_queries():
        assert metric_names(expr), (title, expr)
        assert not metric_names(expr) - known, (title, expr)


def _plugin_like_series() -> list[dict]:
    """Series shaped like the plugin's exposition for one model on two engines with k = 2,
    20 minutes of traffic, a baseline, no drift, no plugin error. Rates per second: drafts 3,
    draft tokens 6, accepted 3 (positions 2.25 and 0.75): pooled acceptance 0.5, length 2."""
    m = 'model_name="m"'
    series = []

    def add(name: str, labels: str, values: str) -> None:
        series.append({"series": f"{name}{{{labels}}}", "values": values})

    for engine, per_minute in (("0", (120, 240, 135, 105, 30, 255)),
                               ("1", (60, 120, 45, 30, 15, 105))):
        e = f'{m},engine="{engine}"'
        drafts, tokens, accepted, pos0, pos1, generated = per_minute
        add("deepspec_drafts_total", e, f"0+{drafts}x20")
        add("deepspec_draft_tokens_total", e, f"0+{tokens}x20")
        add("deepspec_accepted_tokens_total", e, f"0+{accepted}x20")
        add("deepspec_accepted_tokens_per_position_total", f'{e},position="0"', f"0+{pos0}x20")
        add("deepspec_accepted_tokens_per_position_total", f'{e},position="1"', f"0+{pos1}x20")
        add("deepspec_generation_tokens_total", e, f"0+{generated}x20")
        add("deepspec_drift_alarm", e, "0x20")
        add("deepspec_drift_score", e, "0.1x20")
        for window in ("1m", "5m", "1h"):
            w = f'{e},window="{window}"'
            add("deepspec_acceptance_rate", w, "0.5x20")
            add("deepspec_acceptance_length", w, "2x20")
            add("deepspec_position_acceptance_rate", f'{w},position="0"', "0.75x20")
            add("deepspec_position_acceptance_rate", f'{w},position="1"', "0.25x20")
            add("deepspec_predicted_speedup", w, "1.3x20")
            add("deepspec_break_even_acceptance_rate", w, "0.2x20")
            add("deepspec_recommended_k", w, "2x20")
    add("deepspec_baseline_speedup", m, "1.4x20")
    add("deepspec_baseline_acceptance_rate", m, "0.55x20")
    add("deepspec_baseline_acceptance_length", m, "2.1x20")
    add("deepspec_baseline_position_acceptance_rate", f'{m},position="0"', "0.8x20")
    add("deepspec_baseline_position_acceptance_rate", f'{m},position="1"', "0.3x20")
    add("deepspec_target_fingerprint_mismatch", m, "0x20")
    add("deepspec_draft_info", f'{m},draft="acme/draft-a",revision="r1",method="eagle3",k="2",'
        'target="acme/target",target_fingerprint="aaaa",manifest_target_fingerprint="aaaa"',
        "1x20")
    return series


def test_dashboard_queries_return_data_on_plugin_series(tmp_path):
    """Every panel query returns data for a healthy plugin with traffic (the errors panel its
    0), and the pooled panels compute the definitions of deepspec_plugin.metrics."""
    queries = dashboard_queries()
    by_expr = {expr: title for title, expr in queries}
    cases = [{"expr": f"clamp_max(count({expr}), 1)", "eval_time": "20m",
              "exp_samples": [{"labels": "{}", "value": 1}]} for expr in by_expr]

    def only(title_start: str, needle: str) -> str:
        found = [e for e, t in by_expr.items() if t.startswith(title_start) and needle in e]
        assert len(found) == 1, (title_start, needle, found)
        return found[0]

    exact = [
        (only("Acceptance rate vs", "rate(deepspec_accepted"), '{model_name="m"}', 0.5),
        (only("Acceptance length vs", "rate(deepspec_accepted"), '{model_name="m"}', 2),
        (only("Plugin errors", "errors"), '{kind="none"}', 0),
    ]
    for expr, labels, value in exact:
        cases.append({"expr": expr, "eval_time": "20m",
                      "exp_samples": [{"labels": labels, "value": value}]})
    per_position = only("Per-position", "rate(deepspec_accepted")
    cases.append({"expr": per_position, "eval_time": "20m", "exp_samples": [
        {"labels": '{model_name="m",position="0"}', "value": 0.75},
        {"labels": '{model_name="m",position="1"}', "value": 0.25}]})
    # The draft variable scopes the panels: another draft's dashboard is empty.
    other_draft = [expr for title, expr in dashboard_queries(substitutions={"draft": "acme/other"})
                   if title == "Acceptance rate vs baseline"]
    cases.append({"expr": other_draft[0], "eval_time": "20m", "exp_samples": []})

    (tmp_path / "queries.yml").write_text(queries_as_rules_file(queries))
    spec = {"rule_files": ["queries.yml"], "evaluation_interval": "1m", "tests": [
        {"interval": "1m", "input_series": _plugin_like_series(), "promql_expr_test": cases}]}
    # JSON is YAML: promtool reads it as is.
    (tmp_path / "queries_test.yml").write_text(json.dumps(spec, indent=1))
    result = run_promtool("test", "rules", tmp_path / "queries_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


# --- packaging ---------------------------------------------------------------------------------


def test_rules_and_dashboard_are_package_data():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["deepspec_plugin"]
    package = REPO / "deepspec_plugin"
    for path in (ALERTS_PATH, DASHBOARD_PATH):
        relative = path.relative_to(package)
        assert any(relative.match(p) for p in patterns), relative


def test_dashboard_snapshot_legends_and_gaps():
    from deepspec_plugin.serving.monitoring.snapshot import break_at_gaps, legend

    assert legend("{{model_name}} position {{ position }} live",
                  {"model_name": "m", "position": "2"}) == "m position 2 live"
    assert legend("", {"model_name": "m"}) == ""
    # A restarted server leaves a hole: the line breaks there instead of bridging it.
    times, ys = break_at_gaps([(100, "1"), (101, "2"), (110, "3")], start=100, step=1.0)
    assert times == [0, 1, 2, 10] and ys[:2] == [1.0, 2.0] and ys[2] != ys[2] and ys[3] == 3.0
