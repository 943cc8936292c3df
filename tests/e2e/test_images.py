"""Both images, built with buildah as `make images` builds them (docker/build-images.sh), and run as
Kubernetes runs them (deploy/k8s/worker.yaml): as uid 10001, the image's root filesystem read-only
but for the pod's emptyDirs, the model volume read-only and the store's volume, and no network but
a Redis on loopback. In there a worker renders a job (and a compiled worker another: the compiler
that inductor and Triton need is in the image), the producer image submits, and pip finds nothing
broken. The default build takes PyPI's CUDA torch; the suite's takes the CPU wheel of the same
version (`TORCH_WHEELS`), which is the only difference."""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.helpers import decode_video, read_manifest, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
WORKER, PRODUCER = "localhost/lorafleet-test-worker:latest", "localhost/lorafleet-test-producer:latest"
TORCH_WHEELS = "/opt/wheels"  # this machine's CPU build of the pinned torch
UID = "10001"


def pinned_torch() -> str:
    return re.search(r"^torch==(\S+)$", open(os.path.join(REPO, "docker", "constraints.txt")).read(), re.M)[1]


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict:
    """Both images, built once a session by docker/build-images.sh; skipped where buildah cannot
    run (not root), failed in CI."""
    if os.geteuid() != 0 or not glob_wheel():
        if os.environ.get("CI"):
            pytest.fail("the image tests need root and the CPU torch wheel in /opt/wheels")
        pytest.skip("building images here needs root (buildah) and the CPU torch wheel in /opt/wheels")
    env = {**os.environ, "WORKER_IMAGE": WORKER, "PRODUCER_IMAGE": PRODUCER, "TORCH_WHEELS": TORCH_WHEELS}
    started = time.monotonic()
    built = subprocess.run(
        [os.path.join(REPO, "docker", "build-images.sh")], env=env, capture_output=True, text=True, timeout=1500
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    sizes = built.stderr.strip().splitlines()[-2:]
    print(f"images built in {time.monotonic() - started:.0f} s: {sizes}")
    return {"worker": WORKER, "producer": PRODUCER, "log": built.stderr}


def glob_wheel() -> bool:
    return os.path.isdir(TORCH_WHEELS) and any(
        name.startswith(f"torch-{pinned_torch()}+cpu") for name in os.listdir(TORCH_WHEELS)
    )


def image_config(image: str) -> dict:
    """The image's OCI configuration: User, Env, Entrypoint, ..."""
    inspected = subprocess.run(
        ["buildah", "inspect", "--type", "image", image], capture_output=True, text=True, check=True
    )
    return json.loads(inspected.stdout)["OCIv1"]["config"]


@contextlib.contextmanager
def loopback_only(password: str | None = None):
    """A network namespace whose only interface is loopback, and a Redis in it (with `password`, as
    deploy/k8s/redis.yaml's): yields its name."""
    from lorafleet.redis_server import find_redis_server

    name = f"lorafleet-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    redis = None
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        auth = ["--requirepass", password] if password else []
        redis = subprocess.Popen(
            ["ip", "netns", "exec", name, find_redis_server(), "--port", "6379", "--bind", "127.0.0.1", "--save", "", *auth],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        ping = f"import redis; redis.Redis(port=6379, password={password!r}).ping()"
        wait_for(lambda: subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", ping], capture_output=True).returncode == 0, 10, "Redis in the namespace")
        yield name
    finally:
        if redis is not None:
            redis.terminate()
            redis.wait(10)
        subprocess.run(["ip", "netns", "delete", name], check=False)


class Pod:
    """One container of an image, run as a pod's container runs: a mount namespace of its own with
    the image's root filesystem read-only, tmpfs at the writable paths (the pod's emptyDirs), the
    volumes bound (read-only where the pod mounts them so), uid 10001 (the image's USER), and the
    image's environment under the pod's; in a network namespace with loopback only."""

    def __init__(self, image: str, netns: str, writable: list[str], volumes: dict[str, tuple[str, bool]], env: dict):
        self.image, self.netns, self.writable, self.volumes, self.env = image, netns, writable, volumes, env
        self.container = subprocess.run(
            ["buildah", "from", image], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.root = subprocess.run(
            ["buildah", "mount", self.container], capture_output=True, text=True, check=True
        ).stdout.strip()
        config = image_config(image)
        self.user = config.get("User", "")
        self.workdir = config.get("WorkingDir") or "/"
        self.image_env = dict(item.split("=", 1) for item in config.get("Env", []))

    def argv(self, command: list[str]) -> list[str]:
        """The host command that runs `command` inside the pod."""
        mounts = [f'[ -e "$r{path}" ] || mkdir -p "$r{path}"' for path in [*self.writable, *self.volumes]]
        mounts += [
            'mount --bind "$r" "$r"',
            'mount -o remount,bind,ro "$r"',
            'mount -t proc proc "$r/proc"',
            'mount --rbind /dev "$r/dev"',
        ]
        mounts += [f'mount -t tmpfs -o mode=1777 tmpfs "$r{path}"' for path in self.writable]
        for path, (source, read_only) in self.volumes.items():
            mounts.append(f'mount --bind "{source}" "$r{path}"')
            if read_only:
                mounts.append(f'mount -o remount,bind,ro "$r{path}"')
        env = {**self.image_env, **self.env}
        script = (
            "set -e; r=$0; "
            + "; ".join(mounts)
            + "; shift; exec chroot --userspec="
            + self.user
            + ' "$r" /usr/bin/env -i -C ' + self.workdir + ' "$@"'
        )
        return [
            "ip", "netns", "exec", self.netns, "unshare", "--mount", "--propagation", "private", "--fork", "--kill-child",
            "sh", "-c", script, self.root, "-", *(f"{k}={v}" for k, v in env.items()), *command,
        ]  # fmt: skip

    def run(self, command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(command), capture_output=True, text=True, timeout=timeout)

    def start(self, command: list[str], log_path: str) -> subprocess.Popen:
        with open(log_path, "w") as log:
            return subprocess.Popen(self.argv(command), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @staticmethod
    def stop(process: subprocess.Popen) -> None:
        """SIGTERM to the container's processes, as kubelet sends it; SIGKILL past the grace period."""
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def remove(self) -> None:
        subprocess.run(["buildah", "umount", self.container], capture_output=True)
        subprocess.run(["buildah", "rm", self.container], capture_output=True)


@pytest.fixture
def pods(images, tiny, tmp_path):
    """Pods of both images in one loopback-only network with its Redis, sharing a store volume;
    the worker's writable paths are deploy/k8s/worker.yaml's emptyDirs."""
    store = tmp_path / "store"
    store.mkdir()
    os.chmod(store, 0o777)  # the store's volume, writable by the pods' uid
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    made = []
    with loopback_only() as netns:
        # What deploy/k8s/config.yaml gives every pod, with the test's Redis and model.
        fleet = {
            "LORAFLEET_REDIS_URL": "redis://127.0.0.1:6379/0",
            "LORAFLEET_STORE_URL": "/store",
            "LORAFLEET_MODEL": "/models/tiny",
            "OMP_NUM_THREADS": "1",
        }
        model = {"/models/tiny": (tiny["model"], True)}

        def pod(kind: str, **env) -> Pod:
            if kind == "worker":
                made.append(
                    Pod(
                        images["worker"],
                        netns,
                        ["/tmp", "/home/lorafleet/.cache"],
                        {**model, "/store": (str(store), False)},
                        {**fleet, **env},
                    )
                )
            else:
                made.append(
                    Pod(
                        images["producer"],
                        netns,
                        ["/tmp"],
                        {**model, "/store": (str(store), False), "/jobs": (str(jobs), True)},
                        {**fleet, **env},
                    )
                )
            return made[-1]

        try:
            yield {"pod": pod, "store": store, "jobs": jobs}
        finally:
            for made_pod in made:
                made_pod.remove()


def test_the_worker_image_runs_as_uid_10001_with_its_pinned_torch_and_pip_finds_nothing_broken(images, pods):
    assert image_config(images["worker"])["User"] == f"{UID}:{UID}"
    worker = pods["pod"]("worker")
    found = worker.run(
        ["sh", "-c", "id -u; lorafleet --version; pip check; python -c 'import torch; print(torch.__version__)'"]
    )
    assert found.returncode == 0, found.stdout + found.stderr
    uid, version, checked, torch_version = found.stdout.strip().splitlines()
    assert uid == UID and version.startswith("lorafleet") and "No broken requirements" in checked
    assert torch_version.split("+")[0] == pinned_torch()
    wrote = worker.run(["sh", "-c", "touch /app/x"])  # the root filesystem is read-only
    assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr


def test_a_worker_in_its_image_renders_a_job_and_a_compiled_one_too(images, pods, tmp_path):
    """The worker image's entrypoint command with `--device cpu` (no GPU here), then the same with
    `--compile`: inductor compiles C++ with the image's compiler (a build without one failed here)."""
    for compiled, seed in ((False, 1), (True, 2)):
        worker = pods["pod"]("worker", LORAFLEET_METRICS_PORT="0")
        log_path = str(tmp_path / f"worker-{seed}.log")
        process = worker.start(
            ["lorafleet", "worker", "--device", "cpu", *(["--compile"] if compiled else [])], log_path
        )
        try:
            wait_for(
                lambda log_path=log_path, process=process: (
                    "READY" in open(log_path).read() or process.poll() is not None
                ),
                300,
                "READY",
            )
            assert process.poll() is None, open(log_path).read()[-3000:]
            (pods["jobs"] / "jobs.jsonl").write_text(json.dumps({"prompt": "a cat in the image", "seed": seed}) + "\n")
            producer = pods["pod"]("producer")
            done = producer.run(
                ["lorafleet", "submit", "/jobs/jobs.jsonl", "--batch", f"image-{seed}", "--wait", "--timeout", "600"],
                timeout=660,
            )
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + open(log_path).read()[-3000:]
        finally:
            Pod.stop(process)
        (entry,) = read_manifest(str(pods["store"] / "batches" / f"image-{seed}" / "manifest.jsonl"))
        video = pods["store"] / "videos" / f"{entry['key']}.mp4"
        assert entry["status"] == "done" and decode_video(str(video)).shape[0] == 9
        assert entry["video"] == f"/store/videos/{entry['key']}.mp4"  # as the pods see the store
        if compiled:
            assert "compiled" in open(log_path).read()


def test_the_producer_image_has_no_torch(images, pods):
    producer = pods["pod"]("producer")
    found = producer.run(["python", "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"])
    assert found.returncode == 0 and found.stdout.strip() == "True", found.stderr


def test_the_default_build_resolves_the_cuda_build_of_the_pinned_torch(images):
    """What a user's build installs (no TORCH_WHEELS): pip's own resolution, in the worker image,
    of the constraints file's torch against PyPI alone. A metadata check: nothing is downloaded
    beyond the wheels' metadata."""
    container = subprocess.run(
        ["buildah", "from", images["worker"]], capture_output=True, text=True, check=True
    ).stdout.strip()
    volumes = ["--volume", f"{os.environ['PIP_CERT']}:/run/ca.crt:ro"] if os.environ.get("PIP_CERT") else []
    try:
        resolved = subprocess.run(
            ["buildah", "run", "--isolation", "chroot", "--user", "root", *volumes, container, "--", "sh", "-c",
             f"{'PIP_CERT=/run/ca.crt ' if volumes else ''}pip install --dry-run --ignore-installed --quiet --report - "
             "-c docker/constraints.txt torch"],
            capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
    assert resolved.returncode == 0, resolved.stderr[-3000:]
    report = json.loads(resolved.stdout)
    installs = {item["metadata"]["name"].lower(): item for item in report["install"]}
    assert installs["torch"]["metadata"]["version"] == pinned_torch()  # no "+cpu"
    assert any(name.startswith("nvidia-cuda-runtime") for name in installs), sorted(installs)


def manifest_pod(image: str, netns: str, manifest: str, sources: dict, config: dict, secrets: dict, more: dict) -> tuple[Pod, list[str]]:
    """The pod of a manifest in deploy/k8s (its Deployment's, Job's or CronJob's template), as
    kubelet would run it: its emptyDirs writable, its other volumes bound from `sources` (volume
    name -> host folder; a ConfigMap's read-only), `more` volumes besides (path -> (host path,
    read-only)), its environment from the ConfigMap `config` and the Secrets `secrets` (name ->
    value), `$(VAR)` expanded. Returns the pod and its container's command (command + args, or the
    image's entrypoint + args)."""
    import yaml

    (doc,) = [d for d in yaml.safe_load_all(open(os.path.join(REPO, "deploy", "k8s", manifest))) if d and d["kind"] in ("Deployment", "Job", "CronJob")]
    spec = doc["spec"]
    pod = spec.get("jobTemplate", {}).get("spec", spec)["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    writable, bound = [], dict(more)
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            writable.append(mount["mountPath"])
        else:
            bound[mount["mountPath"]] = (sources[mount["name"]], mount.get("readOnly", False) or "configMap" in volume)
    env = dict(config) if container.get("envFrom") else {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda found: env.get(found[1], found[0]), item["value"])
        else:
            env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["name"]]
    assert pod["securityContext"]["runAsUser"] == int(UID) and container["securityContext"]["readOnlyRootFilesystem"]
    config_of_image = image_config(image)
    if "command" in container:
        command = [*container["command"], *container.get("args", [])]
    else:
        command = [*config_of_image.get("Entrypoint", []), *container.get("args", config_of_image.get("Cmd") or [])]
    return Pod(image, netns, writable, bound, env), command


def test_the_example_job_and_cronjob_run_as_their_manifests_say(images, tiny, tmp_path):
    """deploy/k8s/examples' Job and CronJob, their commands, mounts and environment as written, beside
    a worker of deploy/k8s/worker.yaml (its command with the CPU for the GPU), against a Redis with
    the Secret's password under its service name: without the models volume they once exited 2 on
    the model check. The store is a volume here (the README's alternative to a bucket)."""
    import yaml

    (configmap,) = [d for d in yaml.safe_load_all(open(os.path.join(REPO, "deploy", "k8s", "config.yaml"))) if d]
    config = {**configmap["data"], "LORAFLEET_STORE_URL": "/store", "OMP_NUM_THREADS": "1"}
    password = secrets.token_hex(16)
    store, models, jobs, sweeps = (tmp_path / name for name in ("store", "models", "jobs", "sweeps"))
    shutil.copytree(tiny["model"], models / os.path.basename(config["LORAFLEET_MODEL"]))  # where config.yaml points
    shutil.copytree(tiny["style"], store / "adapters" / "style")  # nightly.yaml's store-relative adapter
    os.chmod(store, 0o777)
    for folder, name in ((jobs, "prompts.jsonl"), (sweeps, "nightly.yaml")):  # the ConfigMaps' files
        folder.mkdir()
        shutil.copy(os.path.join(REPO, "deploy", "k8s", "examples", name), folder)
    (tmp_path / "hosts").write_text("127.0.0.1 localhost redis\n")  # the Service's name, as cluster DNS gives it
    more = {"/store": (str(store), False), "/etc/hosts": (str(tmp_path / "hosts"), True)}
    sources = {"models": str(models), "jobs": str(jobs), "sweeps": str(sweeps)}
    keys = {"lorafleet-redis": password, "lorafleet-compile-cache": secrets.token_hex(16)}
    made = []
    with loopback_only(password) as netns:
        worker, command = manifest_pod(images["worker"], netns, "worker.yaml", sources, config, keys, more)
        made.append(worker)
        assert command == ["lorafleet", "worker", "--device", "cuda"]
        log_path = str(tmp_path / "worker.log")
        process = worker.start([*command, "--device", "cpu"], log_path)  # no GPU here: the last --device wins
        try:
            wait_for(lambda: "READY" in open(log_path).read() or process.poll() is not None, 300, "READY")
            assert process.poll() is None, open(log_path).read()[-3000:]
            for manifest, image in (("examples/producer-job.yaml", images["producer"]), ("examples/nightly-cronjob.yaml", images["producer"])):
                pod, command = manifest_pod(image, netns, manifest, sources, config, keys, more)
                made.append(pod)
                done = pod.run(command, timeout=900)
                assert done.returncode == 0, (manifest, done.stdout[-2000:], done.stderr[-3000:], open(log_path).read()[-2000:])
        finally:
            Pod.stop(process)
            for pod in made:
                pod.remove()
    submitted = {entry["id"] for entry in read_manifest(str(next((store / "batches").glob("2*")) / "manifest.jsonl"))}
    assert submitted == {"beach", "city"}
    (night,) = (store / "batches").glob("nightly-*")
    assert (night / "report.html").exists() and json.loads((night / "report.json").read_text())["sets"]


def test_lorafleet_demo_runs_from_the_installed_package(images, pods):
    """The worker image holds lorafleet as pip installed it from a wheel, not a checkout: the demo
    finds its jobs in the package (they once were only in the checkout's examples/)."""
    worker = pods["pod"]("worker", LORAFLEET_METRICS_PORT="0", LORAFLEET_STORE_URL="./results")
    done = worker.run(["sh", "-c", "cd /tmp && lorafleet demo"], timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo done" in done.stdout
    where = worker.run(["sh", "-c", "cd /tmp && python -c 'import lorafleet.demo as d; print(d.EXAMPLES)'"])
    assert where.stdout.strip() == "/usr/local/lib/python3.11/site-packages/lorafleet/examples", where.stdout
