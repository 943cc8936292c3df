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
    assert 'ENTRYPOINT ["lorafleet", "worker"' in open(os.path.join(DOCKER, "worker.Dockerfile")).read()
