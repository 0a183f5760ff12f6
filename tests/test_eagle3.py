"""EAGLE-3 heads trained here: the model in vLLM's layout, training-time test = inference, the
training run (per-step acceptance, exact resume, refusals), and the reference engine proposing
with a head (lossless: greedy equals plain decoding, sampling keeps the target's distribution).

The chi-square checks follow tests/test_reference_engine.py (ALPHA = 1e-3 each, seeds fixed).
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import exact_cells, gof_pvalue
from safetensors import safe_open

from deepspec_plugin.bench.engines.base import GenerationConfig
from deepspec_plugin.bench.engines.reference import ReferenceEngine
from deepspec_plugin.errors import DspecError
from deepspec_plugin.models import check_pair, load_causal_lm
from deepspec_plugin.models.eagle3 import (
    AuxHiddenStates,
    Eagle3Config,
    default_aux_layer_ids,
    load_head,
)
from deepspec_plugin.train.eagle3 import choose_draft_vocabulary, unroll
from deepspec_plugin.train.trainer import train

PROMPTS = [[5, 17, 33, 80, 12, 9, 100], [7, 8], [40, 41, 42, 43, 44], [3]]
ALPHA = 1e-3
QUICK = dict(draft_type="eagle3", batch_size=4, lr=3e-3, draft_vocab_size=256, progress=False)


@pytest.fixture(scope="module")
def target(tiny):
    return load_causal_lm(tiny.target)


@pytest.fixture(scope="module")
def head(target, eagle3_head):
    return load_head(eagle3_head, target)


@pytest.fixture(scope="module")
def engine(tiny, eagle3_head):
    e = ReferenceEngine.from_paths(tiny.target, eagle3_head)
    yield e
    e.close()


# --- the model ---------------------------------------------------------------------------------


def test_default_layer_ids_are_vllms():
    assert default_aux_layer_ids(30) == [2, 15, 27]  # vLLM's (2, L // 2, L - 3) for Llama
    assert default_aux_layer_ids(4) == [1, 2]


def test_the_checkpoint_is_vllms_layout(tiny, eagle3_head):
    cfg = json.loads((eagle3_head / "config.json").read_text())
    assert cfg["architectures"] == ["Eagle3LlamaForCausalLM"]
    assert cfg["norm_before_residual"] is False and cfg["num_hidden_layers"] == 1
    assert cfg["num_aux_hidden_states"] == len(cfg["eagle_aux_hidden_state_layer_ids"])
    with safe_open(str(eagle3_head / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
        assert f.get_tensor("fc.weight").shape == (cfg["hidden_size"], 2 * cfg["hidden_size"])
    assert "embed_tokens.weight" not in names  # vLLM shares the target's
    assert {"midlayer.hidden_norm.weight", "midlayer.self_attn.q_proj.weight", "norm.weight",
            "lm_head.weight"} <= names
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    targets = torch.arange(len(d2t)) + d2t  # target id = draft id + d2t[draft id]
    assert len(d2t) == cfg["draft_vocab_size"] == 256 == int(t2d.sum())
    assert torch.equal(t2d.nonzero().squeeze(-1), targets.sort().values)
    manifest = json.loads((eagle3_head / "deepspec.json").read_text())
    assert manifest["method"] == "eagle3"
    assert manifest["eagle3"]["target_layer_ids"] == cfg["eagle_aux_hidden_state_layer_ids"]
    e = manifest["eagle3"]
    assert e["hidden_states_on_disk_bytes"] == 0
    # 9 samples (8 train, 1 held out) seen 160 + 3 times: the target ran once per sample.
    assert e["target_forwards"] == 9 and e["target_states_remembered"] > 150
    assert len(manifest["held_out"]["acceptance_per_step"]) == 7


def test_load_refuses_broken_heads(tiny, target, eagle3_head, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(eagle3_head, broken)
    state = load_file(str(broken / "model.safetensors"))
    del state["midlayer.mlp.down_proj.weight"]
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(DspecError, match="lacks midlayer.mlp.down_proj.weight.*re-save"):
        load_head(broken, target)
    (broken / "model.safetensors").unlink()
    with pytest.raises(DspecError, match="no safetensors|weights"):
        load_head(broken, target)
    cfg = json.loads((eagle3_head / "config.json").read_text())
    cfg["eagle_aux_hidden_state_layer_ids"] = [1, 9]
    with pytest.raises(DspecError, match=r"\[1, 9\] do not fit the target's 4 layers"):
        Eagle3Config.for_target(json.loads((tiny.target / "config.json").read_text()), 8, [1, 9])


def test_a_head_for_another_target_is_refused(tiny, eagle3_head):
    check_pair(tiny.target, eagle3_head)  # its own target: fine
    with pytest.raises(DspecError, match="trained for another target"):
        check_pair(tiny.target_updated, eagle3_head)


# --- training-time test = what the proposer computes -------------------------------------------


def test_unrolled_training_steps_equal_the_proposers_chain(target, head):
    """Step i of the training unroll at chain j is exactly the proposer's i-th step after the
    target emitted token j + 1, fed the same tokens: same attention (cache + own chain), same
    positions, same hidden states."""
    from deepspec_plugin.bench.engines.eagle3_proposer import Eagle3Proposer

    steps, p = 5, 9
    ids = torch.tensor([[5, 17, 33, 80, 12, 9, 100, 7, 8, 40, 41, 42, 43, 44, 3, 21, 60]])
    capture = AuxHiddenStates(target, head.cfg.aux_layer_ids)
    with torch.no_grad():
        target.model(input_ids=ids)
        aux = capture.take()
        unrolled = unroll(head, aux, ids, torch.ones(1, ids.shape[1] - 1, dtype=torch.bool),
                          steps)
        proposer = Eagle3Proposer(head, "cpu")
        proposer.prefill(ids[:, :p], torch.ones(1, p, dtype=torch.long),
                         torch.arange(p)[None], target_states=aux[:, :p])
        tokens = proposer.block_tokens.clone()
        tokens[0, p - 1] = ids[0, p]  # the pending token x_p with the target's state at p - 1
        proposer.mask.append(proposer.block_valid.long())
        normed, pre = proposer.forward_entries(tokens, head.combine(proposer.block_states),
                                               proposer.block_positions)
        normed, pre = normed[:, p - 1], pre[:, p - 1]
        for i in range(steps):
            if i > 0:
                proposer.mask.append_ones(1)
                normed, pre = proposer.forward_entries(ids[:, p + i][:, None], pre[:, None],
                                                       torch.tensor([[p - 1 + i]]))
                normed, pre = normed[:, 0], pre[:, 0]
            _, sig_pos = unrolled.rows[i]
            row = int((sig_pos == p + i).nonzero())  # chain j = p - 1 predicts token p + 1 + i
            torch.testing.assert_close(unrolled.logits[i][row, :-1], head.logits(normed)[0],
                                       rtol=1e-4, atol=1e-4)


# --- training ----------------------------------------------------------------------------------


def test_training_raises_held_out_acceptance_at_every_step(eagle3_head):
    held = json.loads((eagle3_head / "deepspec.json").read_text())["held_out"]
    assert held["acceptance"] > held["start_acceptance"] + 0.05
    assert held["greedy_agreement"] > held["start_greedy_agreement"]
    assert all(0.0 <= a <= 1.0 for a in held["acceptance_per_step"])


def test_vocabulary_keeps_stop_tokens_and_frequent_tokens():
    class S:
        def __init__(self, ids, mask):
            self.input_ids, self.loss_mask = torch.tensor(ids), torch.tensor(mask)
            self.topk_ids = self.topk_probs = None

    samples = [S([9, 4, 4, 4, 7, 7, 5], [0, 1, 1, 1, 1, 1, 1])]
    v = choose_draft_vocabulary(samples, 3, 20, required=[2])
    assert v.target_ids == [2, 4, 7]  # the stop token, then by frequency (4 x3, 7 x2)
    assert v.response_coverage == pytest.approx(5 / 6)
    with pytest.raises(DspecError, match="cannot hold the target's 2 stop tokens"):
        choose_draft_vocabulary(samples, 1, 20, required=[2, 3])


def test_exact_resume_equals_straight_run(tiny, train_data, tmp_path):
    settings = dict(steps=6, eval_every=3, **QUICK)
    straight = train(tiny.target, train_data, tmp_path / "straight", save_every=100, **settings)
    out = tmp_path / "resumed"
    stopped = train(tiny.target, train_data, out, save_every=100, stop_at=3, **settings)
    assert stopped.draft is None
    resumed = train(tiny.target, train_data, out, save_every=100, resume=True, **settings)
    from safetensors.torch import load_file

    a = load_file(str(straight.draft / "model.safetensors"))
    b = load_file(str(resumed.draft / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert resumed.evals[-1]["acceptance_per_step"] == pytest.approx(
        straight.evals[-1]["acceptance_per_step"], abs=1e-6)


def test_prompt_labels_are_the_targets_own_distribution(tiny, target, train_data):
    """At a response token the online label is the stored signal again (same target, same
    prefix); every other position with a next token gets one too."""
    from deepspec_plugin.models.eagle3 import default_aux_layer_ids
    from deepspec_plugin.train.batches import collate
    from deepspec_plugin.train.data import read_data
    from deepspec_plugin.train.steps import PROMPT_LABEL_TOPK, TargetStates

    samples = list(read_data(train_data))[:3]
    batch = collate(samples)
    k = batch["topk_ids"].shape[-1]
    layers = default_aux_layer_ids(target.config.num_hidden_layers)
    states = TargetStates(target, layers, 2**30, topk=PROMPT_LABEL_TOPK)
    aux, (ids, probs, every) = states.batch_with_labels(batch["input_ids"],
                                                        batch["attention_mask"])
    # The same states as the stop-early capture, bit for bit.
    plain = TargetStates(target, layers, 0).batch(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(aux, plain)
    assert torch.equal(every, batch["attention_mask"][:, 1:].bool())
    assert (every & ~batch["mask"]).any()  # prompt positions are labelled too
    resp = batch["mask"]
    top = min(k, PROMPT_LABEL_TOPK)
    torch.testing.assert_close(probs[resp][:, :top], batch["topk_probs"][resp][:, :top],
                               rtol=0, atol=2e-3)
    sure = batch["topk_probs"][resp][:, 0] - batch["topk_probs"][resp][:, 1] > 1e-2
    assert torch.equal(ids[resp][sure, 0], batch["topk_ids"][resp][sure, 0])
    # Remembered: the second call returns the same labels without the target.
    again = states.batch_with_labels(batch["input_ids"], batch["attention_mask"])[1]
    assert torch.equal(again[0], ids) and states.remembered == len(samples)


def test_training_with_prompt_labels_learns_more_positions(tiny, train_data, tmp_path):
    settings = dict(steps=4, eval_every=4, save_every=100, **QUICK)
    plain = train(tiny.target, train_data, tmp_path / "plain", **settings)
    labelled = train(tiny.target, train_data, tmp_path / "labelled", prompt_labels=True,
                     **settings)
    record = json.loads((labelled.draft / "deepspec.json").read_text())
    assert record["eagle3"]["prompt_labels"] is True
    # Held out on the responses alone in both: comparable numbers, different training.
    assert len(labelled.evals[-1]["acceptance_per_step"]) == len(
        plain.evals[-1]["acceptance_per_step"])
    assert labelled.evals[-1]["acceptance_per_step"] != plain.evals[-1]["acceptance_per_step"]


@pytest.mark.parametrize(("settings", "message"), [
    (dict(lora="r=4"), "EAGLE-3 training does not support LoRA"),
    (dict(on_policy=0.5), "does not support on-policy rollouts"),
    (dict(ttt_steps=0), "ttt_steps must be >= 1"),
    (dict(aux_layer_ids=(1, 7)), r"do not fit the target's 4 layers"),
    (dict(draft_vocab_size=1), "cannot hold the target's"),
    (dict(draft_type="standalone", prompt_labels=True),
     "prompt labels are a setting of drafts on the target"),
])
def test_bad_settings_are_refused_before_anything_is_written(tiny, train_data, tmp_path,
                                                             settings, message):
    out = tmp_path / "run"
    with pytest.raises(DspecError, match=message):
        train(tiny.target, train_data, out, steps=2, **{**QUICK, **settings})
    assert not out.exists()


# --- the reference engine with EAGLE-3 proposals -----------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_speculation_equals_plain_decoding(engine, k):
    cfg = GenerationConfig(max_new_tokens=40)
    plain = engine.generate(PROMPTS, cfg)
    spec = engine.generate(PROMPTS, GenerationConfig(max_new_tokens=40, k=k))
    assert [g.token_ids for g in spec.generations] == [g.token_ids for g in plain.generations]
    assert spec.counts.num_draft_tokens == k * spec.counts.num_drafts
    alone = [engine.generate([p], GenerationConfig(max_new_tokens=40, k=k)).counts
             for p in PROMPTS]
    assert [g.counts for g in spec.generations] == alone  # batching changes no count
    assert engine.describe()["draft_type"] == "eagle3"


def test_the_trained_head_is_accepted_on_the_targets_own_text(engine, tiny):
    """On the prompts it trained on (the data's chat prompts), the head drafts tokens the
    target accepts: far above what the untrained head gets."""
    from helpers import TRAIN_PROMPTS

    from deepspec_plugin.bench.prompts import format_turns
    from deepspec_plugin.models import load_tokenizer

    tok = load_tokenizer(tiny.target)
    prompts = [format_turns(tok, t[:1], [], True) for t in TRAIN_PROMPTS]
    counts = engine.generate(prompts, GenerationConfig(max_new_tokens=32, k=3)).counts
    assert counts.num_accepted_tokens / counts.num_draft_tokens > 0.2


@pytest.mark.parametrize(("rule", "temperature"), [("probabilistic", 0.5), ("greedy", 0.8)])
def test_sampled_tokens_follow_the_target_distribution(tiny, eagle3_head, engine, rule,
                                                       temperature):
    """N samples of the first tokens after a prompt against the target's exact probabilities,
    with EAGLE-3 proposals (q is 0 outside the draft vocabulary) under either drafting rule."""
    e = engine if rule == "probabilistic" else ReferenceEngine.from_paths(
        tiny.target, eagle3_head, draft_sample_method="greedy")
    assert e.describe()["draft_sample_method"] == rule
    n, depth, prompt = 3000, 3, PROMPTS[1]
    result = e.generate([prompt] * n, GenerationConfig(max_new_tokens=depth,
                                                       temperature=temperature, k=2, seed=9))
    samples = [tuple(g.token_ids) for g in result.generations]
    cells = exact_cells(e.target, prompt, depth, n, temperature)
    assert len(cells) >= 20
    assert gof_pvalue(samples, cells, n) > ALPHA
    assert 0 < result.counts.num_accepted_tokens < result.counts.num_draft_tokens


def test_a_head_never_proposes_outside_its_vocabulary(engine, head):
    proposer = engine.proposer
    allowed = set(head.draft_to_target_ids().tolist())
    seen = []
    original = proposer.propose

    def spy(*args, **kwargs):
        proposal = original(*args, **kwargs)
        seen.extend(proposal.tokens.reshape(-1).tolist())
        if proposal.probs is not None:
            outside = torch.ones(proposal.probs.shape[-1], dtype=torch.bool)
            outside[list(allowed)] = False
            assert float(proposal.probs[..., outside].sum()) == 0.0
        return proposal

    proposer.propose = spy
    try:
        engine.generate(PROMPTS, GenerationConfig(max_new_tokens=24, k=3, temperature=1.0))
    finally:
        proposer.propose = original
    assert seen and set(seen) <= allowed
