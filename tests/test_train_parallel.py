"""train/ under torchrun: 2 CPU processes (gloo), DDP and FSDP, against one process.

The contract (train/distributed.py): N processes with batch size B train exactly as one process
with batch size N * B, and a checkpoint written by N processes resumes in one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepspec_plugin.train.trainer import train

STEPS = 4
COMMON = dict(draft_init="layers:1", loss="tvd", steps=STEPS, lr=2e-3, warmup_steps=2,
              eval_fraction=0.25, eval_every=2, save_every=2, seed=0)


@pytest.fixture(scope="module")
def ragged(train_data, tmp_path_factory):
    """train_data with its responses cut to 32, 25, 18 and 11 tokens in turn: the tiny target
    never stops, and with equal lengths each process holds half the global batch's tokens, so a
    wrong per-process loss weighting would go unseen."""
    import hashlib

    import torch
    from safetensors.torch import load, save

    out = tmp_path_factory.mktemp("ragged") / "d"
    shutil.copytree(train_data, out)
    manifest = json.loads((out / "manifest.json").read_text())
    n = 0
    for rec in manifest["shards"]:
        t = load((out / rec["file"]).read_bytes())
        tok, resp = t["token_offsets"].tolist(), t["response_offsets"].tolist()
        parts = {k: [] for k in ("input_ids", "loss_mask", "topk_ids", "topk_probs", "leftover")}
        tok_off, resp_off = [0], [0]
        for j in range(rec["samples"]):
            keep = max(4, (resp[j + 1] - resp[j]) - 7 * (n % 4))
            n += 1
            context = (tok[j + 1] - tok[j]) - (resp[j + 1] - resp[j])
            for k in ("input_ids", "loss_mask"):
                parts[k].append(t[k][tok[j]:tok[j] + context + keep])
            for k in ("topk_ids", "topk_probs", "leftover"):
                parts[k].append(t[k][resp[j]:resp[j] + keep])
            tok_off.append(tok_off[-1] + context + keep)
            resp_off.append(resp_off[-1] + keep)
        t.update({k: torch.cat(v).contiguous() for k, v in parts.items()})
        t["token_offsets"], t["response_offsets"] = torch.tensor(tok_off), torch.tensor(resp_off)
        data = save(t)
        (out / rec["file"]).write_bytes(data)
        rec.update(tokens=tok_off[-1], response_tokens=resp_off[-1],
                   sha256="sha256:" + hashlib.sha256(data).hexdigest())
    manifest.pop("counts")
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def single(tiny, ragged, tmp_path_factory):
    """One process, batch size 4: the run two processes of batch size 2 must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    return train(tiny.target, ragged, out, batch_size=4, progress=False, **COMMON)


def torchrun(target: Path, data: Path, out: Path, parallel: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "deepspec_plugin.cli", "train", "--target", str(target), "--data", str(data),
        "--out", str(out), "--batch-size", "2", "--parallel", parallel,
        "--draft-init", COMMON["draft_init"], "--loss", COMMON["loss"],
        "--steps", str(STEPS), "--lr", str(COMMON["lr"]), "--eval-every", "2",
        "--save-every", "2", "--warmup-steps", str(COMMON["warmup_steps"]),
        "--eval-fraction", str(COMMON["eval_fraction"]), "--seed", str(COMMON["seed"]),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(next((run / "draft").glob("*.safetensors"))))


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    """Equal to atol, but for a few elements in 10,000: Adam divides by the root of the squared
    gradient, so an element whose gradient is near zero turns the rounding of a different
    reduction order into a step of up to lr. A wrong loss weighting moves most elements."""
    import torch

    assert a.keys() == b.keys()
    for name in a:
        if not a[name].is_floating_point():
            assert torch.equal(a[name], b[name]), name
            continue
        off = (a[name] - b[name]).abs()
        assert int((off > atol).sum()) <= max(1, a[name].numel() // 10_000), (
            f"{name}: {int((off > atol).sum())} of {a[name].numel()} beyond {atol}")
        assert float(off.max()) <= COMMON["lr"] * STEPS, f"{name}: {float(off.max())}"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_train_like_one_with_the_global_batch(tiny, ragged, single, tmp_path,
                                                            parallel):
    out = tmp_path / parallel
    proc = torchrun(tiny.target, ragged, out, parallel)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "draft/deepspec.json").read_text())
    assert manifest["training"]["processes"] == 2
    assert manifest["training"]["parallel"] == parallel
    assert manifest["training"]["global_batch_size"] == 4
    assert manifest["tokens_trained"] == single.tokens_trained
    assert_same_weights(weights(out), weights(single.out))
    for a, b in zip(manifest["held_out"].values(), single.manifest["held_out"].values()):
        assert a == pytest.approx(b, abs=1e-5)
    # Only rank 0 wrote: one draft, checkpoints step-2 and step-4, no temp dirs.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not list(out.glob(".*"))

    if parallel == "ddp":
        # A 2-process checkpoint resumes in one process with the same global batch.
        resumed = tmp_path / "resumed"
        shutil.copytree(out, resumed)
        shutil.rmtree(resumed / "draft")
        shutil.rmtree(resumed / "checkpoints/step-4")
        result = train(tiny.target, ragged, resumed, batch_size=4, resume=True, progress=False,
                       **COMMON)
        assert result.steps == STEPS
        assert_same_weights(weights(resumed), weights(single.out))


