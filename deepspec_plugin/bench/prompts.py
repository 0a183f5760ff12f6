"""Prompt files and how a conversation becomes token ids.

A prompt file is JSON Lines, one ``{"turns": ["user turn 1", "user turn 2", ...]}`` per line
(blank lines are skipped). Only user turns are stored: the model's own answers fill the
assistant turns when a multi-turn prompt is played.
"""

from __future__ import annotations

import json
from pathlib import Path

from deepspec_plugin.errors import DspecError

# Between turns when no chat template is used: a blank line, as in plain-text transcripts.
PLAIN_SEPARATOR = "\n\n"


def load_prompt_file(path: str | Path) -> list[list[str]]:
    """Every prompt of a ``{"turns": [...]}`` JSON Lines file, as lists of user turns."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DspecError(f"prompt file {path} does not exist", "check the path") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DspecError(f"cannot read prompt file {path}: {e}",
                         "give a UTF-8 JSON Lines file") from e
    prompts: list[list[str]] = []
    fix = 'write one JSON object per line: {"turns": ["a user message", ...]}'
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"prompt file {path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DspecError(f"{where}: invalid JSON ({e.msg}, column {e.colno})", fix) from e
        if not isinstance(obj, dict) or "turns" not in obj:
            raise DspecError(f"{where}: no 'turns' key", fix)
        turns = obj["turns"]
        if not isinstance(turns, list) or not turns:
            raise DspecError(f"{where}: 'turns' must be a non-empty list", fix)
        for i, t in enumerate(turns):
            if not isinstance(t, str) or not t.strip():
                raise DspecError(f"{where}: turn {i + 1} is not a non-empty string", fix)
        prompts.append(list(turns))
    if not prompts:
        raise DspecError(f"prompt file {path} holds no prompts", fix)
    return prompts


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_turns(
    tokenizer, turns_so_far: list[str], answers_so_far: list[str], chat_template: bool
) -> list[int]:
    """Token ids of a conversation ending with the latest user turn, ready for generation.

    ``answers_so_far`` holds the model's answers to all but the last user turn. With
    ``chat_template`` the tokenizer's template is applied with ``add_generation_prompt=True``;
    without it the turns and answers are joined as plain text with blank lines.
    """
    if len(answers_so_far) != len(turns_so_far) - 1:
        raise ValueError(
            f"{len(turns_so_far)} user turns need {len(turns_so_far) - 1} answers, "
            f"got {len(answers_so_far)}"
        )
    messages = []
    for i, turn in enumerate(turns_so_far):
        messages.append({"role": "user", "content": turn})
        if i < len(answers_so_far):
            messages.append({"role": "assistant", "content": answers_so_far[i]})
    if chat_template:
        if not has_chat_template(tokenizer):
            raise DspecError(
                "the bench asks for the chat template but the tokenizer has none",
                'set "chat_template": false in the bench file (or pass --no-chat-template)',
            )
        # Render to text, then tokenize without extra specials: the template already holds them.
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = PLAIN_SEPARATOR.join(m["content"] for m in messages) + PLAIN_SEPARATOR
    return list(tokenizer(text)["input_ids"])
