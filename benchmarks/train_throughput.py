"""Training throughput on this machine, and data-parallel scaling from 1 to 2 processes.

Same data, draft (``layers:2`` of the reference target), loss and global batch in every run,
side by side in one invocation:

* ``1 proc x 1 thread``: the unit of scaling;
* ``2 procs x 1 thread`` (torchrun, gloo, batch split in two): data parallel on 2 cores;
* ``1 proc x 2 threads``: the same 2 cores used by torch's intra-op threads instead.

Scaling = (2 procs x 1 thread) / (1 proc x 1 thread); ideal 2.0. Tokens are response (loss)
tokens, the unit `dspec train` reports.

    .venv/bin/python benchmarks/train_throughput.py --data DIR [--steps 12]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def run(data: Path, out: Path, steps: int, batch: int, procs: int, threads: int,
        precision: str) -> dict:
    args = ["train", "--target", "reference", "--data", str(data), "--out", str(out),
            "--draft-init", "layers:2", "--loss", "tvd", "--steps", str(steps),
            "--batch-size", str(batch // procs), "--eval-every", str(10 * steps),
            "--save-every", str(10 * steps), "--warmup-steps", "1", "--precision", precision]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    if procs == 1:
        cmd = [sys.executable, "-m", "deepspec_plugin.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(procs), "-m", "deepspec_plugin.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "draft" / "deepspec.json").read_text())
    return {"processes": procs, "threads_per_process": threads, "precision": precision,
            "tokens": manifest["tokens_trained"], "tokens_per_s": manifest["tokens_per_second"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--bf16", action="store_true", help="also 1 proc x 2 threads in bf16")
    args = parser.parse_args()

    configs = [(1, 1, "fp32"), (2, 1, "fp32"), (1, 2, "fp32")]
    if args.bf16:
        configs.append((1, 2, "bf16"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (procs, threads, precision) in enumerate(configs):
            out = Path(tmp) / f"run-{i}"
            rows.append(run(args.data, out, args.steps, args.batch_size, procs, threads,
                            precision))
            shutil.rmtree(out, ignore_errors=True)
            r = rows[-1]
            print(f"{procs} proc x {threads} thread(s) {precision}: "
                  f"{r['tokens_per_s']:.0f} tokens/s ({r['tokens']} tokens)", flush=True)
    unit, dp, threads2 = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"], rows[2]["tokens_per_s"]
    print(f"data-parallel scaling 1 -> 2 processes: {dp / unit:.2f}x (ideal 2.00)")
    print(f"2 processes x 1 thread / 1 process x 2 threads: {dp / threads2:.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
