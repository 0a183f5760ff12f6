"""The reference engine against theory and against transformers, side by side in one run.

On the reference target (SmolLM2-135M-Instruct) with a `draft-init` draft (its first 2 layers),
k = 4, batch size 1, greedy, on this machine:

1. measured speedup of the reference engine (tokens/s with the draft over plain decoding) against
   the speedup Leviathan et al. predict from the engine's own measured alpha and cost ratio c;
   goal: measured / predicted >= 0.9;
2. the reference engine against transformers assisted generation with the same pair and a
   constant k (same outputs, checked token for token); goal: ratio of tokens/s >= 1.0.

Both in float32 and in bfloat16, one after the other. On a CPU, a forward pass over k + 1 tokens
costs more than one over a single token (float32 matrix products are compute-heavier than the
single-token matrix-vector ones; bfloat16 halves the bytes and narrows the gap), while Leviathan's
formula assumes they cost the same: the ratio measured / predicted shows that gap.

Every prompt runs plain decoding, the reference engine and transformers back to back, in a
rotating order, so a slow drift of the machine affects all three alike. Both engines share the
same loaded models.

    .venv/bin/python benchmarks/reference_engine.py [--num-prompts 3] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-prompts", type=int, default=3, help="per category (chat, code, math)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument(
        "--dtype",
        nargs="+",
        default=["float32", "bfloat16"],
        help="one run per dtype, in turn (bfloat16 is fastest on CPUs with avx512_bf16)",
    )
    ap.add_argument("--work", type=Path, default=Path("runs/benchmarks"))
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    from deepspec_plugin.bench.prompts import format_turns
    from deepspec_plugin.bench.run import stop_token_ids
    from deepspec_plugin.bench.spec import load_bench, select_prompts
    from deepspec_plugin.models import draft_init, load_tokenizer, reference_target

    target = reference_target()
    draft = args.work / f"draft-init-{args.layers}"
    if not (draft / "config.json").exists():
        draft_init(target, args.layers, draft, overwrite=True)
    tokenizer = load_tokenizer(target)
    stops = tuple(stop_token_ids(tokenizer, target))

    bench = load_bench("quick").with_overrides(num_prompts=args.num_prompts)
    prompts = []
    for category in bench.categories:
        for _, _, turns in select_prompts(bench, category):
            prompts.append(format_turns(tokenizer, turns[:1], [], chat_template=True))

    all_figures = {
        dtype: measure(args, target, draft, prompts, stops, dtype) for dtype in args.dtype
    }
    goals = []
    for dtype, figures in all_figures.items():
        print(f"\n== {dtype} ==")
        width = max(map(len, figures))
        for key, value in figures.items():
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            print(f"{key:{width}}  {text}")
        goals += [
            (
                f"{dtype}: measured / predicted speedup >= 0.9",
                figures["measured_over_predicted"] >= 0.9,
            ),
            (f"{dtype}: reference / hf tokens/s >= 1.0", figures["reference_over_hf"] >= 1.0),
            (
                f"{dtype}: reference and hf outputs identical",
                figures["prompts_reference_eq_hf"] == len(prompts),
            ),
        ]
    print()
    for text, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    if args.out:
        args.out.write_text(json.dumps(all_figures, indent=2) + "\n")
    return 0 if all(ok for _, ok in goals) else 1


def measure(args, target, draft, prompts, stops, dtype) -> dict:
    """Plain, reference and transformers on every prompt, in rotating order; the figures."""
    import torch

    from deepspec_plugin import metrics
    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.bench.engines.hf import HFAssistedEngine
    from deepspec_plugin.bench.engines.reference import ReferenceEngine

    ref = ReferenceEngine.from_paths(target, draft, dtype=dtype)
    hf = HFAssistedEngine(ref.target, ref.draft)
    plain_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, stop_token_ids=stops)
    spec_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, k=args.k, stop_token_ids=stops)

    # Warm every path (allocator, kernels) before timing anything.
    ref.generate(prompts[:1], plain_cfg)
    ref.generate(prompts[:1], spec_cfg)
    hf.generate(prompts[:1], spec_cfg)

    runs = {"plain": [], "reference": [], "hf": []}
    outs = {name: [] for name in runs}
    engines = {"plain": (ref, plain_cfg), "reference": (ref, spec_cfg), "hf": (hf, spec_cfg)}
    order = list(runs)
    for i, prompt in enumerate(prompts):
        for name in order[i % 3 :] + order[: i % 3]:
            engine, cfg = engines[name]
            result = engine.generate([prompt], cfg)
            runs[name].append(result)
            outs[name].append(result.generations[0].token_ids)
        print(f"{dtype} prompt {i + 1}/{len(prompts)}", file=sys.stderr)

    def tps(results):
        return sum(r.num_new_tokens for r in results) / sum(r.elapsed_s for r in results)

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs)

    def same(a, b):
        return sum(x == y for x, y in zip(outs[a], outs[b]))

    counts = metrics.SpecCounts.total(r.counts for r in runs["reference"])
    tau = metrics.acceptance_length(counts)
    alpha = metrics.alpha_from_acceptance_length(tau, args.k)
    c = mean(r.draft_step_s for r in runs["reference"]) / mean(
        r.target_step_s for r in runs["plain"]
    )
    predicted = metrics.predicted_speedup(alpha, args.k, c)
    measured = metrics.speedup(tps(runs["reference"]), tps(runs["plain"]))
    figures = {
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "k": args.k,
        "torch_threads": torch.get_num_threads(),
        # Greedy outputs agree token for token in float32; in bfloat16 a k+1-token pass rounds
        # differently from k+1 single-token passes, so near-ties can flip (in any engine).
        "prompts_reference_eq_plain": same("reference", "plain"),
        "prompts_hf_eq_plain": same("hf", "plain"),
        "prompts_reference_eq_hf": same("reference", "hf"),
        "acceptance_rate": metrics.acceptance_rate(counts),
        "acceptance_length": tau,
        "alpha": alpha,
        "cost_ratio": c,
        "tokens_per_s_plain": tps(runs["plain"]),
        "tokens_per_s_reference": tps(runs["reference"]),
        "tokens_per_s_hf": tps(runs["hf"]),
        "speedup_measured": measured,
        "speedup_predicted": predicted,
        "measured_over_predicted": measured / predicted,
        "speedup_hf": metrics.speedup(tps(runs["hf"]), tps(runs["plain"])),
        "reference_over_hf": tps(runs["reference"]) / tps(runs["hf"]),
    }
    ref.close()
    return figures


if __name__ == "__main__":
    sys.exit(main())
