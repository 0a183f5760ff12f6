"""EAGLE-3 heads from DeepSpec's layout into vLLM's (deepspec_plugin.exporters.eagle3), tiny target.

The heads are built by tests/eagle3_builders.py from the tiny 4-layer Llama target (random
weights in DeepSpec's ``Qwen3Eagle3Model`` layout, nothing downloaded), converted into a staging
directory, and checked:
names, shapes, config keys, bytes equal to the source's, the check's rules, and refusals of
broken sources and broken exports.

The conversion's meaning (which target hidden states feed the head, where its residual is taken,
what d2t holds) is proved with oracle heads (``build_oracle_eagle3``): heads whose proposals are
known in advance, which a correct conversion makes vLLM accept often and a wrong one (aux layer
ids not shifted by one, ``norm_before_residual`` flipped) clearly less. A fast test checks the
oracle's premise in transformers; the slow tests run real vLLM (CPU) through the project's vLLM
runner (deepspec_plugin.exporters.eagle3_load on VLLMOfflineEngine).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from eagle3_builders import build_deepspec_eagle3, build_oracle_eagle3, greedy_continuations
from helpers import copy_model_with as _copy_with
from helpers import model_config as _config
from helpers import model_tensors as _load
from real_servers import needs_vllm

from deepspec_plugin.errors import DspecError
from deepspec_plugin.exporters import safetensors_io as st
from deepspec_plugin.exporters.eagle3 import is_deepspec_eagle3, write_vllm_eagle3
from deepspec_plugin.exporters.eagle3_load import (
    eagle3_prompt_ids,
    run_vllm_eagle3,
    vllm_load_eagle3,
)
from deepspec_plugin.exporters.eagle3_rules import check_vllm_eagle3
from deepspec_plugin.exporters.output import copy_tokenizer_files
from deepspec_plugin.manifest import read_manifest
from deepspec_plugin.models import fingerprint

HIDDEN, VOCAB, REDUCED = 128, 512, 256
ORACLE_MIN_RATE = 0.7  # accepted tokens per draft, right conversion (vLLM 0.32 measured 0.86)
LAYER = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
         "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
         "hidden_norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight")


@pytest.fixture(scope="module")
def heads(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3")
    return {
        "full": build_deepspec_eagle3(tiny.target, root / "full"),
        "reduced": build_deepspec_eagle3(tiny.target, root / "reduced",
                                         draft_vocab_size=REDUCED, seed=1),
        "llama": build_deepspec_eagle3(tiny.target, root / "llama", qk_norm=False, seed=2),
    }


def _convert(src: Path, target: Path, where: Path) -> tuple[Path, list[str]]:
    where.mkdir(parents=True)
    return where, write_vllm_eagle3(src, target, where)





# --- the DeepSpec-layout builder -----------------------------------------------------------------


def test_builder_writes_deepspec_layout(tiny, heads):
    full = heads["full"]
    names = set(st.read_dir(full))
    assert names == {"embed_tokens.weight", "fc.weight", "norm.weight", "lm_head.weight",
                     *(f"layers.0.{n}" for n in LAYER)}
    cfg = _config(full)
    assert cfg["architectures"] == ["Qwen3Eagle3Model"]
    assert cfg["target_layer_ids"] == [0, 1, 2] and cfg["num_target_layers"] == 4
    assert cfg["num_hidden_layers"] == cfg["draft_num_hidden_layers"] == 1
    assert "ttt_length" in cfg and "step_loss_decay" in cfg and "draft_vocab_size" not in cfg
    tensors = _load(full)
    assert tuple(tensors["fc.weight"].shape) == (HIDDEN, 3 * HIDDEN)
    assert tuple(tensors["layers.0.self_attn.q_proj.weight"].shape) == (HIDDEN, 2 * HIDDEN)
    from safetensors.torch import load_file

    target = load_file(str(tiny.target / "model.safetensors"))
    assert tensors["embed_tokens.weight"].equal(target["model.embed_tokens.weight"])
    assert tensors["lm_head.weight"].equal(target["lm_head.weight"])
    manifest = read_manifest(full)
    assert manifest.method == "eagle3" and manifest.target_fingerprint == fingerprint(tiny.target)
    assert (full / "tokenizer.json").is_file()

    assert is_deepspec_eagle3(full) and is_deepspec_eagle3(heads["reduced"])
    assert not is_deepspec_eagle3(tiny.target) and not is_deepspec_eagle3(tiny.draft)
    assert "layers.0.self_attn.q_norm.weight" not in st.read_dir(heads["llama"])


def test_builder_reduced_vocabulary_maps(tiny, heads):
    import torch
    from safetensors.torch import load_file

    tensors = _load(heads["reduced"])
    d2t, t2d = tensors["d2t"], tensors["t2d"]
    assert d2t.dtype == torch.int64 and tuple(d2t.shape) == (REDUCED,)
    ids = torch.arange(REDUCED) + d2t
    assert bool((ids[1:] > ids[:-1]).all()) and ids.tolist() == t2d.nonzero().flatten().tolist()
    assert {0, 2} <= set(ids.tolist())  # bos/pad and eos stay draftable
    target = load_file(str(tiny.target / "model.safetensors"))
    assert tensors["lm_head.weight"].equal(target["lm_head.weight"][ids])
    assert _config(heads["reduced"])["draft_vocab_size"] == REDUCED


# --- conversion ----------------------------------------------------------------------------------


def test_convert_full_vocabulary(tiny, heads, tmp_path):
    out, notes = _convert(heads["full"], tiny.target, tmp_path / "out")
    src, dst = _load(heads["full"]), _load(out)
    assert set(dst) == {"fc.weight", "norm.weight", "lm_head.weight",
                        *(f"midlayer.{n}" for n in LAYER)}
    for name, t in dst.items():
        source = "layers.0." + name[len("midlayer."):] if name.startswith("midlayer.") else name
        assert t.dtype == src[source].dtype and t.equal(src[source]), name
    cfg = _config(out)
    assert cfg["architectures"] == ["Eagle3Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]  # DeepSpec's [0, 1, 2] + 1
    assert cfg["num_aux_hidden_states"] == 3
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert cfg["norm_before_residual"] is False and cfg["norm_before_fc"] is False
    assert (cfg["vocab_size"], cfg["draft_vocab_size"]) == (VOCAB, VOCAB)
    assert cfg["target_hidden_size"] == HIDDEN and cfg["num_hidden_layers"] == 1
    assert cfg["tie_word_embeddings"] is False
    assert not {"target_layer_ids", "ttt_length", "step_loss_decay",
                "target_model_name_or_path"} & set(cfg)
    joined = " | ".join(notes)
    assert "midlayer" in joined and "embed_tokens dropped" in joined and "[1, 2, 3]" in joined

    for target in (tiny.target, None):
        report = check_vllm_eagle3(out, target)
        assert report.ok, report.failures
        assert all(f.source and "vllm/" in f.source for f in report.findings)
    assert {"aux_layer_range", "embed_tokens", "vocab_size"} <= {
        f.rule for f in check_vllm_eagle3(out, tiny.target).findings}
    assert not is_deepspec_eagle3(out)


def test_convert_reduced_vocabulary(tiny, heads, tmp_path):
    import torch

    out, notes = _convert(heads["reduced"], tiny.target, tmp_path / "out")
    src, dst = _load(heads["reduced"]), _load(out)
    assert "t2d" not in dst and "embed_tokens.weight" not in dst
    assert dst["d2t"].dtype == torch.int64 and dst["d2t"].equal(src["d2t"])
    assert tuple(dst["lm_head.weight"].shape) == (REDUCED, HIDDEN)
    assert dst["lm_head.weight"].equal(src["lm_head.weight"])
    cfg = _config(out)
    assert (cfg["vocab_size"], cfg["draft_vocab_size"]) == (VOCAB, REDUCED)
    assert any("t2d dropped" in n for n in notes)
    report = check_vllm_eagle3(out, tiny.target)
    assert report.ok, report.failures
    assert any(f.rule == "d2t" and f.ok for f in report.findings)


def test_convert_int32_d2t_to_int64(tiny, heads, tmp_path):
    import torch

    src = _copy_with(heads["reduced"], tmp_path / "src",
                     tensors=lambda s: s.update(d2t=s["d2t"].to(torch.int32)))
    out, notes = _convert(src, tiny.target, tmp_path / "out")
    d2t = _load(out)["d2t"]
    assert d2t.dtype == torch.int64 and d2t.equal(_load(heads["reduced"])["d2t"])
    assert any("converted from I32 to I64" in n for n in notes)
    assert check_vllm_eagle3(out, tiny.target).ok


def test_convert_llama_style_head(tiny, heads, tmp_path):
    out, _ = _convert(heads["llama"], tiny.target, tmp_path / "out")
    cfg = _config(out)
    assert cfg["architectures"] == ["Eagle3LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert not any("q_norm" in n for n in st.read_dir(out))
    assert check_vllm_eagle3(out, tiny.target).ok


def test_trained_embedding_is_kept(tiny, heads, tmp_path):
    src = _copy_with(heads["full"], tmp_path / "src", tensors=lambda s: s.update(
        {"embed_tokens.weight": s["embed_tokens.weight"] * 1.5}))
    out, notes = _convert(src, tiny.target, tmp_path / "out")
    assert _load(out)["embed_tokens.weight"].equal(_load(src)["embed_tokens.weight"])
    assert any(n.startswith("embed_tokens kept") for n in notes)
    assert check_vllm_eagle3(out, tiny.target).ok


def _drop(name):
    return lambda s: s.pop(name)


def _reshape_fc(s):
    s["fc.weight"] = s["fc.weight"][:, : 2 * HIDDEN].contiguous()


def _second_layer(s):
    s.update({k.replace("layers.0.", "layers.1."): v.clone() for k, v in list(s.items())
              if k.startswith("layers.0.")})


@pytest.mark.parametrize("tensors, config, match", [
    (_drop("fc.weight"), None, r"lacks tensors .*fc\.weight"),
    (_drop("layers.0.hidden_norm.weight"), None, r"lacks tensors .*layers\.0\.hidden_norm"),
    (_reshape_fc, None, r"fc\.weight is \[128, 256\], expected \[128, 384\]"),
    (None, lambda c: c.update(target_layer_ids=[0, 1, 9]), r"9 is not in \[0, 3\]"),
    (None, lambda c: c.update(target_layer_ids=[2, 1, 0]), r"not strictly increasing"),
    (None, lambda c: c.pop("target_layer_ids"), r"no target_layer_ids"),
    (None, lambda c: c.update(vocab_size=1024), r"vocab_size 1024, the target 512"),
    (_second_layer, lambda c: c.update(num_hidden_layers=2), r"2 decoder layers"),
    (lambda s: s.update(extra=s["norm.weight"].clone()), None, r"no place for: extra"),
], ids=["missing-fc", "missing-hidden-norm", "fc-shape", "layer-id-out-of-range",
        "layer-ids-order", "not-deepspec", "vocab", "two-layers", "unknown-tensor"])
def test_broken_sources_are_refused(tiny, heads, tmp_path, tensors, config, match):
    src = _copy_with(heads["full"], tmp_path / "src", tensors=tensors, config=config)
    stage = tmp_path / "out"
    stage.mkdir()
    with pytest.raises(DspecError, match=match) as err:
        write_vllm_eagle3(src, tiny.target, stage)
    assert err.value.fix  # every refusal says what to do
    assert not (stage / "model.safetensors").exists()  # nothing written before validation


def test_broken_d2t_is_refused(tiny, heads, tmp_path):
    import torch

    def collide(s):
        s["d2t"] = torch.zeros(REDUCED, dtype=torch.int64)
        s["d2t"][1] = -1  # draft ids 0 and 1 both map to target id 0
    src = _copy_with(heads["reduced"], tmp_path / "src", tensors=collide)
    stage = tmp_path / "out"
    stage.mkdir()
    with pytest.raises(DspecError, match="distinct target ids"):
        write_vllm_eagle3(src, tiny.target, stage)


# --- the check on broken exports -----------------------------------------------------------------


@pytest.fixture(scope="module")
def exports(tiny, heads, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3-exports")
    return {name: _convert(heads[name], tiny.target, root / name)[0]
            for name in ("full", "reduced")}


def _int32_d2t(s):
    import torch

    s["d2t"] = s["d2t"].to(torch.int32)


def _full_d2t(s):
    import torch

    s["d2t"] = torch.zeros(VOCAB, dtype=torch.int64)


@pytest.mark.parametrize("base, tensors, config, rules", [
    ("full", _drop("fc.weight"), None, "tensors_present"),
    ("full", _reshape_fc, None, "tensor_shapes"),
    ("full", None, lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 2, 9],
                                      eagle_config={"eagle_aux_hidden_state_layer_ids":
                                                    [1, 2, 9]}), "aux_layer_range"),
    ("full", None, lambda c: c.update(num_aux_hidden_states=2),
     ("aux_layer_ids", "tensor_shapes")),
    ("full", None, lambda c: c.pop("norm_before_residual"), "norm_before_residual"),
    ("full", None, lambda c: c.update(architectures=["Qwen3Eagle3Model"]), "architecture"),
    ("full", None, lambda c: c.update(target_hidden_size=64),
     ("target_hidden_size", "tensor_shapes")),
    ("full", lambda s: s.update({"midlayer.extra.weight": s["norm.weight"].clone()}), None,
     "tensors_known"),
    ("full", _full_d2t, None, "d2t"),
    ("full", lambda s: s.update({"fc.weight": s["fc.weight"].to(__import__("torch").int32)}),
     None, "weight_dtypes"),
    ("reduced", _int32_d2t, None, "d2t"),
    ("reduced", _drop("d2t"), None, ("tensors_present", "d2t")),
], ids=["missing-fc", "fc-shape", "layer-id-out-of-range", "aux-count", "norm-before-residual",
        "architecture", "target-hidden", "unknown-tensor", "d2t-full-vocab", "int-weight",
        "d2t-int32", "d2t-missing"])
def test_check_fails_the_right_rule(tiny, exports, tmp_path, base, tensors, config, rules):
    """``rules``: the rule that must fail, or (that rule, others the same fault also fails)."""
    rule, *also = (rules,) if isinstance(rules, str) else rules
    broken = _copy_with(exports[base], tmp_path / "broken", tensors=tensors, config=config)
    report = check_vllm_eagle3(broken, tiny.target)
    failed = {f.rule for f in report.failures}
    assert rule in failed, [(f.rule, f.message) for f in report.findings]
    assert failed <= {rule, *also}, report.failures  # no unrelated rule fails
    with pytest.raises(DspecError, match=rule):
        report.raise_if_failed()


def test_check_reports_unreadable_export(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    report = check_vllm_eagle3(tmp_path)
    assert not report.ok and report.failures[0].rule == "config"


# --- oracle heads: the conversion's meaning ----------------------------------------------------

# Enough proposals (about 140 drafts) that the gap between the right and the off-by-one mapping
# (about 0.2 accepted tokens per draft) is several standard deviations wide; few enough that vLLM
# decodes them in seconds.
ORACLE_PROMPTS, ORACLE_TOKENS, ORACLE_K = 8, 48, 2


@pytest.fixture(scope="module")
def oracle(tiny, tmp_path_factory):
    """Oracle heads for the first mt-bench prompts: Qwen3-style with the full vocabulary, and
    Llama-style with a reduced vocabulary (d2t), with the target's greedy continuations."""
    root = tmp_path_factory.mktemp("eagle3-oracle")
    prompts = eagle3_prompt_ids(tiny.target, ORACLE_PROMPTS)
    return {
        "prompts": prompts,
        "continuations": greedy_continuations(tiny.target, prompts, ORACLE_TOKENS),
        "full": build_oracle_eagle3(tiny.target, root / "full", prompts, ORACLE_TOKENS),
        "reduced": build_oracle_eagle3(tiny.target, root / "reduced", prompts, ORACLE_TOKENS,
                                       reduced_vocabulary=True, qk_norm=False, seed=1),
    }


