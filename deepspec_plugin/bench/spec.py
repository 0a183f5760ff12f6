"""Bench specs (schema ``deepspec-bench/v1``): what an evaluation runs, as a small JSON file.

A bench names its prompt categories and the grid of settings to measure. Two are packaged
(``quick`` for a CPU in minutes, ``standard`` for a GPU); any other is a file path. Example::

    {
      "schema": "deepspec-bench/v1",
      "name": "quick",
      "description": "...",
      "categories": {
        "code": {"files": ["humaneval.jsonl", "mbpp.jsonl"], "num_prompts": 4}
      },
      "chat_template": true,
      "max_new_tokens": 64,
      "max_turns": 1,
      "temperatures": [0.0, 0.7],
      "k": [4],
      "batch_sizes": [1],
      "seeds": [0],
      "selection": "interleave"
    }

Keys (required unless a default is given):

* ``categories``: name -> ``files`` (prompt files in the ``{"turns": [...]}`` JSON Lines layout;
  a relative name is looked up in the packaged prompts directory, then beside the bench file;
  absolute paths are used as they are) and ``num_prompts`` (prompts taken from the category).
* ``chat_template`` (default true): format prompts with the tokenizer's chat template.
* ``max_new_tokens``: new tokens per turn and request.
* ``max_turns`` (default 1): user turns of a multi-turn prompt to play; turn n + 1 is asked after
  the model's own answer to turn n (every run continues its own conversation).
* ``temperatures`` (0 = greedy), ``k`` (draft tokens per step), ``batch_sizes``, ``seeds``
  (default [0]): the grid. Every combination is measured.
* ``selection`` (default ``"interleave"``, the only one): the first prompts of each file, taken
  in turn across the category's files (file 1 item 1, file 2 item 1, file 1 item 2, ...), so the
  choice is deterministic and mixes the files evenly. A file that runs out is skipped.
* ``description`` (default ""): free text for the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from deepspec_plugin.errors import DspecError

SCHEMA = "deepspec-bench/v1"
DATA_DIR = Path(__file__).resolve().parent / "data"
PROMPTS_DIR = DATA_DIR / "prompts"
BENCHES_DIR = DATA_DIR / "benches"
SELECTIONS = ("interleave",)

_TOP_KEYS = {
    "schema", "name", "description", "categories", "chat_template", "max_new_tokens",
    "max_turns", "temperatures", "k", "batch_sizes", "seeds", "selection",
}
_REQUIRED = ("schema", "name", "categories", "max_new_tokens", "temperatures", "k", "batch_sizes")
_CATEGORY_KEYS = {"files", "num_prompts"}


@dataclass(frozen=True)
class Category:
    name: str
    files: tuple[str, ...]  # as written in the spec (relative names or absolute paths)
    num_prompts: int


@dataclass(frozen=True)
class BenchSpec:
    name: str
    categories: tuple[Category, ...]
    max_new_tokens: int
    temperatures: tuple[float, ...]
    k: tuple[int, ...]
    batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    chat_template: bool = True
    max_turns: int = 1
    description: str = ""
    selection: str = "interleave"
    schema: str = SCHEMA
    # Where it came from and what was overridden: for the report, not part of the file format.
    source: str = ""
    overrides: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        """The spec in its file format: written to a file, ``load_bench`` gives it back."""
        return {
            "schema": self.schema,
            "name": self.name,
            "description": self.description,
            "categories": {
                c.name: {"files": list(c.files), "num_prompts": c.num_prompts}
                for c in self.categories
            },
            "chat_template": self.chat_template,
            "max_new_tokens": self.max_new_tokens,
            "max_turns": self.max_turns,
            "temperatures": list(self.temperatures),
            "k": list(self.k),
            "batch_sizes": list(self.batch_sizes),
            "seeds": list(self.seeds),
            "selection": self.selection,
        }

    def resolve_file(self, name: str) -> Path:
        """The path of one of this spec's prompt files."""
        return resolve_prompt_file(name, self.source, key="categories")

    def with_overrides(
        self,
        *,
        k: list[int] | None = None,
        temperatures: list[float] | None = None,
        batch_sizes: list[int] | None = None,
        max_new_tokens: int | None = None,
        num_prompts: int | None = None,
        seeds: list[int] | None = None,
        max_turns: int | None = None,
        chat_template: bool | None = None,
        prompts_file: str | Path | None = None,
    ) -> BenchSpec:
        """A copy with command-line overrides applied and validated (None keeps the spec's value).

        ``prompts_file`` replaces the categories with one ad-hoc category named after the file's
        stem, holding all its prompts (or ``num_prompts`` of them).
        """
        given = {
            "k": k, "temperatures": temperatures, "batch_sizes": batch_sizes,
            "max_new_tokens": max_new_tokens, "num_prompts": num_prompts, "seeds": seeds,
            "max_turns": max_turns, "chat_template": chat_template,
            "prompts_file": str(prompts_file) if prompts_file is not None else None,
        }
        given = {key: v for key, v in given.items() if v is not None}
        if not given:
            return self
        d = self.to_dict()
        for key in ("k", "temperatures", "batch_sizes", "seeds"):
            if key in given:
                d[key] = list(given[key])
        for key in ("max_new_tokens", "max_turns", "chat_template"):
            if key in given:
                d[key] = given[key]
        if prompts_file is not None:
            path = Path(prompts_file).expanduser().resolve()
            from deepspec_plugin.bench.prompts import load_prompt_file

            available = len(load_prompt_file(path))
            d["categories"] = {
                path.stem: {"files": [str(path)], "num_prompts": num_prompts or available}
            }
        elif num_prompts is not None:
            for c in d["categories"].values():
                c["num_prompts"] = num_prompts
        where = f"{self.source or self.name} with overrides {sorted(given)}"
        spec = parse_bench(d, where=where, base_dir=_base_dir(self.source))
        return replace(spec, source=self.source, overrides={**self.overrides, **given})


