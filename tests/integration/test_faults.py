"""Nothing lost, nothing twice: killed workers, poison jobs, Redis restarts, stops, duplicates, cancel."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis as redis_client
from celery.result import AsyncResult

from common.protocol import TASK_NAME, queue_lists
from lorafleet.redis_server import RedisServer
from tests.conftest import REPO, lorafleet
from tests.helpers import (
    app_for,
    decode_video,
    frozen,
    long_job,
    progress_of,
    queued_messages,
    read_manifest,
    render_records,
    submit_one,
    wait_for,
)
from workers.supervisor import stop_worker

pytestmark = pytest.mark.integration


@pytest.fixture
def fast_leases(fleet_env) -> dict:
    return {**fleet_env, "LORAFLEET_LEASE_S": "2"}


@pytest.mark.parametrize("planted", [False, True], ids=["clean", "malformed-records-in-redis"])
def test_a_job_whose_worker_is_killed_completes_on_another_worker(fast_leases, start_worker, tmp_path, planted):
    """Also with malformed records planted by a client (a running-job entry that is no JSON, one
    missing its fields, a heartbeat without `since`): each is skipped, the sweeper keeps sweeping."""
    if planted:
        client = redis_client.Redis.from_url(fast_leases["LORAFLEET_REDIS_URL"])
        client.hset("lorafleet:running", mapping={"not-json": b"{oops", "no-fields": json.dumps({"queue": 1})})
        client.set("lorafleet:worker:forged", json.dumps({"worker": "forged", "queue": "render"}), ex=600)
    workers = [start_worker(fast_leases), start_worker(fast_leases)]
    result = app_for(fast_leases).send_task(TASK_NAME, args=[long_job(1)])
    info = wait_for(lambda: progress_of(result, fast_leases), 60, "the job to start")
    victim = next(w for w in workers if w.worker == info["worker"])
    survivor = next(w for w in workers if w is not victim)
    os.killpg(victim.pid, signal.SIGKILL)
    outcome = result.get(timeout=120)
    assert outcome["status"] == "done" and outcome["worker"] == survivor.worker
    assert "lost its worker" in open(survivor.log_path).read()
    assert len(glob.glob(os.path.join(fast_leases["LORAFLEET_STORE_URL"], "videos", "*.mp4"))) == 1
    if planted:
        log = open(survivor.log_path).read()
        assert log.count("skipped a malformed RunningEntry record lorafleet:running[not-json]") == 1  # logged once
        health = lorafleet("health", env=fast_leases)
        assert health.returncode == 0 and "Traceback" not in health.stderr and "forged" not in health.stdout


def test_a_poison_job_is_failed_after_max_deliveries_and_the_fleet_serves_on(fast_leases, start_worker):
    poisoned = os.pathsep.join([os.path.join(REPO, "tests", "poison"), REPO])  # tests/poison/sitecustomize.py
    env = {**fast_leases, "LORAFLEET_TEST_KILL_PROMPT": "poison", "LORAFLEET_MAX_DELIVERIES": "3", "PYTHONPATH": poisoned}
    app = app_for(env)
    poison = app.send_task(TASK_NAME, args=[{"prompt": "poison", "seed": 1}])
    worker = start_worker(env)
    deaths = 0
    deadline = time.monotonic() + 180
    while not poison.ready() and time.monotonic() < deadline:
        if worker.poll() is not None:
            deaths += 1
            worker = start_worker(env)
        time.sleep(0.2)
    assert poison.state == "FAILURE", poison.state
    assert "worker lost 3 times" in str(poison.result)
    assert deaths == 3
    assert app.send_task(TASK_NAME, args=[{"prompt": "a healthy job", "seed": 2}]).get(timeout=60)["status"] == "done"


def test_redis_restarts_that_lose_everything_lose_no_job(tiny, tmp_path, start_worker, fleet_env):
    """Redis restarted without persistence forgets the queue, the results, the leases and the locks:
    the running job's worker can no longer prove it holds its job and stops without writing, and
    `submit --wait` sends again every job found nowhere. Each job is rendered once."""
    redis = RedisServer(directory=str(tmp_path / "redis"), appendonly=False)
    os.makedirs(redis.directory)
    redis.start()
    workers = []
    try:
        env = {**fleet_env, "LORAFLEET_REDIS_URL": redis.url, "LORAFLEET_LEASE_S": "3"}
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text("".join(json.dumps(long_job(seed, steps=120)) + "\n" for seed in range(8)))
        workers.extend([start_worker(env), start_worker(env)])
        submit = subprocess.Popen(
            [sys.executable, "-m", "lorafleet", "submit", str(jobs), "--wait", "--batch", "restarts"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        store = env["LORAFLEET_STORE_URL"]
        wait_for(lambda: glob.glob(os.path.join(store, "videos", "*.mp4")), 60, "a first video")
        redis.stop()
        time.sleep(1.5)
        redis.start()
        output, _ = submit.communicate(timeout=240)
        assert submit.returncode == 0, output[-3000:]
        assert "was found nowhere 3 times: sending it again" in output  # the re-send path ran
        manifest = read_manifest(os.path.join(store, "batches", "restarts", "manifest.jsonl"))
        assert [e["status"] for e in manifest] == ["done"] * 8
        assert all(decode_video(e["video"]).shape == (9, 32, 32, 3) for e in manifest)
        counts = render_records([w.log_path for w in workers])
        assert len(counts) == 8 and set(counts.values()) == {1}, counts
    finally:
        for worker in workers:  # told while their Redis is up: a warm shutdown without it waits out its timeout
            worker.terminate()
        for worker in workers:
            stop_worker(worker)
        redis.stop()


def test_sigterm_lets_a_busy_worker_finish_its_job(fleet_env, start_worker):
    worker = start_worker(fleet_env)
    result = app_for(fleet_env).send_task(TASK_NAME, args=[long_job(3)])
    wait_for(lambda: progress_of(result, fleet_env), 60, "the job to start")
    os.killpg(worker.pid, signal.SIGTERM)
    assert result.get(timeout=120)["status"] == "done"
    assert worker.wait(timeout=60) == 0
    assert "stopped after 1 render(s)" in open(worker.log_path).read()


def test_the_same_file_submitted_twice_at_once_renders_each_key_once(fleet_env, start_worker, tmp_path):
    workers = [start_worker(fleet_env), start_worker(fleet_env)]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(long_job(seed, steps=80)) + "\n" for seed in range(4)))
    command = [sys.executable, "-m", "lorafleet", "submit", str(jobs), "--wait"]
    both = [
        subprocess.Popen(command, env=fleet_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)
    ]
    assert [p.wait(timeout=180) for p in both] == [0, 0]
    counts = render_records([w.log_path for w in workers])
    assert len(counts) == 4 and set(counts.values()) == {1}, counts


def test_cancel_stops_a_batch_and_retry_finishes_it(fleet_env, start_worker, tmp_path):
    worker = start_worker(fleet_env)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(long_job(seed, steps=600)) + "\n" for seed in range(3)))
    submitted = lorafleet("submit", str(jobs), "--batch", "stop-me", env=fleet_env)
    assert submitted.returncode == 0, submitted.stderr
    (first, *_) = read_manifest(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "stop-me", "manifest.jsonl"))
    running = AsyncResult(first["task_id"], app=app_for(fleet_env))
    wait_for(lambda: progress_of(running, fleet_env), 60, "the first job to start")
    with frozen(worker):  # 600 steps take 1.6 s here: the cancel lands while the first job runs
        assert lorafleet("cancel", "stop-me", env=fleet_env).returncode == 0
    wait_for(
        lambda: lorafleet("status", "stop-me", env=fleet_env).stdout.count("cancelled") >= 4, 60, "all cancelled", 1
    )
    status = lorafleet("status", "stop-me", env=fleet_env).stdout
    assert "0 done, 0 running, 0 queued, 0 failed, 3 cancelled of 3 jobs" in status
    assert "stopped at step" in status  # the running one stopped mid-render
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 0

    again = lorafleet("retry", "stop-me", "--wait", env=fleet_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 job(s) enqueued again" in again.stdout
    manifest = read_manifest(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "stop-me", "manifest.jsonl"))
    assert [e["status"] for e in manifest] == ["done"] * 3


def test_a_pickled_message_is_refused_and_the_worker_serves_on(fleet_env, start_worker):
    worker = start_worker(fleet_env)
    app = app_for(fleet_env)
    pickled = app.send_task(TASK_NAME, args=[{"prompt": "x", "seed": 1}], serializer="pickle")
    wait_for(lambda: "untrusted content" in open(worker.log_path).read(), 30, "the worker to refuse it")
    # Refused unopened: taken off the queue, never run, so no result, no lease and no video exist.
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 0
    client = redis_client.Redis.from_url(fleet_env["LORAFLEET_REDIS_URL"])
    assert not client.exists(f"celery-task-meta-{pickled.id}", f"lorafleet:lease:{pickled.id}")
    client.close()
    assert render_records([worker.log_path]) == {}
    assert app.send_task(TASK_NAME, args=[{"prompt": "x", "seed": 1}]).get(timeout=60)["status"] == "done"


def test_a_password_protected_redis(fleet_env, start_worker, tmp_path):
    with RedisServer(password="s3cret-pass") as redis:
        env = {**fleet_env, "LORAFLEET_REDIS_URL": redis.url}
        worker = start_worker(env)
        result = submit_one({"prompt": "a cat", "seed": 1}, tmp_path, env, "--wait")
        assert result.returncode == 0, result.stdout + result.stderr
        stop_worker(worker)  # while its Redis is up: a warm shutdown with Redis gone waits out its timeout
        wrong_password = {**env, "LORAFLEET_REDIS_URL": redis.url.replace("s3cret", "wrong")}
        wrong = submit_one({"prompt": "a cat", "seed": 2}, tmp_path, wrong_password)
        assert wrong.returncode == 3
        assert wrong.stderr.startswith("lorafleet submit: cannot use Redis at redis://:***@127.0.0.1:")
        assert "wrong" not in wrong.stderr  # the password is not printed


@pytest.mark.parametrize("how", ["second SIGTERM", "shutdown timeout"])
def test_a_worker_told_to_stop_now_hands_its_job_back(fast_leases, start_worker, how):
    env = {**fast_leases, "LORAFLEET_SHUTDOWN_TIMEOUT_S": "1" if how == "shutdown timeout" else "600"}
    busy, spare = start_worker(env), start_worker(env)
    result = app_for(env).send_task(TASK_NAME, args=[{**long_job(4, steps=1000), "height": 64, "width": 64}])
    info = wait_for(lambda: progress_of(result, env), 60, "the job to start")
    busy, spare = (busy, spare) if info["worker"] == busy.worker else (spare, busy)
    os.killpg(busy.pid, signal.SIGTERM)
    if how == "second SIGTERM":
        time.sleep(0.5)
        os.killpg(busy.pid, signal.SIGTERM)
    assert busy.wait(timeout=20) == 4  # well before the job could have finished
    said = {
        "second SIGTERM": "second SIGTERM: exiting now",
        "shutdown timeout": "still busy 1s after SIGTERM: exiting now",
    }
    assert said[how] in open(busy.log_path).read()
    outcome = result.get(timeout=240)
    assert outcome["status"] == "done" and outcome["worker"] == spare.worker


@pytest.fixture
def tls_files(tmp_path) -> dict:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    folder = tmp_path / "tls"
    folder.mkdir()
    run = lambda *args: subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)  # noqa: E731
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
    )
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (folder / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
    )
    return {"cert": str(folder / "server.crt"), "key": str(folder / "server.key"), "ca": str(folder / "ca.crt")}


def test_redis_over_tls_with_a_password(fleet_env, start_worker, tmp_path, tls_files):
    with RedisServer(password="s3cret-pass", tls=tls_files) as redis:
        assert redis.url.startswith("rediss://:s3cret-pass@127.0.0.1:")
        env = {**fleet_env, "LORAFLEET_REDIS_URL": redis.url}
        worker = start_worker(env)
        result = submit_one({"prompt": "a cat over TLS", "seed": 1}, tmp_path, env, "--wait")
        assert result.returncode == 0, result.stdout + result.stderr
        stop_worker(worker)  # while its Redis is up


def test_submit_wait_sends_again_a_job_found_nowhere(fleet_env, start_worker, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": "a lost job", "seed": seed}) + "\n" for seed in (1, 2)))
    submit = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "submit", str(jobs), "--wait", "--batch", "lost"],
        env=fleet_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for(lambda: queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 2, 30, "two queued messages")
    client = redis_client.Redis.from_url(fleet_env["LORAFLEET_REDIS_URL"])
    client.delete(
        *queue_lists("render")
    )  # what kombu's Redis transport can do to a message in flight at a Redis restart
    client.close()
    start_worker(fleet_env)
    output, _ = submit.communicate(timeout=180)
    assert submit.returncode == 0, output[-3000:]
    assert output.count("was found nowhere 3 times: sending it again") == 2
    manifest = read_manifest(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "lost", "manifest.jsonl"))
    assert [e["status"] for e in manifest] == ["done", "done"]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stopped"])
def test_a_worker_lost_once_its_frames_are_rendered_leaves_one_whole_video(fast_leases, start_worker, how):
    """Killed or frozen after its last denoising step (decoding, encoding or uploading in the
    background): the job is delivered again and finished by the other worker; the store holds one
    whole video and no partial file; a frozen worker that wakes up writes nothing."""
    workers = [start_worker(fast_leases), start_worker(fast_leases)]
    job = {"prompt": "a paper boat", "seed": 8, "steps": 30, "num_frames": 49, "height": 96, "width": 96}
    result = app_for(fast_leases).send_task(TASK_NAME, args=[job])
    info = wait_for(lambda: (p := progress_of(result, fast_leases)) and p["step"] == p["steps"] and p, 120, "the last step")
    victim = next(w for w in workers if w.worker == info["worker"])
    survivor = next(w for w in workers if w is not victim)
    os.killpg(victim.pid, how)
    try:
        outcome = result.get(timeout=180)
    finally:
        if how == signal.SIGSTOP:
            os.killpg(victim.pid, signal.SIGCONT)
    assert outcome["status"] in ("done", "exists")
    time.sleep(3)  # a woken worker's late upload, if it made one, would land by now
    videos = os.path.join(fast_leases["LORAFLEET_STORE_URL"], "videos")
    # A write killed midway may leave its temporary name behind (".tmp-…"), never a half file under a real name.
    files = sorted(name for name in os.listdir(videos) if ".tmp-" not in name)
    key = outcome["key"]
    assert files == [f"{key}.json", f"{key}.mp4", f"{key}.png"], files
    assert decode_video(os.path.join(videos, f"{key}.mp4")).shape == (49, 96, 96, 3)
    assert json.load(open(os.path.join(videos, f"{key}.json")))["worker"] in (victim.worker, survivor.worker)
