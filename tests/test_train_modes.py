"""train/: fresh inits, the online teacher (full distributions), on-policy rollouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TRAIN_PROMPTS, make_train_data, write_prompt_file

from deepspec_plugin.errors import DspecError
from deepspec_plugin.train.data import read_data
from deepspec_plugin.train.trainer import train

PROMPTS = TRAIN_PROMPTS[:6]
QUICK = dict(batch_size=4, eval_fraction=0.25, warmup_steps=2, progress=False)


@pytest.fixture(scope="module")
def full_data(tiny, tmp_path_factory) -> Path:
    """Data whose stored top-k covers the whole tiny vocabulary (K = V = 512)."""
    root = tmp_path_factory.mktemp("modes")
    prompts = write_prompt_file(root / "p.jsonl", PROMPTS)
    out = make_train_data(tiny.target, prompts, root / "data", max_new_tokens=24, topk=512,
                          shard_size=8)
    return out


def test_fresh_init_builds_a_small_random_draft_of_the_target_family(tiny, full_data, tmp_path):
    from deepspec_plugin.models import check_pair, load_causal_lm

    spec = "fresh:layers=1,hidden=64,heads=2,kv_heads=1,intermediate=96"
    result = train(tiny.target, full_data, tmp_path / "run", draft_init=spec, steps=12, lr=3e-3,
                   eval_every=12, **QUICK)
    draft = load_causal_lm(result.draft)
    assert (draft.config.num_hidden_layers, draft.config.hidden_size) == (1, 64)
    assert (draft.config.num_attention_heads, draft.config.num_key_value_heads) == (2, 1)
    check_pair(tiny.target, result.draft)
    assert result.manifest["init"]["spec"] == spec
    assert result.final_acceptance > result.start_acceptance
    # The same seed builds the same start (a resume rebuilds it exactly); another seed does not.
    from deepspec_plugin.train.init import fresh_draft

    a = fresh_draft(tiny.target, spec, tmp_path / "a", seed=0)
    b = fresh_draft(tiny.target, spec, tmp_path / "b", seed=0)
    c = fresh_draft(tiny.target, spec, tmp_path / "c", seed=1)
    read = lambda d: (d / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) != read(c)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fresh:layers=0", "positive integer"),
        ("fresh:depth=2", "invalid fresh draft option"),
        ("fresh:hidden=100,heads=3", "not a multiple of heads"),
        ("fresh:heads=4,kv_heads=3", "not a multiple of kv_heads"),
    ],
)
def test_bad_fresh_specs_are_refused_and_leave_nothing(tiny, full_data, tmp_path, spec, message):
    with pytest.raises(DspecError, match=message):
        train(tiny.target, full_data, tmp_path / "run", draft_init=spec, steps=2, **QUICK)
    assert not (tmp_path / "run").exists()


def test_online_teacher_equals_the_stored_signal_when_k_is_the_vocabulary(tiny, full_data):
    """With K = V the stored top-k is the full distribution (float16-rounded), so every loss
    against it must equal the loss against the target run online."""
    import torch

    from deepspec_plugin.models import load_causal_lm
    from deepspec_plugin.train.batches import collate, target_signal
    from deepspec_plugin.train.draft import response_logits
    from deepspec_plugin.train.losses import make_loss

    samples = list(read_data(full_data))[:4]
    batch = collate(samples)
    draft = load_causal_lm(tiny.draft)
    scorer = load_causal_lm(tiny.target).eval()
    with torch.no_grad():
        logits = response_logits(draft, batch)
        stored, online = target_signal(batch, 1.0), target_signal(batch, 1.0, scorer)
        for spec in ("tvd", "fkl", "rkl", "jsd:0.5"):
            loss = make_loss(spec, 1.0)
            assert float(loss(logits, stored, None)) == pytest.approx(
                float(loss(logits, online, None)), abs=2e-3), spec
        # ...and the target against itself: zero TVD.
        self_logits = response_logits(scorer, batch)
        assert float(make_loss("tvd", 1.0)(self_logits, online, None)) < 1e-6


def test_training_with_the_online_teacher(tiny, full_data, tmp_path):
    result = train(tiny.target, full_data, tmp_path / "run", draft_init="layers:1", steps=10,
                    lr=2e-3, eval_every=10, teacher="online", **QUICK)
    assert result.final_acceptance > result.start_acceptance + 0.01
    assert result.manifest["teacher"] == "online"


def test_rollout_continues_the_context_with_the_drafts_own_tokens(tiny, full_data):
    import torch

    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.bench.engines.reference import ReferenceEngine
    from deepspec_plugin.bench.run import stop_token_ids
    from deepspec_plugin.models import load_causal_lm, load_tokenizer
    from deepspec_plugin.train.on_policy import context_of, is_on_policy, rollout

    samples = list(read_data(full_data))[:3]
    draft = load_causal_lm(tiny.draft).train()
    stops = tuple(stop_token_ids(load_tokenizer(tiny.target), tiny.target))
    rolled = rollout(draft, samples, max_new_tokens=12, temperature=0.0, seed=0,
                     stop_token_ids=stops)
    assert draft.training  # restored after decoding
    plain = ReferenceEngine(load_causal_lm(tiny.draft)).generate(
        [context_of(s) for s in samples],
        GenerationConfig(max_new_tokens=12, temperature=0.0, k=None, seed=0,
                         stop_token_ids=stops))
    for s, r, g in zip(samples, rolled, plain.generations):
        ctx = context_of(s)
        assert r.input_ids[: len(ctx)].tolist() == ctx
        assert r.input_ids[len(ctx):].tolist() == list(g.token_ids)  # the draft's greedy tokens
        assert r.loss_mask.tolist() == [False] * len(ctx) + [True] * (len(r.input_ids) - len(ctx))
        assert r.topk_ids is None
        assert torch.is_tensor(r.input_ids)
    # The choice of on-policy micro-batches is seeded and close to the fraction.
    picks = [is_on_policy(0.25, 7, i) for i in range(2000)]
    assert picks == [is_on_policy(0.25, 7, i) for i in range(2000)]
    assert 0.2 < sum(picks) / len(picks) < 0.3
    assert not any(is_on_policy(0.0, 7, i) for i in range(50))
    assert all(is_on_policy(1.0, 7, i) for i in range(50))


def test_on_policy_training_learns_and_resumes_exactly(tiny, full_data, tmp_path):
    import torch
    from safetensors.torch import load_file

    settings = dict(draft_init="layers:1", steps=12, lr=1e-3, eval_every=12, on_policy=0.5,
                    temperature=1.0, **QUICK)
    straight = train(tiny.target, full_data, tmp_path / "straight", **settings)
    assert straight.manifest["on_policy"] == 0.5
    assert straight.final_acceptance > straight.start_acceptance
    out = tmp_path / "resumed"
    train(tiny.target, full_data, out, save_every=100, stop_at=5, **settings)
    resumed = train(tiny.target, full_data, out, save_every=100, resume=True, **settings)
    a = load_file(str(straight.draft / "model.safetensors"))
    b = load_file(str(resumed.draft / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    with pytest.raises(DspecError, match="on_policy"):
        train(tiny.target, full_data, tmp_path / "bad", draft_init="layers:1", steps=2,
              on_policy=1.5, **QUICK)
    with pytest.raises(DspecError, match="teacher"):
        train(tiny.target, full_data, tmp_path / "bad", draft_init="layers:1", steps=2,
              teacher="oracle", **QUICK)


def test_a_draft_init_with_another_vocabulary_or_tokenizer_is_refused(tiny, full_data, tmp_path):
    import shutil

    other_vocab = tmp_path / "other-vocab"
    shutil.copytree(tiny.draft, other_vocab)
    config = json.loads((other_vocab / "config.json").read_text())
    config["vocab_size"] += 64
    (other_vocab / "config.json").write_text(json.dumps(config))

    other_tokenizer = tmp_path / "other-tokenizer"
    shutil.copytree(tiny.draft, other_tokenizer)
    tok = json.loads((other_tokenizer / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    victim = next(t for t, i in vocab.items() if i == 300)
    vocab["zz" + victim] = vocab.pop(victim)  # same size, one token spelled differently
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(tok))

    for init, message in ((other_vocab, "vocab sizes differ"),
                          (other_tokenizer, "tokenizers differ")):
        out = tmp_path / f"run-{init.name}"
        with pytest.raises(DspecError, match=message):
            train(tiny.target, full_data, out, draft_init=str(init), steps=2, **QUICK)
        assert not out.exists()
