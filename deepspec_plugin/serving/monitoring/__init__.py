"""The serving plugin's Prometheus rules and Grafana dashboard, and their queries as plain text.

``alerts.yml`` holds the recording and alerting rules, ``dashboard.json`` the dashboard. The
functions here let tests (and operators) run the dashboard's queries outside Grafana: Grafana
variables are replaced by concrete values, which gives valid PromQL for ``promtool check rules``
or a real Prometheus. Standard library only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from deepspec_plugin.errors import DspecError

ALERTS_PATH = Path(__file__).with_name("alerts.yml")
DASHBOARD_PATH = Path(__file__).with_name("dashboard.json")

# Grafana's built-in interval variables, as Grafana would fill them for a 1h range at a 1m
# step. Override them through ``substitutions`` (the *_s / *_ms forms do not follow).
BUILTIN_SUBSTITUTIONS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__interval_ms": "60000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}
# "All" for a dashboard's own template variables: they are only used inside =~ matchers.
TEMPLATE_VARIABLE_DEFAULT = ".*"

# $name, ${name}, ${name:format} and the deprecated [[name]] / [[name:format]].
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def load_dashboard(path: Path = DASHBOARD_PATH) -> dict:
    """The dashboard as a dict."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DspecError(f"cannot read the Grafana dashboard {path}: {e}",
                         "reinstall deepspec-plugin or restore the file") from e


def iter_panels(dashboard: dict):
    """Every panel, those inside (collapsed) rows included; rows themselves are skipped."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def template_variables(dashboard: dict) -> list[str]:
    """Names of the dashboard's template variables."""
    return [v["name"] for v in dashboard.get("templating", {}).get("list", [])]


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with every Grafana variable replaced from ``values``; unknown ones are an error."""

    def replace(match: re.Match) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise DspecError(f"the query {expr!r} uses the variable ${name}, which has no value",
                             f"pass substitutions={{{name!r}: ...}}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def variable_values(dashboard: dict, substitutions: dict[str, str] | None = None) -> dict[str, str]:
    """A value for every variable the dashboard's queries may use: its template variables as
    ``.*``, Grafana's interval variables as ``BUILTIN_SUBSTITUTIONS``; ``substitutions`` win."""
    values = dict(BUILTIN_SUBSTITUTIONS)
    values.update({name: TEMPLATE_VARIABLE_DEFAULT for name in template_variables(dashboard)})
    values.update(substitutions or {})
    return values


def dashboard_queries(
    dashboard: dict | None = None, substitutions: dict[str, str] | None = None
) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, with the variables substituted.

    Template variables default to ``.*`` (Grafana's "All"), interval variables to
    ``BUILTIN_SUBSTITUTIONS``; ``substitutions`` overrides either (e.g. ``{"model_name":
    "my-model", "__rate_interval": "30s"}``).
    """
    dashboard = load_dashboard() if dashboard is None else dashboard
    values = variable_values(dashboard, substitutions)
    queries = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((panel.get("title", ""), substitute(target["expr"], values)))
    return queries


def queries_as_rules_file(queries: list[tuple[str, str]]) -> str:
    """A Prometheus rules file with one recording rule per query, for ``promtool check rules``.

    Written by hand (no YAML library): each expression is a JSON string, which YAML reads as a
    double-quoted scalar.
    """
    lines = ["groups:", "  - name: deepspec-dashboard-queries", "    rules:"]
    for i, (title, expr) in enumerate(queries, 1):
        lines.append(f"      # {' '.join(title.split())}")
        lines.append(f"      - record: deepspec_dashboard:query_{i:02d}")
        lines.append(f"        expr: {json.dumps(expr)}")
    if not queries:
        lines[-1] = "    rules: []"
    return "\n".join(lines) + "\n"
