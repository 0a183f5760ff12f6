"""TGI's head drafts trained here: Medusa heads and the MLP speculator, on the tiny target.

TGI cannot run here, so what it computes is written down below from its loader
(huggingface/text-generation-inference, ``server/text_generation_server/layers/medusa.py``
``MedusaHeadV1`` / ``ResBlock``, ``layers/mlp.py`` ``MLPSpeculatorModelTied`` and
``MLPSpeculatorLayerNorm``) and applied to the trained checkpoints' raw tensors: the reference
engine must propose exactly those tokens. Then: the training step's labels sit at the right
offsets, the engine stays lossless with head proposals (greedy equals plain decoding, the
chi-square test of sampling as tests/test_reference_engine.py, ALPHA = 1e-3, seeds fixed),
exact resume, the manifest, the exports (TGI's rules; vLLM 0.32's Medusa layout, the MLP
speculator refused for vLLM), and bad input.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import exact_cells, gof_pvalue
from safetensors.torch import load_file, save_file

from deepspec_plugin.bench.engines.base import GenerationConfig
from deepspec_plugin.bench.engines.head_proposer import HeadProposer
from deepspec_plugin.bench.engines.reference import ReferenceEngine
from deepspec_plugin.bench.engines.timing import StepTimer
from deepspec_plugin.errors import DspecError
from deepspec_plugin.models import check_pair, load_causal_lm
from deepspec_plugin.models.eagle3 import AuxHiddenStates
from deepspec_plugin.models.heads import load_heads
from deepspec_plugin.train.heads import medusa_steps, mlp_steps
from deepspec_plugin.train.trainer import train

PROMPTS = [[5, 17, 33, 80, 12, 9, 100], [7, 8], [40, 41, 42, 43, 44], [3]]
ALPHA = 1e-3
KINDS = ("medusa", "mlp_speculator")


@pytest.fixture(scope="module")
def target(tiny):
    return load_causal_lm(tiny.target)


@pytest.fixture(scope="module")
def drafts(medusa_draft, mlp_draft):
    return {"medusa": medusa_draft, "mlp_speculator": mlp_draft}


@pytest.fixture(scope="module")
def engines(tiny, drafts):
    out = {kind: ReferenceEngine.from_paths(tiny.target, path) for kind, path in drafts.items()}
    yield out
    for e in out.values():
        e.close()


def first_proposal(target, heads, prompt, k):
    """The proposer's greedy proposal right after the prefill of ``prompt``, and h (TGI's input:
    the target's last hidden state after its final norm) with the target's next token."""
    layers = target.config.num_hidden_layers
    ids = torch.tensor([prompt])
    capture = AuxHiddenStates(target, [layers])
    with torch.no_grad():
        out = target(input_ids=ids, output_hidden_states=True)
        states = capture.take()
    capture.remove()
    proposer = HeadProposer(heads, target.model.norm, layers, "cpu")
    mask = torch.ones_like(ids)
    with torch.no_grad():
        proposer.prefill(ids, mask, mask.cumsum(-1) - 1, target_states=states)
        pending = out.logits[:, -1].argmax(-1)
        proposal = proposer.propose(pending, k, 0.0, None, StepTimer("cpu"))
    return proposal.tokens[0].tolist(), out.hidden_states[-1][:, -1], pending


# --- what TGI computes, from its loader ---------------------------------------------------------


def test_medusa_proposes_what_tgis_medusa_head_v1_computes(target, medusa_draft):
    """MedusaHeadV1: head h = ResBlocks x + SiLU(linear(x)) ({h}.{l}.linear), then {h}.{L}
    (no bias), all on the lm_head's input; TGI takes each head's argmax."""
    w = load_file(str(medusa_draft / "medusa_lm_head.safetensors"))
    cfg = json.loads((medusa_draft / "config.json").read_text())
    assert "architectures" not in cfg  # TGI would take the directory for a model
    heads, layers = cfg["medusa_num_heads"], cfg["medusa_num_layers"]
    draft = load_heads(medusa_draft, target)
    for prompt in PROMPTS:
        tokens, h, _ = first_proposal(target, draft, prompt, heads)
        expected = []
        for head in range(heads):
            x = h
            for la in range(layers):
                x = x + torch.nn.functional.silu(x @ w[f"{head}.{la}.linear.weight"].T
                                                 + w[f"{head}.{la}.linear.bias"])
            expected.append(int((x @ w[f"{head}.{layers}.weight"].T).argmax(-1)))
        assert tokens == expected


def test_mlp_speculator_proposes_what_tgis_tied_speculator_computes(target, mlp_draft):
    """MLPSpeculatorModelTied with --speculate = n_predict: state_weight 0.5 ** (0.5 / n),
    emb_weight sqrt(1 - sw^2) * sqrt(inner / 2); state = proj0 (stage 0) or proj1 (later) *
    sw + z; GELU(ln(state)), ln = x * rsqrt(mean(x^2) + 1e-6) * w + b; the first token in is
    the target's argmax; no input scaling (TGI has none)."""
    w = load_file(str(mlp_draft / "model.safetensors"))
    cfg = json.loads((mlp_draft / "config.json").read_text())
    assert cfg["architectures"] == ["MLPSpeculatorPreTrainedModel"]
    assert cfg["tie_weights"] is True and cfg["scale_input"] is False
    assert set(w) == {f"speculator.{n}" for n in ("emb.0.weight", "proj.0.weight",
                                                  "proj.1.weight", "head.0.weight",
                                                  "ln.0.weight", "ln.0.bias")}
    n, inner = cfg["n_predict"], cfg["inner_dim"]
    sw = 0.5 ** (0.5 / n)
    ew = math.sqrt(1 - sw**2) * math.sqrt(inner / 2)
    p = "speculator."
    draft = load_heads(mlp_draft, target)
    for prompt in PROMPTS:
        tokens, state, pending = first_proposal(target, draft, prompt, n)
        ind, expected = pending, []
        for i in range(n):
            z = w[p + "emb.0.weight"][ind] * ew
            proj = w[p + ("proj.0.weight" if i == 0 else "proj.1.weight")]
            state = state @ proj.T * sw + z
            state = state * torch.rsqrt(state.pow(2).mean(-1, keepdim=True) + 1e-6)
            state = torch.nn.functional.gelu(state * w[p + "ln.0.weight"] + w[p + "ln.0.bias"])
            ind = (state @ w[p + "head.0.weight"].T).argmax(-1)
            expected.append(int(ind))
        assert tokens == expected


