"""Which training gives the best draft? Arms side by side on the reference target, one run.

Every arm starts from the same 2-layer draft-init draft (``layers:2``), sees the same data
(target-regenerated responses to the packaged training prompts) and the same token budget
(steps x batch size), and is scored with the ``quick`` bench on the reference engine (greedy and
T = 0.7; acceptance, tau, measured speedup against plain decoding in the same run):

* ``draft-init``: untrained (the baseline every gain is measured from);
* ``ce``: hard labels (the target's tokens); ``fkl``; ``tvd`` (= 1 - acceptance); ``tvd+fkl``
  (TVD's gradient vanishes where the draft gives a token little mass, FKL's does not), and the
  same with a quarter of the micro-batches on-policy (written by the draft, graded online);
* ``tvd-lora16``: LoRA rank 16 on every projection (the usual larger LoRA learning rate);
* ``tvd-full-dist``: ``tvd`` against the target's full distributions, run online, instead of the
  stored top-32: what the compact signal costs;
* ``*-t0.7``: the loss at temperature 0.7, for a draft that will serve at 0.7 (trained "at the
  temperature the draft will serve at").

Resumable: a finished arm (its report) is skipped on a rerun. Prints the table and the ratios
against the untrained draft, and writes ``results.json`` / ``results.md`` into ``--out``.

    .venv/bin/python benchmarks/train_quality.py --out /tmp/train-quality [--steps 80]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ARMS = {
    "draft-init": None,
    "ce": dict(loss="ce"),
    "fkl": dict(loss="fkl"),
    "tvd": dict(loss="tvd"),
    "tvd+fkl": dict(loss="tvd+fkl"),
    "tvd+fkl-on-policy": dict(loss="tvd+fkl", on_policy=0.25),
    "tvd-lora16": dict(loss="tvd", lora="r=16,alpha=32", lr_scale=3.0),
    "tvd-full-dist": dict(loss="tvd", teacher="online"),
    # Trained for serving at T = 0.7 (the loss at that temperature; the stored T = 1 top-k are
    # sharpened to it): read these arms at T = 0.7.
    "ce-t0.7": dict(loss="ce", temperature=0.7),
    "fkl-t0.7": dict(loss="fkl", temperature=0.7),
    "tvd+fkl-t0.7": dict(loss="tvd+fkl", temperature=0.7),
}


def pooled(report) -> dict[str, dict]:
    """The 'overall' entry per temperature of an EvalReport: alpha, acceptance rate, tau,
    speedups."""
    out = {}
    for e in report.overall:
        out[f"T={e.temperature:g}"] = {
            "acceptance_rate": e.acceptance_rate,
            "alpha": e.alpha,
            "tau": e.acceptance_length,
            "tau_ci95": e.interval("acceptance_length"),
            "speedup": e.speedup,
            "predicted_speedup": e.predicted_speedup,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/train-quality"))
    parser.add_argument("--num-prompts", type=int, default=320)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bench", default="quick")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--data", type=Path, default=None, help="default: OUT/data")
    args = parser.parse_args()

    from deepspec_plugin.bench.run import evaluate
    from deepspec_plugin.models import draft_init, reference_target
    from deepspec_plugin.train.data import DEFAULT_PROMPT_FILES, generate_data, storage_report
    from deepspec_plugin.train.trainer import train

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    target = reference_target()
    data = args.data or out / "data"
    started = time.perf_counter()
    manifest = generate_data(
        target, list(DEFAULT_PROMPT_FILES), data, num_prompts=args.num_prompts,
        max_new_tokens=args.max_new_tokens, temperature=0.0, topk=32, batch_size=8,
        shard_size=64, max_prompt_tokens=512, progress=False,
    )
    print(f"data: {manifest.num_samples} samples, {manifest.num_response_tokens} response tokens "
          f"({time.perf_counter() - started:.0f} s, or resumed)", flush=True)

    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for arm in args.arms.split(","):
        spec = ARMS[arm]
        if arm in results:
            print(f"{arm}: done before, skipped", flush=True)
            continue
        row: dict = {"arm": arm}
        if spec is None:
            draft = out / "draft-init-2"
            if not draft.exists():
                draft_init(target, 2, draft)
            row["train_s"] = 0.0
        else:
            spec = dict(spec)
            lr = args.lr * spec.pop("lr_scale", 1.0)
            run = out / f"run-{arm}"
            t0 = time.perf_counter()
            result = train(
                target, data, run, draft_init="layers:2", steps=args.steps,
                batch_size=args.batch_size, lr=lr, warmup_steps=max(1, args.steps // 10),
                eval_every=args.steps, save_every=args.steps, progress=True,
                resume=run.exists(), **spec,
            )
            row.update(train_s=time.perf_counter() - t0, lr=lr, tokens=result.tokens_trained,
                       tokens_per_s=result.tokens_per_second,
                       held_out_acceptance=result.final_acceptance,
                       held_out_start=result.start_acceptance, **spec)
            draft = result.draft
        report = evaluate(target, draft, args.bench, "reference", out / f"eval-{arm}",
                          progress=False)
        row["eval"] = pooled(report)
        results[arm] = row
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"{arm}: {json.dumps(row['eval'])}", flush=True)

    table = render(results, storage_report(data))
    (out / "results.md").write_text(table)
    print(table)


def render(results: dict, storage: dict) -> str:
    temps = sorted({t for r in results.values() for t in r["eval"]})
    head = ["arm", "train time"] + [f"{c} {t}" for t in temps
                                     for c in ("alpha", "tau", "speedup")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, r in results.items():
        cells = [arm, f"{r['train_s'] / 60:.1f} min" if r["train_s"] else "-"]
        for t in temps:
            e = r["eval"][t]
            cells += [f"{e['alpha']:.3f}", f"{e['tau']:.3f}", f"{e['speedup']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    base = results.get("draft-init")
    for t in temps:
        if not base:
            break
        gain0 = base["eval"][t]["tau"] - 1.0
        for arm in ("tvd", "fkl", "tvd+fkl", "ce"):
            if arm in results:
                gain = results[arm]["eval"][t]["tau"] - 1.0
                lines.append(f"- {t}: {arm} tau-1 gain {gain:.3f} = {gain / gain0:.1f}x "
                             f"draft-init's {gain0:.3f}")
        if "tvd-lora16" in results and "tvd" in results:
            a, b = (results["tvd-lora16"]["eval"][t]["acceptance_rate"],
                    results["tvd"]["eval"][t]["acceptance_rate"])
            lines.append(f"- {t}: LoRA r16 / full fine-tuning acceptance rate = {a / b:.2f}")
        if "tvd-full-dist" in results and "tvd" in results:
            a, b = (results["tvd"]["eval"][t]["acceptance_rate"],
                    results["tvd-full-dist"]["eval"][t]["acceptance_rate"])
            lines.append(f"- {t}: acceptance rate, top-32 minus full distributions = {a - b:+.4f}")
    lines.append(f"- top-{storage['topk']} signal: {storage['topk_bytes_per_token']} B per token, "
                 f"{storage['ratio']:.2%} of full float16 logits "
                 f"({storage['full_fp16_bytes_per_token']} B)")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
