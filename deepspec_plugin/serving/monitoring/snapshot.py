"""A picture of the Grafana dashboard drawn from a real Prometheus, without Grafana.

No Grafana server runs on this project's machines, so the README's dashboard picture is drawn
here: every panel of ``dashboard.json`` at its grid position, each query run against a real
Prometheus (``/api/v1/query_range`` for time series, ``/api/v1/query`` at the end for stats and
the table), legends from the panels' ``legendFormat``. It shows the same data a Grafana would, in
matplotlib's style, not Grafana's. matplotlib is needed (the ``bench`` extra).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from deepspec_plugin.openai_http import Client
from deepspec_plugin.serving.monitoring import (
    iter_panels,
    load_dashboard,
    substitute,
    variable_values,
)

GRID_COLUMNS = 24  # Grafana's grid: 24 columns; a row unit is about 30 px
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass(frozen=True)
class Series:
    legend: str
    times: list[float]  # unix seconds
    values: list[float]


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: ``{{label}}`` replaced by the series' label value."""
    return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), fmt or "").strip()


class PrometheusReader:
    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.client = Client(timeout=timeout, fix="start Prometheus or check its URL",
                             name="Prometheus")

    def _get(self, path: str, params: dict) -> list[dict]:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        body = self.client.get(url).check("check the query").json()
        return body["data"]["result"]

    def instant(self, expr: str, at: float) -> list[dict]:
        return self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", {"query": expr, "start": f"{start:.3f}",
                                                 "end": f"{end:.3f}", "step": f"{step:g}"})


def render_dashboard(prometheus_url: str, out: str | Path, *, start: float, end: float,
                     step: float = 1.0, rate_interval: str = "15s",
                     substitutions: dict[str, str] | None = None,
                     dashboard: dict | None = None, title: str | None = None) -> Path:
    """Draw every panel of the dashboard from Prometheus's data between ``start`` and ``end``
    (unix seconds) into the PNG ``out``; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = load_dashboard() if dashboard is None else dashboard
    span = max(int(end - start), 1)
    intervals = {"__rate_interval": rate_interval, "__interval": f"{step:g}s",
                 "__range": f"{span}s", "__range_s": str(span), "__range_ms": str(span * 1000)}
    values = variable_values(dashboard, {**intervals, **(substitutions or {})})
    prom = PrometheusReader(prometheus_url)
    panels = list(iter_panels(dashboard))
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    fig = plt.figure(figsize=(16, rows * 0.42))
    fig.suptitle(title or dashboard.get("title", "dashboard"), x=0.01, y=0.995, ha="left",
                 fontsize=13)
    for panel in panels:
        g = panel["gridPos"]
        # [left, bottom, width, height] in figure fractions, with a margin for titles and ticks.
        top = 0.97  # below the figure's title
        box = [g["x"] / GRID_COLUMNS + 0.035, top * (1 - (g["y"] + g["h"]) / rows) + 0.035,
               g["w"] / GRID_COLUMNS - 0.05, top * g["h"] / rows - 0.075]
        ax = fig.add_axes(box)
        ax.set_title(panel.get("title", ""), fontsize=10, loc="left")
        queries = [(t.get("legendFormat", ""), substitute(t["expr"], values))
                   for t in panel.get("targets", []) if t.get("expr")]
        kind = panel.get("type")
        if kind == "timeseries":
            _timeseries(ax, prom, queries, start, end, step, panel)
        elif kind == "stat":
            _stat(ax, prom, queries, end, panel)
        else:
            _table(ax, prom, queries, end)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _timeseries(ax, prom, queries, start, end, step, panel) -> None:
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    drawn = 0
    for fmt, expr in queries:
        for r in prom.range(expr, start, end, step):
            times, ys = break_at_gaps(r["values"], start, step)
            ax.plot(times, ys, label=legend(fmt, r["metric"]) or expr[:40], linewidth=1.4)
            drawn += 1
    if defaults.get("min") is not None:
        ax.set_ylim(bottom=defaults["min"])
    if defaults.get("max") is not None:
        ax.set_ylim(top=defaults["max"])
    ax.set_xlim(0, end - start)
    ax.set_xlabel("seconds since the start", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def break_at_gaps(points: list, start: float, step: float) -> tuple[list[float], list[float]]:
    """Times (from ``start``) and values, with a break wherever Prometheus had no sample (a
    restarted server, say) instead of a line drawn across the gap."""
    times: list[float] = []
    ys: list[float] = []
    for t, v in points:
        t = float(t) - start
        if times and t - times[-1] > 2.5 * step:
            times.append(times[-1] + step)
            ys.append(float("nan"))
        times.append(t)
        ys.append(float(v))
    return times, ys


def _stat(ax, prom, queries, end, panel) -> None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    texts = []
    for fmt, expr in queries:
        for r in prom.instant(expr, end):
            v = float(r["value"][1])
            shown = f"{v:.1%}" if unit == "percentunit" else f"{v:.3g}"
            texts.append(f"{shown}  {legend(fmt, r['metric'])}".strip())
    ax.axis("off")
    ax.text(0.02, 0.45, "\n".join(texts) or "no data", fontsize=16 if len(texts) < 2 else 11,
            va="center", transform=ax.transAxes)


def _table(ax, prom, queries, end) -> None:
    ax.axis("off")
    lines = []
    for _, expr in queries:
        for r in prom.instant(expr, end):
            lines.append("  ".join(f"{k}={v}" for k, v in sorted(r["metric"].items())
                                   if k not in ("__name__", "instance", "job")))
    ax.text(0.0, 0.9, "\n".join(lines) or "no data", fontsize=7, va="top", family="monospace",
            transform=ax.transAxes, wrap=True)