def test_fsdp_refuses_lora_and_on_policy(tiny, train_data, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "deepspec_plugin.cli", "train", "--target", str(tiny.target),
        "--data", str(train_data),
        "--out", str(tmp_path / "x"), "--parallel", "fsdp", "--lora", "r=4", "--steps", "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0
    assert "LoRA under FSDP is not supported" in proc.stderr + proc.stdout
    assert not (tmp_path / "x").exists()


def test_two_processes_train_an_eagle3_head_like_one(tiny, ragged, tmp_path):
    """EAGLE-3 under DDP: each process runs the target on its own slice; the unrolled loss is
    weighted by its share of the global tokens, so 2 x 2 trains as 1 x 4."""
    settings = dict(loss="tvd", steps=STEPS, lr=2e-3, warmup_steps=2, eval_fraction=0.25,
                    eval_every=2, save_every=2, seed=0, draft_vocab_size=256)
    one = train(tiny.target, ragged, tmp_path / "one", batch_size=4, draft_type="eagle3",
                progress=False, **settings)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "deepspec_plugin.cli", "train", "--target", str(tiny.target), "--data",
        str(ragged), "--out", str(tmp_path / "two"), "--batch-size", "2",
        "--draft-type", "eagle3", "--draft-vocab-size", "256", "--loss", "tvd",
        "--steps", str(STEPS), "--lr", "2e-3", "--eval-every", "2", "--save-every", "2",
        "--warmup-steps", "2", "--eval-fraction", "0.25", "--seed", "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    assert_same_weights(load_file(str(one.draft / "model.safetensors")),
                        load_file(str(tmp_path / "two" / "draft" / "model.safetensors")))
    manifest = json.loads((tmp_path / "two" / "draft" / "deepspec.json").read_text())
    assert manifest["training"]["processes"] == 2 and manifest["method"] == "eagle3"


def test_two_processes_train_medusa_heads_like_one(tiny, ragged, tmp_path):
    """Medusa under DDP, through the CLI (--draft-type medusa --heads 2): each process runs the
    target on its own slice, and 2 x 2 trains as 1 x 4."""
    settings = dict(loss="tvd", steps=STEPS, lr=2e-3, warmup_steps=2, eval_fraction=0.25,
                    eval_every=2, save_every=2, seed=0)
    one = train(tiny.target, ragged, tmp_path / "one", batch_size=4, draft_type="medusa",
                heads=2, progress=False, **settings)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "deepspec_plugin.cli", "train", "--target", str(tiny.target), "--data",
        str(ragged), "--out", str(tmp_path / "two"), "--batch-size", "2",
        "--draft-type", "medusa", "--heads", "2", "--loss", "tvd",
        "--steps", str(STEPS), "--lr", "2e-3", "--eval-every", "2", "--save-every", "2",
        "--warmup-steps", "2", "--eval-fraction", "0.25", "--seed", "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    from safetensors.torch import load_file

    name = "medusa_lm_head.safetensors"
    assert_same_weights(load_file(str(one.draft / name)),
                        load_file(str(tmp_path / "two" / "draft" / name)))
    manifest = json.loads((tmp_path / "two" / "draft" / "deepspec.json").read_text())
    assert manifest["training"]["processes"] == 2 and manifest["method"] == "medusa"
    assert manifest["k"] == 2
