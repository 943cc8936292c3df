"""A worker's /metrics, /healthz and /readyz over HTTP, and `lorafleet health`, with a real worker."""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pygjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from common.broker import make_app
from common.protocol import TASK_NAME
from common.settings import Settings
from lorafleet.redis_server import free_port
from tests.conftest import REPO, lorafleet
from workers.supervisor import spawn_worker, stop_worker, wait_until_ready

pytestmark = pytest.mark.integration


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(port: int) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, labels...): value}."""
    code, text = get(port, "/metrics")
    assert code == 200
    return {
        (sample.name, *sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_a_worker_serves_metrics_and_probes_and_health_follows_its_heartbeat(fleet_env, tmp_path):
    port = free_port()
    env = {**fleet_env, "LORAFLEET_METRICS_PORT": str(port)}
    log_path = str(tmp_path / "worker.log")
    worker = spawn_worker(["--device", "cpu"], env, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:  # the server is up before torch is imported: the first answer is "starting"
            try:
                first = get(port, "/readyz")
                break
            except OSError:
                assert time.monotonic() < deadline, open(log_path).read()
                time.sleep(0.05)
        assert first == (503, "starting\n")
        assert get(port, "/healthz")[0] == 200  # alive while it starts: no heartbeat is due yet
        wait_until_ready(worker, log_path, timeout_s=120)
        before_any_job = scrape(port)  # every outcome's counter is there from the start, at 0
        assert all(before_any_job[("lorafleet_jobs_total", ("outcome", o))] == 0 for o in ("done", "failed"))
        deadline = time.monotonic() + 10
        while get(port, "/readyz")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)

        before = scrape(port)
        app = make_app(Settings(redis_url=env["LORAFLEET_REDIS_URL"]))
        done = app.send_task(TASK_NAME, args=[{"prompt": "a cat", "seed": 7, "steps": 3}]).get(timeout=60)
        assert done["status"] == "done"
        after = scrape(port)
        jobs_done = ("lorafleet_jobs_total", ("outcome", "done"))
        assert after[jobs_done] == before.get(jobs_done, 0) + 1
        for phase in ("adapters", "variant", "denoise", "decode", "export_upload"):
            count = ("lorafleet_render_seconds_count", ("phase", phase))
            assert after[count] == before.get(count, 0) + 1, phase
        assert (
            after[("lorafleet_variant_switch_seconds_count",)]
            == before.get(("lorafleet_variant_switch_seconds_count",), 0) + 1
        )
        assert ("lorafleet_cache_misses_total", ("tier", "disk")) in after
        assert after[("lorafleet_job_step",)] == 0  # idle again
        info = next(key for key in after if key[0] == "lorafleet_worker_info")
        assert ("model", env["LORAFLEET_MODEL"]) in info and ("dtype", "torch.float32") in info

        name = f"cpu-{worker.pid}@{socket.gethostname()}"
        alive = lorafleet("health", "--worker", name, env=env)
        assert alive.returncode == 0 and f"{name}: alive, serving queue render" in alive.stdout
        assert ", idle, last beat" in alive.stdout  # its one job ended
        assert lorafleet("health", env=env).returncode == 0  # any worker

        worker.kill()  # no goodbye: its heartbeat lapses in Redis within 3 beats
        worker.wait()
        deadline = time.monotonic() + 30
        while (gone := lorafleet("health", "--worker", name, env=env)).returncode == 0:
            assert time.monotonic() < deadline, gone.stdout
            time.sleep(1)
        assert gone.returncode == 1 and "no fresh heartbeat in Redis" in gone.stdout
    finally:
        stop_worker(worker)


def test_the_exporter_counts_queues_running_jobs_workers_and_batches(fleet_env, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat", "seed": [1, 2, 3]}\n')
    assert lorafleet("submit", str(jobs), "--batch", "waiting", env=fleet_env).returncode == 0  # no worker yet
    import redis

    # A heartbeat any client may forge, without its fields: skipped, /metrics still answers (it was a 500).
    redis.Redis.from_url(fleet_env["LORAFLEET_REDIS_URL"]).set("lorafleet:worker:forged", '{"queue": "render"}')
    with exporter(fleet_env) as port:
        samples = scrape(port)
    assert samples[("lorafleet_queue_length", ("queue", "render"))] == 3
    assert samples[("lorafleet_running_jobs",)] == 0
    assert samples[("lorafleet_live_workers", ("queue", "render"))] == 0
    assert samples[("lorafleet_batch_jobs", ("batch", "waiting"), ("state", "queued"))] == 3
    assert samples[("lorafleet_batch_jobs", ("batch", "waiting"), ("state", "done"))] == 0


@contextlib.contextmanager
def exporter(env: dict):
    """`lorafleet exporter` on a free port, as an operator starts it; yields the port once it answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lorafleet", "exporter", "--port", str(port)], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get(port, "/metrics")
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_exporter_tells_keda_what_the_fleet_owes_queued_at_every_priority_plus_running(
    fleet_env, start_worker, tmp_path
):
    """deploy/k8s/keda.yaml's metrics-api trigger reads /scale at its valueLocation: jobs waiting at
    every priority plus the ones running, so a fleet is not shrunk under its renders."""
    import yaml

    start_worker(fleet_env)
    long = tmp_path / "long.jsonl"
    long.write_text('{"prompt": "a long cat", "seed": 1, "steps": 1000, "height": 256, "width": 256}\n')
    assert lorafleet("submit", str(long), "--batch", "running", env=fleet_env).returncode == 0
    app = make_app(Settings(redis_url=fleet_env["LORAFLEET_REDIS_URL"]))
    deadline = time.monotonic() + 60
    while not app.control.inspect(timeout=1).active() and time.monotonic() < deadline:
        time.sleep(0.2)
    for priority in ("high", "normal", "low"):  # three Redis lists; the worker is busy
        queued = tmp_path / f"{priority}.jsonl"
        queued.write_text(f'{{"prompt": "a {priority} cat", "seed": 2}}\n')
        assert lorafleet("submit", str(queued), "--priority", priority, env=fleet_env).returncode == 0
    try:
        with exporter(fleet_env) as port:
            code, body = get(port, "/scale")
    finally:
        assert lorafleet("cancel", "running", env=fleet_env).returncode == 0
    assert code == 200
    answer = json.loads(body)
    assert answer["queues"]["render"] == {"queued": 3, "running": 1, "owed": 4}
    keda = yaml.safe_load(open(f"{REPO}/deploy/k8s/keda.yaml"))
    (trigger,) = keda["spec"]["triggers"]
    assert pygjson.get(body, trigger["metadata"]["valueLocation"]).to_int() == 4  # as KEDA's GJSON reads it


