"""The harness end to end on the tiny pair with the real reference engine."""

from __future__ import annotations

import json

import pytest

from deepspec_plugin import metrics
from deepspec_plugin.bench.compare import compare_reports
from deepspec_plugin.bench.engines.base import Engine
from deepspec_plugin.bench.engines.reference import ReferenceEngine
from deepspec_plugin.bench.prompts import format_turns
from deepspec_plugin.bench.report import ACCEPTANCE_PNG, SPEEDUP_PNG
from deepspec_plugin.bench.report_schema import EvalReport, load_report
from deepspec_plugin.bench.run import describe_models, run_bench, stop_token_ids
from deepspec_plugin.bench.spec import SCHEMA, load_bench
from deepspec_plugin.errors import DspecError
from deepspec_plugin.metrics import SpecCounts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENTRY_KEYS = {
    "category", "temperature", "k", "batch_size", "num_prompts", "num_drafts",
    "num_draft_tokens", "num_accepted_tokens", "accepted_per_position", "acceptance_rate",
    "acceptance_length", "position_acceptance", "conditional_position_acceptance", "per_request",
    "alpha", "cost_ratio", "cost_ratio_source", "verify_cost", "verify_cost_source",
    "predicted_speedup", "static_batch_acceptance_length", "static_batch_predicted_speedup",
    "break_even_acceptance_rate", "break_even_alpha", "tokens_per_s",
    "tokens_per_s_baseline", "speedup", "speedup_note", "ci95", "units",
}
UNIT_KEYS = {
    "category", "seed", "prompts", "counts", "request_counts", "new_tokens", "elapsed_s",
    "baseline_new_tokens", "baseline_elapsed_s", "decode_steps", "baseline_decode_steps",
    "draft_step_s", "target_step_s",
    "plain_step_s", "verify_step_s",
}


class DelegatingEngine(Engine):
    """Test double: forwards every call to a real engine, counting them.

    It can raise KeyboardInterrupt on call number ``interrupt_at`` (an interrupted run), and can
    pose as a running server configured with speculation (no baseline, a fixed k).
    """

    def __init__(self, inner: Engine, *, interrupt_at=None, supports_baseline=True, fixed_k=None):
        self.inner = inner
        self.name = f"double({inner.name})"
        self.per_request_counts = inner.per_request_counts
        self.supports_baseline = supports_baseline
        self.fixed_k = fixed_k
        self.interrupt_at = interrupt_at
        self.calls = []

    def generate(self, prompts, cfg):
        self.calls.append(cfg)
        if self.interrupt_at is not None and len(self.calls) >= self.interrupt_at:
            raise KeyboardInterrupt
        if not self.supports_baseline and cfg.k is None:
            raise AssertionError("the harness asked a no-baseline engine for plain decoding")
        return self.inner.generate(prompts, cfg)

    def describe(self):
        return {**self.inner.describe(), "engine": self.name}



