"""train/data.py: target-regenerated data, its top-k signal, resume, validation, storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepspec_plugin.errors import DspecError
from deepspec_plugin.train.data import (
    DEFAULT_PROMPT_FILES,
    check_data_target,
    generate_data,
    load_manifest,
    read_data,
    shard_name,
    storage_report,
)

PROMPTS = [
    ["What is two plus three?"],
    ["Write a function that adds numbers.", "Now make it multiply."],
    ["Tell me about ducks."],
    ["Count to five."],
    ["Why is the sky blue?", "Say it shorter."],
]
SETTINGS = dict(max_new_tokens=6, topk=16, batch_size=2, shard_size=2, progress=False)


def _write_prompts(path: Path) -> Path:
    path.write_text("".join(json.dumps({"turns": t}) + "\n" for t in PROMPTS))
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    return _write_prompts(tmp_path_factory.mktemp("prompts") / "p.jsonl")


@pytest.fixture(scope="module")
def full_run(tiny, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "full"
    manifest = generate_data(tiny.target, [prompt_file], out, **SETTINGS)
    return out, manifest


def _sample_bytes(s) -> tuple:
    return (s.prompt_index, s.turn, s.input_ids.numpy().tobytes(), s.loss_mask.numpy().tobytes(),
            s.topk_ids.numpy().tobytes(), s.topk_probs.numpy().tobytes(),
            s.leftover.numpy().tobytes())


def test_manifest_and_samples(tiny, full_run, prompt_file):
    from deepspec_plugin.models import fingerprint, tokenizer_fingerprint

    out, manifest = full_run
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["schema"] == "deepspec-data/v1"
    assert on_disk["target_fingerprint"] == fingerprint(tiny.target)
    assert on_disk["tokenizer_fingerprint"] == tokenizer_fingerprint(tiny.target)
    assert on_disk["prompt_files"][0]["path"] == str(prompt_file.resolve())
    assert on_disk["settings"]["temperature"] == 0.0
    assert on_disk["settings"]["signal_temperature"] == 1.0
    assert on_disk["settings"]["topk"] == 16
    assert on_disk["complete"] is True
    assert [s["file"] for s in on_disk["shards"]] == [shard_name(i) for i in range(3)]
    samples = list(read_data(out))
    # One sample per turn, in prompt then turn order.
    assert [(s.prompt_index, s.turn) for s in samples] == [
        (0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (4, 0), (4, 1)
    ]
    assert on_disk["counts"]["samples"] == len(samples) == manifest.num_samples
    assert on_disk["counts"]["tokens"] == sum(len(s.input_ids) for s in samples)
    assert on_disk["counts"]["response_tokens"] == sum(int(s.loss_mask.sum()) for s in samples)
    for s in samples:
        n_resp = int(s.loss_mask.sum())
        assert 1 <= n_resp <= SETTINGS["max_new_tokens"]
        # The mask is exactly the tail: response tokens only, after the whole context.
        assert not s.loss_mask[: len(s.input_ids) - n_resp].any()
        assert s.loss_mask[len(s.input_ids) - n_resp :].all()
        assert s.topk_ids.shape == s.topk_probs.shape == (n_resp, 16)
        assert (s.topk_probs[:, :-1] >= s.topk_probs[:, 1:]).all()  # sorted descending
        total = s.topk_probs.sum(-1)
        assert (total <= 1.0 + 2e-3).all()
        assert (s.leftover >= 0).all()
        assert ((total + s.leftover - 1.0).abs() < 2e-3).all()
        # Greedy: the target's top-1 token under the stored distribution is the token it wrote.
        response = s.input_ids[len(s.input_ids) - n_resp :]
        assert (s.topk_ids[:, 0] == response).all()


def test_greedy_responses_match_reference_engine(tiny, full_run):
    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.bench.engines.reference import ReferenceEngine
    from deepspec_plugin.bench.prompts import format_turns
    from deepspec_plugin.bench.run import stop_token_ids
    from deepspec_plugin.models import load_tokenizer

    out, _ = full_run
    tok = load_tokenizer(tiny.target)
    engine = ReferenceEngine.from_paths(tiny.target)
    cfg = GenerationConfig(max_new_tokens=SETTINGS["max_new_tokens"],
                           stop_token_ids=tuple(stop_token_ids(tok, tiny.target)))
    answers: dict[int, list[str]] = {}
    for s in read_data(out):
        turns = PROMPTS[s.prompt_index][: s.turn + 1]
        context = format_turns(tok, turns, answers.get(s.prompt_index, []), True)
        expected = engine.generate([context], cfg).generations[0].token_ids  # batch size 1
        assert s.input_ids.tolist() == context + expected
        answers.setdefault(s.prompt_index, []).append(
            tok.decode(expected, skip_special_tokens=True))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_signal_from_generation_equals_a_teacher_forward(tiny, temperature):
    """The signal recorded from the engine's own forwards (left-padded, cached, rows leaving the
    batch) is the one a teacher-forced forward over the finished sequences gives."""
    import torch

    from deepspec_plugin.bench.engines.base import GenerationConfig
    from deepspec_plugin.bench.engines.reference import ReferenceEngine
    from deepspec_plugin.bench.prompts import format_turns
    from deepspec_plugin.models import load_causal_lm, load_tokenizer
    from deepspec_plugin.train.data import _SignalRecorder, _teacher_signal

    tok = load_tokenizer(tiny.target)
    model = load_causal_lm(tiny.target)
    engine = ReferenceEngine(model)
    contexts = [format_turns(tok, p[:1], [], True) for p in PROMPTS]
    assert len({len(c) for c in contexts}) > 1  # padding is exercised
    cfg = GenerationConfig(max_new_tokens=12, temperature=temperature, seed=3)
    first = engine.generate(contexts, cfg).generations[0].token_ids
    # A stop token that row 0 meets early, so rows leave the batch at different steps.
    cfg = GenerationConfig(max_new_tokens=12, temperature=temperature, seed=3,
                           stop_token_ids=(first[2],))
    recorder = _SignalRecorder(len(contexts), temperature, 16)
    responses = [g.token_ids for g in
                 engine.generate(contexts, cfg, on_logits=recorder).generations]
    assert len({len(r) for r in responses}) > 1
    recorded = [recorder.signal(i, len(r)) for i, r in enumerate(responses)]
    forward = _teacher_signal(model, [c + r for c, r in zip(contexts, responses)],
                              [len(c) for c in contexts], temperature, 16)
    for (ids, probs, left), (f_ids, f_probs, f_left) in zip(recorded, forward):
        assert ids.shape == f_ids.shape and probs.dtype == torch.float16
        assert (probs.float() - f_probs.float()).abs().max() < 2e-3
        assert (left - f_left).abs().max() < 2e-3
        # The same tokens, but for near-ties, which may swap order under float rounding.
        assert (ids == f_ids).float().mean() > 0.95
    with pytest.raises(DspecError, match="plain decoding only"):
        engine.generate(contexts[:1], GenerationConfig(max_new_tokens=2, k=2),
                        on_logits=recorder)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_kill_and_resume_equals_uninterrupted(tiny, full_run, prompt_file, tmp_path, temperature):
    settings = {**SETTINGS, "temperature": temperature}
    if temperature:  # sampled: seeds are fixed by position, so a resume samples the same tokens
        full_out = tmp_path / "sampled-full"
        generate_data(tiny.target, [prompt_file], full_out, **{**settings, "progress": True})
    else:
        full_out = full_run[0]
    out = tmp_path / "resumed"
    first = generate_data(tiny.target, [prompt_file], out, max_shards=1, **settings)
    assert not first.complete and len(first.shards) == 1
    assert not load_manifest(out).complete
    # What a kill mid-shard leaves: a temp file and a half-written next shard unknown to the
    # manifest. Both must be replaced, not trusted.
    (out / ".shard-00001.safetensors.tmp-x").write_bytes(b"partial")
    (out / shard_name(1)).write_bytes(b"garbage")
    resumed = generate_data(tiny.target, [prompt_file], out, **settings)
    assert resumed.complete and len(resumed.shards) == 3
    assert not list(out.glob(".*.tmp-*"))

    got = [_sample_bytes(s) for s in read_data(out)]
    want = [_sample_bytes(s) for s in read_data(full_out)]
    assert got == want
    keys = [(g[0], g[1]) for g in got]
    assert len(keys) == len(set(keys))
    # A rerun of a complete directory generates nothing and changes nothing.
    again = generate_data(tiny.target, [prompt_file], out, **settings)
    assert again.to_dict() == resumed.to_dict()


def test_resume_with_other_settings_or_target_is_refused(tiny, prompt_file, tmp_path):
    out = tmp_path / "d"
    generate_data(tiny.target, [prompt_file], out, max_shards=1, **SETTINGS)
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(DspecError, match=r"temperature: 0\.0 on disk, 0\.7 now.*--overwrite"):
        generate_data(tiny.target, [prompt_file], out, **{**SETTINGS, "temperature": 0.7})
    with pytest.raises(DspecError, match="target_fingerprint"):
        generate_data(tiny.target_updated, [prompt_file], out, **SETTINGS)
    assert (out / "manifest.json").read_bytes() == before  # nothing overwritten
    # --overwrite starts afresh with the new settings.
    m = generate_data(tiny.target, [prompt_file], out, overwrite=True, max_shards=1,
                      **{**SETTINGS, "temperature": 0.7})
    assert m.settings["temperature"] == 0.7 and len(m.shards) == 1


def test_check_data_target(tiny, full_run):
    out, _ = full_run
    assert check_data_target(out, tiny.target).target_fingerprint
    with pytest.raises(DspecError, match="another target"):
        check_data_target(out, tiny.target_updated)


@pytest.mark.parametrize("damage", ["flip", "empty", "missing", "truncate"])
def test_damaged_shard_is_named(full_run, tmp_path, damage):
    import shutil

    src, _ = full_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    shard = out / shard_name(1)
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[-3] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "empty":
        shard.write_bytes(b"")
    elif damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(bytes(data[:20]))
    with pytest.raises(DspecError, match=shard_name(1)):
        list(read_data(out))


def test_storage_report(full_run):
    out, _ = full_run
    tiny_report = storage_report(out)
    assert tiny_report["vocab_size"] == 512 and tiny_report["topk"] == 16
    assert tiny_report["topk_bytes_per_token"] == 16 * 6 + 4
    assert tiny_report["shard_bytes_per_response_token"] > 0
    k32_tiny = storage_report(topk=32, vocab_size=512)
    assert k32_tiny["full_fp16_bytes_per_token"] == 1024
    assert k32_tiny["ratio"] == pytest.approx(196 / 1024)
    reference = storage_report(topk=32, vocab_size=49152)
    assert reference["ratio"] == pytest.approx(196 / 98304)
    assert reference["ratio"] < 0.01


def _turns(path: Path) -> list[list[str]]:
    # Split on "\n" only: arena-hard-v2 holds U+2028 inside JSON strings, which str.splitlines
    # (and so bench.prompts.load_prompt_file, as of this writing) wrongly treats as a line break.
    lines = path.read_text("utf-8").split("\n")
    return [json.loads(line)["turns"] for line in lines if line.strip()]


def test_default_prompts_are_the_training_sets():
    names = sorted(p.name for p in DEFAULT_PROMPT_FILES)
    assert names == ["arena-hard-v2.jsonl", "gsm8k.jsonl", "livecodebench.jsonl", "math500.jsonl"]
    shared_train = Path("/work/shared/datasets/train")
    shared_eval = Path("/work/shared/datasets/eval")
    for path in DEFAULT_PROMPT_FILES:
        turns = _turns(path)
        assert turns and all(t and all(isinstance(x, str) for x in t) for t in turns)
        if (shared_train / path.name).is_file():  # shipped unchanged
            assert path.read_bytes() == (shared_train / path.name).read_bytes()
        if (shared_eval / path.name).is_file():  # same benchmark name: no eval prompt leaks in
            eval_prompts = {json.dumps(t) for t in _turns(shared_eval / path.name)}
            assert not eval_prompts & {json.dumps(t) for t in turns}
