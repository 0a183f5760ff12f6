"""The house: what each layer may import, what the wheel installs, a user's train.py.

Layers, bottom up (the README's "Layout"): the core (``deepspec_plugin`` less the three below),
then ``deepspec_plugin.train`` and ``deepspec_plugin.exporters`` (side by side, neither imports
the other), then the CLI and the recipes on top. Every import counts, those inside functions too.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folders and the package each installs as (pyproject's package-dir).
SOURCES = {"deepspec_plugin": ROOT / "deepspec_plugin", "deepspec_plugin.train": ROOT / "train",
           "deepspec_plugin.exporters": ROOT / "exporters"}
TOP = ("deepspec_plugin.cli", "deepspec_plugin.recipes")
MIDDLE = ("deepspec_plugin.train", "deepspec_plugin.exporters")
# What each layer may not import.
FORBIDDEN = {
    "core": MIDDLE + TOP,
    "deepspec_plugin.train": ("deepspec_plugin.exporters",) + TOP,
    "deepspec_plugin.exporters": ("deepspec_plugin.train",) + TOP,
    "top": (),
}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    out = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if package == "deepspec_plugin" and name.startswith(MIDDLE):
                continue  # not a source folder of the core
            out[name] = path
    return out


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> str:
    if _within(module, TOP):
        return "top"
    for middle in MIDDLE:
        if _within(module, (middle,)):
            return middle
    return "core"


def _package(module: str) -> str:
    """The unit whose privates stay inside: ``deepspec_plugin.models``, ``.bench``, ``.metrics``."""
    return ".".join(module.split(".")[:2])


def _imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


MODULES = _modules()


def test_the_source_tree_is_read():
    assert {"deepspec_plugin.metrics", "deepspec_plugin.models.fingerprint",
            "deepspec_plugin.train.trainer", "deepspec_plugin.exporters.vllm",
            "deepspec_plugin.cli.app", "deepspec_plugin.recipes.quickstart"} <= set(MODULES)


def test_imports_point_down():
    upward = []
    for module, path in MODULES.items():
        forbidden = FORBIDDEN[_layer(module)]
        for imported, names, line in _imports(path, module):
            targets = [imported] + [f"{imported}.{n}" for n in names]
            if any(_within(t, forbidden) for t in targets):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({_layer(module)}) imports "
                              f"{imported}")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_no_generic_top_level_imports():
    bare = [f"{path.relative_to(ROOT)}:{line} imports {imported}"
            for module, path in MODULES.items()
            for imported, _, line in _imports(path, module)
            if imported.split(".")[0] in ("train", "exporters")]
    assert not bare, "\n".join(bare)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_aliases(path: Path, module: str) -> dict[str, str]:
    """Local names bound to a project module: ``from deepspec_plugin import metrics``,
    ``import deepspec_plugin.models as m``, ``from ...exporters import safetensors_io as st``."""
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("deepspec_plugin") and a.asname:
                    aliases[a.asname] = a.name
    for imported, names, _ in _imports(path, module):
        for n in names:
            if f"{imported}.{n}" in MODULES:
                aliases[n] = f"{imported}.{n}"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.asname and a.name in aliases:
                    aliases[a.asname] = aliases.pop(a.name)
    return aliases


def test_no_private_names_across_packages():
    crossing = []
    for module, path in MODULES.items():
        where = path.relative_to(ROOT)
        for imported, names, line in _imports(path, module):
            if not imported.startswith("deepspec_plugin") or _package(imported) == _package(module):
                continue
            private = [n for n in names if _private(n)]
            if private:
                crossing.append(f"{where}:{line} takes {private} from {imported}")
        aliases = _module_aliases(path, module)
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr)
                    and _package(aliases[node.value.id]) != _package(module)):
                crossing.append(f"{where}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not crossing, "\n".join(crossing)


def test_every_package_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert on_disk == listed, f"pyproject packages: missing {on_disk - listed}, stale " \
                              f"{listed - on_disk}"
    assert config["package-dir"] == {"deepspec_plugin.train": "train",
                                     "deepspec_plugin.exporters": "exporters"}


def test_the_wheel_installs_one_top_level_package(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools leaves build/ and *.egg-info in the source tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for folder in SOURCES.values():
        shutil.copytree(folder, src / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"deepspec_plugin",
                                                  "deepspec_plugin-0.1.0.dist-info"}
    for needed in ("deepspec_plugin/train/trainer.py", "deepspec_plugin/exporters/vllm.py",
                   "deepspec_plugin/train/prompts/gsm8k.jsonl",
                   "deepspec_plugin/bench/data/benches/quick.json",
                   "deepspec_plugin/serving/monitoring/alerts.yml"):
        assert needed in names


@pytest.mark.parametrize("command", [["train", "--help"], ["export", "vllm", "--help"],
                                     ["models", "fingerprint", "--help"]])
def test_cli_runs_beside_a_users_train_py(tmp_path, command):
    """A user's own train.py and exporters.py in the working directory shadow nothing."""
    for name in ("train", "exporters"):
        (tmp_path / f"{name}.py").write_text(f"raise SystemExit('the user {name}.py ran')\n")
    run = subprocess.run([sys.executable, "-m", "deepspec_plugin.cli", *command], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "Usage: dspec" in run.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import deepspec_plugin.train.trainer, "
         "deepspec_plugin.exporters.vllm, importlib.util as u, sys; sys.path.remove(''); "
         "print(u.find_spec('train'), u.find_spec('exporters'))"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == ["None", "None"]  # nothing generic in site-packages


def test_tests_share_helpers_not_each_others_modules():
    """Shared test code lives in conftest.py and the helper modules, never in a test module."""
    crossing = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            crossing += [f"{path.name}:{node.lineno} imports {n}" for n in names
                         if n.split(".")[0].startswith("test_") or n == "conftest"]
    assert not crossing, "\n".join(crossing)
