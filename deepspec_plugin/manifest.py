"""The draft manifest, ``deepspec.json``: what travels with a draft from training to serving.

It names the target the draft was made for (``target_fingerprint``, from
:func:`deepspec_plugin.models.fingerprint`), the tokenizer both share (``tokenizer_fingerprint``),
how it speculates (``method``, ``k``) and, once an eval report was attached at export, the
``baseline``: the acceptance measured offline, pooled and per category, that the serving plugin
compares live acceptance with, and the costs the harness measured (cost ratio c, verification
cost v per k, per batch size) from which the plugin predicts the live speedup and its break-even
(:class:`deepspec_plugin.metrics.StepCosts`). Everything else a stage wants to record (training
settings, export details, overridden checks) goes under its own key and is kept as it is by every
later stage.

Stdlib only: the serving plugin reads this inside vLLM and must stay light.

Example::

    {
      "schema": "deepspec-draft/v1",
      "target_fingerprint": "sha256:...",
      "tokenizer_fingerprint": "sha256:...",
      "method": "draft_model",
      "k": 4,
      "baseline": {
        "k": 4, "temperature": 0.0,
        "acceptance_rate": 0.41, "acceptance_length": 2.3, "per_position": [0.6, 0.45, ...],
        "categories": {"chat": {"acceptance_rate": ..., "acceptance_length": ...,
                                "per_position": [...], "num_draft_tokens": 1640}},
        "report": {"bench": "quick", "engine": "reference", "created": "...", ...},
        "costs": [{"batch_size": 1, "cost_ratio": 0.04, "verify_cost": {"1": 1.07, "3": 1.53}}],
        "speedups": [{"k": 4, "batch_size": 1, "measured": 1.1, "ci95": [1.0, 1.2],
                      "predicted": 1.15}]
      },
      "training": {...}, "export": {...}
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.fileio import atomic_write_json
from deepspec_plugin.metrics import StepCosts, nearest_costs

if TYPE_CHECKING:
    from deepspec_plugin.bench.report_schema import EvalReport, ReportEntry

SCHEMA = "deepspec-draft/v1"
FILENAME = "deepspec.json"
METHODS = ("draft_model", "eagle3", "medusa", "mlp_speculator")
_CORE = ("schema", "target_fingerprint", "tokenizer_fingerprint", "method", "k", "baseline")


@dataclass
class Baseline:
    """Offline acceptance at one (k, temperature), pooled and per category, from an eval report."""

    k: int
    temperature: float
    acceptance_rate: float
    acceptance_length: float
    per_position: list[float]
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    # What the break-even needs, per batch size the report measured at this temperature.
    costs: list[StepCosts] = field(default_factory=list)
    # The speedup measured (95% interval) and predicted at each (k, batch size) of the report.
    speedups: list[dict[str, Any]] = field(default_factory=list)

    def costs_at(self, batch_size: float | None) -> StepCosts | None:
        """The costs measured at the batch size nearest ``batch_size`` (None: the smallest)."""
        return nearest_costs(self.costs, batch_size)

    def speedup_at(self, k: int, batch_size: int | None = None) -> dict[str, Any] | None:
        """The measured and predicted speedup at k (batch size default: the baseline's)."""
        size = self.report.get("batch_size") if batch_size is None else batch_size
        return next((s for s in self.speedups if s["k"] == k and s["batch_size"] == size), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k, "temperature": self.temperature,
            "acceptance_rate": self.acceptance_rate,
            "acceptance_length": self.acceptance_length,
            "per_position": list(self.per_position),
            "categories": self.categories, "report": self.report,
            "costs": [c.to_dict() for c in self.costs], "speedups": self.speedups,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "baseline") -> Baseline:
        try:
            return cls(
                k=int(d["k"]), temperature=float(d["temperature"]),
                acceptance_rate=float(d["acceptance_rate"]),
                acceptance_length=float(d["acceptance_length"]),
                per_position=[float(x) for x in d.get("per_position") or []],
                categories=dict(d.get("categories") or {}), report=dict(d.get("report") or {}),
                costs=[StepCosts.from_dict(c) for c in d.get("costs") or []],
                speedups=[_speedup_point(p) for p in d.get("speedups") or []],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise DspecError(f"{where} is malformed ({type(e).__name__}: {e})",
                             "re-export the draft with --report") from None


def _speedup_point(d: dict[str, Any]) -> dict[str, Any]:
    def num(v):
        return None if v is None else float(v)

    ci = d.get("ci95")
    return {"k": int(d["k"]), "batch_size": int(d["batch_size"]), "measured": num(d["measured"]),
            "ci95": [float(x) for x in ci] if ci else None, "predicted": num(d.get("predicted"))}


@dataclass
class DraftManifest:
    target_fingerprint: str
    tokenizer_fingerprint: str
    method: str = "draft_model"
    k: int | None = None
    baseline: Baseline | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # every other stage's record, kept as is

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema": SCHEMA, "target_fingerprint": self.target_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint, "method": self.method,
            "k": self.k, "baseline": self.baseline.to_dict() if self.baseline else None,
        }
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = FILENAME) -> DraftManifest:
        if not isinstance(d, dict):
            raise DspecError(f"{where} is not a JSON object", "re-export the draft")
        if d.get("schema") != SCHEMA:
            raise DspecError(f"{where} has schema {d.get('schema')!r}, expected {SCHEMA!r}",
                             "re-export the draft with this version of dspec")
        for key in ("target_fingerprint", "tokenizer_fingerprint"):
            if not isinstance(d.get(key), str) or not d[key].startswith("sha256:"):
                raise DspecError(f"{where}: {key} is missing or not a sha256 fingerprint",
                                 "re-export the draft")
        method = d.get("method", "draft_model")
        if method not in METHODS:
            raise DspecError(f"{where}: unknown method {method!r}",
                             f"use one of {', '.join(METHODS)}")
        k = d.get("k")
        if k is not None and (not isinstance(k, int) or k < 1):
            raise DspecError(f"{where}: k must be a positive integer, got {k!r}",
                             "re-export the draft with --k")
        baseline = d.get("baseline")
        return cls(
            target_fingerprint=d["target_fingerprint"],
            tokenizer_fingerprint=d["tokenizer_fingerprint"], method=method, k=k,
            baseline=Baseline.from_dict(baseline, f"{where}: baseline") if baseline else None,
            extra={key: v for key, v in d.items() if key not in _CORE},
        )