def _rms_norm(x, weight, eps):
    return weight * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _simulated_acceptance(target: Path, export: Path, prompts, continuations, *,
                          aux_ids=None, norm_before_residual=None) -> float:
    """The share of generated positions where the converted oracle head, run as vLLM runs it
    (llama_eagle3.py forward, shortened: its o_proj and down_proj are zero, so attention and
    MLP add nothing), proposes the target's next-but-one token. The aux states are vLLM's: id i
    is the hidden state entering target layer i, id L the last layer's output before the norm.
    ``aux_ids`` / ``norm_before_residual`` override the export's config (the wrong variants)."""
    import torch

    from deepspec_plugin.models import load_causal_lm

    cfg, w = _config(export), _load(export)
    assert not w["midlayer.self_attn.o_proj.weight"].any()
    assert not w["midlayer.mlp.down_proj.weight"].any()
    aux_ids = cfg["eagle_aux_hidden_state_layer_ids"] if aux_ids is None else aux_ids
    before = cfg["norm_before_residual"] if norm_before_residual is None else norm_before_residual
    eps = cfg["rms_norm_eps"]
    model = load_causal_lm(target)
    captured = {}
    hook = model.model.norm.register_forward_hook(lambda m, i, o: captured.update(pre=i[0]))
    hits = total = 0
    with torch.no_grad():
        for ids, new in zip(prompts, continuations):
            seq = torch.tensor([ids + new])
            hidden = model(seq, output_hidden_states=True).hidden_states
            aux = [*hidden[:-1], captured["pre"]]  # transformers' last entry is after the norm
            x = torch.cat([aux[i][0] for i in aux_ids], -1) @ w["fc.weight"].T
            if before:
                x = _rms_norm(x, w["midlayer.hidden_norm.weight"], eps)
            draft = (_rms_norm(x, w["norm.weight"], eps) @ w["lm_head.weight"].T).argmax(-1)
            proposed = draft + w["d2t"][draft] if "d2t" in w else draft
            n = len(ids)
            # At position p (the target has just emitted seq[p + 1]) the head proposes seq[p + 2].
            hits += int((proposed[n - 1:-2] == seq[0, n + 1:]).sum())
            total += len(new) - 1
    hook.remove()
    return hits / total


