"""train/lora.py and `train(..., lora=...)`: parsing, frozen base, merged output, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deepspec_plugin.errors import DspecError
from deepspec_plugin.train.lora import (
    DEFAULT_TARGETS,
    LoraSpec,
    apply_lora,
    parameter_counts,
    parse_lora,
)
from deepspec_plugin.train.trainer import train

QUICK = dict(batch_size=4, eval_fraction=0.25, warmup_steps=2, progress=False)
SPEC = "r=4,alpha=8"


@pytest.fixture(scope="module")
def lora_run(tiny, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-runs") / "main"
    result = train(
        tiny.target,
        train_data,
        out,
        draft_init="layers:1",
        loss="tvd",
        steps=30,
        lr=1e-2,
        eval_every=15,
        save_every=15,
        lora=SPEC,
        **QUICK,
    )
    return out, result


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


def _peft_from_output(out: Path):
    from peft import PeftModel

    from deepspec_plugin.models import load_causal_lm

    return PeftModel.from_pretrained(load_causal_lm(out / "init"), str(out / "adapter")).eval()


# --- parsing ------------------------------------------------------------------------------------


def test_parse_lora_forms_and_defaults():
    assert parse_lora("r=16,alpha=32,targets=q_proj+k_proj+v_proj+o_proj") == LoraSpec(
        16, 32, ("q_proj", "k_proj", "v_proj", "o_proj"), 0.0
    )
    s = parse_lora("r=8")
    assert s.alpha == 16 and s.targets == DEFAULT_TARGETS and s.dropout == 0.0
    assert parse_lora(" r=4 , alpha=2.5 , dropout=0.1 ") == LoraSpec(4, 2.5, DEFAULT_TARGETS, 0.1)
    assert parse_lora("r=2,targets=v_proj+q_proj+v_proj").targets == ("v_proj", "q_proj")
    assert parse_lora("r=4,alpha=8").to_json() == {
        "r": 4,
        "alpha": 8,
        "targets": list(DEFAULT_TARGETS),
        "dropout": 0.0,
    }


@pytest.mark.parametrize(
    "spec, why",
    [
        ("", "rank r is required"),
        ("alpha=8", "rank r is required"),
        ("r=0", "r must be >= 1"),
        ("r=x", "r must be an integer"),
        ("r=4,alpha=-1", "alpha must be > 0"),
        ("r=4,alpha=big", "must be numbers"),
        ("r=4,dropout=1.5", "dropout must be in"),
        ("r=4,rank=3", "unknown key 'rank'"),
        ("r=4,r=8", "given twice"),
        ("r=4,q_proj", "not key=value"),
        ("r=4,targets=q_proj++v_proj", "empty name"),
    ],
)
def test_bad_specs_are_refused(spec, why):
    with pytest.raises(DspecError, match="invalid LoRA spec") as e:
        parse_lora(spec)
    assert why in str(e.value) and repr(spec) in str(e.value)
    assert "r=R[,alpha=A][,targets=NAME+NAME...]" in str(e.value)  # the valid form


def test_absent_target_module_is_refused_with_the_models_names(tiny, train_data, tmp_path):
    from deepspec_plugin.models import load_causal_lm

    with pytest.raises(DspecError, match="c_attn not in the model.*q_proj.*up_proj"):
        apply_lora(load_causal_lm(tiny.draft), parse_lora("r=2,targets=q_proj+c_attn"))
    out = tmp_path / "run"
    with pytest.raises(DspecError, match="c_attn not in the model.*down_proj"):
        lora = "r=2,targets=c_attn"
        train(tiny.target, train_data, out, draft_init="layers:1", steps=2, lora=lora, **QUICK)
    assert not out.exists()  # refused before anything is left behind
    with pytest.raises(DspecError, match="invalid LoRA spec"):
        train(tiny.target, train_data, out, draft_init="layers:1", steps=2, lora="r=-2", **QUICK)
    assert not out.exists()


# --- the adapter --------------------------------------------------------------------------------


def test_only_lora_parameters_train(tiny):
    import torch

    from deepspec_plugin.models import load_causal_lm

    model = apply_lora(load_causal_lm(tiny.draft).requires_grad_(True), parse_lora("r=4"))
    trainable, total = parameter_counts(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert 0 < trainable < total / 5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if "lora_" in n:
            continue
        assert torch.equal(p, before[n]), n  # the base is bit-identical
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_lora_training_raises_held_out_acceptance(lora_run):
    out, result = lora_run
    assert [e["step"] for e in result.evals] == [0, 15, 30]
    assert result.final_acceptance > result.start_acceptance + 0.03
    # Checkpoints hold the adapter only (safetensors), plus the optimizer state.
    ckpt = out / "checkpoints/step-30"
    saved = _weights(ckpt / "draft")
    assert saved and all("lora_" in k for k in saved)
    assert (ckpt / "optimizer.safetensors").is_file()
    assert json.loads((ckpt / "state.json").read_text())["run"]["lora"]["r"] == 4


def test_adapter_base_is_untouched_and_merged_draft_matches(tiny, lora_run):
    import torch

    from deepspec_plugin.models import check_pair, load_causal_lm

    out, _ = lora_run
    assert (out / "adapter/adapter_config.json").is_file()
    assert (out / "adapter/adapter_model.safetensors").is_file()
    assert not list((out / "adapter").glob("*.bin")) and not list(out.glob(".*tmp-*"))
    peft_model = _peft_from_output(out)
    init = _weights(out / "init")
    base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in peft_model.state_dict().items()
        if "lora_" not in k
    }
    for name, value in init.items():
        torch.testing.assert_close(base[name], value, rtol=0, atol=0)

    draft = out / "draft"
    check_pair(tiny.target, draft)
    merged = load_causal_lm(draft)
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.num_hidden_layers == 1
    assert not any("lora" in k for k in _weights(draft))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, merged.config.vocab_size, (2, 20), generator=gen)
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        untrained = load_causal_lm(out / "init")(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - untrained).abs().max() > 1e-3  # the adapter did change the model


def test_manifest_records_the_lora_spec(tiny, lora_run):
    from deepspec_plugin.models import fingerprint

    out, result = lora_run
    m = json.loads((out / "draft/deepspec.json").read_text())
    assert m == result.manifest
    assert m["lora"]["r"] == 4 and m["lora"]["alpha"] == 8
    assert m["lora"]["targets"] == list(DEFAULT_TARGETS) and m["lora"]["dropout"] == 0.0
    assert m["lora"]["adapter"] == "adapter" and m["lora"]["trainable_parameters"] > 0
    assert m["target_fingerprint"] == fingerprint(tiny.target) and m["steps"] == 30


def test_lora_resume_is_exact_and_refuses_another_spec(tiny, train_data, tmp_path):
    import torch

    settings = dict(draft_init="layers:1", loss="tvd", steps=6, lr=1e-2, eval_every=3, **QUICK)
    straight = train(tiny.target, train_data, tmp_path / "s", save_every=100, lora=SPEC, **settings)
    out = tmp_path / "r"
    stopped = train(tiny.target, train_data, out, save_every=100, stop_at=3, lora=SPEC, **settings)
    assert stopped.draft is None
    with pytest.raises(DspecError, match=r"another run.*lora"):
        train(tiny.target, train_data, out, resume=True, lora="r=8", save_every=100, **settings)
    with pytest.raises(DspecError, match=r"another run.*lora"):
        # full fine-tuning
        train(tiny.target, train_data, out, resume=True, save_every=100, **settings)
    resumed = train(tiny.target, train_data, out, resume=True, lora=SPEC, save_every=100,
                    **settings)
    assert resumed.steps == 6
    for sub in ("draft", "adapter"):
        a, b = _weights(tmp_path / "s" / sub), _weights(out / sub)
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    for x, y in zip(resumed.evals, straight.evals):
        assert x["acceptance"] == pytest.approx(y["acceptance"], abs=1e-6)


def test_cli_train_with_lora(tiny, train_data, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "deepspec_plugin.cli", "train", "--target", str(tiny.target)]
    cmd += ["--data", str(train_data), "--out", str(out), "--draft-init", "layers:1",
            "--steps", "4"]
    cmd += ["--batch-size", "2", "--eval-every", "2", "--lora", "r=4,alpha=8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "trainable of" in done.stdout and "Held-out acceptance" in done.stdout
    m = json.loads((out / "draft/deepspec.json").read_text())
    assert m["lora"]["r"] == 4 and m["lora"]["alpha"] == 8
    assert (out / "adapter/adapter_model.safetensors").is_file()
    bad_cmd = [str(tmp_path / "cli2") if a == str(out) else a for a in cmd[:-1]]
    bad = subprocess.run(
        [*bad_cmd, "r=4,targets=c_attn"], capture_output=True, text=True, timeout=300, env=env
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "c_attn not in the model" in " ".join(bad.stderr.split())