# --- training -----------------------------------------------------------------------------------


def test_medusa_head_i_learns_the_token_i_plus_2_ahead(target, medusa_draft):
    heads = load_heads(medusa_draft, target)
    b, length, h = 2, 9, target.config.hidden_size
    hidden = torch.randn(b, length, h)
    mask = torch.ones(b, length - 1, dtype=torch.bool)
    mask[1, 6:] = False  # a shorter second row
    with torch.no_grad():
        out = medusa_steps(heads, hidden, torch.zeros(b, length, dtype=torch.long), mask)
    for i, ((bi, rows), logits) in enumerate(zip(out.rows, out.logits)):
        t = rows - 1 - i  # the position whose state head i read
        assert bool(mask[bi, rows].all()) and int(t.min()) == 0
        torch.testing.assert_close(logits, heads.head_logits(i, hidden[bi, t]))
    assert [len(r[0]) for r in out.rows] == [7 + 5, 6 + 4, 5 + 3]


def test_mlp_stage_i_reads_the_targets_token_and_the_last_stages_state(target, mlp_draft):
    mlp = load_heads(mlp_draft, target)
    b, length = 1, 8
    hidden = torch.randn(b, length, target.config.hidden_size)
    ids = torch.randint(0, target.config.vocab_size, (b, length))
    mask = torch.ones(b, length - 1, dtype=torch.bool)
    with torch.no_grad():
        out = mlp_steps(mlp, hidden, ids, mask)
        t = 2  # chain t: x_{t+1} into stage 0, x_{t+2} into stage 1, x_{t+3} into stage 2
        state = hidden[0, t]
        for i in range(3):
            state = mlp.stage(i, state, ids[0, t + 1 + i])
            bi, rows = out.rows[i]
            at = int(((rows == t + 1 + i) & (bi == 0)).nonzero())
            torch.testing.assert_close(out.logits[i][at], mlp.logits(state), atol=1e-5,
                                       rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_the_manifest_records_the_heads(drafts, kind):
    m = json.loads((drafts[kind] / "deepspec.json").read_text())
    assert m["method"] == kind and m["k"] == 3
    block = m[kind]
    assert block["hidden_states_on_disk_bytes"] == 0 and block["parameters"] > 0
    assert 0 < block["target_share"] < 1 and block["target_forwards"] > 0
    assert len(m["held_out"]["acceptance_per_step"]) == 3
    shape = {"medusa": {"num_heads": 3, "num_layers": 1},
             "mlp_speculator": {"n_predict": 3, "tie_weights": True, "scale_input": False}}
    assert shape[kind].items() <= block.items()


@pytest.mark.parametrize("kind", KINDS)
def test_exact_resume_equals_straight_run(tiny, train_data, tmp_path, kind):
    settings = dict(draft_type=kind, steps=6, eval_every=3, batch_size=4, lr=3e-3,
                    save_every=100, progress=False)
    straight = train(tiny.target, train_data, tmp_path / "straight", **settings)
    out = tmp_path / "resumed"
    assert train(tiny.target, train_data, out, stop_at=3, **settings).draft is None
    resumed = train(tiny.target, train_data, out, resume=True, **settings)
    name = "medusa_lm_head.safetensors" if kind == "medusa" else "model.safetensors"
    a, b = load_file(str(straight.draft / name)), load_file(str(resumed.draft / name))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(lora="r=4"), "Medusa training does not support LoRA"),
    (dict(on_policy=0.5), "does not support on-policy rollouts"),
    (dict(heads=0), "needs heads >= 1"),
    (dict(head_layers=0), "needs heads >= 1 and head_layers >= 1"),
    (dict(draft_type="mlp_speculator", teacher="online"), "MLP-speculator training does not"),
])
def test_bad_settings_are_refused_before_anything_is_written(tiny, train_data, tmp_path,
                                                             settings, message):
    out = tmp_path / "run"
    with pytest.raises(DspecError, match=message):
        train(tiny.target, train_data, out, steps=2, progress=False,
              **{"draft_type": "medusa", **settings})
    assert not out.exists()


