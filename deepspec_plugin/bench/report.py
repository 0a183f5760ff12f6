"""The evaluation report: report.json (the data), report.md (for people) and two plots.

``report.json`` holds everything, the raw per-unit numbers included, so that any number in the
Markdown or the plots (and any comparison of two reports) can be recomputed from it. Every file is
written into a temp file beside its destination and renamed into place. The report's layout and
its loader are :mod:`deepspec_plugin.bench.report_schema`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from deepspec_plugin.bench.report_schema import (
    REPORT_JSON,
    EvalReport,
    ReportEntry,
)
from deepspec_plugin.fileio import atomic_write_bytes, atomic_write_text

REPORT_MD = "report.md"
ACCEPTANCE_PNG = "acceptance_by_position.png"
SPEEDUP_PNG = "speedup_by_batch_size.png"
# The project README, where the metric definitions are written out (a dev checkout has it).
README = Path(__file__).resolve().parents[2] / "README.md"
METRICS_ANCHOR = "#metrics"


# ------------------------------------------------------------------------------------ files


def _finite(obj):
    """JSON has no NaN or infinity: such floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json_atomic(report: dict, path: str | Path) -> None:
    """``report`` (a JSON-ready dict) as indented JSON, NaN and infinity as null."""
    text = json.dumps(_finite(report), indent=1, allow_nan=False) + "\n"
    atomic_write_text(path, text)


def write_report(report: EvalReport, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and the two PNG plots into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / REPORT_JSON, "md": out / REPORT_MD,
        "acceptance_png": out / ACCEPTANCE_PNG, "speedup_png": out / SPEEDUP_PNG,
    }
    write_json_atomic(report.to_dict(), paths["json"])
    atomic_write_text(paths["md"], render_markdown(report, out))
    atomic_write_bytes(paths["acceptance_png"], plot_acceptance_by_position(report))
    atomic_write_bytes(paths["speedup_png"], plot_speedup_by_batch_size(report))
    return paths


# ------------------------------------------------------------------------------------ tables


def _num(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _with_ci(entry: ReportEntry, metric: str, digits: int = 3) -> str:
    v = getattr(entry, metric)
    if v is None:
        return "-"
    ci = entry.interval(metric)
    if not ci:
        return _num(v, digits)
    return f"{v:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _grouped(report: EvalReport) -> list[ReportEntry]:
    """Category entries, each (temperature, k, batch size) group followed by its overall."""
    from itertools import groupby

    def config(e: ReportEntry) -> tuple:
        return (e.temperature, e.k, e.batch_size)

    overall = {config(e): e for e in report.overall}
    rows = []
    for key, group in groupby(report.results, key=config):
        rows.extend(group)
        if key in overall:
            rows.append(overall[key])
    return rows


def summary_rows(report: EvalReport) -> list[dict[str, str]]:
    """One row of display strings per entry, in run order; keys are the column headers."""
    return _entry_rows(_grouped(report))


def _entry_rows(entries: list[ReportEntry]) -> list[dict[str, str]]:
    rows = []
    for e in entries:
        tps = _num(e.tokens_per_s, 1)
        if e.tokens_per_s_baseline is not None:
            tps += f" / {e.tokens_per_s_baseline:.1f}"
        rows.append({
            "category": e.category,
            "T": f"{e.temperature:g}",
            "k": str(e.k),
            "batch": str(e.batch_size),
            "alpha": _num(e.alpha),
            "tau [95% CI]": _with_ci(e, "acceptance_length", 2),
            "acceptance [95% CI]": _with_ci(e, "acceptance_rate"),
            "speedup [95% CI]": _with_ci(e, "speedup", 2),
            "predicted": _num(e.predicted_speedup, 2) + (
                f" ({e.static_batch_predicted_speedup:.2f} static)"
                if e.batch_size > 1 and e.static_batch_predicted_speedup is not None else ""),
            "c / v": (f"{e.cost_ratio:.3f} / {e.verify_cost:.2f}"
                      if e.cost_ratio is not None and e.verify_cost is not None else "-"),
            "break-even acceptance": _num(e.break_even_acceptance_rate),
            "tok/s spec / plain": tps,
        })
    return rows


def _md_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in rows]
    return lines


