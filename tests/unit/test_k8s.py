"""deploy/k8s validates offline: core kinds against Kubernetes' own schemas (kubernetes-validate,
strict), KEDA's and the Prometheus Operator's kinds against the schemas in tests/k8s_schemas (and
KEDA's own CRD); and the pieces fit: probes on the metrics port, a GPU per pod, a grace period above
the shutdown timeout, KEDA calling the exporter by a name it resolves, selectors that select, every
pod non-root under the restricted Pod Security Standard, no secret in any argv."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.helpers import default_limits, resolver_for

pytestmark = pytest.mark.unit
K8S = os.path.join(REPO, "deploy", "k8s")
KUBERNETES_VERSION = "1.30"
EXAMPLES = os.path.join(K8S, "examples")
MODELS = os.path.join(K8S, "models")
CUSTOM = {"ScaledObject", "ServiceMonitor", "PrometheusRule"}


def documents(folder: str = K8S) -> list[dict]:
    found = []
    for path in sorted(glob.glob(os.path.join(folder, "*.yaml"))):
        if os.path.basename(path) not in ("kustomization.yaml", "nightly.yaml"):
            found += [doc for doc in yaml.safe_load_all(open(path)) if doc]
    return found


def pod_specs() -> list[tuple[str, dict]]:
    """Every pod template of the base and the examples: (kind/name, pod spec)."""
    pods = []
    for doc in documents() + documents(EXAMPLES) + documents(MODELS):
        spec = doc.get("spec", {})
        template = spec.get("jobTemplate", {}).get("spec", spec).get("template")
        if template:
            pods.append((f"{doc['kind']}/{doc['metadata']['name']}", template["spec"]))
    return pods


def by_kind(kind: str) -> list[dict]:
    return [doc for doc in documents() if doc["kind"] == kind]


def test_the_kustomizations_list_every_manifest_and_the_examples_are_opt_in():
    for folder, data in ((K8S, set()), (EXAMPLES, {"nightly.yaml"}), (MODELS, set())):
        kustomization = yaml.safe_load(open(os.path.join(folder, "kustomization.yaml")))
        files = {os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.yaml"))} - {"kustomization.yaml"}
        assert sorted(kustomization["resources"]) == sorted(files - data)
    base = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
    assert not {"Job", "CronJob"} & {doc["kind"] for doc in documents()}  # `apply -k deploy/k8s` waits on nothing
    assert "examples" not in base["resources"]


def test_the_examples_create_every_configmap_their_pods_mount():
    """`kubectl apply -k deploy/k8s/examples`: nothing stuck waiting for a ConfigMap never created."""
    kustomization = yaml.safe_load(open(os.path.join(EXAMPLES, "kustomization.yaml")))
    generated = {generator["name"] for generator in kustomization["configMapGenerator"]}
    for generator in kustomization["configMapGenerator"]:
        for name in generator["files"]:
            assert os.path.isfile(os.path.join(EXAMPLES, name)), name
    mounted = {
        volume["configMap"]["name"]
        for _, pod in pod_specs()
        for volume in pod.get("volumes", [])
        if "configMap" in volume
    }
    assert mounted and mounted <= generated | {"lorafleet-config"}


@pytest.mark.parametrize(
    "doc",
    documents() + documents(EXAMPLES) + documents(MODELS),
    ids=lambda doc: f"{doc['kind']}/{doc['metadata']['name']}",
)
def test_every_manifest_validates(doc):
    if doc["kind"] in CUSTOM:
        schema = json.load(open(os.path.join(REPO, "tests", "k8s_schemas", f"{doc['kind'].lower()}.json")))
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_scaled_object_validates_against_kedas_own_crd():
    crd = yaml.safe_load(open(os.path.join(REPO, "tests", "k8s_schemas", "crds", "keda.sh_scaledobjects.yaml")))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    (scaled,) = by_kind("ScaledObject")
    jsonschema.validate(scaled, version["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("folder", [K8S, EXAMPLES, MODELS], ids=["base", "examples", "models"])
def test_kustomize_builds(folder):
    """The real tool builds what `kubectl apply -k` would apply (where kubectl is installed)."""
    kubectl = subprocess.run(["which", "kubectl"], capture_output=True, text=True).stdout.strip()
    if not kubectl:
        pytest.skip("no kubectl here (Debian: kubernetes-client)")
    built = subprocess.run([kubectl, "kustomize", folder], capture_output=True, text=True, check=True).stdout
    assert all(
        doc["metadata"].get("namespace") == "lorafleet"
        for doc in yaml.safe_load_all(built)
        if doc["kind"] != "Namespace"
    )


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


def test_keda_scales_the_workers_on_what_the_exporter_says_the_render_queue_owes():
    (scaled,) = by_kind("ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "lorafleet-worker"
    assert scaled["spec"]["minReplicaCount"] == 0
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metadata"]["format"] == "json"
    assert trigger["metadata"]["valueLocation"] == "queues.render.owed"  # tests/integration/test_operator.py
    assert trigger["metadata"]["targetValue"] == "1"  # one worker per job queued or running
    assert trigger["metricType"] == "AverageValue"  # KEDA's fallback works for this type only
    # /scale answering 503 (Redis down) three times: the fleet stays as it is.
    assert scaled["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 1, "behavior": "currentReplicas"}
    # KEDA's operator calls from its own namespace: a bare service name would not resolve there.
    url = re.fullmatch(
        r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)/scale", trigger["metadata"]["url"]
    )
    assert url, trigger["metadata"]["url"]
    service, namespace, port = url.groups()
    kustomization = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
    assert namespace == kustomization["namespace"]
    (exporter,) = [s for s in by_kind("Service") if s["metadata"]["name"] == service]
    assert int(port) in [p["port"] for p in exporter["spec"]["ports"]]
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lorafleet-exporter"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["exporter", "--port", port]


def test_every_pod_runs_non_root_with_least_privilege_under_the_restricted_standard():
    (namespace,) = by_kind("Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    pods = pod_specs()
    assert {name for name, _ in pods} >= {
        "Deployment/lorafleet-worker", "Deployment/lorafleet-exporter", "StatefulSet/redis",
        "Job/lorafleet-submit", "CronJob/lorafleet-nightly-sweep",
    }  # fmt: skip
    for name, pod in pods:
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] != 0, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        allowed_volumes = {"emptyDir", "configMap", "secret", "persistentVolumeClaim", "projected", "downwardAPI"}
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= allowed_volumes, (name, volume)
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert context["readOnlyRootFilesystem"] is True, name
            # A read-only root: what the process writes goes to a volume.
            assert "/tmp" in [m["mountPath"] for m in container.get("volumeMounts", [])] or name == "StatefulSet/redis"


def test_no_secret_reaches_any_container_argv():
    secrets = {s["metadata"]["name"] for s in by_kind("Secret")}
    for name, pod in pod_specs():
        for container in pod["containers"]:
            from_secrets = {
                env["name"] for env in container.get("env", []) if "secretKeyRef" in env.get("valueFrom", {})
            }
            assert all(
                env["valueFrom"]["secretKeyRef"]["name"] in secrets
                for env in container.get("env", [])
                if "secretKeyRef" in env.get("valueFrom", {})
            )
            argv = " ".join(container.get("command", []) + container.get("args", []))
            for variable in from_secrets:
                # Kubernetes expands $(VAR) into the argv; a shell's $VAR expanded into a heredoc is not argv.
                assert f"$({variable})" not in argv, (name, variable)
                assert not re.search(rf"(--requirepass|-a)\s+\"?\${variable}", argv), (name, variable)


def test_the_worker_caches_point_at_writable_volumes():
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lorafleet-worker"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    dockerfile = open(os.path.join(REPO, "docker", "worker.Dockerfile")).read()
    for variable in ("HF_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "XDG_CACHE_HOME"):
        path = re.search(rf"{variable}=(\S+)", dockerfile).group(1)
        (mount,) = [m for where, m in mounts.items() if path.startswith(where)]
        assert not mount.get("readOnly"), variable


def test_redis_keeps_an_append_only_file_on_a_volume_behind_the_secret_password():
    (redis,) = by_kind("StatefulSet")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    script = container["command"][-1]
    assert (
        "--appendonly yes" in script and "requirepass $REDIS_PASSWORD" in script
    )  # tests/integration/test_operator.py runs it
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


def test_workers_share_compile_artifacts_only_under_the_fleets_secret():
    """Without LORAFLEET_COMPILE_CACHE_SECRET a worker shares nothing; the manifests wire one from a Secret."""
    (deployment,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lorafleet-worker"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (variable,) = [env for env in container["env"] if env["name"] == "LORAFLEET_COMPILE_CACHE_SECRET"]
    reference = variable["valueFrom"]["secretKeyRef"]
    (secret,) = [s for s in by_kind("Secret") if s["metadata"]["name"] == reference["name"]]
    assert secret["stringData"][reference["key"]].strip()


def test_the_examples_jobs_file_and_sweep_spec_load_as_lorafleet_loads_them(tiny, tmp_path, monkeypatch):
    """What the opt-in Job and CronJob will submit passes lorafleet's own loaders (on the tiny model,
    with the spec's store-relative adapter planted in a store), not only YAML's."""
    import shutil

    from common.jobs_file import load_jobs
    from common.model import model_info
    from common.store import Store
    from common.sweep_grid import load_sweep

    store = Store(str(tmp_path / "store"))
    shutil.copytree(tiny["style"], tmp_path / "store" / "adapters" / "style")
    monkeypatch.chdir(tmp_path)  # store-relative paths are not read from the checkout
    model_for = lambda alias: model_info(tiny["model"])  # noqa: E731
    jobs = load_jobs(os.path.join(EXAMPLES, "prompts.jsonl"), model_for, resolver_for(store), default_limits())
    assert [job.id for job in jobs] == ["beach", "city"] and all(len(job.key) == 64 for job in jobs)
    name, swept, cells, _ = load_sweep(os.path.join(EXAMPLES, "nightly.yaml"), model_for, resolver_for(store), default_limits())
    assert name == "nightly" and len(swept) == len(cells) == 2 * 5 * 2  # prompts × scales 0..1 by 0.25 × seeds


def test_the_worker_deployment_leaves_its_replicas_to_keda():
    """A `replicas` in the Deployment resets the fleet at every `kubectl apply -k`, as the HPA docs warn."""
    (worker,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lorafleet-worker"]
    assert "replicas" not in worker["spec"]


def test_no_pod_gets_an_api_token_and_only_lorafleet_pods_reach_redis():
    (account,) = by_kind("ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for name, pod in pod_specs():
        assert pod.get("serviceAccountName") == account["metadata"]["name"], name
        assert pod.get("automountServiceAccountToken") is False, name
    policies = {policy["metadata"]["name"]: policy["spec"] for policy in by_kind("NetworkPolicy")}
    policy = {"spec": policies["redis-from-lorafleet-only"]}
    (redis,) = by_kind("StatefulSet")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer == {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "lorafleet"}}}
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    # Every other lorafleet pod: connections to its metrics port only (probes and scrapes), Redis' not widened.
    others = policies["lorafleet-metrics-only"]
    assert others["podSelector"]["matchExpressions"] == [{"key": "app.kubernetes.io/name", "operator": "NotIn", "values": ["redis"]}]
    (metrics,) = others["ingress"]
    assert "from" not in metrics and sorted(p["port"] for p in metrics["ports"]) == [9400, 9401]
    for name, pod in pod_specs():  # every pod that talks to Redis passes the policy
        uses_redis = any("LORAFLEET_REDIS_URL" in json.dumps(c.get("env", [])) for c in pod["containers"])
        labels = pod_labels(name)
        assert not uses_redis or labels.get("app.kubernetes.io/part-of") == "lorafleet", name


def pod_labels(name: str) -> dict:
    """The labels of the pod template of `kind/name` (the Job's and CronJob's pods' too)."""
    for doc in documents() + documents(EXAMPLES) + documents(MODELS):
        if f"{doc['kind']}/{doc['metadata']['name']}" == name:
            spec = doc["spec"]
            template = spec.get("jobTemplate", {}).get("spec", spec)["template"]
            return template.get("metadata", {}).get("labels", {})
    raise KeyError(name)


def test_long_running_pods_have_liveness_probes_and_cpu_limits_where_they_belong():
    for name, pod in pod_specs():
        (container,) = pod["containers"]
        if name.split("/")[0] in ("Deployment", "StatefulSet"):
            assert "livenessProbe" in container, name
        limits = container["resources"]["limits"]
        # A GPU worker has none: CFS throttling of its host threads would idle the GPU (worker.yaml says why).
        assert ("cpu" in limits) == ("nvidia.com/gpu" not in limits) or name.startswith(("Job/", "CronJob/")), name
    (exporter,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "lorafleet-exporter"]
    (container,) = exporter["spec"]["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"  # alive while Redis is down (/metrics: 503)


def test_every_pod_that_checks_jobs_mounts_the_models_volume_where_the_config_points():
    """submit and sweep check each job against LORAFLEET_MODEL (its config, frames, sizes): the
    example Job and CronJob once exited 2 without the volume; the download Job fills that folder."""
    model = config()["LORAFLEET_MODEL"]
    for name, pod in pod_specs():
        if name.startswith(("Job/", "CronJob/", "Deployment/lorafleet-worker")):
            (container,) = pod["containers"]
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "models"]
            volume = next(v for v in pod["volumes"] if v["name"] == "models")
            assert model.startswith(mount["mountPath"] + "/") and volume["persistentVolumeClaim"]["claimName"] == "lorafleet-models"
            downloads = name == "Job/lorafleet-model-download"
            assert mount.get("readOnly", False) is not downloads, name
    (download,) = [pod for name, pod in pod_specs() if name == "Job/lorafleet-model-download"]
    (container,) = download["containers"]
    assert container["command"][-2:] == ["--local-dir", model]
    assert download["securityContext"]["runAsUser"] == 10001  # the workers' uid: the files are theirs


def config() -> dict:
    (configmap,) = [d for d in by_kind("ConfigMap") if d["metadata"]["name"] == "lorafleet-config"]
    return configmap["data"]


# Where `make k8s-tools` puts each checking tool: promtool beside the project's python, checkov in
# a virtual environment of its own. Looked up there too because the producer tier runs the suite
# from another virtual environment.
K8S_TOOLS = {"promtool": os.path.join(REPO, ".venv", "bin", "promtool"), "checkov": os.path.join(REPO, ".venv-checkov", "bin", "checkov")}


def tool(name: str) -> str:
    """A checking tool the suite installs (`make k8s-tools`): skipped here without it, failed in CI."""
    found = [p for p in (shutil.which(name), os.path.join(os.path.dirname(sys.executable), name), K8S_TOOLS[name]) if p and os.path.exists(p)]
    if not found:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: `make k8s-tools` installs it")
        pytest.skip(f"{name} is not installed (make k8s-tools)")
    return found[0]


def test_the_alerts_fire_as_their_unit_tests_say(tmp_path):
    """deploy/k8s/alerts.yaml's rules, checked and unit-tested by Prometheus' own promtool."""
    promtool = tool("promtool")
    (rule,) = by_kind("PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    shutil.copy(os.path.join(REPO, "tests", "k8s_alerts", "alerts_test.yaml"), tmp_path)
    checked = subprocess.run([promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    alerts = {r["alert"] for r in rule["spec"]["groups"][0]["rules"]}
    tests = open(os.path.join(REPO, "tests", "k8s_alerts", "alerts_test.yaml")).read()
    assert all(f"alertname: {alert}" in tests for alert in alerts)  # every alert has a test


# checkov's checks that do not fit this deployment, each with why (docs/how-to/kubernetes.md
# lists them too); everything else it checks must pass.
CHECKOV_SKIPPED = {
    "CKV_K8S_43": "images by digest: the admin pins their own registry's digest in kustomization.yaml's images",
    "CKV_K8S_15": "imagePullPolicy Always: a pinned tag or digest does not change; IfNotPresent spares GPU nodes a pull",
    "CKV_K8S_35": "secrets as files: lorafleet reads its settings from the environment (the password never in argv)",
    "CKV_K8S_11": "a GPU worker's CPU limit: CFS throttling of its host threads idles the GPU (worker.yaml)",
}


def test_checkov_finds_nothing_but_the_checks_skipped_with_a_reason(tmp_path):
    """checkov over what `kubectl apply -k` applies: the base, the examples and the model download."""
    checkov = tool("checkov")
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("no kubectl here (Debian: kubernetes-client)")
    for name, folder in (("base", K8S), ("examples", EXAMPLES), ("models", MODELS)):
        built = subprocess.run([kubectl, "kustomize", folder], capture_output=True, text=True, check=True).stdout
        (tmp_path / f"{name}.yaml").write_text(built)
    done = subprocess.run(
        [checkov, "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
         "--skip-check", ",".join(CHECKOV_SKIPPED)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    howto = open(os.path.join(REPO, "docs", "how-to", "kubernetes.md")).read()
    assert all(check in howto for check in CHECKOV_SKIPPED)