def manifest_path(path: str | Path) -> Path:
    """``path`` itself if it is a file, else ``path/deepspec.json``."""
    path = Path(path)
    return path / FILENAME if path.is_dir() else path


def read_manifest(path: str | Path) -> DraftManifest:
    """Read and validate a manifest (a file, or a draft directory holding ``deepspec.json``)."""
    p = manifest_path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise DspecError(f"no draft manifest at {p}", "export the draft with dspec export, "
                         "or train it with dspec train") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DspecError(f"{p} is not valid JSON ({e})", "re-export the draft") from None
    return DraftManifest.from_dict(data, str(p))


def write_manifest(manifest: DraftManifest | dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temp file, fsync, rename): a reader never sees half a manifest."""
    data = manifest.to_dict() if isinstance(manifest, DraftManifest) else manifest
    if isinstance(manifest, dict):
        DraftManifest.from_dict(data, "manifest")  # validate what is written
    p = manifest_path(path)
    return atomic_write_json(p, data)


def _entry_summary(e: ReportEntry) -> dict[str, Any]:
    return {
        "acceptance_rate": e.acceptance_rate, "acceptance_length": e.acceptance_length,
        "alpha": e.alpha, "num_drafts": e.counts.num_drafts,
        "num_draft_tokens": e.counts.num_draft_tokens,
        "num_accepted_tokens": e.counts.num_accepted_tokens,
        "per_position": list(e.position_acceptance),
    }


def baseline_from_report(report: EvalReport, k: int | None = None,
                         temperature: float | None = None, batch_size: int | None = None,
                         where: str = "the report") -> Baseline:
    """The baseline at (k, temperature, batch size) from an eval report (``report.json``, read
    by :func:`deepspec_plugin.bench.report_schema.load_report`).

    Defaults: the report's only k (else ``k`` is required), its lowest temperature (greedy where
    measured) and smallest batch size. Pooled numbers come from the report's ``overall`` entry,
    per-category ones from its per-category entries.
    """
    entries = report.entries()
    if not entries or not report.overall:
        raise DspecError(f"{where} has no results", "pass the report.json of a finished dspec eval")
    ks = sorted({e.k for e in entries})
    if k is None:
        if len(ks) > 1:
            raise DspecError(f"{where} measured k = {ks}; which one is served is ambiguous",
                             "pass --k")
        k = ks[0]
    if k not in ks:
        raise DspecError(f"{where} has no results at k = {k} (it measured k = {ks})",
                         "evaluate at the k you export, or export with a measured k")
    temps = sorted({float(e.temperature) for e in entries if e.k == k})
    temperature = temps[0] if temperature is None else float(temperature)
    if temperature not in temps:
        raise DspecError(f"{where} has no results at temperature {temperature:g} (it has "
                         f"{', '.join(f'{t:g}' for t in temps)})", "pick a measured temperature")
    sizes = sorted({e.batch_size for e in entries
                    if e.k == k and float(e.temperature) == temperature})
    batch_size = sizes[0] if batch_size is None else batch_size

    o = report.entry(k=k, temperature=temperature, batch_size=batch_size)
    if o is None:
        raise DspecError(f"{where} has no pooled entry at k = {k}, T = {temperature:g}, "
                         f"batch size {batch_size}", "pass a complete report")
    if o.acceptance_rate is None or o.acceptance_length is None:
        raise DspecError(f"{where} measured no draft tokens at k = {k}, T = {temperature:g}, "
                         f"batch size {batch_size}", "evaluate with more prompts or new tokens")
    costs, speedups = _costs_from_report(report, temperature)
    return Baseline(
        k=int(k), temperature=temperature,
        acceptance_rate=float(o.acceptance_rate),
        acceptance_length=float(o.acceptance_length),
        per_position=[float(x) for x in o.position_acceptance],
        categories={e.category: _entry_summary(e) for e in report.results
                    if e.at(k=k, temperature=temperature, batch_size=batch_size)},
        report={
            "bench": report.bench_name, "engine": report.engine_name,
            "created": report.created, "batch_size": batch_size,
            "draft_fingerprint": report.draft_fingerprint,
            "target_fingerprint": report.target_fingerprint,
        },
        costs=costs, speedups=speedups,
    )


def _costs_from_report(report: EvalReport,
                       temperature: float) -> tuple[list[StepCosts], list[dict[str, Any]]]:
    """Per batch size at ``temperature``: c (the mean over the measured k) and v at each k whose
    verification the engine timed; and every pooled entry's measured and predicted speedup."""
    costs, speedups = [], []
    pooled = [e for e in report.overall if float(e.temperature) == temperature]
    for size in sorted({e.batch_size for e in pooled}):
        at = sorted((e for e in pooled if e.batch_size == size), key=lambda e: e.k)
        speedups += [{"k": e.k, "batch_size": size, "measured": e.speedup,
                      "ci95": e.interval("speedup"), "predicted": e.predicted_speedup}
                     for e in at]
        ratios = [e.cost_ratio for e in at if e.cost_ratio is not None]
        if ratios:
            costs.append(StepCosts(
                batch_size=size, cost_ratio=sum(ratios) / len(ratios),
                verify_cost={e.k: e.verify_cost for e in at
                             if e.verify_cost is not None and e.verify_cost_source == "measured"},
            ))
    return costs, speedups


def report_model_mismatches(report: EvalReport, where: str, target_fingerprint: str,
                            draft_fingerprint: str | None) -> list[tuple[str, str, str]]:
    """``(what, problem, fix)`` for each model a baseline's report was not measured on.

    A baseline describes one draft on one target: the exporters refuse a report of another
    target or another draft (unless forced, which the manifest then records). A report or a
    draft without a fingerprint is not compared.
    """
    found = []
    rep_target, rep_draft = report.target_fingerprint, report.draft_fingerprint
    if rep_target and rep_target != target_fingerprint:
        found.append(("report_target",
                      f"report {where} was measured on another target ({rep_target}, not "
                      f"{target_fingerprint})", "evaluate the draft on this target, or --force"))
    if rep_draft and draft_fingerprint and rep_draft != draft_fingerprint:
        found.append(("report_draft",
                      f"report {where} was measured on another draft ({rep_draft}, not "
                      f"{draft_fingerprint})", "evaluate this draft (dspec eval), or --force"))
    return found
