"""`dspec export vllm --method eagle3` on the project's own heads (`dspec train --draft-type
eagle3`: already vLLM's layout), the draft sampling rule in every export, and the speculators
format written beside vLLM's layout.

The heads are trained here, for a few steps, on the tiny target (conftest's ``tiny`` and
``train_data``): the export is tested on what the trainer really writes, not on a stand-in.
The refusals run on copies of a trained head with one thing broken; each must say what to do
in one line and leave nothing behind. The speculators config is read back by speculators' own
config classes (speculators 0.9.0, installed without its dependencies: why, in pyproject.toml)
and by vLLM's converter. The slow tests load the export in real vLLM (CPU): through
`dspec export check`'s load, against the reference engine's counts, and the speculators
directory served on its own.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from helpers import copy_model_with as _copy_with
from helpers import model_config as _config
from helpers import model_tensors as _load
from real_servers import needs_vllm

from deepspec_plugin.cli import main
from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.check import check_export
from deepspec_plugin.exporters.eagle3_rules import check_vllm_eagle3
from deepspec_plugin.exporters.vllm import export_vllm
from deepspec_plugin.manifest import read_manifest
from deepspec_plugin.models import fingerprint

DRAFT_VOCAB, VOCAB, K = 200, 512, 3
STOPS = [0, 2]  # the tiny target's EOS ids (tokenizer and generation_config.json)
needs_speculators = pytest.mark.skipif(
    importlib.util.find_spec("speculators") is None,
    reason="speculators is not installed (pip install --no-deps speculators==0.9.0 datasets)")


def _train(tiny, data, out: Path, **settings) -> Path:
    from deepspec_plugin.train.trainer import train

    train(tiny.target, data, out, draft_type="eagle3", steps=3, eval_every=3, save_every=3,
          lr=3e-3, batch_size=4, **settings)
    return out / "draft"


@pytest.fixture(scope="module")
def heads(tiny, train_data, tmp_path_factory):
    """A reduced-vocabulary head (200 of 512 tokens) and a full-vocabulary one, as trained."""
    root = tmp_path_factory.mktemp("own-heads")
    return {"reduced": _train(tiny, train_data, root / "reduced", draft_vocab_size=DRAFT_VOCAB),
            "full": _train(tiny, train_data, root / "full", draft_vocab_size=VOCAB)}


@pytest.fixture(scope="module")
def exported(tiny, heads, tmp_path_factory):
    out = tmp_path_factory.mktemp("own-export") / "eagle3-head"
    return export_vllm(heads["reduced"], tiny.target, out, k=K, method="eagle3", load=False)




def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# --- the export of a trained head ------------------------------------------------------------


def test_trained_head_is_exported_as_it_is(tiny, heads, exported):
    src, out = heads["reduced"], exported.out
    assert exported.check.ok, exported.check.failures
    assert exported.check.format == "eagle3"
    # Already vLLM's layout: the weights are the trained file, byte for byte (t2d included).
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert {"d2t", "t2d", "fc.weight", "midlayer.hidden_norm.weight"} <= set(st.read_dir(out))
    assert "embed_tokens.weight" not in st.read_dir(out)
    assert _config(out) == _config(src)  # nothing to change for the tiny target
    joined = " | ".join(exported.notes)
    assert "copied byte for byte" in joined and "t2d kept" in joined
    m, source = read_manifest(out), read_manifest(src)
    assert (m.method, m.k) == ("eagle3", K)
    assert m.extra["eagle3"] == source.extra["eagle3"]  # the training record, kept as it is
    assert m.extra["eagle3"]["draft_vocab_size"] == DRAFT_VOCAB
    assert m.target_fingerprint == source.target_fingerprint == fingerprint(tiny.target)
    assert m.tokenizer_fingerprint == source.tokenizer_fingerprint
    export = m.extra["export"]
    assert export["source"]["layout"] == "vllm" and export["forced"] == []
    assert export["draft_sample_method"] == "greedy" and export["speculators"] == "speculators"


def test_export_reads_back_as_the_trained_head(tiny, heads, exported):
    """load_head reads the export exactly as it reads the trained head: same tensors, maps."""
    import torch

    from deepspec_plugin.models import load_causal_lm
    from deepspec_plugin.models.eagle3 import load_head

    target = load_causal_lm(tiny.target)
    a, b = load_head(heads["reduced"], target), load_head(exported.out, target)
    assert a.draft_to_target_ids().tolist() == b.draft_to_target_ids().tolist()
    assert set(STOPS) <= set(b.draft_to_target_ids().tolist())
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb), na


def test_full_vocabulary_head_has_no_d2t(tiny, heads, tmp_path):
    """vLLM keeps no map for a full-size head: the trainer writes no d2t for one, vLLM's rules
    pass on the trained directory, and the export copies it as it is."""
    full = heads["full"]
    stored = _load(full)
    assert _config(full)["draft_vocab_size"] == VOCAB and "d2t" not in stored
    assert not check_vllm_eagle3(full, tiny.target).failures
    result = export_vllm(full, tiny.target, tmp_path / "out", k=2, method="eagle3", load=False)
    assert result.check.ok, result.check.failures
    dst = _load(result.out)
    assert "d2t" not in dst and dst["t2d"].all()
    assert all(dst[n].equal(stored[n]) for n in dst)


def test_method_draft_model_is_refused_for_a_head(tiny, heads, tmp_path):
    with pytest.raises(DspecError, match="eagle3 draft.*--method eagle3"):
        export_vllm(heads["reduced"], tiny.target, tmp_path / "out", load=False)
    bare = shutil.copytree(heads["reduced"], tmp_path / "bare")  # no manifest to say so
    (bare / "deepspec.json").unlink()
    with pytest.raises(DspecError, match="EAGLE-3 head \\(vLLM's layout\\).*--method eagle3"):
        export_vllm(bare, tiny.target, tmp_path / "out", load=False)


def test_a_model_that_is_no_head_is_refused_with_method_eagle3(tiny, tmp_path):
    plain = shutil.copytree(tiny.draft, tmp_path / "plain")
    (plain / "deepspec.json").unlink(missing_ok=True)
    with pytest.raises(DspecError, match="is not an EAGLE-3 head") as err:
        export_vllm(plain, tiny.target, tmp_path / "out", method="eagle3", load=False)
    assert "--method draft_model" in err.value.fix


# --- refusals: one line, problem and fix, nothing written ------------------------------------


def _aux(ids):
    def change(c):
        c["eagle_aux_hidden_state_layer_ids"] = ids
        c["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = ids
    return change


def _without_stops(s):
    """A draft vocabulary of 200 target tokens without either stop token (d2t and t2d)."""
    import torch

    ids = torch.tensor([i for i in range(VOCAB) if i not in STOPS][:DRAFT_VOCAB])
    s["d2t"] = ids - torch.arange(DRAFT_VOCAB)
    s["t2d"] = torch.zeros(VOCAB, dtype=torch.bool)
    s["t2d"][ids] = True


def _fc_for(n_aux):
    def change(s):
        s["fc.weight"] = s["fc.weight"][:, :1].repeat(1, n_aux * 128).contiguous()
    return change


@pytest.mark.parametrize("tensors, config, match", [
    (None, _aux([1, 9]), r"aux layer ids \[1, 9\] .* do not fit the target's 4 layers: 9 is not "
                         r"in \[0, 4\]"),
    (None, _aux([2, 1]), r"not strictly increasing"),
    (None, lambda c: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[1, 3]),
     r"two aux layer lists"),
    (_without_stops, None, r"lacks the target's stop token\(s\) \[0, 2\]"),
    (lambda s: s.pop("midlayer.hidden_norm.weight"), None,
     r"lacks tensors .*midlayer\.hidden_norm\.weight"),
    (lambda s: s.pop("d2t"), None, r"lacks tensors .*d2t"),
    (_fc_for(3), None, r"fc\.weight is \[128, 384\], expected \[128, 256\]"),
    (lambda s: s.update(extra=s["norm.weight"].clone()), None, r"no place for: extra"),
    (None, lambda c: c.update(vocab_size=1024), r"vocab_size 1024, the target 512"),
    (None, lambda c: c.update(target_hidden_size=64), r"hidden size 64; the target's is 128"),
    (None, lambda c: c.update(architectures=["Eagle3MistralForCausalLM"]),
     r"is not an EAGLE-3 head: .*architectures Eagle3\*ForCausalLM"),
], ids=["aux-out-of-range", "aux-order", "aux-two-lists", "no-stop-tokens", "missing-tensor",
        "missing-d2t", "fc-width", "unknown-tensor", "vocab", "target-hidden", "architecture"])
def test_broken_heads_are_refused(tiny, heads, tmp_path, tensors, config, match):
    src = _copy_with(heads["reduced"], tmp_path / "src", tensors=tensors, config=config)
    out = tmp_path / "exports" / "out"
    out.parent.mkdir()
    with pytest.raises(DspecError, match=match) as err:
        export_vllm(src, tiny.target, out, method="eagle3", load=False)
    assert err.value.fix and "\n" not in str(err.value)  # one line: the problem and the fix
    assert not out.exists() and not _leftovers(out.parent)  # nothing half-written


def test_head_without_weights_is_refused(tiny, heads, tmp_path):
    src = shutil.copytree(heads["reduced"], tmp_path / "src")
    (src / "model.safetensors").unlink()
    with pytest.raises(DspecError, match="has no \\*.safetensors weights") as err:
        export_vllm(src, tiny.target, tmp_path / "out", method="eagle3", load=False)
    assert err.value.fix and not (tmp_path / "out").exists()


def test_an_earlier_export_is_exported_again(tiny, tmp_path):
    """A vLLM-layout head that is not the project's own: a DeepSpec head converted once
    (Qwen3-style, q/k norms, reduced vocabulary) goes through the same checks and is copied."""
    first = _deepspec_export(tiny, tmp_path)
    again = export_vllm(first, tiny.target, tmp_path / "again", method="eagle3", k=2,
                        load=False)
    assert again.check.ok, again.check.failures
    assert read_manifest(again.out).extra["export"]["source"]["layout"] == "vllm"
    assert (again.out / "model.safetensors").read_bytes() == (
        first / "model.safetensors").read_bytes()
    assert _config(again.out)["architectures"] == ["Eagle3Qwen3ForCausalLM"]
    assert any("q_norm" in n for n in st.read_dir(again.out))


def test_head_for_another_target_needs_force_and_is_recorded(tiny, heads, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DspecError, match="made for another target.*--force") as err:
        export_vllm(heads["reduced"], tiny.target_updated, out, method="eagle3", load=False)
    assert "\n" not in str(err.value) and not out.exists()
    result = export_vllm(heads["reduced"], tiny.target_updated, out, method="eagle3",
                         load=False, force=True)
    m = read_manifest(result.out)
    assert m.extra["export"]["forced"] == ["target_fingerprint"]
    assert m.target_fingerprint == fingerprint(tiny.target_updated)
    assert m.extra["data"]["target_fingerprint"] == fingerprint(tiny.target)  # history kept
    assert result.check.ok


# --- the draft sampling rule -------------------------------------------------------------------


def _serving(out: Path) -> tuple[dict, dict, str, dict]:
    import yaml

    sc = out / "serving_configs"
    return (json.loads((sc / "speculative-config.json").read_text()),
            yaml.safe_load((sc / "vllm-serve.yaml").read_text()),
            (sc / "vllm-command.sh").read_text().splitlines()[-1],
            yaml.safe_load((sc / "helm-values.yaml").read_text()))


def test_draft_sample_method_is_greedy_by_default_and_everywhere(exported):
    spec, serve, command, helm = _serving(exported.out)
    assert spec == {"method": "eagle3", "model": str(exported.out), "num_speculative_tokens": K,
                    "draft_sample_method": "greedy"}
    assert serve["speculative-config"] == spec
    assert '"draft_sample_method":"greedy"' in command
    assert helm["speculative"] == {"method": "eagle3", "k": K, "draftSampleMethod": "greedy"}
    assert any(f.rule == "draft_sample_method" and f.ok and not f.warning
               for f in exported.check.findings)


@pytest.mark.parametrize("which", ["eagle3", "draft_model"])
def test_probabilistic_drafting_when_asked(tiny, heads, tmp_path, which):
    draft = heads["reduced"] if which == "eagle3" else tiny.draft
    result = export_vllm(draft, tiny.target, tmp_path / "out", k=2, method=which, load=False,
                         draft_sample_method="probabilistic")
    spec, serve, command, _ = _serving(result.out)
    assert spec["draft_sample_method"] == "probabilistic" and spec["method"] == which
    assert '"draft_sample_method":"probabilistic"' in command
    assert read_manifest(result.out).extra["export"]["draft_sample_method"] == "probabilistic"
    if which == "eagle3":
        speculators = (result.out / "serving_configs" / "vllm-speculators-command.sh").read_text()
        assert f"vllm serve {result.out / 'speculators'} --speculative-config " \
               "'{\"draft_sample_method\":\"probabilistic\"}'" in speculators
    else:
        assert not (result.out / "speculators").exists()  # speculators has no draft_model type


def test_unknown_draft_sample_method_is_refused_before_anything(tiny, tmp_path):
    with pytest.raises(DspecError, match="unknown draft sampling rule 'top_k'") as err:
        export_vllm(tiny.draft, tiny.target, tmp_path / "out", load=False,
                    draft_sample_method="top_k")
    assert "greedy" in err.value.fix and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rule, ok, warning", [(None, False, True), ("typical", False, False)])
def test_check_reads_the_sampling_rule(exported, tmp_path, rule, ok, warning):
    broken = shutil.copytree(exported.out, tmp_path / "broken")
    path = broken / "serving_configs" / "speculative-config.json"
    spec = json.loads(path.read_text())
    spec.pop("draft_sample_method")
    if rule:
        spec["draft_sample_method"] = rule
    path.write_text(json.dumps(spec))
    report = check_export(broken, load=False)
    finding = next(f for f in report.findings if f.rule == "draft_sample_method")
    assert (finding.ok, finding.warning) == (ok, warning)
    assert report.ok is warning  # a missing rule warns (vLLM's default), a wrong one fails


def test_baseline_measured_with_the_other_rule_is_noted(tiny, tmp_path):
    """A report measured (at T > 0) with probabilistic drafting, exported for greedy serving:
    the export says that live acceptance will differ from the baseline."""
    from deepspec_plugin.exporters.vllm import sample_rule_notes
    from deepspec_plugin.manifest import Baseline

    class Report:  # an EvalReport's engine record, as the reference engine describes itself
        engine = {"name": "reference", "draft_sample_method": "probabilistic"}

    warm = Baseline(k=3, temperature=0.7, acceptance_rate=0.5, acceptance_length=2.0,
                    per_position=[0.5])
    (note,) = sample_rule_notes(Report(), warm, "greedy")
    assert "'probabilistic' at T = 0.7" in note and "'greedy'" in note
    assert sample_rule_notes(Report(), warm, "probabilistic") == []
    cold = Baseline(k=3, temperature=0.0, acceptance_rate=0.5, acceptance_length=2.0,
                    per_position=[0.5])
    assert sample_rule_notes(Report(), cold, "greedy") == []  # at T = 0 the rules agree


# --- the speculators format ----------------------------------------------------------------------


def test_speculators_dir_holds_the_same_head(exported):
    out = exported.out
    spec = _config(out / "speculators")
    cfg = _config(out)
    assert spec["speculators_model_type"] == "eagle3"
    for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
                "norm_before_residual", "norm_before_fc"):
        assert spec[key] == cfg[key], key
    assert spec["norm_before_residual"] is False  # vLLM's speculators path defaults to true
    layer = spec["transformer_layer_config"]
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1
    assert layer["num_aux_hidden_states"] == 2  # vLLM 0.32 sizes fc from it, else for 3
    sc = spec["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["default_proposal_method"] == "greedy"
    assert sc["proposal_methods"][0]["speculative_tokens"] == K
    assert sc["verifier"]["architectures"] == ["LlamaForCausalLM"]
    mine, theirs = _load(out), _load(out / "speculators")
    assert set(theirs) == {n.replace("midlayer.", "layers.0.") for n in mine}
    for name, t in mine.items():
        assert t.equal(theirs[name.replace("midlayer.", "layers.0.")]), name
    assert any(f.rule == "speculators_config" and f.ok for f in exported.check.findings)
    assert any(f.rule == "speculators_weights" and f.ok for f in exported.check.findings)


def test_check_fails_a_speculators_dir_that_disagrees(exported, tmp_path):
    broken = shutil.copytree(exported.out, tmp_path / "broken")
    spec = _config(broken / "speculators")
    spec["eagle_aux_hidden_state_layer_ids"] = [1, 3]
    (broken / "speculators" / "config.json").write_text(json.dumps(spec))
    report = check_export(broken, load=False)
    assert {f.rule for f in report.failures} == {"speculators_config"}


def _deepspec_export(tiny, tmp_path) -> Path:
    from eagle3_builders import build_deepspec_eagle3

    head = build_deepspec_eagle3(tiny.target, tmp_path / "deepspec-head", draft_vocab_size=256)
    return export_vllm(head, tiny.target, tmp_path / "deepspec-out", method="eagle3", k=2,
                       target_name="my-org/tiny-target", load=False).out


@needs_speculators
@pytest.mark.parametrize("which", ["own", "deepspec"])
def test_speculators_config_is_valid_for_speculators(tiny, exported, tmp_path, which):
    """speculators' own loader (SpeculatorModelConfig.from_pretrained: pydantic validation and
    its registry) reads the config as an Eagle3SpeculatorConfig with the head's values; the
    DeepSpec-converted head (Qwen3-style, q/k norms) as a Qwen3 layer."""
    from speculators import SpeculatorModelConfig
    from speculators.models import Eagle3SpeculatorConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    out = exported.out if which == "own" else _deepspec_export(tiny, tmp_path)
    cfg = _config(out)
    config = SpeculatorModelConfig.from_pretrained(str(out / "speculators"),
                                                   local_files_only=True)
    assert isinstance(config, Eagle3SpeculatorConfig)
    assert config.draft_vocab_size == cfg["draft_vocab_size"]
    assert config.eagle_aux_hidden_state_layer_ids == cfg["eagle_aux_hidden_state_layer_ids"]
    assert config.norm_before_residual is False and config.target_hidden_size == 128
    layer = config.transformer_layer_config
    assert type(layer).__name__ == ("LlamaConfig" if which == "own" else "Qwen3Config")
    assert (layer.hidden_size, layer.num_hidden_layers, layer.vocab_size) == (128, 1, VOCAB)
    assert config.target_vocab_size == VOCAB
    sc = config.speculators_config
    assert sc.algorithm == "eagle3" and sc.default_proposal_method == "greedy"
    (method,) = sc.proposal_methods
    assert isinstance(method, GreedyTokenProposalConfig)
    assert method.speculative_tokens == (K if which == "own" else 2)
    verifier = str(tiny.target.resolve()) if which == "own" else "my-org/tiny-target"
    assert sc.verifier.name_or_path == verifier
    assert sc.verifier.architectures == ["LlamaForCausalLM"]
    # Round trip through speculators' serialiser keeps what vLLM reads.
    again = config.to_dict()
    for key in ("draft_vocab_size", "eagle_aux_hidden_state_layer_ids", "norm_before_residual",
                "target_hidden_size", "speculators_model_type"):
        assert again[key] == _config(out / "speculators")[key], key


@needs_vllm
def test_vllm_reads_the_speculators_config(exported):
    """vLLM 0.32's own converter (configs/speculators): the speculative config it builds, and
    the draft config it hands the EAGLE-3 Llama head (fc sized for 2 aux states, the residual
    before hidden_norm)."""
    from vllm.transformers_utils.configs.speculators.base import SpeculatorsConfig

    path = exported.out / "speculators"
    assert SpeculatorsConfig.extract_vllm_speculative_config(_config(path)) == {
        "method": "eagle3", "num_speculative_tokens": K}
    hf = SpeculatorsConfig.from_pretrained(str(path))
    assert hf.architectures == ["Eagle3LlamaForCausalLM"]
    assert (hf.num_aux_hidden_states, hf.norm_before_residual, hf.draft_vocab_size) == (
        2, False, DRAFT_VOCAB)
    assert hf.eagle_aux_hidden_state_layer_ids == [1, 2] and hf.vocab_size == VOCAB


def test_cli_exports_and_checks_a_trained_head(tiny, heads, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert main(["export", "vllm", "--draft", str(heads["reduced"]), "--target",
                 str(tiny.target), "--out", str(out), "--method", "eagle3", "--no-load"]) == 0
    assert "exported eagle3" in capsys.readouterr().out
    assert main(["export", "check", str(out), "--no-load"]) == 0
    assert "all checks passed" in capsys.readouterr().out


# --- real vLLM ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_trained_head_loads_in_vllm(tiny, train_data, tmp_path):
    """A head trained here (30 steps: enough that vLLM accepts some of its drafts), exported,
    then `dspec export check`'s real load (check_export with load: vllm_load_eagle3 on the
    project's vLLM runner): vLLM builds the head from the export, drafts with it, and greedy
    output equals plain decoding. Then vLLM's acceptance counts on the export against the
    reference engine's on the same prompts (check.real_load, the draft_model check): equal
    counts, per position, mean vLLM computes the head exactly as it was trained. Measured:
    7 of 114 draft tokens accepted over 38 drafts (per position 5, 2, 0) in both. About 4
    minutes on a busy 2-core CPU."""
    from deepspec_plugin.exporters.check import real_load
    from deepspec_plugin.train.trainer import train

    train(tiny.target, train_data, tmp_path / "run", draft_type="eagle3", steps=30,
          eval_every=30, save_every=30, lr=3e-3, batch_size=4, draft_vocab_size=DRAFT_VOCAB)
    out = tmp_path / "export"
    export_vllm(tmp_path / "run" / "draft", tiny.target, out, k=K, method="eagle3", load=False)
    report = check_export(out, tiny.target, load=True)
    print(report.load and report.load["summary"])
    assert report.ok, report.failures
    assert report.load["equal"], report.load["summary"]
    counts = report.load["counts"]
    assert counts["num_drafts"] > 0 and counts["num_draft_tokens"] == K * counts["num_drafts"]
    assert any(f.rule == "vllm_load" and f.ok and not f.warning for f in report.findings)

    exact = real_load(out, tiny.target, K)
    print(exact["summary"])
    assert exact["equal"], exact["counts"]
    assert exact["counts"]["vllm"]["num_accepted_tokens"] > 0, exact["summary"]


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_vllm_serves_the_speculators_dir(tiny, exported, tmp_path):
    """`vllm serve EXPORT/speculators` (the OpenAI server on the speculators directory alone):
    vLLM finds the verifier (the tiny target, by its local path) in the config, drafts with the
    head, and its greedy tokens equal the target's own (transformers, which vLLM matches on the
    tiny target: test_export_eagle3.py's oracle test)."""
    import requests
    from eagle3_builders import greedy_continuations
    from real_servers import server_counters, vllm_server

    from deepspec_plugin.exporters.eagle3_load import eagle3_prompt_ids

    prompts, new = eagle3_prompt_ids(tiny.target, 2), 16
    expected = greedy_continuations(tiny.target, prompts, new)
    with vllm_server(tmp_path, target=exported.out / "speculators") as (url, log):
        served = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        got = []
        for ids in prompts:
            r = requests.post(f"{url}/v1/completions", timeout=120, json={
                "model": served, "prompt": ids, "max_tokens": new,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True})
            r.raise_for_status()
            got.append(r.json()["choices"][0]["token_ids"])
        counts = server_counters(url)
    print(counts)
    assert got == expected
    assert counts["drafts"] > 0 and counts["draft_tokens"] == K * counts["drafts"]
