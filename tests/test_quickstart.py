"""`dspec quickstart` on the real reference target, with a bench cut down to seconds."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    from deepspec_plugin.recipes.quickstart import run_quickstart

    bench = tmp_path / "mini.json"
    bench.write_text(
        json.dumps(
            {
                "schema": "deepspec-bench/v1",
                "name": "mini",
                "categories": {
                    "chat": {"files": ["mt-bench.jsonl"], "num_prompts": 1},
                    "math": {"files": ["gsm8k.jsonl"], "num_prompts": 1},
                },
                "max_new_tokens": 8,
                "temperatures": [0.0],
                "k": [3],
                "batch_sizes": [1],
            }
        )
    )
    from deepspec_plugin.recipes.quickstart import QuickstartPlan, comparison_rows

    plan = QuickstartPlan(num_prompts=8, max_new_tokens=8, steps=3, batch_size=4, lr=1e-3)
    result = run_quickstart(
        tmp_path / "qs", bench=str(bench), progress=False, log=lambda _: None, plan=plan
    )
    for report in (result.untrained, result.trained):
        assert report.complete is True
        assert {r.category for r in report.results} == {"chat", "math"}
        for r in report.results:
            assert (
                r.counts.num_drafts > 0
                and r.speedup is not None
                and r.predicted_speedup is not None
            )
        assert report.models.target.params > 100_000_000
    assert (result.untrained_dir / "report.md").exists()
    assert (result.trained_dir / "report.md").exists()
    trained = tmp_path / "qs" / "train" / "draft"
    assert result.trained.models.draft.path == str(trained.resolve())
    manifest = json.loads((trained / "deepspec.json").read_text())
    assert manifest["steps"] == 3 and manifest["loss"] == "fkl"
    assert [r["draft"] for r in comparison_rows(result)] == ["untrained", "distilled"]
    assert set(result.seconds) == {"target", "draft", "data", "train", "eval_untrained",
                                   "eval_trained"}
    # A second run reuses the draft, the data and the finished training run.
    draft = tmp_path / "qs" / "draft-init-2"
    mtimes = [(p / "config.json").stat().st_mtime_ns for p in (draft, trained)]
    data_manifest = (tmp_path / "qs" / "data" / "manifest.json").read_bytes()
    run_quickstart(tmp_path / "qs", bench=str(bench), progress=False, log=lambda _: None,
                   plan=plan)
    assert [(p / "config.json").stat().st_mtime_ns for p in (draft, trained)] == mtimes
    assert (tmp_path / "qs" / "data" / "manifest.json").read_bytes() == data_manifest


def test_comparison_rows_read_the_pooled_entries(tmp_path):
    from deepspec_plugin.bench.report_schema import EvalReport, ReportEntry, ReportModels
    from deepspec_plugin.metrics import SpecCounts
    from deepspec_plugin.recipes.quickstart import QuickstartResult, comparison_rows

    def report(rate: float, speedup_ci) -> EvalReport:
        pooled = ReportEntry(
            category="overall", temperature=0.0, k=3, batch_size=1, counts=SpecCounts(),
            acceptance_rate=rate, alpha=rate, acceptance_length=1 + 3 * rate, speedup=1.5,
            predicted_speedup=1.75, ci95={"speedup": speedup_ci})
        return EvalReport(bench={"name": "quick"}, models=ReportModels(), overall=[pooled])

    result = QuickstartResult(report(0.25, None), report(0.5, [1.25, 1.75]), tmp_path,
                              tmp_path, {})
    assert result.report is result.trained
    assert comparison_rows(result) == [
        {"draft": "untrained", "T": "0", "k": "3", "acceptance": "0.250", "alpha": "0.250",
         "tau": "1.75", "speedup": "1.50", "predicted": "1.75"},
        {"draft": "distilled", "T": "0", "k": "3", "acceptance": "0.500", "alpha": "0.500",
         "tau": "2.50", "speedup": "1.50 [1.25, 1.75]", "predicted": "1.75"},
    ]
