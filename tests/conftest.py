"""Shared fixtures: the tiny model, a private redis-server, real worker processes, a store."""

import importlib.util
import os
import socket
import subprocess
import sys

import pytest

from common.errors import LorafleetError
from lorafleet.redis_server import RedisServer
from workers.supervisor import spawn_worker, stop_worker, wait_until_ready

# No network here or in CI: a hub lookup must fail at once rather than retry for seconds.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tests never read the developer's fleet settings: each test says what it sets (fleet_env, Settings(...)).
for _name in [name for name in os.environ if name.startswith("LORAFLEET_")]:
    del os.environ[_name]
# The suite runs several CPU workers beside pytest on a machine of few cores: torch's OpenMP threads,
# one per core in every process, spin against each other there (a render of 0.5 s alone took 6–33 s
# with three workers on 2 cores). One thread each; every process the suite starts inherits it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A producer-only install (no torch: `make test-producer`) runs every test that needs no render stack.
HAS_TORCH = importlib.util.find_spec("torch") is not None
TORCH_FIXTURES = {"tiny", "tiny_kinds", "fleet_env", "start_worker"}


def pytest_collection_modifyitems(config, items):
    """Without torch, skip the tests that need the render stack: marked `torch`, or using the tiny
    model or real workers (a test module that imports torch at its top is not collected: tests/unit/conftest.py)."""
    if HAS_TORCH:
        return
    skip = pytest.mark.skip(reason="needs torch (the worker extra)")
    for item in items:
        if item.get_closest_marker("torch") or TORCH_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """The tiny random-weight pipeline and its adapters, built once: {"model", "style", "subject"}."""
    from workers.tiny_model import write_tiny_model

    return write_tiny_model(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_kinds(tmp_path_factory) -> dict:
    """The tiny image-to-video and CogVideoX 1.5 pipelines, built once: {kind: paths} for i2v,
    t2v-1.5 and i2v-1.5 (an I2V kind's paths add the input images "sunset" and "tiles")."""
    from workers.tiny_model import write_tiny_model

    return {
        kind: write_tiny_model(str(tmp_path_factory.mktemp(kind)), kind=kind) for kind in ("i2v", "t2v-1.5", "i2v-1.5")
    }


@pytest.fixture(scope="session")
def redis_server():
    """A private redis-server for the session; skipped locally, failed in CI, where none can start."""
    try:
        server = RedisServer().start()
    except LorafleetError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"no redis-server: {exc}")
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """The private server's URL, emptied before each test so no queue or result leaks between tests."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


@pytest.fixture
def fleet_env(tiny, redis_url, tmp_path) -> dict:
    """The environment a user sets for a fleet: this test's Redis, store and the tiny model."""
    return {
        **os.environ,
        "LORAFLEET_REDIS_URL": redis_url,
        "LORAFLEET_STORE_URL": str(tmp_path / "store"),
        "LORAFLEET_MODEL": tiny["model"],
        "LORAFLEET_ADAPTER_CACHE_DIR": str(tmp_path / "adapter-cache"),
    }


@pytest.fixture
def start_worker(tmp_path):
    """Start real `lorafleet worker --device cpu` processes; each is stopped after the test."""
    started = []

    def start(env: dict, name: str | None = None, flags: tuple[str, ...] = ()):
        log_path = str(tmp_path / f"{name or f'worker{len(started)}'}.log")
        process = spawn_worker(["--device", "cpu", *flags], env, log_path)
        started.append(process)
        wait_until_ready(process, log_path, timeout_s=120)
        process.log_path = log_path
        process.worker = f"cpu-{process.pid}@{socket.gethostname()}"
        return process

    yield start
    for process in started:  # every worker told at once: their warm shutdowns overlap
        if process.poll() is None:
            process.terminate()
    for process in started:
        stop_worker(process, timeout_s=30)


def lorafleet(*args: str, env: dict, cwd: str = REPO, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the `lorafleet` command as a user does; returns its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "lorafleet", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
