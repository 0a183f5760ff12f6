"""The eval report as typed objects: what ``report.json`` holds, and its one loader.

``EvalReport.to_dict`` gives the report.json layout key for key (the writer in
:mod:`deepspec_plugin.bench.run` writes it), ``EvalReport.from_dict`` reads it back and checks it,
and :func:`load_report` is the one way a report file is read: by ``dspec eval compare``, the
exporters (the baseline of a draft manifest) and everything else. A report that a run left
partial (interrupted, failed, or still running) loads, so that it can be inspected and compared;
``require_complete=True`` refuses it, as every export baseline does.

Light (the standard library and :mod:`deepspec_plugin.metrics`): the draft manifest, read
inside vLLM, builds its baseline from a report.

Layout (keys in file order; ``error`` only after a failed run, ``finished`` only once complete)::

    {"schema": "deepspec-bench/v1", "created": ..., "complete": true, "interrupted": false,
     "bench": {the bench spec}, "bench_source": ..., "overrides": {...},
     "engine": {"name": ..., ...}, "environment": {...},
     "models": {"target": ModelInfo, "draft": ModelInfo | null},
     "stop_token_ids": [...], "notes": [...],
     "results": [ReportEntry per category], "overall": [ReportEntry pooled over categories],
     "error": ..., "finished": ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts

SCHEMA = "deepspec-bench/v1"
REPORT_JSON = "report.json"
OVERALL = "overall"  # the category of the entries pooled over all categories
REWRITE_FIX = "re-run the evaluation to write it again"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ------------------------------------------------------------------------------------ models


@dataclass
class ModelInfo:
    """One evaluated model: where it was, its fingerprints and parameter count.

    A directory without weights (a served model's tokenizer copy) has null fingerprint and
    parameter count, and ``unavailable`` says why.
    """

    path: str | None = None
    fingerprint: str | None = None
    tokenizer_fingerprint: str | None = None
    params: int | None = None
    unavailable: str | None = None  # written only when a property could not be read

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "fingerprint": self.fingerprint,
               "tokenizer_fingerprint": self.tokenizer_fingerprint, "params": self.params}
        if self.unavailable is not None:
            out["unavailable"] = self.unavailable
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ModelInfo:
        if not isinstance(d, dict):
            raise DspecError(f"{where} is not a JSON object", REWRITE_FIX)
        for key in ("path", "fingerprint", "tokenizer_fingerprint", "unavailable"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise DspecError(f"{where} has no valid '{key}'", REWRITE_FIX)
        if d.get("params") is not None and not _is_int(d["params"]):
            raise DspecError(f"{where} has no valid 'params'", REWRITE_FIX)
        return cls(path=d.get("path"), fingerprint=d.get("fingerprint"),
                   tokenizer_fingerprint=d.get("tokenizer_fingerprint"),
                   params=d.get("params"), unavailable=d.get("unavailable"))


@dataclass
class ReportModels:
    """The target and the draft (none for a server that speculates on its own) of a run."""

    target: ModelInfo | None = None
    draft: ModelInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target.to_dict() if self.target else None,
                "draft": self.draft.to_dict() if self.draft else None}

    @classmethod
    def from_dict(cls, d: Any, where: str = "models") -> ReportModels:
        if not isinstance(d, dict):
            raise DspecError(f"{where} is not a JSON object", REWRITE_FIX)
        return cls(**{role: ModelInfo.from_dict(d[role], f"{where}.{role}")
                      if d.get(role) is not None else None for role in ("target", "draft")})


# ------------------------------------------------------------------------------------ entries


@dataclass
class ReportEntry:
    """The numbers of one (category, temperature, k, batch size), seeds pooled.

    ``counts`` are the units' counts summed; every metric is derived from them
    (:mod:`deepspec_plugin.metrics`). ``ci95`` maps a metric of
    :data:`deepspec_plugin.bench.stats.CI_METRICS` to its 95% bootstrap interval (null from one
    unit, or without a baseline for speedup). ``units`` are the raw per-unit records, in the
    layout :mod:`deepspec_plugin.bench.stats` resamples.
    """

    category: str
    temperature: float
    k: int
    batch_size: int
    counts: SpecCounts
    num_prompts: int | None = None
    num_units: int | None = None
    seeds: list[int] = field(default_factory=list)
    # Acceptance, from the counts.
    acceptance_rate: float | None = None
    acceptance_length: float | None = None
    position_acceptance: list[float | None] = field(default_factory=list)
    conditional_position_acceptance: list[float | None] = field(default_factory=list)
    per_request: dict[str, float | None] | None = None
    alpha: float | None = None
    # Predicted speedup tau / (k c + v) from the cost ratio c and the verification cost v (and
    # where they came from), and the acceptance at which it is 1.
    cost_ratio: float | None = None
    cost_ratio_source: str | None = None
    verify_cost: float | None = None
    verify_cost_source: str | None = None
    predicted_speedup: float | None = None
    # The same for the harness's static batches: their acceptance length (tokens per step over
    # plain decoding's, the slowest row's steps) over k c + v. Equal at batch size 1 (greedy).
    static_batch_acceptance_length: float | None = None
    static_batch_predicted_speedup: float | None = None
    break_even_acceptance_rate: float | None = None
    break_even_alpha: float | None = None
    # Measured speed: speculative, plain decoding, and their ratio (or why there is none).
    new_tokens: int | None = None
    elapsed_s: float | None = None
    tokens_per_s: float | None = None
    baseline_new_tokens: int | None = None
    baseline_elapsed_s: float | None = None
    tokens_per_s_baseline: float | None = None
    speedup: float | None = None
    speedup_note: str | None = None
    ci95: dict[str, list[float] | None] = field(default_factory=dict)
    units: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, float, int, int]:
        """(category, temperature, k, batch size): what two reports' entries are matched by."""
        return (self.category, self.temperature, self.k, self.batch_size)

    def at(self, *, k: int, temperature: float, batch_size: int) -> bool:
        """Whether this entry measured that k, temperature and batch size."""
        return (self.k == k and float(self.temperature) == float(temperature)
                and self.batch_size == batch_size)

    def interval(self, metric: str) -> list[float] | None:
        """The 95% interval of ``metric`` (``acceptance_rate``, ...), or None."""
        return self.ci95.get(metric)

    def to_dict(self) -> dict[str, Any]:
        return {
            "category": self.category, "temperature": self.temperature, "k": self.k,
            "batch_size": self.batch_size, "num_prompts": self.num_prompts,
            "num_units": self.num_units, "seeds": self.seeds,
            **self.counts.to_dict(),
            "acceptance_rate": self.acceptance_rate,
            "acceptance_length": self.acceptance_length,
            "position_acceptance": self.position_acceptance,
            "conditional_position_acceptance": self.conditional_position_acceptance,
            "per_request": self.per_request,
            "alpha": self.alpha,
            "cost_ratio": self.cost_ratio,
            "cost_ratio_source": self.cost_ratio_source,
            "verify_cost": self.verify_cost,
            "verify_cost_source": self.verify_cost_source,
            "predicted_speedup": self.predicted_speedup,
            "static_batch_acceptance_length": self.static_batch_acceptance_length,
            "static_batch_predicted_speedup": self.static_batch_predicted_speedup,
            "break_even_acceptance_rate": self.break_even_acceptance_rate,
            "break_even_alpha": self.break_even_alpha,
            "new_tokens": self.new_tokens,
            "elapsed_s": self.elapsed_s,
            "tokens_per_s": self.tokens_per_s,
            "baseline_new_tokens": self.baseline_new_tokens,
            "baseline_elapsed_s": self.baseline_elapsed_s,
            "tokens_per_s_baseline": self.tokens_per_s_baseline,
            "speedup": self.speedup,
            "speedup_note": self.speedup_note,
            "ci95": self.ci95,
            "units": self.units,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "entry") -> ReportEntry:
        if not isinstance(d, dict):
            raise DspecError(f"{where} is not a JSON object", REWRITE_FIX)
        for key, ok in (("category", lambda v: isinstance(v, str)), ("temperature", _is_number),
                        ("k", _is_int), ("batch_size", _is_int)):
            if not ok(d.get(key)):
                raise DspecError(f"{where} has no valid '{key}'", REWRITE_FIX)
        try:
            counts = SpecCounts.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise DspecError(f"{where} has no valid counts ({type(e).__name__}: {e})",
                             REWRITE_FIX) from None
        for key, kind in (("seeds", list), ("position_acceptance", list),
                          ("conditional_position_acceptance", list), ("ci95", dict),
                          ("units", list)):
            if d.get(key) is not None and not isinstance(d[key], kind):
                raise DspecError(f"{where} has no valid '{key}'", REWRITE_FIX)
        return cls(
            category=d["category"], temperature=d["temperature"], k=d["k"],
            batch_size=d["batch_size"], counts=counts,
            num_prompts=d.get("num_prompts"), num_units=d.get("num_units"),
            seeds=d.get("seeds") or [],
            acceptance_rate=d.get("acceptance_rate"),
            acceptance_length=d.get("acceptance_length"),
            position_acceptance=d.get("position_acceptance") or [],
            conditional_position_acceptance=d.get("conditional_position_acceptance") or [],
            per_request=d.get("per_request"),
            alpha=d.get("alpha"),
            cost_ratio=d.get("cost_ratio"),
            cost_ratio_source=d.get("cost_ratio_source"),
            verify_cost=d.get("verify_cost"),
            verify_cost_source=d.get("verify_cost_source"),
            predicted_speedup=d.get("predicted_speedup"),
            static_batch_acceptance_length=d.get("static_batch_acceptance_length"),
            static_batch_predicted_speedup=d.get("static_batch_predicted_speedup"),
            break_even_acceptance_rate=d.get("break_even_acceptance_rate"),
            break_even_alpha=d.get("break_even_alpha"),
            new_tokens=d.get("new_tokens"),
            elapsed_s=d.get("elapsed_s"),
            tokens_per_s=d.get("tokens_per_s"),
            baseline_new_tokens=d.get("baseline_new_tokens"),
            baseline_elapsed_s=d.get("baseline_elapsed_s"),
            tokens_per_s_baseline=d.get("tokens_per_s_baseline"),
            speedup=d.get("speedup"),
            speedup_note=d.get("speedup_note"),
            ci95=d.get("ci95") or {},
            units=d.get("units") or [],
        )


# ------------------------------------------------------------------------------------ the report


@dataclass
class EvalReport:
    """One ``dspec eval`` run: what was run, where, and an entry per measured configuration.

    ``bench`` is the bench spec in its file format (:meth:`BenchSpec.to_dict`); ``engine`` the
    engine's name and self-description; ``environment`` versions, platform and device, as shown.
    """

    bench: dict[str, Any]
    models: ReportModels
    results: list[ReportEntry] = field(default_factory=list)  # per category
    overall: list[ReportEntry] = field(default_factory=list)  # pooled over categories
    schema: str = SCHEMA
    created: str | None = None
    complete: bool = False
    interrupted: bool = False
    bench_source: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    stop_token_ids: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # why the run failed, when it raised
    finished: str | None = None  # when it completed

    # --- accessors

    def entries(self) -> list[ReportEntry]:
        """Every entry: the per-category ones, then the pooled ones."""
        return [*self.results, *self.overall]

    def entry(self, *, k: int, temperature: float, batch_size: int,
              category: str = OVERALL) -> ReportEntry | None:
        """The entry of ``category`` (default: pooled) at k, temperature and batch size."""
        pool = self.overall if category == OVERALL else self.results
        return next((e for e in pool if e.category == category
                     and e.at(k=k, temperature=temperature, batch_size=batch_size)), None)

    @property
    def bench_name(self) -> str | None:
        return self.bench.get("name")

    @property
    def engine_name(self) -> str | None:
        return self.engine.get("name")

    @property
    def target_fingerprint(self) -> str | None:
        return self.models.target.fingerprint if self.models.target else None

    @property
    def draft_fingerprint(self) -> str | None:
        return self.models.draft.fingerprint if self.models.draft else None

    @property
    def status(self) -> str:
        """``complete``, ``interrupted``, ``failed`` or ``incomplete`` (still running)."""
        if self.complete:
            return "complete"
        if self.interrupted:
            return "interrupted"
        return "failed" if self.error is not None else "incomplete"

    # --- the file format

    def to_dict(self) -> dict[str, Any]:
        """The report.json layout (keys in file order); NaN is left for the writer to null."""
        out = {
            "schema": self.schema, "created": self.created, "complete": self.complete,
            "interrupted": self.interrupted, "bench": self.bench,
            "bench_source": self.bench_source, "overrides": self.overrides,
            "engine": self.engine, "environment": self.environment,
            "models": self.models.to_dict(), "stop_token_ids": self.stop_token_ids,
            "notes": self.notes,
            "results": [e.to_dict() for e in self.results],
            "overall": [e.to_dict() for e in self.overall],
        }
        if self.error is not None:
            out["error"] = self.error
        if self.finished is not None:
            out["finished"] = self.finished
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "the report") -> EvalReport:
        """Check and read a report.json object; a bad one is a one-line :class:`DspecError`."""
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            found = d.get("schema") if isinstance(d, dict) else type(d).__name__
            raise DspecError(f"{where} is not a {SCHEMA} report (schema: {found!r})",
                             "pass a report.json written by `dspec eval`")
        for key, kind in (("results", list), ("overall", list), ("bench", dict),
                          ("models", dict)):
            if not isinstance(d.get(key), kind):
                raise DspecError(f"report {where} has no valid '{key}'", REWRITE_FIX)
        for key, kind in (("overrides", dict), ("engine", dict), ("environment", dict),
                          ("stop_token_ids", list), ("notes", list)):
            if d.get(key) is not None and not isinstance(d[key], kind):
                raise DspecError(f"report {where} has no valid '{key}'", REWRITE_FIX)
        for key in ("complete", "interrupted"):
            if d.get(key) is not None and not isinstance(d[key], bool):
                raise DspecError(f"report {where} has no valid '{key}'", REWRITE_FIX)
        return cls(
            schema=d["schema"], created=d.get("created"),
            complete=d.get("complete") is True, interrupted=d.get("interrupted") is True,
            bench=d["bench"], bench_source=d.get("bench_source"),
            overrides=d.get("overrides") or {}, engine=d.get("engine") or {},
            environment=d.get("environment") or {},
            models=ReportModels.from_dict(d["models"], f"report {where}: models"),
            stop_token_ids=d.get("stop_token_ids") or [], notes=d.get("notes") or [],
            results=[ReportEntry.from_dict(e, f"report {where}: results[{i}]")
                     for i, e in enumerate(d["results"])],
            overall=[ReportEntry.from_dict(e, f"report {where}: overall[{i}]")
                     for i, e in enumerate(d["overall"])],
            error=d.get("error"), finished=d.get("finished"),
        )


# ------------------------------------------------------------------------------------ the loader


def report_file(path: str | Path) -> Path:
    """``path`` itself, or the report.json inside it where it is a directory."""
    path = Path(path)
    return path / REPORT_JSON if path.is_dir() else path


def load_report(path: str | Path, *, require_complete: bool = False) -> EvalReport:
    """A report.json (or the directory holding one), checked once.

    ``require_complete`` refuses a partial report (an interrupted, failed or unfinished run):
    a baseline must come from a run that measured everything it set out to.
    """
    path = report_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DspecError(f"report {path} does not exist",
                         "pass a report.json or the directory `dspec eval --out` wrote") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise DspecError(f"cannot read report {path}: {reason}", "check the path") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DspecError(
            f"report {path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
            "it may be truncated",
            REWRITE_FIX,
        ) from None
    report = EvalReport.from_dict(data, str(path))
    if require_complete and not report.complete:
        why = {"interrupted": "the run was interrupted",
               "failed": f"the run failed ({report.error})",
               "incomplete": "the run has not finished (complete: false)"}[report.status]
        raise DspecError(f"report {path} is partial: {why}",
                         "run `dspec eval` to the end and pass its report")
    return report
