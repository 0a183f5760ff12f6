"""Two reports side by side: is B's acceptance or speedup really different from A's?

Entries are matched by (category, temperature, k, batch size), the pooled ``overall`` entries
included. For the acceptance rate, the acceptance length and the measured speedup, each row gives
A, B, the difference B - A and its 95% bootstrap interval over the reports' units
(:func:`.stats.metric_diff_ci`): paired by prompt when both reports measured the same prompts
(two drafts on one bench), independent otherwise (``paired`` says which); the difference is
``significant`` when the interval excludes 0. Differences in what was compared (target, draft,
bench, engine) are noted.
"""

from __future__ import annotations

from deepspec_plugin.bench import stats
from deepspec_plugin.bench.report_schema import OVERALL, EvalReport, ReportEntry
from deepspec_plugin.errors import DspecError

SHORT_NAMES = {"acceptance_rate": "acceptance", "acceptance_length": "tau", "speedup": "speedup"}


def _entries(report: EvalReport) -> dict[tuple, ReportEntry]:
    return {e.key: e for e in report.entries()}


def comparison_notes(a: EvalReport, b: EvalReport) -> list[str]:
    """What differs between the two runs besides the numbers."""
    notes = []
    for role in ("target", "draft"):
        ma, mb = getattr(a.models, role), getattr(b.models, role)
        fa, fb = ma.fingerprint if ma else None, mb.fingerprint if mb else None
        if fa != fb:
            notes.append(f"{role}s differ: A {fa or 'none'} ({_path(ma)}), "
                         f"B {fb or 'none'} ({_path(mb)})")
    if a.bench != b.bench:
        keys = sorted(k for k in set(a.bench) | set(b.bench) if a.bench.get(k) != b.bench.get(k))
        notes.append(f"benches differ in {', '.join(keys)}")
    if a.engine_name != b.engine_name:
        notes.append(f"engines differ: A {a.engine_name}, B {b.engine_name}")
    for name, r in (("A", a), ("B", b)):
        if not r.complete:
            notes.append(f"report {name} is partial (complete: false)")
    only_a = sorted(set(_entries(a)) - set(_entries(b)), key=str)
    only_b = sorted(set(_entries(b)) - set(_entries(a)), key=str)
    if only_a:
        notes.append(f"{len(only_a)} entries only in A, e.g. {_key_text(only_a[0])}")
    if only_b:
        notes.append(f"{len(only_b)} entries only in B, e.g. {_key_text(only_b[0])}")
    return notes


def _path(model) -> str:
    return model.path if model and model.path is not None else "-"


def _key_text(key: tuple) -> str:
    c, t, k, b = key
    return f"{c} T={t:g} k={k} batch={b}"


def compare_reports(a: EvalReport, b: EvalReport) -> list[dict]:
    """One row per matched entry and metric; every row carries the comparison's ``notes``."""
    ea, eb = _entries(a), _entries(b)
    keys = [key for key in ea if key in eb]
    if not keys:
        raise DspecError(
            "the two reports share no (category, temperature, k, batch size) entry",
            "compare reports of the same bench (or overlapping overrides)",
        )
    notes = comparison_notes(a, b)
    rows = []
    for key in keys:
        x, y = ea[key], eb[key]
        category, temperature, k, batch_size = key
        for metric in stats.CI_METRICS:
            va, vb = getattr(x, metric), getattr(y, metric)
            diff = vb - va if va is not None and vb is not None else None
            ci, paired = None, False
            if diff is not None and x.units and y.units:
                paired = stats.paired_units(x.units, y.units) is not None
                ci = stats.metric_diff_ci(x.units, y.units, metric,
                                          stratify=category == OVERALL)
            rows.append({
                "category": category,
                "temperature": temperature,
                "k": k,
                "batch_size": batch_size,
                "metric": metric,
                "a": va,
                "b": vb,
                "difference": diff,
                "ci95": ci,
                "paired": paired,
                "significant": bool(ci is not None and (ci[0] > 0 or ci[1] < 0)),
                "notes": notes,
            })
    return rows


def render_comparison(rows: list[dict]):
    """A rich Table of the rows; the comparison's notes go into its caption."""
    from rich.table import Table

    def num(v, digits=3):
        return "-" if v is None else f"{v:.{digits}f}"

    notes = list(rows[0]["notes"]) if rows else []
    if rows and any(r["paired"] for r in rows):
        notes.append("intervals paired by prompt (both reports measured the same prompts)")
    table = Table(title="B vs A", caption="\n".join(notes) if notes else None)
    for col in ("category", "T", "k", "batch", "metric", "A", "B", "B - A [95% CI]", "significant"):
        table.add_column(col, justify="left" if col in ("category", "metric") else "right")
    for r in rows:
        diff = num(r["difference"], 4)
        if r["ci95"]:
            diff += f" [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]"
        table.add_row(
            r["category"], f"{r['temperature']:g}", str(r["k"]), str(r["batch_size"]),
            SHORT_NAMES.get(r["metric"], r["metric"]), num(r["a"]), num(r["b"]), diff,
            "[bold]yes[/bold]" if r["significant"] else "no",
        )
    return table
