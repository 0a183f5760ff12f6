"""The target's cost of n tokens against one, with torch's linear layers and with skinny ones.

On SmolLM2-135M-Instruct (the reference target), fp32, 2 threads, after a 160-token context:
the median time of a cached forward of n = 1..8 new tokens per row, at batch 1 and batch 4,
with ``F.linear`` (MKL's x @ W^T) and with `SkinnyLinear` (W @ x^T, ``skinny_linear.py``), the
two interleaved round by round on the same loaded model so that a drift of the machine hits both.
Per width it prints T(n) in ms, T(n) / T(1) (the verification cost v of k = n - 1), and the most an
oracle draft (always right, free) could buy, n T(1) / T(n). Also checks that the two give the
same greedy next tokens. Writes ``benchmarks/results/decode_matmul.json``.

    .venv/bin/python benchmarks/decode_matmul.py [--rounds 5] [--repeats 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from eagle3_speedup import forward_times

MODES = ("torch", "skinny")


def same_argmax(model, context: int = 160, width: int = 8) -> bool:
    """The next-token argmax of every position, with either kind of linear layer."""
    import torch
    from transformers import DynamicCache

    from deepspec_plugin.bench.engines.skinny_linear import use_skinny_linears

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 40000, (1, context + width), generator=gen)
    picks = []
    with torch.inference_mode():
        for on in (False, True):
            use_skinny_linears(model, on)
            # A prefill is many rows (F.linear either way): compare cached steps of `width` rows.
            cache = DynamicCache()
            model(ids[:, :context], past_key_values=cache, use_cache=True)
            logits = model(ids[:, context:], past_key_values=cache, use_cache=True).logits
            picks.append(logits.argmax(-1))
    return bool(torch.equal(*picks))


def main() -> None:
    import torch

    from deepspec_plugin.bench.engines.skinny_linear import use_skinny_linears
    from deepspec_plugin.models import load_causal_lm, reference_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=8, help="forwards per width, round and mode")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model = load_causal_lm(reference_target())
    widths = range(1, 9)
    results = {"target": "SmolLM2-135M-Instruct", "dtype": "float32", "threads": 2,
               "context": 160, "rounds": args.rounds, "repeats": args.repeats,
               "same_greedy_tokens": same_argmax(model), "batches": {}}
    for batch in (int(b) for b in args.batches.split(",")):
        per_round = {m: {n: [] for n in widths} for m in MODES}
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                use_skinny_linears(model, mode == "skinny")
                for n, t in forward_times(model, widths, batch=batch, repeats=args.repeats,
                                          seed=r).items():
                    per_round[mode][n].append(t)
        table = {}
        for mode in MODES:
            t = {n: statistics.median(per_round[mode][n]) for n in widths}
            table[mode] = {"ms": {n: t[n] * 1e3 for n in widths},
                           "relative": {n: t[n] / t[1] for n in widths},
                           "oracle_speedup": {n: n * t[1] / t[n] for n in widths}}
        results["batches"][batch] = table
        print(f"batch {batch}: median of {args.rounds} rounds x {args.repeats} forwards")
        print(f"{'n':>2} {'torch ms':>9} {'skinny ms':>9} {'skinny/torch':>12} "
              f"{'v torch':>8} {'v skinny':>8} {'oracle torch':>12} {'oracle skinny':>13}")
        for n in widths:
            a, b = table["torch"], table["skinny"]
            print(f"{n:>2} {a['ms'][n]:>9.1f} {b['ms'][n]:>9.1f} {b['ms'][n] / a['ms'][n]:>12.2f} "
                  f"{a['relative'][n]:>8.2f} {b['relative'][n]:>8.2f} "
                  f"{a['oracle_speedup'][n]:>12.2f} {b['oracle_speedup'][n]:>13.2f}")
    print(f"same greedy next tokens with either linear: {results['same_greedy_tokens']}")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "decode_matmul.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
