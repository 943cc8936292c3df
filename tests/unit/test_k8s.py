"""deploy/k8s validates offline: core kinds against Kubernetes' own schemas (kubernetes-validate,
strict), KEDA's and the Prometheus Operator's kinds against the schemas in tests/k8s_schemas; and
the pieces fit: probes on the metrics port, a GPU per pod, a grace period above the shutdown
timeout, triggers on every priority's list, selectors that select."""

import glob
import json
import os
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.broker import queue_lists
from tests.conftest import REPO

pytestmark = pytest.mark.unit
K8S = os.path.join(REPO, "deploy", "k8s")
KUBERNETES_VERSION = "1.30"
CUSTOM = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}


def documents() -> list[dict]:
    found = []
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        if os.path.basename(path) != "kustomization.yaml":
            found += [doc for doc in yaml.safe_load_all(open(path)) if doc]
    return found


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in documents() if doc["kind"] == kind]


def test_the_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
    files = {os.path.basename(p) for p in glob.glob(os.path.join(K8S, "*.yaml"))} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


@pytest.mark.parametrize("doc", documents(), ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}")
def test_every_manifest_validates(doc):
    if doc["kind"] in CUSTOM:
        schema = json.load(open(os.path.join(REPO, "tests", "k8s_schemas", f"{doc['kind'].lower()}.json")))
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_workers_take_one_gpu_and_are_probed_and_stopped_as_the_worker_expects():
    (config,) = by_kind("ConfigMap")
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lorafleet-worker"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] > int(config["data"]["LORAFLEET_SHUTDOWN_TIMEOUT_S"])
    (port,) = container["ports"]
    assert port["containerPort"] == int(config["data"]["LORAFLEET_METRICS_PORT"]) and port["name"] == "metrics"
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (budget,) = by_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_keda_scales_the_workers_on_every_priority_list_of_the_render_queue():
    (scaled,) = by_kind("ScaledObject")
    (auth,) = by_kind("TriggerAuthentication")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "lorafleet-worker"
    assert scaled["spec"]["minReplicaCount"] == 0
    triggers = scaled["spec"]["triggers"]
    assert [t["metadata"]["listName"] for t in triggers] == queue_lists("render")
    assert all(t["type"] == "redis" and t["authenticationRef"]["name"] == auth["metadata"]["name"] for t in triggers)
    assert all("activationListLength" in t["metadata"] for t in triggers)
    (secret,) = by_kind("Secret")
    assert auth["spec"]["secretTargetRef"] == [
        {"parameter": "password", "name": secret["metadata"]["name"], "key": "password"}
    ]


def test_redis_keeps_an_append_only_file_on_a_volume_behind_the_secret_password():
    (redis,) = by_kind("StatefulSet")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and "--requirepass" in args
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"


def test_the_service_monitor_selects_the_worker_and_exporter_services_on_their_metrics_port():
    (monitor,) = by_kind("ServiceMonitor")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in by_kind("Service") if wanted.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in selected} >= {"lorafleet-worker-metrics", "lorafleet-exporter"}
    for service in selected:
        if service["metadata"]["name"] != "redis":
            assert "metrics" in [p["name"] for p in service["spec"]["ports"]]
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


def test_the_grafana_dashboard_plots_only_metrics_lorafleet_exports():
    dashboard = json.load(open(os.path.join(K8S, "grafana-dashboard.json")))
    kustomization = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
    assert kustomization["configMapGenerator"][0]["files"] == ["grafana-dashboard.json"]
    # The names the worker (workers/metrics.py) and the exporter (producer/exporter.py) declare,
    # with the series Prometheus derives from counters and histograms.
    declared = set()
    for source in ("workers/metrics.py", "producer/exporter.py"):
        declared |= set(re.findall(r'"(lorafleet_[a-z_]+)"', open(os.path.join(REPO, source)).read()))
    declared |= {f"{name}_{s}" for name in declared for s in ("total", "bucket", "count", "sum", "info")}
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"lorafleet_[a-z_]+", target["expr"]))
    assert used and used <= declared, used - declared
