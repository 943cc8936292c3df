"""docker/ cannot be built here (no Docker engine): check what can be checked by reading."""

import os

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.unit
DOCKER = os.path.join(REPO, "docker")


def test_compose_file_parses_and_has_the_fleet():
    compose = yaml.safe_load(open(os.path.join(DOCKER, "compose.yaml")))
    services = compose["services"]
    assert {"redis", "flower", "producer", "worker-gpu0", "worker-gpu1"} <= services.keys()
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    for name in ("worker-gpu0", "worker-gpu1"):
        worker = services[name]
        assert worker["environment"]["LORAFLEET_REDIS_URL"] == "redis://redis:6379/0"
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [name[-1]] and device["capabilities"] == ["gpu"]


def test_images_copy_every_package_the_project_installs():
    for dockerfile in ("worker.Dockerfile", "producer.Dockerfile"):
        text = open(os.path.join(DOCKER, dockerfile)).read()
        for package in ("common", "producer", "workers", "lorafleet"):
            assert f"COPY {package} ./{package}" in text, (dockerfile, package)
    worker = open(os.path.join(DOCKER, "worker.Dockerfile")).read()
    assert 'ENTRYPOINT ["lorafleet", "worker"' in worker
    assert "LORAFLEET_METRICS_PORT=9400" in worker and "HEALTHCHECK" in worker and ":9400/healthz" in worker


def test_nightly_schedules_run_the_sweep():
    cronjob = yaml.safe_load(open(os.path.join(REPO, "deploy", "k8s", "nightly-cronjob.yaml")))
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["schedule"] == "0 2 * * *"
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert "lorafleet sweep" in container["args"][0] and "--compare latest --timeout 21600" in container["args"][0]
    assert cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 21600  # the sweep times out first
    (line,) = [text for text in open(os.path.join(DOCKER, "nightly.cron")) if text.strip() and not text.startswith("#")]
    assert line.split()[:5] == ["0", "2", "*", "*", "*"] and "lorafleet sweep" in line
    assert "--compare latest --timeout 21600" in line
