"""The command line: expected errors are one line naming the fix, non-zero exit, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from local_http import free_port

DSPEC = [sys.executable, "-m", "deepspec_plugin.cli"]


def dspec(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    return subprocess.run(
        [*DSPEC, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    err = " ".join(proc.stderr.split())  # rich may wrap long lines
    assert err.startswith("error:"), proc.stderr
    assert "Fix:" in err, proc.stderr
    for needle in needles:
        assert needle in err, (needle, proc.stderr)


def test_models_tiny_prints_paths_and_is_deterministic(tmp_path):
    a = dspec("models", "tiny", "--out", tmp_path / "a", "--seed", "3", "--perturb", "0.02")
    assert a.returncode == 0, a.stderr
    for name in ("target", "draft", "target-updated"):
        assert (tmp_path / "a" / name / "config.json").exists()
    dspec("models", "tiny", "--out", tmp_path / "b", "--seed", "3")
    fa = dspec("models", "fingerprint", tmp_path / "a" / "target").stdout
    fb = dspec("models", "fingerprint", tmp_path / "b" / "target").stdout
    assert fa == fb and "sha256:" in fa


def test_eval_end_to_end_and_compare(tiny, tmp_path):
    common = ["--target", tiny.target, "--bench", "quick", "--engine", "reference"]
    small = ["--num-prompts", "1", "--max-new-tokens", "12", "--temperature", "0", "--k", "2,3"]
    a = dspec("eval", *common, "--draft", tiny.draft, *small, "--out", tmp_path / "a")
    assert a.returncode == 0, a.stderr
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["complete"] is True
    assert sorted({r["k"] for r in report["results"]}) == [2, 3]
    assert {r["category"] for r in report["results"]} >= {"chat", "code", "math"}
    b = dspec("eval", *common, "--draft", tiny.target, *small, "--out", tmp_path / "b")
    assert b.returncode == 0, b.stderr
    cmp = dspec("eval", "compare", tmp_path / "a", tmp_path / "b")
    assert cmp.returncode == 0, cmp.stderr
    assert "acceptance" in cmp.stdout.lower()


def test_mismatched_vocabularies(tiny, tmp_path):
    other = tmp_path / "other"
    # A draft whose tokenizer is another build's: its vocabulary differs from the target's.
    from deepspec_plugin.models import build_tiny

    build_tiny(other, seed=1)
    cfg = json.loads((other / "draft" / "config.json").read_text())
    cfg["vocab_size"] = cfg["vocab_size"] + 64
    (other / "draft" / "config.json").write_text(json.dumps(cfg))
    proc = dspec(
        "eval", "--target", tiny.target, "--draft", other / "draft", "--out", tmp_path / "r"
    )
    assert_clean_error(proc, "vocab")


def test_draft_that_is_not_a_causal_lm(tiny, tmp_path):
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertModel"]})
    )
    proc = dspec("eval", "--target", tiny.target, "--draft", bad, "--out", tmp_path / "r")
    assert_clean_error(proc, "causal")


def test_missing_bench_file(tiny, tmp_path):
    proc = dspec(
        "eval",
        "--target",
        tiny.target,
        "--draft",
        tiny.draft,
        "--bench",
        tmp_path / "nope.json",
        "--out",
        tmp_path / "r",
    )
    assert_clean_error(proc, "nope.json")


def test_prompt_file_with_a_broken_line(tiny, tmp_path):
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text('{"turns": ["hello"]}\n{"turns": ["fine"]}\n{"turns": [oops\n')
    proc = dspec(
        "eval",
        "--target",
        tiny.target,
        "--draft",
        tiny.draft,
        "--prompts",
        prompts,
        "--out",
        tmp_path / "r",
    )
    assert_clean_error(proc, "mine.jsonl", "line 3")


def test_endpoint_that_is_down(tiny, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = dspec(
        "eval",
        "--engine",
        "endpoint",
        "--endpoint",
        url,
        "--target",
        tiny.target,
        "--num-prompts",
        "1",
        "--out",
        tmp_path / "r",
        timeout=120,
    )
    assert_clean_error(proc, url)


def test_missing_target_directory(tmp_path):
    proc = dspec(
        "models",
        "draft-init",
        "--target",
        tmp_path / "absent",
        "--layers",
        "1",
        "--out",
        tmp_path / "d",
    )
    assert_clean_error(proc, "absent")


@pytest.mark.parametrize("args", [["--k", "two"], ["--temperature", "hot"]])
def test_malformed_lists(tiny, tmp_path, args):
    proc = dspec("eval", "--target", tiny.target, "--draft", tiny.draft, *args, "--out", tmp_path)
    assert_clean_error(proc)


def test_data_generate_resumes_and_refuses_other_settings(tiny, tmp_path):
    out = tmp_path / "data"
    args = ["data", "generate", "--target", tiny.target, "--out", out, "--num-prompts", "3"]
    args += ["--max-new-tokens", "8", "--shard-size", "2", "--topk", "8"]
    first = dspec(*args)
    assert first.returncode == 0, first.stderr
    assert "bytes per response token" in first.stdout
    manifest = (out / "manifest.json").read_text()
    again = dspec(*args)  # complete already: nothing changes
    assert again.returncode == 0, again.stderr
    assert (out / "manifest.json").read_text() == manifest
    other = dspec(*args, "--temperature", "0.8")
    assert_clean_error(other, "temperature")
    assert (out / "manifest.json").read_text() == manifest


def test_train_end_to_end_and_refusals(tiny, tmp_path):
    data = tmp_path / "data"
    gen = ["data", "generate", "--target", tiny.target, "--out", data, "--num-prompts", "4"]
    assert dspec(*gen, "--max-new-tokens", "16", "--topk", "8").returncode == 0
    run = ["train", "--target", tiny.target, "--data", data, "--out", tmp_path / "run"]
    run += ["--draft-init", "layers:1", "--steps", "6", "--batch-size", "2", "--eval-every", "3"]
    done = dspec(*run)
    assert done.returncode == 0, done.stderr
    assert "Held-out acceptance" in done.stdout
    manifest = json.loads((tmp_path / "run" / "draft" / "deepspec.json").read_text())
    assert manifest["loss"] == "tvd+fkl" and manifest["steps"] == 6  # the default
    assert_clean_error(dspec(*run), "run")  # the run directory exists: nothing is overwritten
    other = ["train", "--target", tiny.target_updated, "--data", data, "--out", tmp_path / "r2"]
    assert_clean_error(dspec(*other), "another target")
    bad_loss = ["train", "--target", tiny.target, "--data", data, "--out", tmp_path / "r3"]
    assert_clean_error(dspec(*bad_loss, "--loss", "kl"), "kl")
