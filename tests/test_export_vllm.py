"""`dspec export vllm` (draft_model) and `dspec export check`, on the tiny pair, without vLLM.

The real vLLM load is in tests/test_export_vllm_real.py (slow); here every export passes
``load=False`` and the checks run on files only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from deepspec_plugin.bench.spec import SCHEMA
from deepspec_plugin.cli import main
from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters.check import check_export
from deepspec_plugin.exporters.serving import COMPOSE_FILES, VLLM_FILES
from deepspec_plugin.exporters.vllm import export_vllm
from deepspec_plugin.manifest import read_manifest, write_manifest
from deepspec_plugin.models import fingerprint, tokenizer_fingerprint


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def resize_vocab(src: Path, dst: Path, rows: int) -> Path:
    """A copy of a model whose embedding and head have `rows` rows (zero rows added, or cut)."""
    import torch
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    state = tensors(src)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in state:
            t = state[name]
            state[name] = (torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
                           if rows > t.shape[0] else t[:rows].clone())
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = rows
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "draft-vllm"
    return export_vllm(tiny.draft, tiny.target, out, k=3, load=False)


def test_draft_model_export_is_self_contained_and_checked(tiny, exported):
    out = exported.out
    assert exported.check.ok and exported.notes == []
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "deepspec.json",
            "serving_configs"} <= names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    # Same tensors, byte for byte; the target's tokenizer.
    src, dst = tensors(tiny.draft), tensors(out)
    assert src.keys() == dst.keys() and all(src[n].equal(dst[n]) for n in src)
    # Nothing to change: the weights file is copied whole.
    weights = "model.safetensors"
    assert (out / weights).read_bytes() == (tiny.draft / weights).read_bytes()
    assert tokenizer_fingerprint(out) == tokenizer_fingerprint(tiny.target)
    m = read_manifest(out)
    assert m.method == "draft_model" and m.k == 3 and m.baseline is None
    assert m.target_fingerprint == fingerprint(tiny.target)
    assert m.tokenizer_fingerprint == tokenizer_fingerprint(tiny.target)
    assert m.extra["export"]["engine"] == "vllm" and m.extra["export"]["forced"] == []
    assert m.extra["export"]["source"]["path"] == str(tiny.draft.resolve())


def test_serving_configs_name_the_method_and_the_export(tiny, exported):
    import yaml

    sc = exported.out / "serving_configs"
    written = {str(p.relative_to(sc)) for p in sc.rglob("*") if p.is_file()}
    assert written == {*VLLM_FILES, *COMPOSE_FILES}  # compose files: tests/test_serving_configs.py
    spec = json.loads((sc / "speculative-config.json").read_text())
    assert spec == {"method": "draft_model", "model": str(exported.out),
                    "num_speculative_tokens": 3, "draft_sample_method": "greedy"}
    serve = yaml.safe_load((sc / "vllm-serve.yaml").read_text())
    assert serve == {"model": str(tiny.target.resolve()), "speculative-config": spec}
    command = (sc / "vllm-command.sh").read_text().splitlines()[-1]
    assert command.startswith(f"vllm serve {tiny.target.resolve()} --speculative-config ")
    assert '"method":"draft_model"' in command
    values = yaml.safe_load((sc / "helm-values.yaml").read_text())
    assert values == {"engine": "vllm", "model": str(tiny.target.resolve()),
                      "draft": exported.out.name,
                      "speculative": {"method": "draft_model", "k": 3,
                                      "draftSampleMethod": "greedy"},
                      "args": [], "env": {}, "deepspec": {"manifest": "deepspec.json"}}


def test_vocab_padding_when_only_padding_differs(tiny, tmp_path):
    target = resize_vocab(tiny.target, tmp_path / "target-576", 576)
    result = export_vllm(tiny.draft, target, tmp_path / "out", load=False)
    assert any("padded" in n and "512 to the target's 576" in n for n in result.notes)
    src, dst = tensors(tiny.draft), tensors(result.out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert dst[name].shape[0] == 576
        assert dst[name][:512].equal(src[name]) and not dst[name][512:].any()
    assert json.loads((result.out / "config.json").read_text())["vocab_size"] == 576
    assert result.check.ok
    # And back: a draft with more (padding) rows than the target is cut to the target's size.
    wide = resize_vocab(tiny.draft, tmp_path / "draft-576", 576)
    back = export_vllm(wide, tiny.target, tmp_path / "out-back", load=False)
    assert any("cut back" in n for n in back.notes)
    assert tensors(back.out)["lm_head.weight"].equal(src["lm_head.weight"])


def test_tokenizers_that_truly_differ_are_refused_naming_the_tokens(tiny, tmp_path):
    draft = tmp_path / "draft"
    shutil.copytree(tiny.draft, draft)
    tok = json.loads((draft / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DspecError) as e:
        export_vllm(draft, tiny.target, tmp_path / "out", load=False)
    assert "tokenizer differs" in str(e.value) and repr(a) in str(e.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_pickle_only_draft_is_refused_unread(tiny, tmp_path):
    draft = tmp_path / "pickled"
    draft.mkdir()
    shutil.copy(tiny.draft / "config.json", draft / "config.json")
    (draft / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(DspecError, match="pickle"):
        export_vllm(draft, tiny.target, tmp_path / "out", load=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_weights_fail_before_anything_lands(tiny, tmp_path, damage):
    draft = tmp_path / "draft"
    shutil.copytree(tiny.draft, draft)
    weights = draft / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000] if damage == "truncate"
                        else data[:8] + b"{not json" + data[17:])
    with pytest.raises(DspecError, match="truncated" if damage == "truncate" else "corrupt"):
        export_vllm(draft, tiny.target, tmp_path / "out", load=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_is_refused_or_replaced_whole(tiny, exported, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported.out, out)
    before = tree_digest(out)
    with pytest.raises(DspecError, match="already exists.*--overwrite"):
        export_vllm(tiny.draft, tiny.target, out, load=False)
    assert tree_digest(out) == before
    export_vllm(tiny.draft, tiny.target, out, k=5, load=False, overwrite=True)
    assert read_manifest(out).k == 5 and leftovers(tmp_path) == []


def test_a_failure_late_in_the_export_keeps_the_old_export(tiny, exported, tmp_path,
                                                          monkeypatch):
    import deepspec_plugin.exporters.vllm as vllm_export

    out = tmp_path / "out"
    shutil.copytree(exported.out, out)
    before = tree_digest(out)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vllm_export, "write_vllm_configs", broken)
    with pytest.raises(OSError):
        export_vllm(tiny.draft, tiny.target, out, load=False, overwrite=True)
    assert tree_digest(out) == before and leftovers(tmp_path) == []


def test_draft_for_another_target_needs_force_and_is_recorded(tiny, exported, tmp_path):
    with pytest.raises(DspecError, match="made for another target.*--force"):
        export_vllm(exported.out, tiny.target_updated, tmp_path / "out", load=False)
    result = export_vllm(exported.out, tiny.target_updated, tmp_path / "out", load=False,
                         force=True)
    m = read_manifest(result.out)
    assert m.extra["export"]["forced"] == ["target_fingerprint"]
    assert m.target_fingerprint == fingerprint(tiny.target_updated)
    rule = next(f for f in result.check.findings if f.rule == "target_fingerprint")
    assert rule.ok  # the export now names the target it was forced onto


@pytest.fixture(scope="module")
def tiny_report(tiny, tmp_path_factory) -> Path:
    from deepspec_plugin.bench.run import evaluate

    root = tmp_path_factory.mktemp("report")
    bench = root / "mini.json"
    bench.write_text(json.dumps({
        "schema": SCHEMA, "name": "mini", "max_new_tokens": 8, "temperatures": [0.0, 0.7],
        "k": [3], "batch_sizes": [1],
        "categories": {"chat": {"files": ["mt-bench.jsonl"], "num_prompts": 1},
                       "math": {"files": ["gsm8k.jsonl"], "num_prompts": 1}},
    }))
    evaluate(tiny.target, tiny.draft, bench, "reference", root / "eval", progress=False)
    return root / "eval" / "report.json"


def test_report_becomes_the_baseline(tiny, tiny_report, tmp_path):
    report = json.loads(tiny_report.read_text())
    result = export_vllm(tiny.draft, tiny.target, tmp_path / "out", report=tiny_report,
                         load=False)
    b = read_manifest(result.out).baseline
    greedy = next(e for e in report["overall"] if e["temperature"] == 0.0)
    assert result.check.ok and read_manifest(result.out).k == 3  # k taken from the report
    assert (b.k, b.temperature) == (3, 0.0)
    assert b.acceptance_rate == greedy["acceptance_rate"]
    assert b.acceptance_length == greedy["acceptance_length"]
    assert b.per_position == greedy["position_acceptance"]
    assert set(b.categories) == {"chat", "math"}
    assert b.report["draft_fingerprint"] == fingerprint(tiny.draft)
    # The report of one draft is not the baseline of another.
    other = resize_vocab(tiny.draft, tmp_path / "other", 512)
    (other / "config.json").write_text((tiny.draft / "config.json").read_text().replace(
        '"rms_norm_eps": 1e-05', '"rms_norm_eps": 2e-05'))
    with pytest.raises(DspecError, match="measured on another draft"):
        export_vllm(other, tiny.target, tmp_path / "out2", report=tiny_report, load=False)
    with pytest.raises(DspecError, match="no results at k = 4"):
        export_vllm(tiny.draft, tiny.target, tmp_path / "out3", report=tiny_report, k=4,
                    load=False)


def test_an_interrupted_report_is_no_baseline(tiny, tiny_report, tmp_path):
    partial = {**json.loads(tiny_report.read_text()), "complete": False, "interrupted": True}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps(partial))
    with pytest.raises(DspecError, match="is partial: the run was interrupted"):
        export_vllm(tiny.draft, tiny.target, tmp_path / "out", report=tmp_path / "eval",
                    load=False)
    assert not (tmp_path / "out").exists()


def test_check_names_each_broken_rule(tiny, exported, tmp_path):
    def broken(edit) -> set[str]:
        d = tmp_path / f"broken-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(exported.out, d)
        edit(d)
        return {f.rule for f in check_export(d, tiny.target, load=False).failures}

    def config(d, **changes):
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(changes)
        (d / "config.json").write_text(json.dumps(cfg))

    assert broken(lambda d: config(d, vocab_size=600)) >= {"vocab_size", "tensor_shapes"}
    assert broken(lambda d: config(d, num_hidden_layers=2)) == {"tensor_names"}
    assert broken(lambda d: (d / "tokenizer.json").unlink() or
                  (d / "tokenizer_config.json").unlink()) == {"tokenizer_files"}
    assert broken(lambda d: (d / "pytorch_model.bin").write_bytes(b"x")) == {"no_pickle"}
    assert "integrity" in broken(lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-10]))
    # Against another target: the fingerprint rule fails.
    assert {f.rule for f in check_export(exported.out, tiny.target_updated,
                                         load=False).failures} == {"target_fingerprint"}


def test_manifest_of_an_export_is_validated(exported, tmp_path):
    d = tmp_path / "bad-manifest"
    shutil.copytree(exported.out, d)
    data = json.loads((d / "deepspec.json").read_text())
    data["method"] = "magic"
    (d / "deepspec.json").write_text(json.dumps(data))
    with pytest.raises(DspecError, match="unknown method 'magic'"):
        check_export(d, load=False)
    with pytest.raises(DspecError, match="unknown method"):
        write_manifest(data, d / "again.json")


def test_cli_export_and_check(tiny, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert main(["export", "vllm", "--draft", str(tiny.draft), "--target", str(tiny.target),
                 "--out", str(out), "--k", "2", "--no-load"]) == 0
    printed = capsys.readouterr().out
    assert "exported draft_model" in printed and read_manifest(out).k == 2
    assert main(["export", "check", str(out), "--no-load"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    assert main(["export", "vllm", "--draft", str(tiny.draft), "--target", str(tiny.target),
                 "--out", str(out), "--no-load"]) == 2
    assert "already exists" in capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    cfg["vocab_size"] = 7
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["export", "check", str(out), "--no-load"]) == 1
    assert "FAIL" in capsys.readouterr().out


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 24}),
    ("mistral", {}), ("qwen2", {}), ("qwen3", {"head_dim": 16}),
])
def test_llama_family_shapes_match_transformers(model_type, extra):
    """The check's own shape rules for the Llama family equal transformers' models."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from deepspec_plugin.exporters.check import llama_tensors

    c = {"model_type": model_type, "hidden_size": 64, "intermediate_size": 96,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
         "vocab_size": 100, "tie_word_embeddings": False, **extra}
    cfg = AutoConfig.for_model(**c)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert llama_tensors(cfg.to_dict()) == expected


