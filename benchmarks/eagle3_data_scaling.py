"""What more data buys an EAGLE-3 head at one training budget, on this CPU: a learning curve.

On SmolLM2-135M-Instruct (the reference target): the target's greedy answers (``--max-new-tokens``
at most) to the first 64 x max(``--shards``) packaged training prompts, written once in shards of
64 prompts; the first m shards are a data set of their own (shard i always holds the same prompts,
so the smaller sets are prefixes of the larger). One EAGLE-3 head per set, the same settings and
the same number of optimizer steps (the same compute), then the ``quick`` bench on the reference
engine, batch size 1, seed 0, at k = 1, greedy and T = 0.7, every speedup against plain decoding
in the same run. Prints acceptance by category against the data's size and writes
``benchmarks/results/eagle3_data_scaling_<steps>steps.json``; every stage is reused on a rerun
(a data set already under ``--out`` is never regenerated, so another ``--steps`` can share it).

    .venv/bin/python benchmarks/eagle3_data_scaling.py --out runs/scaling [--shards 1,2,4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from eagle3_speedup import bench, pooled
from head_drafts import train_one


def data_prefixes(target: Path, out: Path, shards: list[int], max_new_tokens: int) -> dict:
    """{m: (directory of the first m shards, its counts)}, generated in one resumed run."""
    from deepspec_plugin.train.data import DEFAULT_PROMPT_FILES, generate_data

    growing = out / "data"
    sets = {}
    for m in sorted(shards):
        copy = out / f"data-{m}"
        if not copy.is_dir():
            started = time.perf_counter()
            manifest = generate_data(
                target, list(DEFAULT_PROMPT_FILES), growing, num_prompts=64 * max(shards),
                max_new_tokens=max_new_tokens, temperature=0.0, topk=32, batch_size=32,
                shard_size=64, max_prompt_tokens=384, progress=False,
                max_shards=m - len(_shards_in(growing)))
            print(f"  data: {len(manifest.shards)} shards after "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            shutil.copytree(growing, copy.with_suffix(".tmp"), dirs_exist_ok=True)
            copy.with_suffix(".tmp").rename(copy)
        from deepspec_plugin.train.data import load_manifest

        manifest = load_manifest(copy)
        sets[m] = (copy, {"prompts": sum(s.prompt_end - s.prompt_start for s in manifest.shards),
                          "samples": manifest.num_samples,
                          "response_tokens": manifest.num_response_tokens})
    return sets


def _shards_in(data: Path) -> list:
    from deepspec_plugin.train.data import load_manifest

    return load_manifest(data).shards if (data / "manifest.json").is_file() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shards", default="1,2,4", help="data sets of this many 64-prompt shards")
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps (batch 8) per head")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    import torch

    from deepspec_plugin.models import reference_target

    torch.set_num_threads(2)
    target = reference_target()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    shards = [int(s) for s in args.shards.split(",")]
    for m, (data, counts) in data_prefixes(target, args.out, shards, args.max_new_tokens).items():
        entry = results.setdefault(str(m), {"data": counts})
        run = args.out / f"train-{m}"
        if "train" not in entry:
            _, entry["train"] = train_one("eagle3", target, data, run, args.steps)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
        report = bench(target, run / "draft", args.out / f"bench-{m}", k=[1],
                       temperatures=[0.0, 0.7])
        entry["bench"] = pooled(report)
        entry["by_category"] = {
            f"{e.category} T={e.temperature}": {"acceptance_rate": e.acceptance_rate,
                                                "speedup": e.speedup}
            for e in report.results}
        results_path.write_text(json.dumps(results, indent=2) + "\n")

    print(f"EAGLE-3, {args.steps} steps of 8 each, quick bench, k = 1, reference engine")
    print(f"{'shards':>6} {'resp tokens':>11} {'held-out':>8} {'T':>4} {'accept':>6} "
          f"{'chat':>5} {'code':>5} {'math':>5} {'speedup [95% CI]':>20}")
    for m in sorted(shards):
        e = results[str(m)]
        held = (e["train"].get("held_out") or {}).get("greedy_agreement")
        for row in e["bench"]:
            cat = {c: e["by_category"].get(f"{c} T={row['T']}", {}).get("acceptance_rate")
                   for c in ("chat", "code", "math")}
            lo, hi = row["speedup_ci95"] or (float("nan"), float("nan"))
            print(f"{m:>6} {e['data']['response_tokens']:>11} "
                  f"{held if held is None else round(held, 3)!s:>8} {row['T']:>4} "
                  f"{row['acceptance_rate']:>6.3f} "
                  + " ".join(f"{v if v is None else round(v, 3)!s:>5}" for v in cat.values())
                  + f" {row['speedup']:>6.2f} [{lo:.2f}, {hi:.2f}]")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"eagle3_data_scaling_{args.steps}steps.json"
    path.write_text(json.dumps({"steps": args.steps, "max_new_tokens": args.max_new_tokens,
                                "target": "SmolLM2-135M-Instruct", "sets": results},
                               indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
