"""train/trainer.py: distillation on the tiny pair, alignment, checkpoints, resume, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from deepspec_plugin.errors import DspecError
from deepspec_plugin.train.batches import batch_indices, collate, split_by_prompt
from deepspec_plugin.train.data import Sample, generate_data, read_data
from deepspec_plugin.train.trainer import evaluate, train

QUICK = dict(batch_size=4, eval_fraction=0.25, warmup_steps=2, progress=False)


@pytest.fixture(scope="module")
def trained(tiny, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "main"
    result = train(
        tiny.target,
        train_data,
        out,
        draft_init="layers:1",
        loss="tvd",
        steps=40,
        lr=2e-3,
        eval_every=20,
        save_every=20,
        **QUICK,
    )
    return out, result


def test_training_raises_held_out_acceptance(trained):
    _, result = trained
    assert [e["step"] for e in result.evals] == [0, 20, 40]
    assert result.final_acceptance > result.start_acceptance + 0.02
    assert result.evals[-1]["tokens"] > 0
    assert result.tokens_trained > 0 and result.tokens_per_second > 0


def test_draft_output_and_manifest(tiny, train_data, trained):
    from deepspec_plugin.models import (
        check_pair,
        fingerprint,
        load_causal_lm,
        tokenizer_fingerprint,
    )

    out, result = trained
    draft = out / "draft"
    assert result.draft == draft
    assert list(draft.glob("*.safetensors")) and (draft / "config.json").is_file()
    assert (draft / "tokenizer.json").is_file()
    assert not list(draft.glob("*.bin"))
    check_pair(tiny.target, draft)
    assert load_causal_lm(draft).config.num_hidden_layers == 1
    m = json.loads((draft / "deepspec.json").read_text())
    assert m == result.manifest
    assert m["schema"] == "deepspec-draft/v1" and m["method"] == "draft_model"
    assert m["target_fingerprint"] == fingerprint(tiny.target)
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny.target)
    assert m["init"]["spec"] == "layers:1"
    assert m["init"]["fingerprint"] == fingerprint(out / "init")
    assert m["loss"] == "tvd" and m["temperature"] == 1.0 and m["steps"] == 40
    assert m["data"]["path"] == str(train_data.resolve())
    assert m["data"]["target_fingerprint"] == fingerprint(tiny.target)
    assert m["data"]["samples"] == len(list(read_data(train_data)))
    assert m["tokens_trained"] == result.tokens_trained
    assert m["held_out"]["acceptance"] == pytest.approx(result.final_acceptance)
    assert 0 < m["held_out"]["greedy_agreement"] <= 1
    assert m["created"]
    # keep_last=2 with save_every=20 over 40 steps: both kept, no temp dirs left.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-40"]
    assert not list(out.glob(".*tmp-*"))


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


def test_exact_resume_equals_straight_run(tiny, train_data, tmp_path):
    import torch

    settings = dict(
        draft_init="layers:1", loss="tvd", steps=6, lr=2e-3, eval_every=3, keep_last=2, **QUICK
    )
    straight = train(tiny.target, train_data, tmp_path / "straight", save_every=2, **settings)
    assert sorted(p.name for p in (tmp_path / "straight/checkpoints").iterdir()) == [
        "step-4",
        "step-6",
    ]

    out = tmp_path / "resumed"
    stopped = train(tiny.target, train_data, out, save_every=100, stop_at=3, **settings)
    assert stopped.draft is None and stopped.steps == 3
    assert not (out / "draft").exists()
    assert (out / "checkpoints/step-3/state.json").is_file()
    # What a kill mid-save leaves: a temp dir, never a complete step-N (renamed last).
    (out / "checkpoints/.step-4.tmp-x/draft").mkdir(parents=True)
    resumed = train(tiny.target, train_data, out, save_every=100, resume=True, **settings)
    assert not list((out / "checkpoints").glob(".*"))
    assert resumed.steps == 6

    a, b = _weights(straight.draft), _weights(resumed.draft)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert resumed.tokens_trained == straight.tokens_trained
    assert [e["step"] for e in resumed.evals] == [e["step"] for e in straight.evals]
    for x, y in zip(resumed.evals, straight.evals):
        assert x["acceptance"] == pytest.approx(y["acceptance"], abs=1e-6)
    # A finished run is not resumed again.
    with pytest.raises(DspecError, match="already finished"):
        train(tiny.target, train_data, out, save_every=100, resume=True, **settings)


def test_checkpoint_of_another_run_is_refused(tiny, train_data, tmp_path):
    settings = dict(draft_init="layers:1", steps=4, save_every=100, **QUICK)
    out = tmp_path / "a"
    train(tiny.target, train_data, out, loss="tvd", stop_at=2, **settings)
    other = tmp_path / "b"
    shutil.copytree(out, other)
    before = (other / "checkpoints/step-2/state.json").read_bytes()
    with pytest.raises(DspecError, match=r"another run.*loss: 'tvd' in the checkpoint, 'fkl'"):
        train(tiny.target, train_data, other, loss="fkl", resume=True, **settings)
    with pytest.raises(DspecError, match=r"another run.*lr"):
        train(tiny.target, train_data, other, loss="tvd", lr=1e-2, resume=True, **settings)
    assert (other / "checkpoints/step-2/state.json").read_bytes() == before
    assert not (other / "draft").exists()


def test_existing_out_without_resume_is_refused(tiny, train_data, trained):
    out, _ = trained
    before = (out / "draft/deepspec.json").read_bytes()
    with pytest.raises(DspecError, match="already exists.*--resume"):
        train(tiny.target, train_data, out, draft_init="layers:1", steps=2, **QUICK)
    assert (out / "draft/deepspec.json").read_bytes() == before


def test_data_from_another_target_is_refused(tiny, train_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DspecError, match="another target"):
        train(tiny.target_updated, train_data, out, draft_init="layers:1", steps=2, **QUICK)
    assert not out.exists()  # nothing written


def test_bad_init_and_temperature_are_refused(tiny, train_data, tmp_path):
    with pytest.raises(DspecError, match="neither layers:N, fresh"):
        train(
            tiny.target, train_data, tmp_path / "x", draft_init=str(tmp_path / "nope"), steps=2,
            **QUICK
        )
    for spec, message in (
        ("layers:x", "invalid draft init"),
        ("layers:9", "between 1 and"),
        ("fresh:2", "invalid fresh draft option"),
    ):
        with pytest.raises(DspecError, match=message):
            train(tiny.target, train_data, tmp_path / "z", draft_init=spec, steps=2, **QUICK)
        assert not (tmp_path / "z").exists()  # a refused run leaves no directory behind
    # Greedy train_data stores T=1 top-k; a loss at T=1.5 would move mass into the tokens not stored
    # (a lower temperature is fine: the top-k are sharpened, see test_losses).
    with pytest.raises(DspecError, match="temperature"):
        train(
            tiny.target,
            train_data,
            tmp_path / "y",
            draft_init="layers:1",
            steps=2,
            temperature=1.5,
            **QUICK,
        )


def test_collate_shifts_signal_onto_predicting_logits():
    import torch

    k = 3
    s = Sample(
        prompt_index=0,
        turn=0,
        input_ids=torch.tensor([5, 6, 7, 8, 9]),
        loss_mask=torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool),
        topk_ids=torch.tensor([[7, 1, 2], [8, 1, 2], [9, 1, 2]]),
        topk_probs=torch.full((3, k), 0.25),
        leftover=torch.full((3,), 0.25),
    )
    short = Sample(
        prompt_index=1,
        turn=0,
        input_ids=torch.tensor([5, 6, 7]),
        loss_mask=torch.tensor([0, 1, 1], dtype=torch.bool),
        topk_ids=torch.tensor([[6, 0, 0], [7, 0, 0]]),
        topk_probs=torch.full((2, k), 0.3),
        leftover=torch.full((2,), 0.1),
    )
    b = collate([s, short])
    assert b["input_ids"].shape == (2, 5) and b["topk_ids"].shape == (2, 4, k)
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # Logits at t predict token t + 1: the signal row for token t + 1 sits at t.
    assert b["mask"].tolist() == [[False, True, True, True], [True, True, False, False]]
    assert b["topk_ids"][0, :, 0].tolist() == [0, 7, 8, 9]
    assert b["topk_ids"][1, :, 0].tolist() == [6, 7, 0, 0]
    for row, t in ((0, 1), (0, 3), (1, 0)):
        assert b["topk_ids"][row, t, 0] == b["input_ids"][row, t + 1]


def test_draft_equal_to_target_with_full_vocab_signal_accepts_everything(
    tiny, train_prompt_file, tmp_path
):
    """The alignment check end to end: K = V, the target as its own draft -> 1 - TVD = 1."""
    import torch

    from deepspec_plugin.models import load_causal_lm

    out = tmp_path / "fullvocab"
    generate_data(
        tiny.target,
        [train_prompt_file],
        out,
        num_prompts=3,
        max_new_tokens=12,
        topk=512,
        batch_size=3,
        shard_size=3,
        progress=False,
    )
    samples = list(read_data(out))
    model = load_causal_lm(tiny.target)
    args = dict(batch_size=2, temperature=1.0, signal_temperature=1.0)
    got = evaluate(model, samples, **args)
    assert got["tokens"] == sum(int(s.loss_mask.sum()) for s in samples)
    assert got["acceptance"] > 0.998  # float16 stored probabilities
    assert got["greedy"] == 1.0
    # One position off, the same pair looks like a poor draft: the check can fail.
    shifted = [
        Sample(
            s.prompt_index,
            s.turn,
            s.input_ids,
            s.loss_mask,
            torch.roll(s.topk_ids, 1, 0),
            torch.roll(s.topk_probs, 1, 0),
            s.leftover,
        )
        for s in samples
    ]
    assert evaluate(model, shifted, **args)["acceptance"] < 0.9
    # The whole train() path with the target as an existing-directory init measures the same.
    result = train(
        tiny.target,
        out,
        tmp_path / "run",
        draft_init=str(tiny.target),
        steps=1,
        lr=0.0,
        batch_size=2,
        eval_fraction=0.34,
        progress=False,
    )
    assert result.start_acceptance > 0.998
    assert result.manifest["init"]["spec"] == str(tiny.target)


def test_split_and_order_are_deterministic():
    samples = [Sample(i // 2, i % 2, None, None, None, None, None) for i in range(20)]
    train_a, held_a = split_by_prompt(samples, 0.2, seed=1)
    train_b, held_b = split_by_prompt(samples, 0.2, seed=1)
    assert held_a == held_b and len({s.prompt_index for s in held_a}) == 2
    assert not {s.prompt_index for s in held_a} & {s.prompt_index for s in train_a}
    assert all(s.turn in (0, 1) for s in held_a) and len(held_a) == 4
    # The order is an endless stream of epoch shuffles addressed by position.
    stream = batch_indices(7, 3, 0, 21)
    assert sorted(stream[:7]) == sorted(stream[7:14]) == list(range(7))
    assert batch_indices(7, 3, 5, 9) == stream[5:14]
    with pytest.raises(DspecError, match="at least 2"):
        split_by_prompt(samples[:2], 0.2, seed=1)


def test_run_identity_is_derived_from_the_config(tiny, train_data, trained):
    from dataclasses import replace

    from deepspec_plugin.train.config import TrainConfig
    from deepspec_plugin.train.distributed import World

    out, _ = trained
    cfg = TrainConfig(tiny.target, train_data, out, draft_init="layers:1", loss="tvd", steps=40,
                      lr=2e-3, eval_every=20, save_every=20, **QUICK)
    identity = cfg.run_identity(World(), out / "init", "tvd")
    recorded = json.loads((out / "checkpoints/step-40/state.json").read_text())["run"]
    assert identity.to_json() == recorded and "lora" not in recorded
    assert identity.differences(recorded) == []
    wider = replace(cfg, lora="r=4").run_identity(World(size=2), out / "init", "tvd")
    assert wider.to_json()["global_batch_size"] == 8 and wider.to_json()["lora"]["r"] == 4
    assert wider.differences(recorded)[0].startswith("global_batch_size: 4 in the checkpoint")
    with pytest.raises(DspecError, match="grad_accum must be >= 1"):
        replace(cfg, out=out.parent / "new", grad_accum=0).check(World())
    with pytest.raises(DspecError, match="unknown parallel mode"):
        replace(cfg, parallel="tp").check(World())