def test_eagle3_export_through_export_vllm(tiny, tmp_path):
    """An EAGLE-3 head in DeepSpec's layout (conversion details: test_export_eagle3.py)."""
    import yaml
    from eagle3_builders import build_deepspec_eagle3

    head = build_deepspec_eagle3(tiny.target, tmp_path / "head")
    with pytest.raises(DspecError, match="draft_model"):  # its manifest says eagle3
        export_vllm(head, tiny.target, tmp_path / "wrong", load=False)
    result = export_vllm(head, tiny.target, tmp_path / "out", method="eagle3", k=2, load=False)
    assert result.check.ok and result.check.format == "eagle3"
    assert any("midlayer" in n for n in result.notes)
    m = read_manifest(result.out)
    assert (m.method, m.k) == ("eagle3", 2)
    serve = yaml.safe_load((result.out / "serving_configs" / "vllm-serve.yaml").read_text())
    assert serve["speculative-config"] == {"method": "eagle3", "model": str(result.out),
                                           "num_speculative_tokens": 2,
                                           "draft_sample_method": "greedy"}
    assert tokenizer_fingerprint(result.out) == tokenizer_fingerprint(tiny.target)


def test_streamed_writer_round_trips_with_padding_and_alignment(tiny, tmp_path):
    """write_safetensors: renamed, padded and inline tensors read back by safetensors itself."""
    import torch
    from safetensors.torch import load_file

    from deepspec_plugin.exporters import safetensors_io as st

    stored = st.read_dir(tiny.draft)
    embed = stored["model.embed_tokens.weight"]
    plan = [st.padded_rows(embed, "a.embed", embed.shape[0] + 3),
            st.renamed(stored["model.norm.weight"], "b.norm"),
            st.Planned("c.ids", "I64", (2,), data=torch.tensor([7, 9]).numpy().tobytes())]
    st.write_safetensors(tmp_path / "x.safetensors", plan)
    back = load_file(tmp_path / "x.safetensors")
    src = tensors(tiny.draft)
    assert back["a.embed"][:-3].equal(src["model.embed_tokens.weight"])
    assert not back["a.embed"][-3:].any()
    assert back["b.norm"].equal(src["model.norm.weight"]) and back["c.ids"].tolist() == [7, 9]
    assert st.unchanged_file(plan) is None
    with pytest.raises(ValueError, match="bytes planned"):
        st.write_safetensors(tmp_path / "y.safetensors",
                             [st.Planned("bad", "F32", (3,), data=b"\0" * 8)])