def test_a_run_cannot_start_from_another_kinds_heads(tiny, train_data, tmp_path, mlp_draft):
    out = tmp_path / "run"
    with pytest.raises(DspecError, match="is not a medusa draft"):
        train(tiny.target, train_data, out, steps=2, draft_type="medusa",
              draft_init=str(mlp_draft), progress=False)
    assert not out.exists()


# --- the reference engine ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculation_equals_plain_decoding(engines, kind, k):
    engine = engines[kind]
    plain = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=40))
    spec = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=40, k=k))
    assert [g.token_ids for g in spec.generations] == [g.token_ids for g in plain.generations]
    assert spec.counts.num_draft_tokens == k * spec.counts.num_drafts
    alone = [engine.generate([p], GenerationConfig(max_new_tokens=40, k=k)).counts
             for p in PROMPTS]
    assert [g.counts for g in spec.generations] == alone  # batching changes no count
    assert engine.describe()["draft_type"] == kind


@pytest.mark.parametrize("kind", KINDS)
def test_trained_heads_are_accepted_more_than_untrained(tiny, drafts, kind):
    """On the prompts they trained on, the trained heads beat their init (the target's own LM
    head read one token too early)."""
    from helpers import TRAIN_PROMPTS

    from deepspec_plugin.bench.prompts import format_turns
    from deepspec_plugin.models import load_tokenizer

    tok = load_tokenizer(tiny.target)
    prompts = [format_turns(tok, t[:1], [], True) for t in TRAIN_PROMPTS]
    rates = []
    for path in (drafts[kind].parent / "init", drafts[kind]):
        e = ReferenceEngine.from_paths(tiny.target, path)
        c = e.generate(prompts, GenerationConfig(max_new_tokens=32, k=3)).counts
        rates.append(c.num_accepted_tokens / c.num_draft_tokens)
    assert rates[1] > rates[0] + 0.05, rates


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rule", ["probabilistic", "greedy"])
def test_sampled_tokens_follow_the_target_distribution(tiny, drafts, engines, kind, rule):
    """N samples of the first tokens after a prompt against the target's exact probabilities,
    with head proposals under either drafting rule (greedy drafting is TGI's and vLLM's)."""
    e = engines[kind] if rule == "probabilistic" else ReferenceEngine.from_paths(
        tiny.target, drafts[kind], draft_sample_method="greedy")
    assert e.describe()["draft_sample_method"] == rule
    n, depth, prompt, temperature = 3000, 3, PROMPTS[1], 0.8
    result = e.generate([prompt] * n, GenerationConfig(max_new_tokens=depth,
                                                       temperature=temperature, k=2, seed=11))
    samples = [tuple(g.token_ids) for g in result.generations]
    cells = exact_cells(e.target, prompt, depth, n, temperature)
    assert len(cells) >= 20
    assert gof_pvalue(samples, cells, n) > ALPHA
    assert 0 < result.counts.num_accepted_tokens < result.counts.num_draft_tokens