def packaged_benches() -> list[str]:
    return sorted(p.stem for p in BENCHES_DIR.glob("*.json"))


def load_bench(name_or_path: str | Path) -> BenchSpec:
    """A packaged bench by name (``quick``, ``standard``) or a bench file by path, validated."""
    text = str(name_or_path)
    packaged = BENCHES_DIR / f"{text}.json"
    if "/" not in text and not text.endswith(".json") and packaged.is_file():
        path = packaged
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise DspecError(
                f"bench '{text}' not found: it is neither a packaged bench "
                f"({', '.join(packaged_benches())}) nor a file",
                "pass a packaged bench name or the path of a deepspec-bench/v1 JSON file",
            )
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DspecError(f"cannot read bench file {path}: {e.strerror}", "check the path") from e
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DspecError(
            f"bench file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}",
            "fix the JSON syntax there",
        ) from e
    spec = parse_bench(data, where=str(path), base_dir=path.resolve().parent)
    return replace(spec, source=str(path.resolve()))


def parse_bench(data: object, *, where: str, base_dir: Path | None = None) -> BenchSpec:
    """Validate a decoded bench file; every error names ``where``, the key and the fix."""

    def fail(key: str, problem: str, fix: str) -> DspecError:
        return DspecError(f"{where}: key '{key}' {problem}", fix)

    if not isinstance(data, dict):
        raise DspecError(f"{where}: a bench file must hold a JSON object",
                         f'start from a packaged bench such as {BENCHES_DIR / "quick.json"}')
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        known = ", ".join(sorted(_TOP_KEYS))
        raise fail(unknown[0], "is unknown", f"remove it; known keys: {known}")
    for key in _REQUIRED:
        if key not in data:
            raise fail(key, "is missing", f"add it (see {BENCHES_DIR / 'quick.json'})")
    if data["schema"] != SCHEMA:
        raise fail("schema", f"is {data['schema']!r}, which this version does not read",
                   f'set "schema": "{SCHEMA}"')

    name = _string(data["name"], "name", fail)
    description = data.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "must be a string", "write it as a JSON string")
    chat_template = data.get("chat_template", True)
    if not isinstance(chat_template, bool):
        raise fail("chat_template", f"must be true or false, got {chat_template!r}",
                   'write "chat_template": true or false')
    selection = data.get("selection", "interleave")
    if selection not in SELECTIONS:
        raise fail("selection", f"is {selection!r}", f'use one of {", ".join(SELECTIONS)}')

    max_new_tokens = _positive_int(data["max_new_tokens"], "max_new_tokens", fail)
    max_turns = _positive_int(data.get("max_turns", 1), "max_turns", fail)
    temperatures = _number_list(data["temperatures"], "temperatures", fail)
    k = _int_list(data["k"], "k", fail, minimum=1)
    batch_sizes = _int_list(data["batch_sizes"], "batch_sizes", fail, minimum=1)
    seeds = _int_list(data.get("seeds", [0]), "seeds", fail, minimum=0)

    cats = data["categories"]
    if not isinstance(cats, dict) or not cats:
        raise fail("categories", "must be a non-empty object: name -> {files, num_prompts}",
                   'write e.g. "categories": {"code": {"files": ["humaneval.jsonl"], '
                   '"num_prompts": 4}}')
    categories = []
    for cname, c in cats.items():
        ckey = f"categories.{cname}"
        if not cname.strip():
            raise fail(ckey, "has an empty category name", "give the category a name")
        if not isinstance(c, dict):
            raise fail(ckey, "must be an object {files, num_prompts}", "write it as one")
        unknown = sorted(set(c) - _CATEGORY_KEYS)
        if unknown:
            raise fail(f"{ckey}.{unknown[0]}", "is unknown", "remove it; known: files, num_prompts")
        for key in sorted(_CATEGORY_KEYS):
            if key not in c:
                raise fail(f"{ckey}.{key}", "is missing", "add it")
        files = c["files"]
        if (not isinstance(files, list) or not files
                or not all(isinstance(f, str) and f.strip() for f in files)):
            raise fail(f"{ckey}.files", "must be a non-empty list of prompt file names",
                       'write e.g. "files": ["gsm8k.jsonl"]')
        for f in files:
            resolve_prompt_file(f, base_dir, key=f"{ckey}.files", where=where)
        num = _positive_int(c["num_prompts"], f"{ckey}.num_prompts", fail)
        categories.append(Category(name=cname, files=tuple(files), num_prompts=num))

    return BenchSpec(
        name=name, description=description, categories=tuple(categories),
        max_new_tokens=max_new_tokens, temperatures=tuple(temperatures), k=tuple(k),
        batch_sizes=tuple(batch_sizes), seeds=tuple(seeds), chat_template=chat_template,
        max_turns=max_turns, selection=selection, source="",
    )


