"""Data generation's throughput: the signal from the generating forwards against a second forward.

On SmolLM2-135M-Instruct (the reference target), fp32, 2 threads: the first ``--prompts``
packaged training prompts (interleaved, first turns, at most 384 tokens), answered greedily in
batches of ``--batch-size`` by the reference engine, at each ``--max-new-tokens``. Two ways to take
the top-32 signal, interleaved round by round on the same loaded model so that a drift of the
machine hits both:

* ``forward``: one teacher-forced forward over the finished sequences (what endpoint data does);
* ``recorded``: the generating forwards' own logits (`on_logits`, what local data does now).

Prints the response tokens per second of each (medians over rounds), their ratio, and how far the
two signals are apart. Writes ``benchmarks/results/data_generation.json``.

    .venv/bin/python benchmarks/data_generation.py [--prompts 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

WAYS = ("forward", "recorded")


def batches_of(tokenizer, prompts: list[list[str]], size: int) -> list[list[list[int]]]:
    from deepspec_plugin.bench.prompts import format_turns

    contexts = sorted((format_turns(tokenizer, p[:1], [], True) for p in prompts), key=len)
    return [contexts[i : i + size] for i in range(0, len(contexts), size)]


def one_pass(engine, model, batches, cfg, way: str, topk: int = 32):
    """(seconds, response tokens, signals) of one way over every batch."""
    from deepspec_plugin.train.data import _SignalRecorder, _teacher_signal

    started, tokens, signals = time.perf_counter(), 0, []
    for contexts in batches:
        if way == "recorded":
            recorder = _SignalRecorder(len(contexts), 0.0, topk)
            result = engine.generate(contexts, cfg, on_logits=recorder)
            responses = [g.token_ids for g in result.generations]
            signals += [recorder.signal(i, len(r)) for i, r in enumerate(responses)]
        else:
            responses = [g.token_ids for g in engine.generate(contexts, cfg).generations]
            signals += _teacher_signal(model, [c + r for c, r in zip(contexts, responses)],
                                       [len(c) for c in contexts], 0.0, topk)
        tokens += sum(len(r) for r in responses)
    return time.perf_counter() - started, tokens, signals


def main() -> None:
    import torch

    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.bench.engines.reference import ReferenceEngine
    from deepspec_plugin.bench.prompts import format_turns
    from deepspec_plugin.bench.run import stop_token_ids
    from deepspec_plugin.models import load_causal_lm, load_tokenizer, reference_target
    from deepspec_plugin.train.data import DEFAULT_PROMPT_FILES, _load_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", default="64,192")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(2)
    target = reference_target()
    tokenizer = load_tokenizer(target)
    model = load_causal_lm(target)
    engine = ReferenceEngine(model)
    prompts, _ = _load_prompts(
        list(DEFAULT_PROMPT_FILES), args.prompts,
        lambda p: len(format_turns(tokenizer, p[:1], [], True)) <= 384)
    batches = batches_of(tokenizer, prompts, args.batch_size)
    stops = tuple(stop_token_ids(tokenizer, target))
    results = {"target": "SmolLM2-135M-Instruct", "dtype": "float32", "threads": 2,
               "prompts": len(prompts), "batch_size": args.batch_size, "rounds": args.rounds,
               "temperature": 0.0, "topk": 32, "by_max_new_tokens": {}}
    for new in (int(n) for n in args.max_new_tokens.split(",")):
        cfg = GenerationConfig(max_new_tokens=new, temperature=0.0, stop_token_ids=stops)
        rates = {w: [] for w in WAYS}
        signals = {}
        for r in range(args.rounds):
            for way in (WAYS if r % 2 == 0 else WAYS[::-1]):
                seconds, tokens, signals[way] = one_pass(engine, model, batches, cfg, way)
                rates[way].append(tokens / seconds)
        gap = max(float((a[1].float() - b[1].float()).abs().max())
                  for a, b in zip(signals["forward"], signals["recorded"]))
        same_top1 = statistics.mean(float((a[0][:, 0] == b[0][:, 0]).float().mean())
                                    for a, b in zip(signals["forward"], signals["recorded"]))
        row = {w: statistics.median(rates[w]) for w in WAYS}
        row.update(ratio=row["recorded"] / row["forward"], max_prob_gap=gap,
                   same_top1=same_top1, rates=rates)
        results["by_max_new_tokens"][new] = row
        print(f"max_new_tokens {new}: forward {row['forward']:.1f} tok/s, recorded "
              f"{row['recorded']:.1f} tok/s, ratio {row['ratio']:.2f}x; signals: max prob gap "
              f"{gap:.1e}, same top-1 {same_top1:.4f}")
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / "data_generation.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
