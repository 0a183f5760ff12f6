"""Break-even on this CPU: measured speedup against acceptance, on the predicted curve.

The trained EAGLE-3 head and standalone draft of a ``benchmarks/head_drafts.py`` run (``--run``)
on SmolLM2-135M-Instruct, each evaluated by the harness at k = 1, 2, 3 (the ``quick`` bench,
greedy, batch sizes 1 and 4, reference engine, fp32), every speedup against plain decoding in the
same run. Per (draft, batch size, k) it prints the measured speedup with its 95% interval, the
predicted one tau / (k c + v) from the measured cost ratio c and verification cost v, their ratio
(the check that the model is good enough to act on: >= 0.9), and the break-even acceptance rate.
The ratio is taken to the static-batch prediction: the harness's batches step until their slowest
row is done, and a pass's tokens past the length limit are cut (``metrics.
static_batch_acceptance_length``; at batch size 1 only the cut differs). The pooled prediction,
what a continuously batched server gets and the plugin computes, is printed beside it.

It draws ``benchmarks/results/break_even.png``: per draft, the predicted speedup as a function of
the pooled acceptance rate, (1 + k a) / (k c + v), a line per k, with the measured points (and
their intervals) and the break-even marked where each line crosses 1, at batch size 1; and writes
``benchmarks/results/break_even.json``. Reports are reused on a rerun.

    .venv/bin/python benchmarks/break_even.py --run runs/heads
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from eagle3_speedup import bench

from deepspec_plugin import metrics

DRAFTS = {"eagle3": "train-eagle3/draft", "standalone": "train-standalone/draft"}
COLORS = {1: "tab:blue", 2: "tab:orange", 3: "tab:green"}


def rows_of(name: str, report) -> list[dict]:
    rows = []
    for e in sorted(report.overall, key=lambda e: (e.batch_size, e.k)):
        check = e.static_batch_predicted_speedup or e.predicted_speedup
        rows.append({
            "draft": name, "k": e.k, "acceptance_rate": e.acceptance_rate,
            "tau": e.acceptance_length, "cost_ratio": e.cost_ratio,
            "verify_cost": e.verify_cost, "verify_cost_source": e.verify_cost_source,
            "batch_size": e.batch_size,
            "speedup": e.speedup, "speedup_ci95": e.interval("speedup"),
            "predicted_speedup": e.predicted_speedup,
            "static_batch_acceptance_length": e.static_batch_acceptance_length,
            "static_batch_predicted_speedup": e.static_batch_predicted_speedup,
            "measured_over_predicted": (e.speedup / check
                                        if e.speedup and check else None),
            "break_even_acceptance_rate": e.break_even_acceptance_rate,
            "break_even_alpha": e.break_even_alpha,
        })
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drafts = sorted({r["draft"] for r in rows})
    fig, axes = plt.subplots(1, len(drafts), figsize=(6 * len(drafts), 4.5), sharey=True)
    for ax, name in zip(axes if len(drafts) > 1 else [axes], drafts):
        for r in (r for r in rows if r["draft"] == name and r["batch_size"] == 1):
            k, c, v = r["k"], r["cost_ratio"], r["verify_cost"]
            xs = [i / 100 for i in range(101)]
            ax.plot(xs, [metrics.speedup_at_length(1 + k * a, k, c, v) for a in xs],
                    color=COLORS[k], label=f"k={k} predicted (c={c:.3f}, v={v:.2f})")
            lo, hi = r["speedup_ci95"] or (r["speedup"], r["speedup"])
            ax.errorbar([r["acceptance_rate"]], [r["speedup"]],
                        yerr=[[r["speedup"] - lo], [hi - r["speedup"]]], fmt="o",
                        color=COLORS[k], capsize=3, label=f"k={k} measured")
            be = r["break_even_acceptance_rate"]
            if be is not None and 0 < be < 1:
                ax.axvline(be, color=COLORS[k], linestyle=":", linewidth=1)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"{name} draft, SmolLM2-135M-Instruct, this CPU")
        ax.set_xlabel("acceptance rate (accepted / proposed draft tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes_list = axes if len(drafts) > 1 else [axes]
    axes_list[0].set_ylabel("speedup over plain decoding (dotted: break-even)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from deepspec_plugin.models import reference_target

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/heads"),
                    help="a benchmarks/head_drafts.py output directory (its trained drafts)")
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    target = reference_target()
    ks = [int(k) for k in args.k.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    for name, rel in DRAFTS.items():
        draft = args.run / rel
        for b in batch_sizes:  # one report per batch size, so that a rerun reuses them
            out = args.run / (f"break-even-{name}" + ("" if b == 1 else f"-b{b}"))
            rows += rows_of(name, bench(target, draft, out, k=ks, temperatures=[0.0],
                                        batch_sizes=[b]))
    print(f"{'draft':<11} {'b':>2} {'k':>2} {'accept':>7} {'c':>6} {'v':>5} "
          f"{'measured [95% CI]':>20} {'predicted':>9} {'static':>6} {'meas/pred':>9} "
          f"{'break-even':>10}")
    for r in rows:
        ci = r["speedup_ci95"] or [float("nan")] * 2
        static = r["static_batch_predicted_speedup"]
        print(f"{r['draft']:<11} {r['batch_size']:>2} {r['k']:>2} {r['acceptance_rate']:>7.3f} "
              f"{r['cost_ratio']:>6.3f} {r['verify_cost']:>5.2f} "
              f"{r['speedup']:>6.2f} [{ci[0]:.2f}, {ci[1]:.2f}] {r['predicted_speedup']:>9.2f} "
              f"{static if static is not None else float('nan'):>6.2f} "
              f"{r['measured_over_predicted']:>9.2f} {r['break_even_acceptance_rate']:>10.3f}")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "break_even.json").write_text(json.dumps(
        {"bench": "quick", "temperature": 0.0, "batch_sizes": batch_sizes,
         "engine": "reference", "dtype": "float32", "rows": rows}, indent=2) + "\n")
    plot(rows, args.results / "break_even.png")
    print(f"wrote {args.results / 'break_even.json'} and break_even.png")


if __name__ == "__main__":
    main()