def resolve_prompt_file(
    name: str, base: str | Path | None, *, key: str, where: str | None = None
) -> Path:
    """Absolute paths as given; else the packaged prompts directory, then ``base``'s directory."""
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [PROMPTS_DIR / p]
    base_dir = _base_dir(base) if base is not None else None
    if not p.is_absolute() and base_dir is not None:
        candidates.append(base_dir / p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    packaged = ", ".join(sorted(q.name for q in PROMPTS_DIR.glob("*.jsonl")))
    raise DspecError(
        f"{where or 'bench'}: key '{key}' names prompt file '{name}', which does not exist",
        f"use a packaged prompt file ({packaged}), an absolute path, or a path relative to the "
        "bench file",
    )


def select_prompts(spec: BenchSpec, category: Category) -> list[tuple[str, int, list[str]]]:
    """The category's prompts as (file name, line index, turns), in the spec's selection order."""
    from deepspec_plugin.bench.prompts import load_prompt_file

    per_file = [(f, load_prompt_file(spec.resolve_file(f))) for f in category.files]
    chosen: list[tuple[str, int, list[str]]] = []
    row = 0
    while len(chosen) < category.num_prompts:
        took = False
        for fname, prompts in per_file:
            if row < len(prompts) and len(chosen) < category.num_prompts:
                chosen.append((Path(fname).name, row, prompts[row]))
                took = True
        if not took:
            available = sum(len(p) for _, p in per_file)
            raise DspecError(
                f"bench '{spec.name}': category '{category.name}' asks for "
                f"{category.num_prompts} prompts but its files hold only {available}",
                f"set num_prompts to at most {available} or add prompt files",
            )
        row += 1
    return chosen


def _base_dir(source: str | Path | None) -> Path | None:
    if not source:
        return None
    p = Path(source)
    return p if p.is_dir() else p.parent


def _string(v, key, fail) -> str:
    if not isinstance(v, str) or not v.strip():
        raise fail(key, f"must be a non-empty string, got {v!r}", f'write "{key}": "some-name"')
    return v


def _positive_int(v, key, fail) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise fail(key, f"must be an integer, got {v!r}", f'write "{key}": 4 (a whole number)')
    if v <= 0:
        raise fail(key, f"must be positive, got {v}", f"set {key} to 1 or more")
    return v


def _int_list(v, key, fail, *, minimum: int) -> list[int]:
    if not isinstance(v, list) or not v:
        raise fail(key, f"must be a non-empty list of integers, got {v!r}",
                   f'write e.g. "{key}": [{max(minimum, 1)}]')
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise fail(key, f"must hold integers only, got {x!r}", "remove the non-integer entry")
        if x < minimum:
            what = "positive" if minimum == 1 else f">= {minimum}"
            raise fail(key, f"values must be {what}, got {x}", f"use values >= {minimum}")
    if len(set(v)) != len(v):
        raise fail(key, f"has repeated values {v}", "list each value once")
    return list(v)


def _number_list(v, key, fail) -> list[float]:
    if not isinstance(v, list) or not v:
        raise fail(key, f"must be a non-empty list of numbers, got {v!r}",
                   f'write e.g. "{key}": [0.0, 0.7]')
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise fail(key, f"must hold numbers only, got {x!r}", "remove the non-number entry")
        if x < 0:
            raise fail(key, f"values must be >= 0, got {x}", "use 0 for greedy decoding")
        out.append(float(x))
    if len(set(out)) != len(out):
        raise fail(key, f"has repeated values {v}", "list each value once")
    return out
