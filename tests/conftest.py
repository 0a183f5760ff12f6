"""Shared fixtures. Tests run offline: nothing here may reach a hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny tokenizer, target, draft and perturbed target (`dspec models tiny`), built once."""
    from deepspec_plugin.models import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"), seed=0, perturb=0.02)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads that
    spin against other processes make each step up to 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="session")
def train_prompt_file(tmp_path_factory):
    """TRAIN_PROMPTS as a prompt file (eight prompts, one of them two turns)."""
    from helpers import write_prompt_file

    return write_prompt_file(tmp_path_factory.mktemp("prompts") / "p.jsonl")


@pytest.fixture(scope="session")
def train_data(tiny, train_prompt_file, tmp_path_factory):
    """The tiny target's answers to TRAIN_PROMPTS (32 tokens, top-16), generated once."""
    from helpers import make_train_data

    return make_train_data(tiny.target, train_prompt_file, tmp_path_factory.mktemp("data") / "d")


@pytest.fixture(scope="session")
def eagle3_head(tiny, train_data, tmp_path_factory):
    """An EAGLE-3 head trained for the tiny target (40 steps on train_data, a few seconds):
    ``out/draft`` of `dspec train --draft-type eagle3`."""
    from deepspec_plugin.train.trainer import train

    out = tmp_path_factory.mktemp("eagle3") / "run"
    result = train(tiny.target, train_data, out, draft_type="eagle3", steps=40, lr=3e-3,
                   batch_size=4, eval_every=20, save_every=40, draft_vocab_size=256,
                   progress=False)
    return result.draft


def _train_heads(tiny, train_data, tmp_path_factory, kind: str):
    from deepspec_plugin.train.trainer import train

    out = tmp_path_factory.mktemp(kind) / "run"
    return train(tiny.target, train_data, out, draft_type=kind, steps=40, lr=3e-3,
                 batch_size=4, eval_every=20, save_every=40, progress=False).draft


@pytest.fixture(scope="session")
def medusa_draft(tiny, train_data, tmp_path_factory):
    """3 Medusa heads trained for the tiny target (40 steps, about a second): ``out/draft`` of
    `dspec train --draft-type medusa`."""
    return _train_heads(tiny, train_data, tmp_path_factory, "medusa")


@pytest.fixture(scope="session")
def mlp_draft(tiny, train_data, tmp_path_factory):
    """A 3-stage MLP speculator trained for the tiny target (40 steps): ``out/draft`` of
    `dspec train --draft-type mlp_speculator`."""
    return _train_heads(tiny, train_data, tmp_path_factory, "mlp_speculator")
