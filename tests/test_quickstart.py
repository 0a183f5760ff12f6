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

    plan = QuickstartPlan(num_prompts=8, max_new_tokens=8, steps=3, batch_size=4, lr=1e-3,
                          eagle3_steps=2, data_batch_size=8)
    result = run_quickstart(
        tmp_path / "qs", bench=str(bench), progress=False, log=lambda _: None, plan=plan
    )
    assert list(result.reports) == ["standalone", "eagle3"]
    for report in result.reports.values():
        assert report.complete is True
        assert {r.category for r in report.results} == {"chat", "math"}
        for r in report.results:
            assert (
                r.counts.num_drafts > 0
                and r.speedup is not None
                and r.predicted_speedup is not None
            )
        assert report.models.target.params > 100_000_000
    for d in result.report_dirs.values():
        assert (d / "report.md").exists()
    trained = tmp_path / "qs" / "train" / "draft"
    head = tmp_path / "qs" / "eagle3" / "draft"
    assert result.reports["standalone"].models.draft.path == str(trained.resolve())
    assert result.reports["eagle3"].models.draft.path == str(head.resolve())
    assert result.reports["eagle3"].engine["draft_type"] == "eagle3"
    manifest = json.loads((trained / "deepspec.json").read_text())
    assert manifest["steps"] == 3 and manifest["loss"] == "fkl"
    assert json.loads((head / "deepspec.json").read_text())["method"] == "eagle3"
    assert [r["draft"] for r in comparison_rows(result)] == ["standalone, distilled",
                                                             "EAGLE-3 head"]
    assert set(result.seconds) == {"target", "draft", "data", "train", "train_eagle3",
                                   "eval_standalone", "eval_eagle3"}
    # A second run reuses the draft, the data and the finished training runs.
    draft = tmp_path / "qs" / "draft-init-2"
    mtimes = [(p / "config.json").stat().st_mtime_ns for p in (draft, trained, head)]
    data_dir = tmp_path / "qs" / "data-8x8-b8"
    data_manifest = (data_dir / "manifest.json").read_bytes()
    run_quickstart(tmp_path / "qs", bench=str(bench), progress=False, log=lambda _: None,
                   plan=plan)
    assert [(p / "config.json").stat().st_mtime_ns for p in (draft, trained, head)] == mtimes
    assert (data_dir / "manifest.json").read_bytes() == data_manifest


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

    reports = {"standalone": report(0.25, None), "eagle3": report(0.5, [1.25, 1.75])}
    result = QuickstartResult(reports, {n: tmp_path for n in reports}, {})
    assert result.report is reports["eagle3"]
    assert comparison_rows(result) == [
        {"draft": "standalone, distilled", "T": "0", "k": "3", "acceptance": "0.250",
         "alpha": "0.250", "tau": "1.75", "speedup": "1.50", "predicted": "1.75"},
        {"draft": "EAGLE-3 head", "T": "0", "k": "3", "acceptance": "0.500", "alpha": "0.500",
         "tau": "2.50", "speedup": "1.50 [1.25, 1.75]", "predicted": "1.75"},
    ]
