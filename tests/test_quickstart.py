"""`dspec quickstart` on the real reference target, with a bench cut down to seconds."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    from deepspec_plugin.quickstart import run_quickstart

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
    report, report_dir = run_quickstart(
        tmp_path / "qs", bench=str(bench), progress=False, log=lambda _: None
    )
    assert report["complete"] is True
    assert {r["category"] for r in report["results"]} == {"chat", "math"}
    for r in report["results"]:
        assert (
            r["num_drafts"] > 0 and r["speedup"] is not None and r["predicted_speedup"] is not None
        )
    assert report["models"]["target"]["params"] > 100_000_000
    assert (report_dir / "report.md").exists()
    # A second run reuses the draft (same target fingerprint) instead of rebuilding it.
    draft = tmp_path / "qs" / "draft-init-2"
    mtime = (draft / "config.json").stat().st_mtime_ns
    run_quickstart(tmp_path / "qs", bench=str(bench), progress=False, log=lambda _: None)
    assert (draft / "config.json").stat().st_mtime_ns == mtime