@pytest.fixture(scope="module")
def oracle_exports(tiny, oracle, tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3-oracle-exports")
    outs = {}
    for name in ("full", "reduced"):
        outs[name], _ = _convert(oracle[name], tiny.target, root / name)
        copy_tokenizer_files(tiny.target, outs[name])
    return outs


def _wrong(export: Path, dst: Path, change: str) -> Path:
    """A copy of a converted head with one deliberate conversion error."""
    def aux_not_shifted(c):
        ids = [x - 1 for x in c["eagle_aux_hidden_state_layer_ids"]]
        c["eagle_aux_hidden_state_layer_ids"] = c["eagle_config"][
            "eagle_aux_hidden_state_layer_ids"] = ids

    fix = {"aux": aux_not_shifted,
           "norm": lambda c: c.update(norm_before_residual=True)}[change]
    return _copy_with(export, dst, config=fix)


def test_oracle_head_layout(tiny, oracle, oracle_exports):
    import torch

    full, reduced = _load(oracle["full"]), _load(oracle["reduced"])
    cfg = _config(oracle["full"])
    assert cfg["target_layer_ids"] == [0, 1, 2, 3]
    fc = full["fc.weight"]
    assert fc[:, -HIDDEN:].equal(torch.eye(HIDDEN)) and not fc[:, :-HIDDEN].any()
    assert set(full["layers.0.hidden_norm.weight"].tolist()) == {-1.0, 1.0}
    from safetensors.torch import load_file

    target = load_file(str(tiny.target / "model.safetensors"))
    assert full["norm.weight"].equal(target["model.norm.weight"])
    # lm_head: the target's rows, permuted (every row once), not equal to the target's.
    rows = {tuple(r.tolist()) for r in target["lm_head.weight"]}
    assert {tuple(r.tolist()) for r in full["lm_head.weight"]} == rows
    assert not full["lm_head.weight"].equal(target["lm_head.weight"])
    n = _config(oracle["reduced"])["draft_vocab_size"]
    assert 10 < n < VOCAB and tuple(reduced["lm_head.weight"].shape) == (n, HIDDEN)
    assert "layers.0.self_attn.q_norm.weight" not in reduced
    for name in ("full", "reduced"):
        assert check_vllm_eagle3(oracle_exports[name], tiny.target).ok
    assert read_manifest(oracle["full"]).extra["training"]["oracle"]["mapped_tokens"] > 10


def test_oracle_premise_in_transformers(tiny, oracle, oracle_exports, tmp_path):
    """Before any vLLM run: the converted oracle heads, computed as vLLM computes them from the
    target's hidden states, propose the target's next-but-one token at most positions; with the
    residual taken after hidden_norm (random signs) almost never; and the full-vocabulary head
    with the aux ids not shifted (reading the state one layer earlier) clearly less often. (The
    reduced head's proposals are confined to the few dozen tokens of the target's loops, so a
    state one layer early still lands on the right one about as often: it proves d2t, not the
    layer ids.) Measured for seed 0 (right / aux not shifted / norm_before_residual): full
    0.84 / 0.64 / 0.00, reduced 0.84 / 0.70 / 0.14."""
    rates = {}
    for name in ("full", "reduced"):
        export = oracle_exports[name]
        aux = _config(export)["eagle_aux_hidden_state_layer_ids"]
        assert aux == [1, 2, 3, 4]
        args = (tiny.target, export, oracle["prompts"], oracle["continuations"])
        rates[name] = (_simulated_acceptance(*args),
                       _simulated_acceptance(*args, aux_ids=[x - 1 for x in aux]),
                       _simulated_acceptance(*args, norm_before_residual=True))
    print({name: [round(r, 3) for r in v] for name, v in rates.items()})
    for name, (right, _, norm_first) in rates.items():
        assert right >= 0.75 and norm_first <= 0.25, (name, rates)
    right, off_by_one, _ = rates["full"]
    assert off_by_one <= right - 0.15, rates


# --- real vLLM -----------------------------------------------------------------------------------



def _rate(counts: dict) -> float:
    """Accepted tokens per draft: with this oracle only the first draft position can be right
    (the second repeats the first, and the tiny target never repeats a token)."""
    return counts["num_accepted_tokens"] / max(counts["num_drafts"], 1)


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_vllm_load_eagle3_accepts_the_oracle(tiny, oracle, tmp_path):
    """`dspec export vllm --method eagle3` on the Llama-style reduced-vocabulary oracle head,
    then the export check's real load (vllm_load_eagle3) on the prompts the oracle was built
    from: vLLM accepts most first proposals (which proves d2t's offsets and the Llama head's
    path) and greedy output is unchanged. Measured: 175 of 406 draft tokens over 203 drafts
    (0.86 per draft; the second draft position repeats the first, so it is never right). About
    80 s on a busy 2-core CPU."""
    from deepspec_plugin.exporters.vllm import export_vllm

    out = tmp_path / "export"
    export_vllm(oracle["reduced"], tiny.target, out, k=ORACLE_K, method="eagle3", load=False)
    load = vllm_load_eagle3(out, tiny.target, ORACLE_K, num_prompts=ORACLE_PROMPTS,
                            max_new_tokens=ORACLE_TOKENS)
    print(load["summary"])
    assert load["equal"], load["summary"]
    c = load["counts"]
    assert c["num_drafts"] > 20 and c["num_draft_tokens"] == ORACLE_K * c["num_drafts"]
    assert _rate(c) >= ORACLE_MIN_RATE, load["summary"]
    assert re.fullmatch(r"vLLM \S+ loaded the EAGLE-3 head: \d+/\d+ draft tokens accepted over "
                        rf"\d+ drafts \(k={ORACLE_K}, {ORACLE_PROMPTS} prompts, greedy\); output "
                        "identical to plain decoding", load["summary"])


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_vllm_wrong_conversions_accept_less(tiny, oracle, oracle_exports, tmp_path):
    """The Qwen3-style full-vocabulary oracle in vLLM, converted right and with each
    deliberate error, in one vLLM process (4 engine starts, about 2 minutes). Measured
    accepted tokens per draft: right 0.86, aux not shifted 0.60, norm_before_residual 0.003.

    * right: most first proposals accepted (proves aux id = DeepSpec id + 1, the residual before
      hidden_norm, and that vLLM feeds the last layer's output before the final norm);
    * aux ids not shifted (DeepSpec's ids used as vLLM's): the head reads the state entering
      the layer instead of its output, and acceptance drops clearly;
    * norm_before_residual true: the residual passes through hidden_norm (random signs), and
      almost nothing is accepted.

    Greedy output equals plain decoding in every case: a wrong head only costs speed.
    """
    right = oracle_exports["full"]
    heads = {"right": right, "aux": _wrong(right, tmp_path / "aux", "aux"),
             "norm": _wrong(right, tmp_path / "norm", "norm")}
    result = run_vllm_eagle3(tiny.target, list(heads.values()), oracle["prompts"], ORACLE_K,
                             ORACLE_TOKENS)
    assert "Resolved architecture: Eagle3Qwen3ForCausalLM" in result["log"]
    assert "Using auxiliary layers from speculative config: (1, 2, 3, 4)" in result["log"]
    assert "Using auxiliary layers from speculative config: (0, 1, 2, 3)" in result["log"]
    plain = result["plain"]
    assert [len(t) for t in plain] == [ORACLE_TOKENS] * ORACLE_PROMPTS
    assert plain == oracle["continuations"]  # vLLM's greedy tokens are transformers' here
    rates = {}
    for name, head in heads.items():
        run = result["heads"][str(head)]
        assert run["tokens"] == plain, name
        assert run["counts"]["num_drafts"] > 20, (name, run["counts"])
        rates[name] = _rate(run["counts"])
    print({name: round(r, 3) for name, r in rates.items()})
    assert rates["right"] >= ORACLE_MIN_RATE, rates
    assert rates["aux"] <= rates["right"] - 0.1, rates
    assert rates["norm"] <= 0.1, rates


@needs_vllm
def test_vllm_run_past_timeout_is_killed_and_reported(tiny, oracle_exports):
    """The runner's failure path, cheaply: a 1-second limit kills vLLM's process group while it
    is still importing, and the error names the limit and carries the log's tail."""
    import time

    start = time.monotonic()
    with pytest.raises(DspecError, match=r"vLLM ran past 1 s loading or running the EAGLE-3 "
                                         r"head") as err:
        run_vllm_eagle3(tiny.target, [oracle_exports["full"]], [[1, 2, 3]], 1, 4, timeout_s=1)
    assert time.monotonic() - start < 30
    assert "last lines of its log" in str(err.value) and err.value.fix
