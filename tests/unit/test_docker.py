"""docker/: no image can be built here (no Docker engine), so each part is checked with the real
tool that can run here: hadolint lints both Dockerfiles, the compose file validates against the
Compose Specification's own schema (tests/compose_schema), and the images' Python environment is
the suite's own (one torch, the versions of docker/constraints.txt, every dependency's floor met;
tests/e2e/test_worker_image.py builds that environment and renders in it)."""

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import distributions, version

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO

pytestmark = pytest.mark.unit
DOCKER = os.path.join(REPO, "docker")
DOCKERFILES = ("worker.Dockerfile", "producer.Dockerfile")


def read(name: str) -> str:
    return open(os.path.join(DOCKER, name)).read()


def constraints() -> dict[str, str]:
    """docker/constraints.txt as {normalized name: version}."""
    pins = {}
    for line in read("constraints.txt").splitlines():
        if line and not line.startswith("#"):
            name, pinned = line.split("==")
            pins[normalize(name)] = pinned
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def torch_floor_violations(torch_version: str) -> list[str]:
    """Every requirement on torch that an installed distribution declares (under any extra: diffusers
    and transformers name torch only in extras) that `torch_version` does not meet."""
    found = []
    for dist in distributions():
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.name == "torch" and not requirement.specifier.contains(torch_version, prereleases=True):
                found.append(f"{dist.metadata['Name']} {dist.version} requires {line}")
    return found


@pytest.mark.torch  # the suite's own torch
def test_one_torch_for_the_suite_the_images_and_the_makefile():
    pinned = constraints()["torch"]
    assert Version(version("torch")).public == pinned  # the suite runs the torch the image installs
    assert "torch==" not in read("worker.Dockerfile")  # the image takes it from constraints.txt
    assert "docker/install-python.sh" in read("worker.Dockerfile")
    makefile = open(os.path.join(REPO, "Makefile")).read()
    assert "grep -m1 '^torch==' docker/constraints.txt" in makefile and "docker/install-python.sh" in makefile
    assert "grep -m1 '^torch==' \"$here/constraints.txt\"" in read("install-python.sh")


@pytest.mark.torch  # the floors of the installed diffusers and transformers
def test_the_pinned_torch_meets_every_dependencys_floor():
    pinned = constraints()["torch"]
    assert torch_floor_violations(pinned) == []
    # What broke the image before: a base image's torch 2.5.1 under diffusers 0.42 and transformers 5.
    assert any("transformers" in v for v in torch_floor_violations("2.5.1")), torch_floor_violations("2.5.1")


def test_the_suite_runs_the_versions_the_images_install():
    pins = constraints()
    installed = {normalize(d.metadata["Name"]): d.version for d in distributions()}
    differ = {
        name: (pinned, installed[name])
        for name, pinned in pins.items()
        if name in installed and Version(installed[name]).public != Version(pinned).public
    }
    assert differ == {}, f"installed ≠ docker/constraints.txt (make install, or regenerate it): {differ}"


def test_images_start_from_the_suites_python_and_run_as_a_non_root_user():
    suite_python = f"{sys.version_info.major}.{sys.version_info.minor}"
    for dockerfile in DOCKERFILES:
        text = read(dockerfile)
        # python:<the suite's>-slim, or the same built from Debian's packages where no registry answers
        assert re.search(rf"^ARG BASE_IMAGE=python:{re.escape(suite_python)}-slim$", text, re.M), dockerfile
        assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), dockerfile
        (user,) = re.findall(r"^USER (\S+)$", text, re.M)
        assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit(), dockerfile
        assert text.rindex("USER ") > text.rindex("RUN "), f"{dockerfile}: nothing may run as root after USER"
        assert "-c docker/constraints.txt" in text or "install-python.sh" in text, dockerfile
        for package in ("common", "producer", "workers", "lorafleet"):
            assert f"COPY {package} ./{package}" in text, (dockerfile, package)
    worker = read("worker.Dockerfile")
    assert 'ENTRYPOINT ["lorafleet", "worker"' in worker
    assert "LORAFLEET_METRICS_PORT=9400" in worker and "HEALTHCHECK" in worker and ":9400/healthz" in worker
    assert "HF_HOME=/home/lorafleet/.cache/huggingface" in worker  # the user's writable cache, not /models


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_finds_nothing(dockerfile):
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    done = subprocess.run([hadolint, os.path.join(DOCKER, dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_file_follows_the_compose_specification_and_has_the_fleet():
    compose = yaml.safe_load(open(os.path.join(DOCKER, "compose.yaml")))
    schema = json.load(open(os.path.join(REPO, "tests", "compose_schema", "compose-spec.json")))
    jsonschema.Draft7Validator(schema).validate(compose)  # the draft the schema names
    services = compose["services"]
    assert {"redis", "flower", "producer", "worker-gpu0", "worker-gpu1"} <= services.keys()
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    for name in ("worker-gpu0", "worker-gpu1"):
        worker = services[name]
        assert worker["environment"]["LORAFLEET_REDIS_URL"] == "redis://redis:6379/0"
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["device_ids"] == [name[-1]] and device["capabilities"] == ["gpu"]
        assert "worker-cache:/home/lorafleet/.cache" in worker["volumes"]
        # compose refuses to start without the secret that signs shared compile artifacts
        assert worker["environment"]["LORAFLEET_COMPILE_CACHE_SECRET"].startswith("${LORAFLEET_COMPILE_CACHE_SECRET:?")
    for name, service in services.items():
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "user" in service or "build" in service, f"{name}: an image's own non-root user or an explicit one"


def test_nightly_schedules_run_the_sweep():
    path = os.path.join(REPO, "deploy", "k8s", "examples", "nightly-cronjob.yaml")
    cronjob = yaml.safe_load(open(path))
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["schedule"] == "0 2 * * *"
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert "lorafleet sweep" in container["args"][0] and "--compare latest --timeout 21600" in container["args"][0]
    assert cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] > 21600  # the sweep times out first
    (line,) = [text for text in open(os.path.join(DOCKER, "nightly.cron")) if text.strip() and not text.startswith("#")]
    assert line.split()[:5] == ["0", "2", "*", "*", "*"] and "lorafleet sweep" in line
    assert "--compare latest --timeout 21600" in line
