"""`dspec export tgi`: head drafts into TGI's speculator layout, TGI's loader rules, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters.heads import (
    build_medusa,
    build_mlp_speculator,
    detect_head_format,
    medusa_names,
)
from deepspec_plugin.exporters.serving import COMPOSE_FILES
from deepspec_plugin.exporters.tgi import export_tgi
from deepspec_plugin.exporters.tgi_rules import check_tgi, medusa_shapes, mlp_tied_shapes
from deepspec_plugin.manifest import read_manifest
from deepspec_plugin.models import fingerprint, tokenizer_fingerprint

TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
SERVING = {"serving_configs/tgi-launcher.sh", "serving_configs/tgi.env",
           "serving_configs/helm-values.yaml", *(f"serving_configs/{f}" for f in COMPOSE_FILES)}


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    """Staging or swap directories an export might leave behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {
        "medusa": build_medusa(tiny.target, root / "medusa", num_heads=3, num_layers=1),
        # Medusa's training scripts also save the heads inside a whole checkpoint, prefixed.
        "medusa_prefixed": build_medusa(tiny.target, root / "medusa-prefixed", num_heads=2,
                                        num_layers=2, seed=1, prefix="medusa_head.",
                                        weights_file="model.safetensors"),
        "mlp": build_mlp_speculator(tiny.target, root / "mlp", n_predict=3, inner_dim=96),
        "mlp_untied": build_mlp_speculator(tiny.target, root / "mlp-untied", tie_weights=False),
    }