@pytest.mark.parametrize("kind", KINDS)
def test_k_beyond_the_heads_is_refused(engines, kind):
    with pytest.raises(DspecError, match="proposes at most 3 tokens"):
        engines[kind].generate(PROMPTS, GenerationConfig(max_new_tokens=4, k=4))


# --- bad drafts ---------------------------------------------------------------------------------


def test_heads_of_another_target_are_refused(tiny, medusa_draft):
    with pytest.raises(DspecError, match="was trained for another target"):
        check_pair(tiny.target_updated, medusa_draft)


def test_heads_of_another_size_are_refused(tiny, mlp_draft, tmp_path):
    bad = tmp_path / "mlp"
    shutil.copytree(mlp_draft, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "emb_dim": cfg["emb_dim"] * 2}))
    with pytest.raises(DspecError, match="has emb_dim .* the target .* has hidden_size"):
        check_pair(tiny.target, bad)


def test_a_checkpoint_missing_tensors_is_refused_in_one_line(target, medusa_draft, tmp_path):
    bad = tmp_path / "medusa"
    shutil.copytree(medusa_draft, bad)
    w = load_file(str(bad / "medusa_lm_head.safetensors"))
    del w["2.1.weight"]
    save_file(w, str(bad / "medusa_lm_head.safetensors"))
    with pytest.raises(DspecError, match=r"lacks 2\.1\.weight.*re-save the whole draft") as e:
        load_heads(bad, target)
    assert "\n" not in str(e.value)


def test_pickle_only_heads_are_refused_unread(target, medusa_draft, tmp_path):
    bad = tmp_path / "medusa"
    shutil.copytree(medusa_draft, bad)
    (bad / "medusa_lm_head.safetensors").unlink()
    (bad / "medusa_lm_head.pt").write_bytes(b"not even a pickle")
    with pytest.raises(DspecError, match="pickle"):
        load_heads(bad, target)


# --- exports ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_what_train_wrote_passes_export_check_and_exports_for_tgi(tiny, drafts, kind, tmp_path):
    from deepspec_plugin.exporters.check import check_export
    from deepspec_plugin.exporters.tgi import export_tgi

    assert check_export(drafts[kind], tiny.target).ok
    result = export_tgi(drafts[kind], tiny.target, tmp_path / "tgi")
    assert result.check.ok and not [f for f in result.check.findings if f.warning]
    launcher = (tmp_path / "tgi" / "serving_configs" / "tgi-launcher.sh").read_text()
    assert "--speculate 3" in launcher


def test_medusa_exports_to_vllms_layout_that_runs_the_same_heads(tiny, medusa_draft, tmp_path):
    from deepspec_plugin.exporters.vllm import export_vllm

    out = tmp_path / "vllm"
    result = export_vllm(medusa_draft, tiny.target, out, method="medusa", load=False)
    assert result.check.ok
    assert any("vLLM 0.33 removed" in n for n in result.notes)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MedusaModel"] and cfg["medusa_fc_bias"] is True
    names = set(load_file(str(out / "model.safetensors")))
    assert {"blocks.0.layers.0.weight", "blocks.2.layers.0.bias", "lm_heads.1.weight"} <= names
    spec = json.loads((out / "serving_configs" / "speculative-config.json").read_text())
    assert spec["method"] == "medusa" and spec["num_speculative_tokens"] == 3
    counts = [ReferenceEngine.from_paths(tiny.target, d).generate(
        PROMPTS, GenerationConfig(max_new_tokens=24, k=3)).counts for d in (medusa_draft, out)]
    assert counts[0] == counts[1]


def test_vllm_exports_refuse_what_vllm_cannot_run(tiny, mlp_draft, medusa_draft, tmp_path):
    from deepspec_plugin.exporters.vllm import export_vllm

    with pytest.raises(DspecError, match="vLLM 0.32 cannot run an MLP speculator.*dspec export "
                                         "tgi"):
        export_vllm(mlp_draft, tiny.target, tmp_path / "a", method="mlp_speculator", load=False)
    with pytest.raises(DspecError, match="is a medusa draft.*pass --method medusa"):
        export_vllm(medusa_draft, tiny.target, tmp_path / "b", load=False)
    with pytest.raises(DspecError, match="k = 4 but the draft has 3 Medusa heads"):
        export_vllm(medusa_draft, tiny.target, tmp_path / "c", method="medusa", k=4, load=False)
    assert not any((tmp_path / n).exists() for n in "abc")
