"""Plain helpers the tests share (tests/ is on sys.path: no __init__.py); fixtures are in
conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

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

