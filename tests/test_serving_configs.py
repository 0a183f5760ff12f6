"""serving_configs/ and the compose files every export writes, validated offline.

Docker cannot run on this project's machines, so nothing here starts a container. Instead every
compose file (the static ones in serving_configs/ and those `dspec export vllm` / `dspec export
tgi` write for real exports of the tiny pair) is validated against the Compose specification's
JSON schema (tests/schemas/compose-spec.json, copied from compose-spec/compose-spec), its
mounted paths must exist beside it, and the files the containers see are followed through the
mounts: Prometheus's config (checked by the real promtool, rules included), the alert rules and
dashboard (the package's, byte for byte), Grafana's provisioning, the vLLM serve configs (read
back by vLLM's own argument parser where vLLM is installed) and TGI's env files. No file may hold
a Hub token. The Dockerfiles are not built; the paths they copy must exist.
"""

from __future__ import annotations

import copy
import json
import posixpath
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from eagle3_builders import build_deepspec_eagle3
from helpers import run_promtool
from jsonschema import Draft7Validator
from real_servers import needs_vllm

from deepspec_plugin.exporters import serving
from deepspec_plugin.exporters.heads import build_medusa, build_mlp_speculator
from deepspec_plugin.exporters.tgi import export_tgi
from deepspec_plugin.exporters.vllm import export_vllm
from deepspec_plugin.manifest import read_manifest
from deepspec_plugin.serving.monitoring import ALERTS_PATH, DASHBOARD_PATH

REPO = Path(__file__).resolve().parents[1]
STATIC = REPO / "serving_configs"
STATIC_COMPOSE = {"vllm": STATIC / "docker-compose.vllm.yaml",
                  "tgi": STATIC / "docker-compose.tgi.yaml"}
STATIC_PROMETHEUS = {"vllm": STATIC / "prometheus" / "prometheus.yml",
                     "tgi": STATIC / "prometheus" / "prometheus-tgi.yml"}
SCHEMA = json.loads((Path(__file__).with_name("schemas") / "compose-spec.json").read_text())
# Set while the exports run: it must not reach any file they write.
FAKE_TOKEN = "hf_deepspecTestTokenThatMustNeverBeWritten42"
TOKEN_LIKE = re.compile(rb"hf_[A-Za-z0-9]{30,}")
REQUIRED_VARIABLE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*:\?[^}]+\}$")
HUB_TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- reading compose files ------------------------------------------------------------------------


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def schema_errors(doc) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in Draft7Validator(SCHEMA).iter_errors(doc)]


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(type, source, target) of every volume entry, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v["type"], v.get("source", ""), v["target"]))
            continue
        # Short syntax SOURCE:TARGET[:MODE]; a ${VAR:?message} source holds colons of its own.
        m = re.match(r"^(\$\{[^}]*\}|[^:]+):([^:]+)(?::[a-z,]+)?$", v)
        assert m, f"cannot read the volume {v!r}"
        source, target = m.groups()
        kind = "bind" if source.startswith((".", "/", "$")) else "volume"
        out.append((kind, source, target))
    return out


def missing_mounts(compose: dict, where: Path) -> list[str]:
    """Bind sources that do not exist relative to the compose file, named volumes that are not
    declared, env files that are missing; a ${VAR:?...} source must be given when compose runs."""
    problems = []
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for kind, source, _ in mounts(service):
            if kind == "volume" and source not in declared:
                problems.append(f"{name}: volume {source} is not declared")
            elif kind == "bind" and source.startswith("$"):
                if not REQUIRED_VARIABLE.match(source):
                    problems.append(f"{name}: {source} is neither a path nor a required variable")
            elif kind == "bind" and not (where / source).exists():
                problems.append(f"{name}: {source} does not exist")
        for env_file in service.get("env_file", []):
            if not (where / env_file).is_file():
                problems.append(f"{name}: env_file {env_file} does not exist")
    return problems


def host_path(service: dict, container_path: str, where: Path) -> Path | None:
    """The host file a bind mount shows at ``container_path`` in the service's container."""
    container_path = posixpath.normpath(container_path)
    for kind, source, target in mounts(service):
        if kind != "bind" or source.startswith("$"):
            continue
        target = posixpath.normpath(target)
        if container_path == target:
            return (where / source).resolve()
        if container_path.startswith(target + "/"):
            return (where / source / posixpath.relpath(container_path, target)).resolve()
    return None


