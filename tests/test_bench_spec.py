"""Bench specs and prompt files: packaged benches, validation messages, overrides, selection."""

from __future__ import annotations

import json

import pytest

from deepspec_plugin.bench.prompts import load_prompt_file
from deepspec_plugin.bench.spec import (
    PROMPTS_DIR,
    SCHEMA,
    load_bench,
    packaged_benches,
    select_prompts,
)
from deepspec_plugin.errors import DspecError


def _mini(**changes) -> dict:
    spec = {
        "schema": SCHEMA,
        "name": "mini",
        "categories": {
            "chat": {"files": ["mt-bench.jsonl"], "num_prompts": 2},
            "code": {"files": ["humaneval.jsonl", "mbpp.jsonl"], "num_prompts": 3},
        },
        "max_new_tokens": 16,
        "temperatures": [0.0],
        "k": [2],
        "batch_sizes": [1],
    }
    spec.update(changes)
    return spec


def _write(tmp_path, obj, name="bench.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=2))
    return path


def test_packaged_benches_load_and_match_their_purpose():
    assert {"quick", "standard"} <= set(packaged_benches())
    quick = load_bench("quick")
    assert [c.name for c in quick.categories] == ["chat", "code", "math"]
    assert all(c.num_prompts == 4 for c in quick.categories)
    assert (quick.max_new_tokens, quick.temperatures, quick.k) == (48, (0.0, 0.7), (4,))
    assert (quick.batch_sizes, quick.seeds) == ((1,), (0,))
    standard = load_bench("standard")
    assert [c.name for c in standard.categories] == ["chat", "code", "math", "hard-math"]
    assert all(c.num_prompts == 20 for c in standard.categories)
    assert standard.k == (2, 4, 6) and standard.batch_sizes == (1, 4)
    assert standard.temperatures == (0.0, 0.7, 1.0) and standard.max_new_tokens == 128
    assert standard.max_turns == 2
    for spec in (quick, standard):  # every prompt it asks for exists
        for c in spec.categories:
            assert len(select_prompts(spec, c)) == c.num_prompts


def test_to_dict_round_trips_through_a_file(tmp_path):
    spec = load_bench("quick")
    again = load_bench(_write(tmp_path, spec.to_dict()))
    assert again.to_dict() == spec.to_dict()


def test_defaults_of_optional_keys(tmp_path):
    spec = load_bench(_write(tmp_path, _mini()))
    assert spec.seeds == (0,) and spec.max_turns == 1 and spec.chat_template is True
    assert spec.selection == "interleave" and spec.description == ""


def test_selection_interleaves_files_deterministically(tmp_path):
    spec = load_bench(_write(tmp_path, _mini()))
    code = spec.categories[1]
    chosen = select_prompts(spec, code)
    assert [(f, i) for f, i, _ in chosen] == [
        ("humaneval.jsonl", 0), ("mbpp.jsonl", 0), ("humaneval.jsonl", 1)
    ]
    assert chosen[1][2] == load_prompt_file(PROMPTS_DIR / "mbpp.jsonl")[0]
    assert select_prompts(spec, code) == chosen


def test_selection_continues_with_the_longer_file_and_refuses_too_many(tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text('{"turns": ["s0"]}\n')
    spec = load_bench(_write(tmp_path, _mini(categories={
        "mix": {"files": [str(short), "gsm8k.jsonl"], "num_prompts": 3}})))
    turns = [t[0] for _, _, t in select_prompts(spec, spec.categories[0])]
    gsm = load_prompt_file(PROMPTS_DIR / "gsm8k.jsonl")
    assert turns == ["s0", gsm[0][0], gsm[1][0]]
    too_many = load_bench(_write(tmp_path, _mini(categories={
        "mix": {"files": [str(short)], "num_prompts": 2}}), "b2.json"))
    with pytest.raises(DspecError, match="asks for 2 prompts but its files hold only 1"):
        select_prompts(too_many, too_many.categories[0])


def test_prompt_files_beside_the_bench_file_resolve(tmp_path):
    (tmp_path / "mine.jsonl").write_text('{"turns": ["hello"]}\n')
    spec = load_bench(_write(tmp_path, _mini(categories={
        "mine": {"files": ["mine.jsonl"], "num_prompts": 1}})))
    assert select_prompts(spec, spec.categories[0])[0][2] == ["hello"]


def test_missing_bench_names_the_packaged_ones(tmp_path):
    with pytest.raises(DspecError) as e:
        load_bench("no-such-bench")
    assert "no-such-bench" in str(e.value) and "quick" in str(e.value)
    with pytest.raises(DspecError, match="not found"):
        load_bench(tmp_path / "missing.json")


def test_bad_json_gives_line_and_column(tmp_path):
    path = _write(tmp_path, '{\n  "schema": "deepspec-bench/v1",\n  "name": oops\n}\n')
    with pytest.raises(DspecError) as e:
        load_bench(path)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and "column" in msg and "Fix:" in msg


@pytest.mark.parametrize(
    ("changes", "key", "words"),
    [
        ({"schema": "deepspec-bench/v9"}, "schema", "deepspec-bench/v1"),
        ({"colour": "blue"}, "colour", "unknown"),
        ({"k": "4"}, "k", "list"),
        ({"k": [0]}, "k", "positive"),
        ({"k": [2, 2]}, "k", "repeated"),
        ({"batch_sizes": [1.5]}, "batch_sizes", "integers"),
        ({"max_new_tokens": 0}, "max_new_tokens", "positive"),
        ({"max_new_tokens": True}, "max_new_tokens", "integer"),
        ({"max_turns": -1}, "max_turns", "positive"),
        ({"temperatures": [-0.5]}, "temperatures", ">= 0"),
        ({"temperatures": ["hot"]}, "temperatures", "numbers"),
        ({"seeds": [-1]}, "seeds", ">= 0"),
        ({"chat_template": "yes"}, "chat_template", "true or false"),
        ({"selection": "random"}, "selection", "interleave"),
        ({"name": ""}, "name", "non-empty"),
        ({"categories": {}}, "categories", "non-empty"),
        ({"categories": {"c": {"files": ["nope.jsonl"], "num_prompts": 1}}},
         "categories.c.files", "nope.jsonl"),
        ({"categories": {"c": {"files": [], "num_prompts": 1}}}, "categories.c.files", "list"),
        ({"categories": {"c": {"files": ["gsm8k.jsonl"]}}}, "categories.c.num_prompts", "missing"),
        ({"categories": {"c": {"files": ["gsm8k.jsonl"], "num_prompts": 0}}},
         "categories.c.num_prompts", "positive"),
        ({"categories": {"c": {"files": ["gsm8k.jsonl"], "num_prompts": 1, "x": 1}}},
         "categories.c.x", "unknown"),
    ],
)
def test_validation_errors_name_file_key_and_fix(tmp_path, changes, key, words):
    path = _write(tmp_path, _mini(**changes))
    with pytest.raises(DspecError) as e:
        load_bench(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert f"'{key}'" in msg, msg
    assert words in msg, msg
    assert "Fix:" in msg, msg


def test_missing_required_key(tmp_path):
    spec = _mini()
    del spec["temperatures"]
    path = _write(tmp_path, spec)
    with pytest.raises(DspecError, match=r"'temperatures' is missing"):
        load_bench(path)


def test_overrides_apply_validate_and_are_recorded(tmp_path):
    spec = load_bench(_write(tmp_path, _mini()))
    over = spec.with_overrides(k=[3, 5], temperatures=[1.0], num_prompts=1, max_new_tokens=8)
    assert over.k == (3, 5) and over.temperatures == (1.0,) and over.max_new_tokens == 8
    assert all(c.num_prompts == 1 for c in over.categories)
    assert over.overrides["k"] == [3, 5] and over.source == spec.source
    assert spec.with_overrides() is spec
    with pytest.raises(DspecError, match="'k'"):
        spec.with_overrides(k=[0])


def test_prompts_file_override_makes_one_category(tmp_path):
    prompts = tmp_path / "my-prompts.jsonl"
    prompts.write_text('{"turns": ["a"]}\n{"turns": ["b"]}\n\n{"turns": ["c"]}\n')
    spec = load_bench("quick").with_overrides(prompts_file=prompts)
    assert [c.name for c in spec.categories] == ["my-prompts"]
    assert spec.categories[0].num_prompts == 3
    assert [t for _, _, t in select_prompts(spec, spec.categories[0])] == [["a"], ["b"], ["c"]]
    two = load_bench("quick").with_overrides(prompts_file=prompts, num_prompts=2)
    assert two.categories[0].num_prompts == 2


# ------------------------------------------------------------------------------ prompt files


def test_prompt_file_loads_turns_and_skips_blank_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"turns": ["one"]}\n\n{"turns": ["two", "and more"]}\n')
    assert load_prompt_file(path) == [["one"], ["two", "and more"]]
    mt = load_prompt_file(PROMPTS_DIR / "mt-bench.jsonl")
    assert len(mt) == 80 and all(len(t) == 2 for t in mt)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"turns": ["ok"', "invalid JSON"),
        ('{"prompt": "x"}', "no 'turns'"),
        ('{"turns": []}', "non-empty list"),
        ('{"turns": "x"}', "non-empty list"),
        ('{"turns": ["fine", 3]}', "turn 2"),
        ('{"turns": ["  "]}', "turn 1"),
    ],
)
def test_broken_prompt_line_is_named_by_number(tmp_path, line, words):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"turns": ["a"]}\n\n' + line + '\n{"turns": ["b"]}\n')
    with pytest.raises(DspecError) as e:
        load_prompt_file(path)
    msg = str(e.value)
    assert str(path) in msg and "line 3" in msg and words in msg and "Fix:" in msg


def test_empty_and_missing_prompt_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DspecError, match="holds no prompts"):
        load_prompt_file(empty)
    with pytest.raises(DspecError, match="does not exist"):
        load_prompt_file(tmp_path / "nope.jsonl")


def test_line_separators_inside_json_strings_are_not_line_breaks(tmp_path):
    # U+2028 is a line break to str.splitlines() but legal inside a JSON string.
    from deepspec_plugin.bench.prompts import load_prompt_file

    path = tmp_path / "p.jsonl"
    path.write_text('{"turns": ["one\u2028two"]}\n{"turns": ["three"]}\n', encoding="utf-8")
    assert load_prompt_file(path) == [["one\u2028two"], ["three"]]


def test_every_shipped_prompt_file_loads():
    from deepspec_plugin.bench.prompts import load_prompt_file
    from deepspec_plugin.bench.spec import PROMPTS_DIR
    from deepspec_plugin.train.data import DEFAULT_PROMPT_FILES

    files = sorted(PROMPTS_DIR.glob("*.jsonl")) + list(DEFAULT_PROMPT_FILES)
    assert len(files) == 11
    for f in files:
        assert load_prompt_file(f), f