def render_markdown(report: EvalReport, out_dir: str | Path | None = None) -> str:
    bench, env, engine = report.bench, report.environment, report.engine
    lines = [f"# Speculative decoding report: bench `{bench['name']}`", ""]
    status = {"complete": "complete", "interrupted": "INTERRUPTED (partial)"}.get(
        report.status, "INCOMPLETE (partial)")
    lines += [f"Created {report.created or '?'} UTC; {status}.", ""]
    if bench.get("description"):
        lines += [bench["description"], ""]

    lines += ["## What was run", ""]
    for role, m in (("target", report.models.target), ("draft", report.models.draft)):
        if m:
            params = f"{m.params:,} parameters" if m.params else "parameters unknown"
            lines.append(f"- **{role}**: `{m.path}` ({params}), "
                         f"fingerprint `{m.fingerprint or 'unavailable'}`")
        else:
            lines.append(f"- **{role}**: none")
    lines.append(f"- **engine**: `{engine.get('name', '?')}` "
                 + ", ".join(f"{k}={v}" for k, v in engine.items() if k not in ("name", "engine")))
    cats = ", ".join(f"{n} ({c['num_prompts']} from {', '.join(Path(f).name for f in c['files'])})"
                     for n, c in bench["categories"].items())
    lines += [
        f"- **prompts**: {cats}; chat template {'on' if bench['chat_template'] else 'off'}, "
        f"up to {bench['max_turns']} turn(s), {bench['max_new_tokens']} new tokens per turn",
        f"- **grid**: temperatures {bench['temperatures']}, k {bench['k']}, "
        f"batch sizes {bench['batch_sizes']}, seeds {bench['seeds']}",
    ]
    if report.overrides:
        lines.append(f"- **overrides**: {report.overrides}")
    for note in report.notes:
        lines.append(f"- note: {note}")
    lines += ["", "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items() if v is not None]
    lines.append("")

    rows_by_t: dict[float, list[ReportEntry]] = {}
    for e in _grouped(report):
        rows_by_t.setdefault(e.temperature, []).append(e)
    lines += ["## Results", ""]
    lines += [
        "alpha: i.i.d. acceptance probability that explains tau; tau: mean tokens per target "
        "pass (acceptance length); acceptance: accepted / proposed draft tokens; speedup: "
        "tokens/s with the draft over plain decoding, measured in the same run; predicted: "
        "tau / (k c + v), c the cost ratio (draft step / plain target step), v the "
        "verification cost (target pass over k + 1 tokens / over one); at batch size > 1, in "
        "brackets, the same for these static batches, which step until their slowest row is "
        "done (tau of their tokens per step over plain decoding's); break-even acceptance: "
        "the acceptance rate at which predicted speedup is 1. Intervals: 95% bootstrap over units "
        "(none from a single unit). "
        f"Definitions: {_metrics_link(out_dir)}.", "",
    ]
    for t, entries in rows_by_t.items():
        lines += [f"### Temperature {t:g}", ""]
        lines += _md_table(_entry_rows(entries))
        notes = sorted({e.speedup_note for e in entries if e.speedup_note})
        sources = sorted({e.cost_ratio_source or "unavailable" for e in entries})
        verify = sorted({e.verify_cost_source or "unavailable" for e in entries})
        lines += ["", f"Cost ratio c: {', '.join(sources)}. Verification cost v: "
                  f"{', '.join(verify)}."]
        lines += [f"Speedup: {n}." for n in notes]
        lines.append("")
    lines += ["## Plots", "", f"![acceptance by position]({ACCEPTANCE_PNG})", "",
              f"![speedup by batch size]({SPEEDUP_PNG})", ""]
    return "\n".join(lines)


def _metrics_link(out_dir) -> str:
    """A relative link to the README's metric definitions where the report sits in the checkout."""
    if out_dir is not None and README.exists():
        out = Path(out_dir).resolve()
        if out.is_relative_to(README.parent):
            rel = Path(os.path.relpath(README, out)).as_posix()
            return f"[README, Metrics]({rel}{METRICS_ANCHOR})"
    return "the project README, section Metrics, and `deepspec_plugin/metrics.py`"


# ------------------------------------------------------------------------------------ plots


def _figure(ncols: int, width: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.0), dpi=100)
    FigureCanvasAgg(fig)  # Agg, without touching pyplot's global backend
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _png(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _nan(v):
    return float("nan") if v is None else v


def plot_acceptance_by_position(report: EvalReport) -> bytes:
    """Conditional and cumulative acceptance per draft position, a line per category/temperature.

    Each line uses the entry with the largest k (most positions) and the smallest batch size.
    """
    from matplotlib.ticker import MaxNLocator

    fig, (cond_ax, cum_ax) = _figure(2)
    best: dict[tuple, ReportEntry] = {}
    for e in report.results:
        key = (e.category, e.temperature)
        b = best.get(key)
        if b is None or (e.k, -e.batch_size) > (b.k, -b.batch_size):
            best[key] = e
    for (category, t), e in best.items():
        cond = e.conditional_position_acceptance
        cum = e.position_acceptance
        label = f"{category}, T={t:g}"
        xs = list(range(1, len(cond) + 1))
        cond_ax.plot(xs, [_nan(v) for v in cond], marker="o", label=label)
        cum_ax.plot(list(range(1, len(cum) + 1)), [_nan(v) for v in cum], marker="o",
                    label=label)
    cond_ax.set_title("P(position i accepted | earlier accepted)")
    cum_ax.set_title("P(at least i tokens of a draft accepted)")
    for ax in (cond_ax, cum_ax):
        ax.set_xlabel("draft position i")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        if best:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no results", ha="center", transform=ax.transAxes)
    return _png(fig)


def plot_speedup_by_batch_size(report: EvalReport) -> bytes:
    """Measured speedup (95% CI bars) and predicted speedup over batch size, a line per k."""
    overall = report.overall
    temps = sorted({e.temperature for e in overall}) or [None]
    fig, axes = _figure(len(temps), width=4.5)
    for ax, t in zip(axes, temps):
        entries = [e for e in overall if e.temperature == t]
        colors = {}
        for k in sorted({e.k for e in entries}):
            line = sorted((e for e in entries if e.k == k), key=lambda e: e.batch_size)
            xs = [e.batch_size for e in line]
            measured = [_nan(e.speedup) for e in line]
            err_lo, err_hi = [], []
            for e in line:
                ci = e.interval("speedup")
                v = e.speedup
                ok = ci is not None and v is not None
                err_lo.append(max(v - ci[0], 0.0) if ok else 0.0)
                err_hi.append(max(ci[1] - v, 0.0) if ok else 0.0)
            if any(e.speedup is not None for e in line):
                bars = ax.errorbar(xs, measured, yerr=[err_lo, err_hi], marker="o", capsize=3,
                                   label=f"k={k} measured")
                colors[k] = bars[0].get_color()
            predicted = [_nan(e.predicted_speedup) for e in line]
            ax.plot(xs, predicted, linestyle="--", marker="x", color=colors.get(k),
                    label=f"k={k} predicted")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speedup over plain decoding")
        ax.set_title("all categories" + (f", T={t:g}" if t is not None else ""))
        ax.grid(alpha=0.3)
        if entries:
            ax.legend(fontsize="small")
            bs = sorted({e.batch_size for e in entries})
            ax.set_xticks(bs)
        else:
            ax.text(0.5, 0.5, "no results", ha="center", transform=ax.transAxes)
    return _png(fig)