def option(argv: list[str], name: str) -> str:
    """The value of ``--name value`` or ``--name=value`` in a command line."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads an env_file (comments and blanks skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not KEY=VALUE"
            env[key] = value.strip("'\"")
    return env


def names_on_network(compose: dict) -> set[str]:
    """Service names and their network aliases: the host names other containers can reach."""
    names = set(compose["services"])
    for service in compose["services"].values():
        for net in (service.get("networks") or {}).values():
            names |= set((net or {}).get("aliases", []))
    return names


def published_container_ports(service: dict) -> set[int]:
    return {int(str(p).rsplit(":", 1)[-1]) for p in service.get("ports", [])}


def engine_services(compose: dict, image: str) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s["image"] == image}


# --- real exports of the tiny pair, with a token in the environment ----------------------------


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving-exports")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", FAKE_TOKEN)
        head = build_deepspec_eagle3(tiny.target, root / "eagle3-src")
        medusa = build_medusa(tiny.target, root / "medusa-src", num_heads=3, num_layers=1)
        mlp = build_mlp_speculator(tiny.target, root / "mlp-src", n_predict=3, inner_dim=96)
        out = {
            "draft_model": export_vllm(tiny.draft, tiny.target, root / "Draft Model", k=3,
                                       load=False).out,
            "draft_model_hub": export_vllm(tiny.draft, tiny.target, root / "hub-target", k=2,
                                           target_name=HUB_TARGET,
                                           draft_sample_method="probabilistic",
                                           load=False).out,
            "eagle3": export_vllm(head, tiny.target, root / "eagle3", k=2, method="eagle3",
                                  load=False).out,
            "medusa": export_tgi(medusa, tiny.target, root / "medusa").out,
            "mlp_speculator": export_tgi(mlp, tiny.target, root / "mlp", speculate=2,
                                         model_id=HUB_TARGET).out,
        }
    return out


VLLM_EXPORTS = ("draft_model", "draft_model_hub", "eagle3")
TGI_EXPORTS = ("medusa", "mlp_speculator")


def export_compose(exports, name: str) -> tuple[dict, Path]:
    where = exports[name] / serving.SERVING_DIR
    return load_yaml(where / serving.COMPOSE_FILE), where


def all_compose(exports) -> list[tuple[str, dict, Path]]:
    found = [(f"static {e}", load_yaml(p), p.parent) for e, p in STATIC_COMPOSE.items()]
    return found + [(name, *export_compose(exports, name)) for name in exports]


# --- the Compose specification --------------------------------------------------------------------


@pytest.mark.parametrize("engine", sorted(STATIC_COMPOSE))
def test_static_compose_files_follow_the_compose_spec(engine):
    assert schema_errors(load_yaml(STATIC_COMPOSE[engine])) == []


@pytest.mark.parametrize("name", VLLM_EXPORTS + TGI_EXPORTS)
def test_exported_compose_files_follow_the_compose_spec(exports, name):
    compose, _ = export_compose(exports, name)
    assert schema_errors(compose) == []


@pytest.mark.parametrize("path, value", [
    (("services", "grafana", "depends_on"), "prometheus"),  # a list or a map, not a string
    (("services", "prometheus", "ports"), 9090),            # a list
    (("services", "vllm-eagle3", "shm_size"), ["8gb"]),     # a number or a string
    (("services", "vllm-eagle3", "entrypont"), ["python3"]),  # no such key
    (("volumes", "hf-cache"), "cache"),                     # a map or null
])
def test_the_schema_rejects_wrong_types_and_keys(path, value):
    compose = load_yaml(STATIC_COMPOSE["vllm"])
    broken = copy.deepcopy(compose)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert schema_errors(compose) == [] and schema_errors(broken) != []


# --- mounts ------------------------------------------------------------------------------------


def test_every_mounted_path_exists_beside_its_compose_file(exports):
    for name, compose, where in all_compose(exports):
        assert missing_mounts(compose, where) == [], name


def test_the_mount_check_reports_what_is_missing():
    compose = load_yaml(STATIC_COMPOSE["tgi"])
    compose["services"]["prometheus"]["volumes"][0]["source"] = "prometheus/nope.yml"
    compose["services"]["tgi-medusa"]["env_file"] = ["tgi/nope.env"]
    compose["services"]["grafana"]["volumes"].append("unknown-volume:/x")
    compose["services"]["monitor-medusa"]["volumes"] = ["${DRAFT_DIR}:/draft:ro"]
    problems = missing_mounts(compose, STATIC)
    assert problems == [
        "tgi-medusa: env_file tgi/nope.env does not exist",
        "monitor-medusa: ${DRAFT_DIR} is neither a path nor a required variable",
        "prometheus: prometheus/nope.yml does not exist",
        "grafana: volume unknown-volume is not declared",
    ]


def test_exports_mount_themselves_and_a_local_target(tiny, exports):
    """The export at /draft (read-only); a target given as a path at that same path (TGI's
    base_model_name_or_path names it there); a Hub target mounted nowhere."""
    local = str(tiny.target.resolve())
    for name in VLLM_EXPORTS + TGI_EXPORTS:
        compose, where = export_compose(exports, name)
        engine = compose["services"]["vllm" if name in VLLM_EXPORTS else "tgi"]
        binds = {target: source for kind, source, target in mounts(engine) if kind == "bind"}
        assert (where / binds[serving.DRAFT_MOUNT]).resolve() == exports[name].resolve()
        assert all(v.get("read_only") for v in engine["volumes"] if v["type"] == "bind")
        hub = name in ("draft_model_hub", "mlp_speculator")
        assert binds == ({serving.DRAFT_MOUNT: ".."} if hub
                         else {serving.DRAFT_MOUNT: "..", local: local}), name


# --- Prometheus --------------------------------------------------------------------------------


def prometheus_files(exports) -> list[Path]:
    return [*STATIC_PROMETHEUS.values(),
            *(exports[n] / serving.SERVING_DIR / serving.PROMETHEUS_FILE for n in exports)]


def test_prometheus_configs_pass_promtool_with_the_alert_rules(exports):
    rules = sum(len(g["rules"]) for g in load_yaml(ALERTS_PATH)["groups"])
    for path in prometheus_files(exports):
        result = run_promtool("check", "config", path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {rules} rules found" in result.stdout, result.stdout


def test_promtool_rejects_a_config_whose_rules_are_broken(tmp_path):
    (tmp_path / "alerts.yml").write_text(
        ALERTS_PATH.read_text().replace("expr:", "expr: sum(", 1))
    config = load_yaml(STATIC_PROMETHEUS["vllm"])
    config["rule_files"] = ["alerts.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    broken = run_promtool("check", "config", tmp_path / "prometheus.yml")
    assert broken.returncode != 0 and "could not parse expression" in broken.stdout + broken.stderr
    config["rule_files"] = ["missing/alerts.yml"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    assert run_promtool("check", "config", tmp_path / "prometheus.yml").returncode != 0


def test_static_prometheus_configs_are_the_exporters_with_the_package_rules():
    for engine, path in STATIC_PROMETHEUS.items():
        assert load_yaml(path) == serving.prometheus_config(
            engine, "../../deepspec_plugin/serving/monitoring/alerts.yml")


def test_prometheus_in_its_container_loads_the_package_rules_and_scrapes_the_engine(exports):
    """Followed through the mounts: --config.file is a mounted config, each rule file it names
    (relative to it, inside the container) is a mounted copy of the package's alerts.yml, and
    every scrape target is a service or alias of the same compose file."""
    for name, compose, where in all_compose(exports):
        prometheus = compose["services"]["prometheus"]
        config_in = option(prometheus["command"], "--config.file")
        config = load_yaml(host_path(prometheus, config_in, where))
        assert config["rule_files"], name
        for rule_file in config["rule_files"]:
            rules_in = posixpath.join(posixpath.dirname(config_in), rule_file)
            rules = host_path(prometheus, rules_in, where)
            assert rules is not None, f"{name}: {rules_in} is not mounted"
            assert rules.read_bytes() == ALERTS_PATH.read_bytes(), name
        targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
                   for t in sc["targets"]]
        reachable = names_on_network(compose)
        assert {t.split(":")[0] for t in targets} <= reachable, name
        if "tgi" in name or name in TGI_EXPORTS:
            assert targets == [f"tgi:{serving.TGI_PORT}",
                               f"deepspec-monitor:{serving.SIDECAR_PORT}"], name
        else:
            assert targets == [f"vllm:{serving.VLLM_PORT}"], name


# --- Grafana -----------------------------------------------------------------------------------


def test_grafana_is_provisioned_with_prometheus_and_the_package_dashboard(exports):
    expected = serving.grafana_provisioning()
    for name, compose, where in all_compose(exports):
        grafana = compose["services"]["grafana"]
        datasources = load_yaml(host_path(
            grafana, "/etc/grafana/provisioning/datasources/deepspec.yml", where))
        providers = load_yaml(host_path(
            grafana, "/etc/grafana/provisioning/dashboards/deepspec.yml", where))
        assert datasources == expected[serving.GRAFANA_DATASOURCE], name
        assert providers == expected[serving.GRAFANA_DASHBOARDS], name
        url = datasources["datasources"][0]["url"]
        assert url == f"http://prometheus:{serving.PROMETHEUS_PORT}" and "prometheus" in \
            compose["services"]
        dashboards_in = providers["providers"][0]["options"]["path"]
        dashboard = host_path(grafana, f"{dashboards_in}/dashboard.json", where)
        assert dashboard is not None and dashboard.read_bytes() == DASHBOARD_PATH.read_bytes()
        home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert host_path(grafana, home, where) == dashboard, name


def test_static_monitoring_services_are_the_exporters():
    package = "../deepspec_plugin/serving/monitoring"
    for engine, path in STATIC_COMPOSE.items():
        services = load_yaml(path)["services"]
        expected = serving.monitoring_services(
            prometheus_file=str(STATIC_PROMETHEUS[engine].relative_to(STATIC)),
            rule_file=f"{package}/alerts.yml", dashboard_file=f"{package}/dashboard.json",
            datasource_file=serving.GRAFANA_DATASOURCE,
            dashboards_file=serving.GRAFANA_DASHBOARDS)
        assert {n: services[n] for n in expected} == expected, engine


def test_exports_copy_the_package_rules_and_dashboard(exports):
    for name, out in exports.items():
        sc = out / serving.SERVING_DIR
        assert (sc / serving.ALERTS_COPY).read_bytes() == ALERTS_PATH.read_bytes(), name
        assert (sc / serving.DASHBOARD_COPY).read_bytes() == DASHBOARD_PATH.read_bytes(), name


# --- vLLM ----------------------------------------------------------------------------------------


def static_vllm_cases() -> dict[str, tuple[dict, Path]]:
    """profile -> (its vLLM service, the host file of its --config)."""
    compose = load_yaml(STATIC_COMPOSE["vllm"])
    cases = {}
    for service in engine_services(compose, serving.VLLM_PLUGIN_IMAGE).values():
        (profile,) = service["profiles"]
        cases[profile] = (service, host_path(service, option(service["command"], "--config"),
                                             STATIC))
    return cases


def test_static_vllm_serve_configs_carry_the_exporters_speculative_config():
    cases = static_vllm_cases()
    assert sorted(cases) == ["draft-model", "eagle3"]
    for profile, (service, path) in cases.items():
        assert path is not None and path.is_file(), profile
        config = load_yaml(path)
        assert set(config) == {"model", "speculative-config"}, profile
        spec = config["speculative-config"]
        assert spec["method"] == profile.replace("-", "_")
        assert spec == serving.speculative_config(spec["method"], serving.DRAFT_MOUNT,
                                                  spec["num_speculative_tokens"])
        assert service["environment"]["DSPEC_MANIFEST"] == f"{serving.DRAFT_MOUNT}/deepspec.json"
        assert option(service["command"], "--port") == str(serving.VLLM_PORT)
        assert published_container_ports(service) == {serving.VLLM_PORT}
        assert "vllm" in service["networks"]["default"]["aliases"]


def test_exported_vllm_compose_serves_the_export_as_its_manifest_says(exports):
    for name in VLLM_EXPORTS:
        out = exports[name]
        compose, where = export_compose(exports, name)
        manifest = read_manifest(out)
        export = manifest.extra["export"]
        vllm = compose["services"]["vllm"]
        assert vllm["image"] == serving.VLLM_PLUGIN_IMAGE
        assert vllm["entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        command = vllm["command"]
        assert option(command, "--model") == export["target"]["name_or_path"]
        spec = json.loads(option(command, "--speculative-config"))
        assert spec == serving.speculative_config(manifest.method, serving.DRAFT_MOUNT,
                                                  manifest.k, export["draft_sample_method"])
        # The export's own serve config names the same draft by its path on this machine.
        serve = load_yaml(where / "vllm-serve.yaml")
        assert serve["speculative-config"] == {**spec, "model": str(out)}
        assert option(command, "--port") == str(serving.VLLM_PORT)
        assert published_container_ports(vllm) == {serving.VLLM_PORT}
        assert vllm["environment"]["DSPEC_MANIFEST"] == f"{serving.DRAFT_MOUNT}/deepspec.json"
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", compose["name"]), compose["name"]
    assert load_yaml(exports["draft_model"] / "serving_configs" / "docker-compose.yaml")[
        "name"] == "deepspec-draft-model"


@needs_vllm
def test_vllms_own_parser_reads_every_vllm_command_line(exports, tmp_path):
    """vLLM 0.32's api_server parser (``--config`` included) on each compose command, in one
    subprocess: what reaches vLLM is the model and speculative config these files mean."""
    argvs, expected = [], []
    for profile, (service, path) in static_vllm_cases().items():
        command = [str(path) if a == option(service["command"], "--config") else a
                   for a in service["command"]]
        config = load_yaml(path)
        argvs.append(command)
        expected.append([config["model"], config["speculative-config"]])
    for name in VLLM_EXPORTS:
        command = export_compose(exports, name)[0]["services"]["vllm"]["command"]
        argvs.append(command)
        expected.append([option(command, "--model"),
                         json.loads(option(command, "--speculative-config"))])
    script = (
        "import json, sys\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser, "
        "validate_parsed_serve_args\n"
        "out = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)\n"
        "    validate_parsed_serve_args(args)\n"
        "    out.append([args.model, args.speculative_config, args.host, args.port])\n"
        "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", script, json.dumps(argvs)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    parsed = json.loads(run.stdout.strip().splitlines()[-1])
    assert [p[:2] for p in parsed] == expected
    assert all(p[2:] == ["0.0.0.0", serving.VLLM_PORT] for p in parsed)


# --- TGI -----------------------------------------------------------------------------------------


def check_tgi_engine_and_monitor(env: dict[str, str], tgi: dict, monitor: dict) -> None:
    assert env["MODEL_ID"] == serving.DRAFT_MOUNT
    k = int(env["SPECULATE"])
    assert k >= 1 and 0 < int(env["MAX_INPUT_TOKENS"]) < int(env["MAX_TOTAL_TOKENS"])
    assert env["HOSTNAME"] == "0.0.0.0" and int(env["PORT"]) == serving.TGI_PORT
    assert published_container_ports(tgi) == {serving.TGI_PORT}
    assert monitor["image"] == serving.PLUGIN_IMAGE
    assert monitor["command"] == serving.tgi_monitor_command(k)
    assert option(monitor["command"], "--metrics-url") == f"http://tgi:{env['PORT']}/metrics"
    assert any(t == serving.DRAFT_MOUNT for _, _, t in mounts(monitor))


def test_static_tgi_env_files_and_their_sidecars():
    compose = load_yaml(STATIC_COMPOSE["tgi"])
    services = compose["services"]
    tgis = engine_services(compose, serving.TGI_IMAGE)
    assert sorted(s["profiles"][0] for s in tgis.values()) == ["medusa", "mlp-speculator"]
    for name, tgi in tgis.items():
        (profile,) = tgi["profiles"]
        (env_file,) = tgi["env_file"]
        assert env_file == f"tgi/{profile}.env"
        (monitor,) = [s for s in services.values()
                      if s.get("profiles") == [profile] and s["image"] == serving.PLUGIN_IMAGE]
        assert monitor["depends_on"] == [name]
        assert "tgi" in tgi["networks"]["default"]["aliases"]
        assert "deepspec-monitor" in monitor["networks"]["default"]["aliases"]
        check_tgi_engine_and_monitor(read_env_file(STATIC / env_file), tgi, monitor)


def test_exported_tgi_compose_runs_the_export_with_its_env_file(exports):
    for name in TGI_EXPORTS:
        out = exports[name]
        compose, where = export_compose(exports, name)
        tgi, monitor = compose["services"]["tgi"], compose["services"]["deepspec-monitor"]
        assert tgi["image"] == serving.TGI_IMAGE and tgi["env_file"] == ["tgi.env"]
        exported = read_env_file(where / "tgi.env")
        assert exported["MODEL_ID"] == str(out.resolve())  # the launcher script's, unchanged
        # The compose file overrides where the export is, the address and the port only.
        env = {**exported, **{k: v for k, v in tgi["environment"].items() if v is not None}}
        assert set(env) - set(exported) == {"HOSTNAME", "PORT"}
        check_tgi_engine_and_monitor(env, tgi, monitor)
        assert int(env["SPECULATE"]) == read_manifest(out).k
        assert monitor["depends_on"] == ["tgi"]
    assert read_env_file(exports["mlp_speculator"] / "serving_configs" / "tgi.env")[
        "SPECULATE"] == "2"


# --- secrets -------------------------------------------------------------------------------------


def test_no_token_is_written_anywhere(exports):
    """In no file of serving_configs/ nor of any export (weights included): neither the token
    the exports ran with nor anything shaped like a Hub token."""
    files = [p for root in (STATIC, *exports.values()) for p in sorted(root.rglob("*"))
             if p.is_file()]
    assert {"tgi.env", "docker-compose.yaml", "Dockerfile", "medusa.env"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert FAKE_TOKEN.encode() not in data and not TOKEN_LIKE.search(data), path
    for name, compose, _ in all_compose(exports):
        for service_name, service in compose["services"].items():
            env = service.get("environment") or {}
            # Passed through from the shell (null: unset when the shell has none), never a value.
            assert env.get("HF_TOKEN", None) is None, (name, service_name)
            assert not any("token" in key.lower() for key in env if key != "HF_TOKEN")


# --- images and Dockerfiles --------------------------------------------------------------------


PINNED = {serving.VLLM_PLUGIN_IMAGE, serving.TGI_IMAGE, serving.PLUGIN_IMAGE,
          serving.PROMETHEUS_IMAGE, serving.GRAFANA_IMAGE}


def test_every_image_is_pinned(exports):
    for name, compose, _ in all_compose(exports):
        for service in compose["services"].values():
            image = service["image"]
            assert image in PINNED and not image.endswith(":latest"), (name, image)
    assert serving.VLLM_IMAGE == "vllm/vllm-openai:v0.32.0"
    assert serving.PLUGIN_IMAGE == "ghcr.io/deepspec/deepspec-plugin:0.1.0"


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of serving_configs/docker/NAME, continuation lines joined."""
    text = (STATIC / "docker" / name).read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def copied_sources(steps: list[tuple[str, str]]) -> list[str]:
    return [src for op, args in steps if op == "COPY" and not args.startswith("--from")
            for src in args.split()[:-1]]