@pytest.fixture(scope="module")
def exports(tiny, sources, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {name: export_tgi(sources[name], tiny.target, root / name)
            for name in ("medusa", "medusa_prefixed", "mlp")}


def test_detect_head_format(tiny, sources):
    assert detect_head_format(sources["medusa"]) == "medusa"
    assert detect_head_format(sources["mlp"]) == "mlp_speculator"
    assert detect_head_format(tiny.draft) == "draft_model"


def test_medusa_export_layout(tiny, sources, exports):
    from safetensors.torch import load_file

    for name, heads, layers, prefix, src_file in (
        ("medusa", 3, 1, "", "medusa_lm_head.safetensors"),
        ("medusa_prefixed", 2, 2, "medusa_head.", "model.safetensors"),
    ):
        res = exports[name]
        out = res.out
        assert res.method == "medusa" and res.check.ok
        files = _files(out)
        assert {"medusa_lm_head.safetensors", "config.json", "deepspec.json"} <= files
        assert TOKENIZER_FILES <= files and SERVING <= files
        assert not any(f.endswith((".bin", ".pt")) for f in files)
        assert [f for f in files if f.endswith(".safetensors")] == ["medusa_lm_head.safetensors"]

        config = json.loads((out / "config.json").read_text())
        assert "architectures" not in config
        assert config["medusa_num_heads"] == heads and config["medusa_num_layers"] == layers
        assert config["base_model_name_or_path"] == str(tiny.target.resolve())

        written = load_file(str(out / "medusa_lm_head.safetensors"))
        expected = medusa_shapes(heads, layers, 128, 512)
        assert set(written) == set(expected) == set(medusa_names(heads, layers))
        assert {n: tuple(t.shape) for n, t in written.items()} == expected
        source = load_file(str(sources[name] / src_file))
        for n, t in written.items():
            assert t.equal(source[prefix + n]), n

        manifest = read_manifest(out)
        assert manifest.method == "medusa" and manifest.k == heads
        assert manifest.target_fingerprint == fingerprint(tiny.target)
        assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(tiny.target)
        assert manifest.extra["export"]["engine"] == "tgi"
        assert manifest.extra["export"]["forced"] == []
        assert manifest.extra["training"]["builder"] == "build_medusa"  # earlier stages kept
        assert tokenizer_fingerprint(out) == tokenizer_fingerprint(tiny.target)


def test_mlp_export_layout(tiny, sources, exports):
    from safetensors.torch import load_file

    res = exports["mlp"]
    out = res.out
    assert res.method == "mlp_speculator" and res.check.ok
    files = _files(out)
    assert {"model.safetensors", "config.json", "deepspec.json"} <= files
    assert TOKENIZER_FILES <= files and SERVING <= files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mlp_speculator"
    assert config["architectures"] == ["MLPSpeculatorPreTrainedModel"]
    assert config["tie_weights"] is True
    assert (config["n_predict"], config["inner_dim"], config["emb_dim"],
            config["vocab_size"]) == (3, 96, 128, 512)
    assert config["base_model_name_or_path"] == str(tiny.target.resolve())

    written = load_file(str(out / "model.safetensors"))
    expected = mlp_tied_shapes(96, 128, 512)
    assert all(n.startswith("speculator.") for n in written)
    assert {n: tuple(t.shape) for n, t in written.items()} == expected
    source = load_file(str(sources["mlp"] / "model.safetensors"))
    for n, t in written.items():
        assert t.equal(source[n]), n
    assert read_manifest(out).k == 3


def test_check_passes_on_exports(tiny, exports):
    for res in exports.values():
        report = check_tgi(res.out, tiny.target)
        assert report.ok, [(f.rule, f.message) for f in report.failures]
        rules = {f.rule for f in report.findings}
        assert {"target.hidden_size", "target.vocab_size", "target.tokenizer",
                "files.tokenizer", "files.no_pickle", "tensors.dtype"} <= rules
        # Every rule names where in TGI (or dspec) it comes from.
        assert all(f.source and (".py" in f.source or ".rs" in f.source) for f in report.findings)


# --- each rule fails on a broken export ----------------------------------------------------------


def _edit_config(d: Path, **changes) -> None:
    p = d / "config.json"
    config = json.loads(p.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    p.write_text(json.dumps(config))


def _edit_tensors(path: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    tensors = fn(load_file(str(path)))
    save_file(tensors, str(path))


def _rename(old: str, new: str):
    def fn(t):
        t[new] = t.pop(old)
        return t
    return fn


def _reshape(name: str):
    def fn(t):
        t[name] = t[name][:-1].clone()
        return t
    return fn


def _to_int(name: str):
    def fn(t):
        t[name] = t[name].to(__import__("torch").int32)
        return t
    return fn


def _strip_prefix(t):
    return {n.removeprefix("speculator."): v for n, v in t.items()}


BREAKERS = {
    "medusa.config.no_architectures": ("medusa", lambda d: _edit_config(
        d, architectures=["LlamaForCausalLM"])),
    "medusa.config.required": ("medusa", lambda d: _edit_config(d, medusa_num_layers=None)),
    "medusa.tensors.names": ("medusa", lambda d: _edit_tensors(
        d / "medusa_lm_head.safetensors", _rename("1.0.linear.weight", "1.0.linear.kernel"))),
    "medusa.tensors.shapes": ("medusa", lambda d: _edit_tensors(
        d / "medusa_lm_head.safetensors", _reshape("2.1.weight"))),
    "medusa.weights.file": ("medusa", lambda d: os.replace(
        d / "medusa_lm_head.safetensors", d / "model.safetensors")),
    "tensors.dtype": ("medusa", lambda d: _edit_tensors(
        d / "medusa_lm_head.safetensors", _to_int("0.0.linear.bias"))),
    "config.base_model_name_or_path": ("medusa", lambda d: _edit_config(
        d, base_model_name_or_path=None)),
    "files.tokenizer": ("medusa", lambda d: [(d / n).unlink() for n in (
        "tokenizer.json", "tokenizer_config.json")]),
    "files.no_pickle": ("mlp", lambda d: (d / "pytorch_model.bin").write_bytes(b"\x80\x04N.")),
    "speculate.within_heads": ("mlp", lambda d: (d / "serving_configs/tgi.env").write_text(
        (d / "serving_configs/tgi.env").read_text().replace("SPECULATE=3", "SPECULATE=4"))),
    "mlp.config.tie_weights": ("mlp", lambda d: _edit_config(d, tie_weights=False)),
    "mlp.config.architectures": ("mlp", lambda d: _edit_config(d, architectures=None)),
    "mlp.tensors.prefix": ("mlp", lambda d: _edit_tensors(
        d / "model.safetensors", _strip_prefix)),
    "mlp.tensors.shapes": ("mlp", lambda d: _edit_tensors(
        d / "model.safetensors", _reshape("speculator.proj.1.weight"))),
    "mlp.tensors.names": ("mlp", lambda d: _edit_tensors(
        d / "model.safetensors", _rename("speculator.proj.1.weight", "speculator.proj.2.weight"))),
    "format.detected": ("mlp", lambda d: _edit_config(d, model_type="llama")),
}


@pytest.mark.parametrize("rule", sorted(BREAKERS))
def test_each_rule_fails_on_a_broken_export(rule, tiny, exports, tmp_path):
    which, breaker = BREAKERS[rule]
    broken = tmp_path / "broken"
    shutil.copytree(exports[which].out, broken)
    assert check_tgi(broken, tiny.target).ok
    breaker(broken)
    report = check_tgi(broken, tiny.target)
    assert not report.ok
    failed = {f.rule: f for f in report.failures}
    assert rule in failed, [(f.rule, f.message) for f in report.failures]
    assert failed[rule].source and ("text_generation_server" in failed[rule].source
                                    or ".rs" in failed[rule].source)
    with pytest.raises(DspecError, match=rule.replace(".", r"\.")):
        report.raise_if_failed()


def test_target_mismatch_rules(tiny, exports, tmp_path):
    other = tmp_path / "other-target"
    shutil.copytree(tiny.target, other)
    _edit_config(other, vocab_size=640, hidden_size=256)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzz-new-token"] = 600
    (other / "tokenizer.json").write_text(json.dumps(tok))
    failed = {f.rule for f in check_tgi(exports["medusa"].out, other).failures}
    assert {"target.hidden_size", "target.vocab_size", "target.tokenizer"} <= failed


# --- refusals ------------------------------------------------------------------------------------


def test_standalone_draft_model_refused(tiny, tmp_path):
    with pytest.raises(DspecError) as e:
        export_tgi(tiny.draft, tiny.target, tmp_path / "out")
    msg = str(e.value)
    assert "TGI cannot serve" in msg and "Medusa" in msg and "dspec export vllm" in msg
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_untied_mlp_refused_with_reason(tiny, sources, tmp_path):
    with pytest.raises(DspecError, match=r"untied.*MLPSpeculatorModel\.__init__"):
        export_tgi(sources["mlp_untied"], tiny.target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_speculate_and_token_limits_checked(tiny, sources, tmp_path):
    with pytest.raises(DspecError, match="exceeds the 3 heads"):
        export_tgi(sources["medusa"], tiny.target, tmp_path / "a", speculate=4)
    with pytest.raises(DspecError, match="must be positive and below"):
        export_tgi(sources["medusa"], tiny.target, tmp_path / "b", max_input_tokens=512,
                   max_total_tokens=512)
    assert sorted(os.listdir(tmp_path)) == []


def test_pickle_only_draft_refused_unloaded(tiny, sources, tmp_path):
    draft = tmp_path / "pickled"
    shutil.copytree(sources["medusa"], draft)
    (draft / "medusa_lm_head.safetensors").unlink()
    # Not a valid pickle either: refusing must not depend on trying to load it.
    (draft / "medusa_lm_head.bin").write_bytes(b"not even a pickle")
    with pytest.raises(DspecError, match=r"pickle.*never\s+loaded"):
        export_tgi(draft, tiny.target, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_source_leaves_nothing(tiny, sources, tmp_path):
    draft = tmp_path / "src"
    shutil.copytree(sources["medusa"], draft)
    weights = draft / "medusa_lm_head.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    parent = tmp_path / "exports"
    parent.mkdir()
    with pytest.raises(DspecError, match="truncated"):
        export_tgi(draft, tiny.target, parent / "out")
    assert os.listdir(parent) == []


def test_failed_check_never_lands_and_keeps_old_export(tiny, sources, tmp_path):
    """Integer weights are only caught by the TGI checker, after everything is staged."""
    draft = tmp_path / "src"
    shutil.copytree(sources["medusa"], draft)
    _edit_tensors(draft / "medusa_lm_head.safetensors", _to_int("0.0.linear.weight"))
    parent = tmp_path / "exports"
    with pytest.raises(DspecError, match=r"tensors\.dtype"):
        export_tgi(draft, tiny.target, parent / "out")
    assert os.listdir(parent) == []

    export_tgi(sources["medusa"], tiny.target, parent / "out")
    before = _snapshot(parent / "out")
    with pytest.raises(DspecError, match=r"tensors\.dtype"):
        export_tgi(draft, tiny.target, parent / "out", overwrite=True)
    assert _snapshot(parent / "out") == before
    assert os.listdir(parent) == ["out"]


def test_existing_out_refused_unless_overwrite(tiny, sources, tmp_path):
    out = tmp_path / "out"
    export_tgi(sources["medusa"], tiny.target, out)
    before = _snapshot(out)
    with pytest.raises(DspecError, match="already exists.*--overwrite"):
        export_tgi(sources["medusa"], tiny.target, out, speculate=2)
    assert _snapshot(out) == before

    res = export_tgi(sources["medusa"], tiny.target, out, speculate=2, overwrite=True)
    assert res.check.ok and read_manifest(out).k == 2
    assert _snapshot(out) != before
    assert "SPECULATE=2" in (out / "serving_configs/tgi.env").read_text()
    assert os.listdir(tmp_path) == ["out"]


def test_fingerprint_mismatch_refused_then_forced(tiny, sources, tmp_path):
    updated_fp = fingerprint(tiny.target_updated)
    with pytest.raises(DspecError) as e:
        export_tgi(sources["medusa"], tiny.target_updated, tmp_path / "out")
    assert fingerprint(tiny.target) in str(e.value) and updated_fp in str(e.value)
    assert "--force" in str(e.value)
    assert not (tmp_path / "out").exists()

    res = export_tgi(sources["medusa"], tiny.target_updated, tmp_path / "out", force=True)
    manifest = read_manifest(res.out)
    assert manifest.target_fingerprint == updated_fp
    assert manifest.extra["export"]["forced"] == ["target_fingerprint"]
    assert any("forced" in n for n in res.notes)


def test_draft_without_manifest_or_tokenizer(tiny, sources, tmp_path):
    """The FasterDecoding layout as downloaded: config and heads only."""
    draft = tmp_path / "bare"
    draft.mkdir()
    for name in ("config.json", "medusa_lm_head.safetensors"):
        shutil.copy2(sources["medusa"] / name, draft / name)
    res = export_tgi(draft, tiny.target, tmp_path / "out", model_id="org/tiny-target")
    manifest = read_manifest(res.out)
    assert manifest.extra["export"]["source"]["fingerprint"].startswith("sha256:")
    assert json.loads((res.out / "config.json").read_text())["base_model_name_or_path"] == \
        "org/tiny-target"
    assert any("no deepspec.json" in n for n in res.notes)


# --- baseline, launcher ----------------------------------------------------------------------


def _entry(category, k, rate, length, positions, temperature=0.0, batch_size=1):
    drafts = 100
    return {
        "category": category, "temperature": temperature, "k": k, "batch_size": batch_size,
        "acceptance_rate": rate, "acceptance_length": length, "position_acceptance": positions,
        "alpha": rate, "num_drafts": drafts, "num_draft_tokens": drafts * k,
        "num_accepted_tokens": round(rate * drafts * k),
    }


def _report(target_fp: str = "sha256:t", draft_fp: str = "sha256:d") -> dict:
    results, overall = [], []
    for k in (2, 3):
        results += [_entry("chat", k, 0.5, 2.0, [0.6, 0.4, 0.3][:k]),
                    _entry("math", k, 0.7, 2.4, [0.8, 0.6, 0.5][:k])]
        overall.append(_entry("overall", k, 0.6, 2.2, [0.7, 0.5, 0.4][:k]))
    return {
        "schema": "deepspec-bench/v1", "created": "2026-01-01T00:00:00+00:00",
        "complete": True, "bench": {"name": "quick"}, "engine": {"name": "reference"},
        "models": {"target": {"fingerprint": target_fp}, "draft": {"fingerprint": draft_fp}},
        "results": results, "overall": overall,
    }


def _measured(tiny, sources) -> dict:
    """A report measured on this target and the MLP speculator, as the export checks."""
    return _report(fingerprint(tiny.target), fingerprint(sources["mlp"]))


def test_baseline_from_report(tiny, sources, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(_measured(tiny, sources)))
    res = export_tgi(sources["mlp"], tiny.target, tmp_path / "out", speculate=2, report=report)
    baseline = read_manifest(res.out).baseline
    assert baseline is not None and baseline.k == 2 and baseline.temperature == 0.0
    assert baseline.acceptance_rate == 0.6 and baseline.per_position == [0.7, 0.5]
    assert set(baseline.categories) == {"chat", "math"}
    assert baseline.categories["math"]["acceptance_rate"] == 0.7
    assert baseline.categories["chat"]["per_position"] == [0.6, 0.4]
    assert baseline.report["bench"] == "quick"

    bad = _measured(tiny, sources)
    bad["results"] = [e for e in bad["results"] if e["k"] == 3]
    bad["overall"] = [e for e in bad["overall"] if e["k"] == 3]
    report.write_text(json.dumps(bad))
    with pytest.raises(DspecError, match="no results at k = 2"):
        export_tgi(sources["mlp"], tiny.target, tmp_path / "out2", speculate=2, report=report)
    assert not (tmp_path / "out2").exists()


def test_a_report_of_another_target_or_draft_is_refused_then_forced(tiny, sources, tmp_path):
    """The same rule as the vLLM export's: a baseline is this draft's, on this target."""
    report = tmp_path / "report.json"
    for other, what in ((_report(draft_fp=_measured(tiny, sources)["models"]["draft"]
                                 ["fingerprint"]), "another target"),
                        (_report(target_fp=fingerprint(tiny.target)), "another draft")):
        report.write_text(json.dumps(other))
        with pytest.raises(DspecError, match=f"was measured on {what}"):
            export_tgi(sources["mlp"], tiny.target, tmp_path / "out", speculate=2, report=report)
        assert not (tmp_path / "out").exists()
    res = export_tgi(sources["mlp"], tiny.target, tmp_path / "out", speculate=2, report=report,
                     force=True)
    assert read_manifest(res.out).extra["export"]["forced"] == ["report_draft"]


@pytest.mark.parametrize("partial, why", [
    ({"complete": False, "interrupted": True}, "the run was interrupted"),
    ({"complete": False, "error": "RuntimeError: boom"}, "the run failed"),
    ({"complete": False}, "the run has not finished"),
])
def test_a_partial_report_is_no_baseline(tiny, sources, tmp_path, partial, why):
    """The vLLM export refuses a partial report as its baseline; so does the TGI export."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps({**_report(), **partial}))
    with pytest.raises(DspecError, match=f"is partial: {why}"):
        export_tgi(sources["mlp"], tiny.target, tmp_path / "out", speculate=2, report=report)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_no_report_is_refused(tiny, sources, tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({**_report(), "schema": "deepspec-bench/v2"}))
    with pytest.raises(DspecError, match="is not a deepspec-bench/v1 report"):
        export_tgi(sources["mlp"], tiny.target, tmp_path / "out", speculate=2, report=report)
    with pytest.raises(DspecError, match="does not exist"):
        export_tgi(sources["mlp"], tiny.target, tmp_path / "out", speculate=2,
                   report=tmp_path / "missing.json")
    assert not (tmp_path / "out").exists()


def test_launcher_args_env_and_helm(tiny, sources, tmp_path):
    import yaml

    out = tmp_path / "out"
    export_tgi(sources["medusa"], tiny.target, out, speculate=2, max_input_tokens=256,
               max_total_tokens=512)
    served = str(out.resolve())
    args = ["--model-id", served, "--speculate", "2", "--max-input-tokens", "256",
            "--max-total-tokens", "512"]
    script = (out / "serving_configs/tgi-launcher.sh").read_text()
    assert ('exec text-generation-launcher --model-id "$MODEL_ID" --speculate 2 '
            '--max-input-tokens 256 --max-total-tokens 512 "$@"') in script
    assert os.access(out / "serving_configs/tgi-launcher.sh", os.X_OK)
    env_lines = [ln for ln in (out / "serving_configs/tgi.env").read_text().splitlines()
                 if ln and not ln.startswith("#")]
    assert env_lines == [f"MODEL_ID={served}", "SPECULATE=2", "MAX_INPUT_TOKENS=256",
                         "MAX_TOTAL_TOKENS=512"]
    values = yaml.safe_load((out / "serving_configs/helm-values.yaml").read_text())
    # The chart passes --model-id and --speculate itself; the token limits are the extra args.
    assert values == {
        "engine": "tgi", "model": "", "draft": "out",
        "speculative": {"method": "medusa", "k": 2},
        "args": ["--max-input-tokens", "256", "--max-total-tokens", "512"],
        "env": {}, "deepspec": {"manifest": "deepspec.json"},
    }
    assert read_manifest(out).extra["export"]["launcher"] == args

    # Run the script with a stand-in `text-generation-launcher` that prints its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "text-generation-launcher"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    run = subprocess.run(["sh", str(out / "serving_configs/tgi-launcher.sh"), "--port", "8080"],
                         env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
                         capture_output=True, text=True, check=True)
    assert run.stdout.splitlines() == [*args, "--port", "8080"]


def test_long_inputs_set_prefill_tokens(tiny, sources, tmp_path):
    out = tmp_path / "out"
    res = export_tgi(sources["mlp"], tiny.target, out, max_input_tokens=6000,
                     max_total_tokens=8192)
    assert res.check.ok
    env = (out / "serving_configs/tgi.env").read_text()
    assert "MAX_BATCH_PREFILL_TOKENS=6000" in env
    script = (out / "serving_configs/tgi-launcher.sh").read_text()
    assert "--max-batch-prefill-tokens 6000" in script
    assert any("max_position_embeddings" in n for n in res.notes)


def test_cli_export_tgi_and_check(tiny, sources, tmp_path, capsys):
    from deepspec_plugin.cli import main

    out = tmp_path / "cli-medusa"
    assert main(["export", "tgi", "--draft", str(sources["medusa"]), "--target",
                 str(tiny.target), "--out", str(out), "--speculate", "2"]) == 0
    assert "exported medusa" in capsys.readouterr().out
    assert read_manifest(out).k == 2
    assert main(["export", "check", str(out)]) == 0  # TGI: the loader rules, no engine to load
    assert "all checks passed" in capsys.readouterr().out
    assert main(["export", "tgi", "--draft", str(tiny.draft), "--target", str(tiny.target),
                 "--out", str(tmp_path / "lm")]) == 2
    assert "TGI cannot serve one" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["export", "check", str(out)]) == 1
