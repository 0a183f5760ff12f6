"""Does an export stream? Peak memory and throughput of `dspec export vllm` on a 1 GB checkpoint.

Builds (once) a Llama draft of about 1 GB in float32 for the reference target (its vocabulary
and tokenizer; random weights: only bytes matter here), then, side by side in one run:

* ``copy``: ``shutil.copyfile`` of the same safetensors bytes (the floor for moving them), and
  ``copy+fsync`` (the same, flushed to disk as the export's files are);
* ``export``: ``export_vllm(..., load=False)`` in a fresh process, the whole export (target and
  tokenizer fingerprints, streamed weights, configs, manifest, the file checks), with the
  target's fingerprint remembered from an earlier export (``deepspec_plugin.stat_cache``);
* ``export, cold``: the same with ``DSPEC_STAT_CACHE=0``: the target's 517 MB hashed again, as
  the first export for a target does;
* ``export, padded vocab``: the same draft with 64 fewer vocabulary rows than the target, so the
  embedding and head are padded on the way (still streamed).

Each runs in its own process, measured for wall time and peak RSS (``ru_maxrss`` of the child),
alternating over ``--repeats`` rounds; the medians are compared. Goals: peak
RSS under the largest tensor plus 300 MB, and export time within 2x of the copy.

    .venv/bin/python benchmarks/export_stream.py [--work /tmp/export-bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 1024, 4096, 12, 16, 4
CHILD = r"""
import json, os, shutil, sys, time
from pathlib import Path
mode, src, dst, target = sys.argv[1:5]
t = time.perf_counter()
if mode.startswith("copy"):
    Path(dst).mkdir()
    for f in Path(src).glob("*.safetensors"):
        shutil.copyfile(f, Path(dst) / f.name)
        if mode == "copy+fsync":
            fd = os.open(Path(dst) / f.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
else:
    from deepspec_plugin.exporters.vllm import export_vllm
    export_vllm(src, target, dst, load=False)
print(json.dumps({"seconds": time.perf_counter() - t}))
"""


def build_draft(target: Path, out: Path, vocab: int) -> Path:
    """A ~1 GB float32 Llama with the target's tokenizer, written tensor by tensor."""
    import numpy as np
    from safetensors.numpy import save_file

    from deepspec_plugin.fileio import atomic_dir
    from deepspec_plugin.models import copy_tokenizer_files

    if (out / "config.json").exists():
        return out
    with atomic_dir(out) as tmp:
        tcfg = json.loads((target / "config.json").read_text())
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
            "max_position_embeddings": tcfg["max_position_embeddings"], "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "torch_dtype": "float32", "hidden_act": "silu",
            "bos_token_id": tcfg.get("bos_token_id"), "eos_token_id": tcfg.get("eos_token_id"),
        }
        rng = np.random.default_rng(0)
        head = HIDDEN // HEADS

        def w(*shape):
            return rng.standard_normal(shape, dtype=np.float32) * 0.02

        state = {"model.embed_tokens.weight": w(vocab, HIDDEN), "lm_head.weight": w(vocab, HIDDEN),
                 "model.norm.weight": np.ones(HIDDEN, np.float32)}
        for i in range(LAYERS):
            p = f"model.layers.{i}."
            state.update({
                p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": w(KV_HEADS * head, HIDDEN),
                p + "self_attn.v_proj.weight": w(KV_HEADS * head, HIDDEN),
                p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": w(INTERMEDIATE, HIDDEN),
                p + "mlp.up_proj.weight": w(INTERMEDIATE, HIDDEN),
                p + "mlp.down_proj.weight": w(HIDDEN, INTERMEDIATE),
                p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
                p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32),
            })
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_tokenizer_files(target, tmp)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/export-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from deepspec_plugin.exporters.safetensors_io import read_dir
    from deepspec_plugin.models import reference_target

    target = reference_target()
    vocab = json.loads((target / "config.json").read_text())["vocab_size"]
    draft = build_draft(target, args.work / "draft-1gb", vocab)
    narrow = build_draft(target, args.work / "draft-1gb-narrow", vocab - 64)
    tensors = read_dir(draft)
    total = sum(t.nbytes for t in tensors.values())
    largest = max(t.nbytes for t in tensors.values())
    print(f"checkpoint: {len(tensors)} tensors, {total / 1e9:.2f} GB, largest "
          f"{largest / 1e6:.0f} MB; target {target.name}", flush=True)

    modes = (("export", draft), ("export, padded vocab", narrow), ("export, cold", draft),
             ("copy", draft), ("copy+fsync", draft))
    rows: dict[str, list[dict]] = {mode: [] for mode, _ in modes}
    peak_of("export", draft, args.work, target)  # remembers the target's fingerprint
    for _ in range(args.repeats):
        for mode, src in modes:
            rows[mode].append(peak_of(mode, src, args.work, target))
            r = rows[mode][-1]
            print(f"  {mode:22} {r['inner_s']:6.2f} s  peak RSS {r['peak_mb']:7.0f} MB",
                  flush=True)
    copy_s = statistics.median(r["inner_s"] for r in rows["copy"])
    budget_mb = largest / 2**20 + 300
    print("\n| run | median time | vs copy | peak RSS | budget (largest tensor + 300 MB) |")
    print("|---|---|---|---|---|")
    for mode, rs in rows.items():
        s = statistics.median(r["inner_s"] for r in rs)
        peak = max(r["peak_mb"] for r in rs)
        print(f"| {mode} | {s:.2f} s | {s / copy_s:.2f}x | {peak:.0f} MB | {budget_mb:.0f} MB |")


def peak_of(mode: str, src: Path, work: Path, target: Path) -> dict:
    """Time and peak RSS of one child, measured by the child's own /proc status at exit."""
    dst = work / "out"
    shutil.rmtree(dst, ignore_errors=True)
    code = CHILD.replace('print(json.dumps({"seconds": time.perf_counter() - t}))', (
        'seconds = time.perf_counter() - t\n'
        'hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]\n'
        'print(json.dumps({"seconds": seconds, "hwm_kib": int(hwm)}))'))
    env = dict(os.environ, DSPEC_STAT_CACHE="0" if mode == "export, cold" else "1")
    proc = subprocess.run([sys.executable, "-c", code, mode if mode.startswith("copy")
                           else "export", str(src), str(dst), str(target)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1], env=env)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(dst, ignore_errors=True)
    return {"inner_s": out["seconds"], "peak_mb": out["hwm_kib"] / 1024}


if __name__ == "__main__":
    main()