def test_the_dockerfiles_copy_paths_of_the_repository():
    """Not built here (no Docker): what they copy exists at the build context (the repository
    root), their ignore files let exactly that through, and their bases are pinned."""
    for name in ("Dockerfile", "Dockerfile.vllm"):
        steps = dockerfile(name)
        sources = copied_sources(steps)
        assert sources and all((REPO / s).exists() for s in sources), (name, sources)
        ignore = [ln for ln in (STATIC / "docker" / f"{name}.dockerignore").read_text()
                  .splitlines() if ln and not ln.startswith("#")]
        # Everything left out, then exactly the copied paths let back in.
        assert ignore[0] == "*" and {f"!{s}" for s in sources} == {
            ln for ln in ignore if ln.startswith("!")}, name
        assert {"pyproject.toml", "deepspec_plugin", "train", "exporters"} <= set(sources)
    plugin = dockerfile("Dockerfile")
    assert [a for op, a in plugin if op == "FROM"] == ["python:3.12-slim"]
    run = " ".join(a for op, a in plugin if op == "RUN")
    assert 'pip install "/src[hub]"' in run
    chart = load_yaml(REPO / "charts" / "deepspec-serving" / "values.yaml")
    assert f"pip install --no-deps --target {chart['plugin']['sitePackages']} /src" in run
    assert f"{chart['plugin']['image']['repository']}:{chart['plugin']['image']['tag']}" == \
        serving.PLUGIN_IMAGE
    assert [a for op, a in plugin if op == "USER"] == ["1000"]
    vllm = dockerfile("Dockerfile.vllm")
    assert [a.split()[0] for op, a in vllm if op == "FROM"] == ["python:3.12-slim",
                                                                serving.VLLM_IMAGE]
    assert any("pip install --no-cache-dir --no-deps /tmp/dist/*.whl" in a
               for op, a in vllm if op == "RUN")


def test_the_static_vllm_compose_builds_its_image_from_dockerfile_vllm():
    compose = load_yaml(STATIC_COMPOSE["vllm"])
    for service in engine_services(compose, serving.VLLM_PLUGIN_IMAGE).values():
        build = service["build"]
        context = (STATIC / build["context"]).resolve()
        assert context == REPO and (context / build["dockerfile"]).is_file()
        assert service["pull_policy"] == "never"


def test_the_readme_names_every_file():
    readme = (STATIC / "README.md").read_text()
    for path in sorted(STATIC.rglob("*")):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(STATIC)) in readme, path