@pytest.fixture(scope="module")
def mini_bench(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "mini.json"
    path.write_text(json.dumps({
        "schema": SCHEMA,
        "name": "mini",
        "description": "2 categories x 2 prompts for tests",
        "categories": {
            "chat": {"files": ["mt-bench.jsonl"], "num_prompts": 2},
            "code": {"files": ["humaneval.jsonl", "mbpp.jsonl"], "num_prompts": 2},
        },
        "max_new_tokens": 16,
        "max_turns": 2,
        "temperatures": [0.0, 0.7],
        "k": [2],
        "batch_sizes": [1],
        "seeds": [0],
    }))
    return load_bench(path)


@pytest.fixture(scope="module")
def engine(tiny):
    eng = ReferenceEngine.from_paths(tiny.target, tiny.draft)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from deepspec_plugin.models import load_tokenizer

    return load_tokenizer(tiny.target)


@pytest.fixture(scope="module")
def run(tiny, mini_bench, engine, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    report = run_bench(mini_bench, engine, tokenizer, out,
                       models_info=describe_models(tiny.target, tiny.draft), progress=False)
    return report, out


def _json(report: EvalReport) -> dict:
    """The report as report.json holds it."""
    return json.loads(json.dumps(report.to_dict()))


@pytest.fixture(scope="module")
def self_draft_run(tiny, mini_bench, tokenizer, tmp_path_factory):
    """The target as its own draft: every draft token is accepted."""
    out = tmp_path_factory.mktemp("self")
    eng = ReferenceEngine.from_paths(tiny.target, tiny.target)
    try:
        return run_bench(mini_bench.with_overrides(temperatures=[0.0]), eng, tokenizer, out,
                         models_info=describe_models(tiny.target, tiny.target), progress=False)
    finally:
        eng.close()


# ------------------------------------------------------------------------------------ the run


def test_report_is_complete_with_every_key(run, mini_bench, tiny):
    report = _json(run[0])
    assert report["complete"] is True and report["interrupted"] is False
    assert report["schema"] == SCHEMA and report["bench"] == mini_bench.to_dict()
    assert report["models"]["draft"]["path"] == str(tiny.draft.resolve())
    assert report["models"]["target"]["params"] > report["models"]["draft"]["params"] > 0
    env = report["environment"]
    assert env["python"] and env["torch"] and env["device"] == "cpu" and env["torch_threads"]
    assert len(report["results"]) == 2 * 2  # categories x temperatures
    assert len(report["overall"]) == 2
    for entry in report["results"] + report["overall"]:
        assert ENTRY_KEYS <= set(entry), ENTRY_KEYS - set(entry)
        for unit in entry["units"]:
            assert UNIT_KEYS <= set(unit)
    chat = next(e for e in report["results"] if e["category"] == "chat")
    assert [u["prompts"] for u in chat["units"]] == [["mt-bench.jsonl:0"], ["mt-bench.jsonl:1"]]


def test_pooled_numbers_are_the_units_and_metrics_recomputed(run):
    report = _json(run[0])
    for entry in report["results"] + report["overall"]:
        units = entry["units"]
        pooled = SpecCounts.total(SpecCounts.from_dict(u["counts"]) for u in units)
        assert pooled.num_drafts > 0
        assert entry["num_drafts"] == pooled.num_drafts
        assert entry["num_draft_tokens"] == pooled.num_draft_tokens == 2 * pooled.num_drafts
        assert entry["num_accepted_tokens"] == pooled.num_accepted_tokens
        assert entry["accepted_per_position"] == pooled.accepted_per_position
        assert entry["acceptance_rate"] == metrics.acceptance_rate(pooled)
        assert entry["acceptance_length"] == metrics.acceptance_length(pooled)
        assert entry["position_acceptance"] == metrics.position_acceptance(pooled)
        assert entry["conditional_position_acceptance"] == (
            metrics.conditional_position_acceptance(pooled))
        assert entry["alpha"] == metrics.alpha_from_acceptance_length(
            entry["acceptance_length"], entry["k"])
        assert entry["cost_ratio_source"] == "measured" and 0 < entry["cost_ratio"]
        # The reference engine times its plain steps and its verification passes: c is over a
        # plain step, v = verification pass / plain step.
        plain = sum(u["plain_step_s"] for u in units) / len(units)
        verify = sum(u["verify_step_s"] for u in units) / len(units)
        draft = sum(u["draft_step_s"] for u in units) / len(units)
        assert entry["cost_ratio"] == pytest.approx(draft / plain)
        assert entry["verify_cost_source"] == "measured"
        assert entry["verify_cost"] == pytest.approx(verify / plain)
        assert entry["predicted_speedup"] == metrics.speedup_at_length(
            entry["acceptance_length"], entry["k"], entry["cost_ratio"], entry["verify_cost"])
        assert entry["break_even_acceptance_rate"] == metrics.break_even_acceptance_rate(
            entry["k"], entry["cost_ratio"], entry["verify_cost"])
        # At batch size 1 a unit's decode steps are its drafts (speculative) and its tokens
        # after each turn's first (plain); greedy, the static-batch tau is tau but for the
        # tokens the length limit cut from a turn's last pass.
        assert all(u["decode_steps"] == u["counts"]["num_drafts"] for u in units)
        assert entry["static_batch_acceptance_length"] == metrics.static_batch_acceptance_length(
            *(sum(u[key] for u in units) for key in (
                "new_tokens", "decode_steps", "baseline_new_tokens", "baseline_decode_steps")))
        assert entry["static_batch_predicted_speedup"] == pytest.approx(metrics.speedup_at_length(
            entry["static_batch_acceptance_length"], entry["k"], entry["cost_ratio"],
            entry["verify_cost"]))
        if entry["temperature"] == 0:
            for u in units:
                produced = u["counts"]["num_accepted_tokens"] + u["counts"]["num_drafts"]
                assert u["baseline_new_tokens"] == u["new_tokens"]
                assert produced - 2 * 2 <= u["baseline_decode_steps"] <= produced  # k = 2, 2 turns
            assert entry["static_batch_acceptance_length"] <= entry["acceptance_length"]
        requests = [SpecCounts.from_dict(r) for u in units for r in u["request_counts"]]
        assert entry["per_request"] == metrics.per_request_means(requests)
        tps = sum(u["new_tokens"] for u in units) / sum(u["elapsed_s"] for u in units)
        base = (sum(u["baseline_new_tokens"] for u in units)
                / sum(u["baseline_elapsed_s"] for u in units))
        assert entry["tokens_per_s"] == pytest.approx(tps)
        assert entry["tokens_per_s_baseline"] == pytest.approx(base)
        assert entry["speedup"] == pytest.approx(metrics.speedup(tps, base))
        for m in ("acceptance_rate", "acceptance_length", "speedup"):
            lo, hi = entry["ci95"][m]
            assert lo - 1e-12 <= entry[m] <= hi + 1e-12, (m, lo, entry[m], hi)
    for overall in report["overall"]:
        parts = [e for e in report["results"] if e["temperature"] == overall["temperature"]]
        assert overall["num_drafts"] == sum(e["num_drafts"] for e in parts)
        assert overall["num_prompts"] == sum(e["num_prompts"] for e in parts) == 4


def test_the_manifest_baseline_carries_the_measured_costs(run, tmp_path):
    """At export the baseline takes, per batch size, c (mean over the measured k) and v at each
    k the engine timed, and every entry's measured and predicted speedup; they round-trip."""
    from deepspec_plugin.errors import DspecError
    from deepspec_plugin.manifest import (
        DraftManifest,
        baseline_from_report,
        read_manifest,
        write_manifest,
    )

    report = run[0]
    b = baseline_from_report(report, temperature=0.0)
    pooled = [e for e in report.overall if e.temperature == 0.0]
    assert [c.batch_size for c in b.costs] == sorted({e.batch_size for e in pooled})
    costs = b.costs_at(1)
    at_1 = [e for e in pooled if e.batch_size == 1]
    assert costs.cost_ratio == pytest.approx(sum(e.cost_ratio for e in at_1) / len(at_1))
    assert costs.verify_cost == {e.k: e.verify_cost for e in at_1}
    entry = at_1[0]
    point = b.speedup_at(entry.k, 1)
    assert point["measured"] == entry.speedup and point["predicted"] == entry.predicted_speedup
    assert point["ci95"] == entry.interval("speedup")
    m = DraftManifest("sha256:" + "a" * 64, "sha256:" + "b" * 64, k=entry.k, baseline=b)
    back = read_manifest(write_manifest(m, tmp_path / "deepspec.json")).baseline
    assert back.costs == b.costs and back.speedups == b.speedups
    bad = m.to_dict()
    bad["baseline"]["costs"] = [{"batch_size": 1, "cost_ratio": -0.1, "verify_cost": {}}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DspecError, match="baseline is malformed"):
        read_manifest(tmp_path / "bad.json")


def test_a_static_batch_steps_as_long_as_its_slowest_row(engine, tokenizer):
    """A batch's decode steps are its longest row's: the most drafts of its rows (speculative),
    the most tokens after the first (plain), summed over turns."""
    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.bench.run import play_unit

    prompts = [["Write a haiku about the sea."], ["List three prime numbers and explain why."],
               ["Hi"]]
    played = {}
    for k in (None, 3):
        cfg = GenerationConfig(max_new_tokens=24, k=k, stop_token_ids=(0,))
        unit = play_unit(engine, tokenizer, prompts, cfg, max_turns=1, chat_template=False)
        played[k] = unit
    spec, plain = played[3], played[None]
    assert spec.decode_steps == max(c.num_drafts for c in spec.request_counts)
    assert spec.decode_steps < sum(c.num_drafts for c in spec.request_counts)
    assert plain.decode_steps == 24 - 1  # no row stops before the limit (stop id 0 is unused)
    static = metrics.static_batch_acceptance_length(
        spec.new_tokens, spec.decode_steps, plain.new_tokens, plain.decode_steps)
    assert static == pytest.approx(23 / spec.decode_steps)  # the same tokens, greedy
    assert static <= metrics.acceptance_length(spec.counts) + 1e-12


def test_multi_turn_units_and_shared_baselines(run):
    report = _json(run[0])
    for entry in report["results"]:
        turns = 2 if entry["category"] == "chat" else 1  # mt-bench has two user turns
        for u in entry["units"]:
            assert len(u["request_counts"]) == turns
            assert u["new_tokens"] <= 16 * turns and u["baseline_new_tokens"] <= 16 * turns
            assert u["new_tokens"] > 0 and u["elapsed_s"] > 0 and u["baseline_elapsed_s"] > 0


def test_report_files_exist_and_load(run):
    report, out = run
    assert load_report(out).to_dict() == _json(report)
    md = (out / "report.md").read_text()
    assert "bench `mini`" in md and "| chat | 0 | 2 | 1 |" in md and "| overall | 0.7 |" in md
    for name in (ACCEPTANCE_PNG, SPEEDUP_PNG):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
        import matplotlib.image

        assert matplotlib.image.imread(out / name).ndim == 3
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_real_report_round_trips_byte_for_byte(run):
    _, out = run
    text = (out / "report.json").read_text()
    again = EvalReport.from_dict(json.loads(text)).to_dict()
    assert json.dumps(again, indent=1, allow_nan=False) + "\n" == text


def test_interrupted_run_leaves_a_partial_report(tiny, mini_bench, engine, tokenizer, tmp_path):
    # Per chat prompt: warm-up plain, plain turns 1-2, warm-up spec, spec turns 1-2; then the
    # second prompt's 4 calls finish the chat entry. Call 12 is inside the code category.
    double = DelegatingEngine(engine, interrupt_at=12)
    with pytest.raises(KeyboardInterrupt):
        run_bench(mini_bench, double, tokenizer, tmp_path,
                  models_info=describe_models(tiny.target, tiny.draft), progress=False)
    partial = json.loads((tmp_path / "report.json").read_text())
    assert partial["complete"] is False and partial["interrupted"] is True
    assert [e["category"] for e in partial["results"]] == ["chat"]
    assert partial["overall"] == []
    assert load_report(tmp_path).complete is False
    with pytest.raises(DspecError, match="partial: the run was interrupted"):
        load_report(tmp_path, require_complete=True)


def test_server_like_engine_uses_its_k_and_reports_no_speedup(
    tiny, mini_bench, engine, tokenizer, tmp_path
):
    double = DelegatingEngine(engine, supports_baseline=False, fixed_k=3)
    spec = mini_bench.with_overrides(num_prompts=1, temperatures=[0.0], max_new_tokens=4,
                                     max_turns=1)
    report = _json(run_bench(spec, double, tokenizer, tmp_path,
                             models_info=describe_models(tiny.target, tiny.draft),
                             progress=False))
    assert report["bench"]["k"] == [3] and any("fixed k = 3" in n for n in report["notes"])
    assert all(cfg.k == 3 for cfg in double.calls)
    for e in report["results"] + report["overall"]:
        assert e["k"] == 3 and e["speedup"] is None and e["ci95"]["speedup"] is None
        assert "baseline" in e["speedup_note"] and e["acceptance_rate"] is not None


# ------------------------------------------------------------------------------------ compare


def test_compare_a_run_with_itself(run):
    report, _ = run
    rows = compare_reports(report, report)
    assert rows and all(r["difference"] == 0 and not r["significant"] for r in rows)


def test_compare_finds_the_better_draft(run, self_draft_run):
    report, _ = run
    assert all(e.acceptance_rate > 0.95 for e in self_draft_run.results)
    rows = compare_reports(report, self_draft_run)
    acc = [r for r in rows if r["metric"] == "acceptance_rate"]
    assert {r["category"] for r in acc} == {"chat", "code", "overall"}
    assert all(r["temperature"] == 0.0 for r in acc)
    assert all(r["difference"] > 0 and r["significant"] for r in acc)
    assert any("drafts differ" in n for n in rows[0]["notes"])


# ------------------------------------------------------------------------------------ pieces


def test_format_turns_with_the_chat_template(tokenizer):
    ids = format_turns(tokenizer, ["What is 2+2?"], [], chat_template=True)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is 2+2?<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    two = tokenizer.decode(format_turns(tokenizer, ["Q1", "Q2"], ["A1"], chat_template=True))
    assert "<|im_start|>assistant\nA1<|im_end|>" in two and two.index("A1") < two.index("Q2")
    with pytest.raises(ValueError):
        format_turns(tokenizer, ["Q1", "Q2"], [], chat_template=True)


def test_format_turns_plain_and_without_a_template(tiny):
    from deepspec_plugin.models import load_tokenizer

    tok = load_tokenizer(tiny.target)
    plain = tok.decode(format_turns(tok, ["Q1", "Q2"], ["A1"], chat_template=False),
                       skip_special_tokens=True)
    assert plain == "Q1\n\nA1\n\nQ2\n\n"
    tok.chat_template = None
    with pytest.raises(DspecError, match='"chat_template": false'):
        format_turns(tok, ["Q1"], [], chat_template=True)


def test_stop_tokens_join_tokenizer_and_generation_config(tiny, tokenizer):
    ids = stop_token_ids(tokenizer, tiny.target)
    gen = json.loads((tiny.target / "generation_config.json").read_text())["eos_token_id"]
    assert ids[0] == tokenizer.eos_token_id and set(gen) <= set(ids)
    assert len(ids) == len(set(ids))
    assert stop_token_ids(tokenizer, None) == [tokenizer.eos_token_id]


def test_evaluate_end_to_end(tiny, mini_bench, tmp_path):
    from deepspec_plugin.bench import evaluate

    report = _json(evaluate(tiny.target, tiny.draft, mini_bench.source, "reference", tmp_path,
                            temperatures=[0.0], num_prompts=1, max_new_tokens=4, max_turns=1,
                            progress=False))
    assert report["complete"] and (tmp_path / "report.md").exists()
    assert report["overrides"] == {"temperatures": [0.0], "num_prompts": 1,
                                   "max_new_tokens": 4, "max_turns": 1}
    assert [e["num_prompts"] for e in report["results"]] == [1, 1]
    from deepspec_plugin.models import fingerprint

    assert report["models"]["target"]["fingerprint"] == fingerprint(tiny.target)
