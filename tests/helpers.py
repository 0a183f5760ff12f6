"""Plain helpers the tests share (tests/ is on sys.path: no __init__.py); fixtures are in
conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

# --- command-line tools the project installs (scripts/setup.sh) -------------------------------


def require_tool(name: str, install: str) -> str:
    """Path of the tool ``name``: the test skips without it, or fails when DSPEC_REQUIRE_TOOLS=1
    (CI, where scripts/setup.sh installed it). ``install`` says how to get it."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed ({install})"
        if os.environ.get("DSPEC_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{reason}, and DSPEC_REQUIRE_TOOLS=1 requires it")
        pytest.skip(reason)
    return path


def promtool() -> str:
    return require_tool("promtool", "Debian/Ubuntu: apt-get install prometheus; "
                                    "scripts/setup.sh does it as root")


def run_promtool(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


# --- training data: the tiny target answers short chat prompts --------------------------------

TRAIN_PROMPTS = [
    ["What is two plus three?"],
    ["Write a function that adds numbers.", "Now make it multiply."],
    ["Tell me about ducks."],
    ["Count to five."],
    ["Why is the sky blue?"],
    ["Name three colours."],
    ["How do I sort a list in Python?"],
    ["What is the capital of France?"],
]


def write_prompt_file(path, prompts=TRAIN_PROMPTS):
    """A ``{"turns": [...]}`` JSONL prompt file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"turns": t}) + "\n" for t in prompts))
    return path


def make_train_data(target, prompt_file, out, **settings):
    """``generate_data`` with the settings the training tests share (overridable)."""
    from deepspec_plugin.train.data import generate_data

    defaults = dict(max_new_tokens=32, topk=16, batch_size=4, shard_size=4, progress=False)
    generate_data(target, [prompt_file], out, **{**defaults, **settings})
    return out


# --- chi-square goodness of fit of sampled sequences against a model's exact probabilities ------


def exact_cells(model, prompt, depth, n, temperature):
    """Token sequences of ``depth`` whose target probability x n is >= 5, with that probability.

    Chosen from the target's exact probabilities only (never from samples), so the binning
    cannot adapt to the data; the mass of every other sequence forms one "rest" cell.
    """
    import numpy as np
    import torch

    cells = {(): 1.0}
    with torch.inference_mode():
        for _ in range(depth):
            prefixes = list(cells)
            ids = torch.tensor([prompt + list(p) for p in prefixes])
            logits = model(input_ids=ids).logits[:, -1].float()
            probs = torch.softmax(logits / temperature, -1).double().numpy()
            nxt = {}
            for prefix, row in zip(prefixes, probs):
                for token in np.nonzero(cells[prefix] * row * n >= 5)[0]:
                    nxt[prefix + (int(token),)] = cells[prefix] * float(row[token])
            cells = nxt
    return cells


def gof_pvalue(samples: list[tuple[int, ...]], cells: dict, n: int) -> float:
    import numpy as np
    from scipy.stats import chisquare

    index = {c: i for i, c in enumerate(cells)}
    observed = np.zeros(len(cells) + 1)
    for s in samples:
        observed[index.get(s, len(cells))] += 1
    expected = np.array(list(cells.values()) + [max(0.0, 1.0 - sum(cells.values()))]) * n
    if expected[-1] < 5:  # fold a tiny rest cell into the smallest cell
        smallest = int(np.argmin(expected[:-1]))
        observed[smallest] += observed[-1]
        expected[smallest] += expected[-1]
        observed, expected = observed[:-1], expected[:-1]
    return float(chisquare(observed, expected * n / expected.sum()).pvalue)


# --- a model directory, read and altered ------------------------------------------------------


def model_config(path) -> dict:
    """``path/config.json``."""
    return json.loads((Path(path) / "config.json").read_text())


def model_tensors(path) -> dict:
    """``path/model.safetensors``, loaded."""
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def copy_model_with(src, dst, *, tensors=None, config=None) -> Path:
    """A copy of a checkpoint with its tensors and/or config changed in place by the given
    functions."""
    import shutil

    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    if tensors is not None:
        state = model_tensors(src)
        tensors(state)
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        cfg = model_config(src)
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst
