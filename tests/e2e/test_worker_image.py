"""The worker image's Python environment, built as docker/worker.Dockerfile builds it (no Docker
engine here): its COPY lines into a build folder, a fresh venv of the suite's Python (the image's
base is python:<the suite's version>-slim), its ENV, its RUN line; then `lorafleet worker` from that
venv renders a job. What broke before: a torch 2.5.1 base under diffusers 0.42 and transformers 5,
where the worker died on import (`module 'torch' has no attribute 'accelerator'`)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, lorafleet
from tests.helpers import decode_video, read_manifest
from workers.supervisor import stop_worker, wait_until_ready

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]  # each builds an image's environment from scratch
DOCKERFILE = os.path.join(REPO, "docker", "worker.Dockerfile")


def instructions(dockerfile: str = DOCKERFILE) -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", open(dockerfile).read())
    found = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, arguments = line.strip().partition(" ")
            found.append((keyword.upper(), arguments.strip()))
    return found


def build_image_env(root, dockerfile: str) -> dict:
    """An image's /app, venv and environment, built as its Dockerfile says: {"bin", "env", "app"}."""
    app, home, venv = root / "app", root / "home", root / "venv"
    app.mkdir(parents=True)
    home.mkdir()
    env = {"PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    for variable in ("HF_HUB_OFFLINE", "PIP_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE", "TMPDIR"):
        if variable in os.environ:  # how this machine reaches its package index; the image's own stays
            env[variable] = os.environ[variable]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for keyword, arguments in instructions(dockerfile):
        if keyword == "COPY":
            *sources, destination = shlex.split(arguments)
            target = app / destination
            for source in sources:
                path = os.path.join(REPO, source)
                if os.path.isdir(path):
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
                else:
                    target.mkdir(parents=True, exist_ok=True) if destination.endswith("/") else None
                    shutil.copy(path, target)
        elif keyword == "ENV":
            for assignment in shlex.split(arguments):
                name, _, value = assignment.partition("=")
                env[name] = value.replace("/home/lorafleet", str(home))
        elif keyword == "RUN" and ("pip install" in arguments or "install-python.sh" in arguments):
            command = arguments.split("&&")[0].strip()  # the install; the rest makes the user's folders
            # The venv's pip; pip's cache kept (it changes no resolution, only what is downloaded again).
            argv = [str(venv / "bin" / "pip") if word == "pip" else word for word in shlex.split(command)]
            argv = [word for word in argv if word != "--no-cache-dir"]
            done = subprocess.run(argv, cwd=app, env={**os.environ, **env}, capture_output=True, text=True)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"bin": venv / "bin", "env": env, "app": app}


@pytest.fixture(scope="module")
def image_env(tmp_path_factory) -> dict:
    return build_image_env(tmp_path_factory.mktemp("image"), DOCKERFILE)


def test_the_images_environment_holds_the_pinned_torch_and_pip_finds_nothing_broken(image_env):
    pinned = re.search(r"^torch==(\S+)$", open(os.path.join(REPO, "docker", "constraints.txt")).read(), re.M)[1]
    python = str(image_env["bin"] / "python")
    torch_version = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__.split('+')[0])"],
        capture_output=True, text=True, check=True, cwd="/",
    ).stdout.strip()  # fmt: skip
    assert torch_version == pinned
    checked = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout
    # transformers and diffusers import against that torch, as the worker does at start.
    imported = subprocess.run(
        [python, "-c", "import diffusers, transformers, torch; torch.accelerator; print('ok')"],
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert imported.stdout.strip() == "ok", imported.stderr[-2000:]


def test_a_worker_from_the_images_environment_renders_a_job(image_env, fleet_env, tmp_path):
    # The image's environment, with the fleet's settings over it (as compose and k8s set them).
    fleet = {name: value for name, value in fleet_env.items() if name.startswith("LORAFLEET_")}
    env = {**image_env["env"], **fleet, "LORAFLEET_METRICS_PORT": "0"}
    log_path = str(tmp_path / "worker.log")
    # The image's entrypoint is `lorafleet worker --device cuda`; no GPU here, so the CPU.
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [str(image_env["bin"] / "lorafleet"), "worker", "--device", "cpu"],
            cwd=image_env["app"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until_ready(worker, log_path, timeout_s=180)
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text('{"prompt": "a cat in the image", "seed": 7, "num_frames": 9}\n')
        started = time.monotonic()
        done = lorafleet("submit", str(jobs), "--batch", "image", "--wait", env=fleet_env)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        (entry,) = read_manifest(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "image", "manifest.jsonl"))
        assert entry["status"] == "done" and decode_video(entry["video"]).shape[0] == 9
        assert time.monotonic() - started < 120
    finally:
        stop_worker(worker, timeout_s=30)


def test_the_producer_images_environment_submits_without_torch(fleet_env, tmp_path):
    """docker/producer.Dockerfile's environment, built as it says: no torch in it, and its
    `lorafleet submit` checks, keys and enqueues a jobs file against the fleet's Redis."""
    image = build_image_env(tmp_path / "producer", os.path.join(REPO, "docker", "producer.Dockerfile"))
    python = str(image["bin"] / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True, cwd="/").returncode != 0
    env = {**image["env"], **{k: v for k, v in fleet_env.items() if k.startswith("LORAFLEET_")}}
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat from the producer image", "seed": 3}\n')
    done = subprocess.run(
        [str(image["bin"] / "lorafleet"), "submit", str(jobs), "--batch", "from-image"],
        cwd=image["app"], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "batch from-image: 1 jobs, 1 enqueued" in done.stdout
