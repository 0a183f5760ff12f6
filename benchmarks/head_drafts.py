"""Head drafts for TGI against EAGLE-3 and the standalone draft, on this CPU: one run, side by side.

On SmolLM2-135M-Instruct (the reference target), the same data for every draft (``--data``, or
generated here from the packaged training prompts), one training budget each, then the ``quick``
bench (3 categories x 4 prompts, 48 tokens) on the reference engine at k = 3 (and ``--k``),
greedy and T = 0.7, every speedup against plain decoding in the same run:

* ``medusa``: 3 Medusa heads of 1 residual block (TGI's layout);
* ``mlp_speculator``: the tied 3-stage MLP speculator (TGI's layout);
* ``eagle3``: an EAGLE-3 head (vLLM's layout), the quickstart's settings;
* ``standalone``: the distilled 2-layer standalone draft, the quickstart's settings.

Head drafts are benched under both drafting rules at T = 0.7: ``probabilistic`` (the draft
samples, exact rejection sampling) and ``greedy`` (the draft proposes its argmax: what TGI and
vLLM do at any temperature; TGI's verification is then prefix matching of sampled tokens, which
accepts a proposed token with the same probability as the rule's one-hot q). Prints the table and
writes ``--out/results.json``; every stage is reused on a rerun.

    .venv/bin/python benchmarks/head_drafts.py --out runs/heads --steps medusa=120,...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eagle3_speedup import bench, pooled

DRAFTS = ("medusa", "mlp_speculator", "eagle3", "standalone")
TRAINING = {  # the settings of each draft's run (besides steps); the same data for all
    "medusa": dict(draft_type="medusa", heads=3, head_layers=1, loss="tvd+fkl", lr=1e-3),
    "mlp_speculator": dict(draft_type="mlp_speculator", heads=3, loss="tvd+fkl", lr=1e-3),
    "eagle3": dict(draft_type="eagle3", loss="tvd+fkl", lr=2e-3),
    "standalone": dict(draft_init="layers:2", loss="fkl", lr=1e-3),
}


def make_data(target: Path, out: Path, num_prompts: int, max_new_tokens: int) -> tuple[Path, dict]:
    from deepspec_plugin.train.data import DEFAULT_PROMPT_FILES, generate_data

    data = out / f"data-{num_prompts}x{max_new_tokens}"
    started = time.perf_counter()
    manifest = generate_data(target, list(DEFAULT_PROMPT_FILES), data, num_prompts=num_prompts,
                             max_new_tokens=max_new_tokens, temperature=0.0, topk=32,
                             batch_size=32, shard_size=64, max_prompt_tokens=384,
                             progress=False)
    return data, {"prompts": num_prompts, "samples": manifest.num_samples,
                  "response_tokens": manifest.num_response_tokens,
                  "minutes": (time.perf_counter() - started) / 60}


def train_one(name: str, target: Path, data: Path, run: Path, steps: int) -> tuple[Path, dict]:
    from deepspec_plugin.train.trainer import train

    settings = TRAINING[name]
    started = time.perf_counter()
    result = train(target, data, run, steps=steps, batch_size=8,
                   warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 2),
                   save_every=max(1, steps // 4), keep_last=1, resume=run.exists(),
                   progress=False, **settings)
    m = result.manifest
    return result.draft, {
        "minutes": (time.perf_counter() - started) / 60, "steps": result.steps,
        "tokens_per_second": result.tokens_per_second, "held_out": m.get("held_out"),
        "parameters": (m.get(name) or {}).get("parameters"),
        "target_share": (m.get(name) or {}).get("target_share"), "settings": settings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="a data directory (default: generated here)")
    ap.add_argument("--prompts", type=int, default=192)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--steps", default="medusa=100,mlp_speculator=100,eagle3=120,standalone=60",
                    help="optimizer steps per draft (batch 8)")
    ap.add_argument("--drafts", default=",".join(DRAFTS))
    ap.add_argument("--k", default="3,1", help="draft lengths of the bench")
    args = ap.parse_args()

    import torch

    from deepspec_plugin.models import draft_init, reference_target
    from deepspec_plugin.models.files import param_count

    torch.set_num_threads(2)
    target = reference_target()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    data = args.data
    if data is None:
        data, results["data"] = make_data(target, out, args.prompts, args.max_new_tokens)
        save()
    steps = {k: int(v) for k, v in (x.split("=") for x in args.steps.split(","))}
    ks = [int(x) for x in args.k.split(",")]
    for name in args.drafts.split(","):
        entry = results.setdefault(name, {})
        run = out / f"train-{name}"
        if name == "standalone" and not (out / "draft-init-2").is_dir():
            draft_init(target, 2, out / "draft-init-2")
        if name == "standalone":
            TRAINING[name]["draft_init"] = str(out / "draft-init-2")
        if "train" not in entry:
            draft, entry["train"] = train_one(name, target, data, run, steps[name])
            save()
        draft = run / "draft"
        entry["train"]["parameters"] = entry["train"].get("parameters") or param_count(draft)
        for k in ks:  # one report per k, so that a rerun with other --k reuses them
            entry.setdefault("bench", {})[str(k)] = pooled(
                bench(target, draft, out / f"bench-{name}-k{k}", k=[k]))
            save()
            if name in ("medusa", "mlp_speculator"):
                entry.setdefault("bench_greedy_rule", {})[str(k)] = pooled(bench(
                    target, draft, out / f"bench-{name}-greedy-rule-k{k}", k=[k],
                    temperatures=[0.7], draft_sample_method="greedy"))
                save()
    print(json.dumps(results, indent=1)[:8000])


if __name__ == "__main__":
    main()