def test_scale_names_a_model_alias_queue_by_an_escaped_gjson_path_and_says_503_when_redis_is_down(redis_url):
    """A model alias's queue, `render.2b`, holds a dot: GJSON reads `queues.render.2b.owed` as four
    steps and finds nothing; keda.yaml documents the escaped path. And with Redis gone, /scale says
    so with a 503 within seconds (KEDA's fallback then keeps the fleet as it is)."""
    from producer.exporter import value_location

    env = {**os.environ, "LORAFLEET_REDIS_URL": redis_url, "LORAFLEET_MODELS": '{"2b": "/models/CogVideoX-2b"}'}
    client = redis.Redis.from_url(redis_url)
    client.lpush("render.2b", "a message", "another")
    client.close()
    with exporter(env) as port:
        code, body = get(port, "/scale")
    assert code == 200, body
    assert value_location("2b") == "queues.render\\.2b.owed" and "queues.render\\.A.owed" in open(f"{REPO}/deploy/k8s/keda.yaml").read()
    assert pygjson.get(body, value_location("2b")).to_int() == 2
    assert not pygjson.get(body, "queues.render.2b.owed").exists()  # four steps: nothing there
    assert pygjson.get(body, value_location()).to_int() == 0

    down = {**env, "LORAFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    with exporter(down) as port:
        started = time.monotonic()
        code, body = get(port, "/scale")
        alive = get(port, "/healthz")
    assert code == 503 and body.startswith("redis unreachable: ConnectionError"), (code, body)
    assert time.monotonic() - started < 5
    assert alive == (200, "ok\n")  # the liveness probe's: the exporter lives on through the outage
