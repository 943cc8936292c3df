"""The operator's day: what a worker and the batch commands say when things are missing."""

import json
import os
import time

import pytest

from lorafleet.redis_server import free_port
from tests.conftest import lorafleet
from tests.helpers import queued_messages
from workers.supervisor import spawn_worker, stop_worker

pytestmark = pytest.mark.integration


def test_a_worker_is_not_ready_until_its_broker_answers(fleet_env, tmp_path):
    env = {**fleet_env, "LORAFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # nobody listens there
    log_path = tmp_path / "worker.log"
    worker = spawn_worker(["--device", "cpu"], env, str(log_path))
    try:
        deadline = time.monotonic() + 60
        while "connecting to the broker" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(8)
        log = log_path.read_text()
        assert "model loaded" in log and "READY" not in log, log[-2000:]
        assert worker.poll() is None  # it waits for Redis rather than dying
    finally:
        stop_worker(worker, timeout_s=10)


def test_cancel_with_no_worker_cancels_the_queued_jobs_at_once(fleet_env, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": "a cat", "seed": seed}) + "\n" for seed in range(3)))
    assert lorafleet("submit", str(jobs), "--batch", "nobody", env=fleet_env).returncode == 0
    cancelled = lorafleet("cancel", "nobody", env=fleet_env)
    assert cancelled.returncode == 0 and "cancelled 3 queued job(s)" in cancelled.stdout, cancelled.stdout
    status = lorafleet("status", "nobody", "--json", env=fleet_env)
    assert json.loads(status.stdout)["counts"]["cancelled"] == 3
    assert status.returncode == 1  # as `wait` ends on a batch with cancelled jobs (README: exit codes)
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 3  # still queued: a worker will skip them


def test_status_with_redis_down_shows_the_recorded_states_and_says_so(fleet_env, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a cat", "seed": 1}) + "\n")
    assert lorafleet("submit", str(jobs), "--batch", "offline", env=fleet_env).returncode == 0
    down = {**fleet_env, "LORAFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    status = lorafleet("status", "offline", env=down)
    assert status.returncode == 3, status.stdout + status.stderr
    assert "Redis is unreachable: the states below are as last recorded" in status.stdout
    assert "batch offline: 0 done, 0 running, 1 queued" in status.stdout
    assert "cannot use Redis at redis://127.0.0.1:" in status.stderr


def test_every_problem_of_a_line_is_reported_in_one_run(fleet_env, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"prompt": "a cat", "steps": "30", "adapters": ["no/such-adapter"]})
        + "\n"
        + json.dumps({"prompt": "a dog", "lora_sacle": 1})
        + "\n"
    )
    result = lorafleet("submit", str(jobs), env=fleet_env)
    assert result.returncode == 2
    errors = result.stderr.splitlines()[1:]
    assert errors[0] == 'line 1: steps: must be an integer, got "30"'
    assert errors[1].startswith('line 1: adapter "no/such-adapter" not found')
    assert errors[2] == 'line 2: unknown field "lora_sacle" (did you mean "lora_scale"?)'
    assert not os.path.exists(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches"))


def test_the_k8s_redis_takes_its_password_from_config_not_argv(tmp_path):
    """deploy/k8s/redis.yaml's own start script, run by a POSIX sh: clients need the Secret's
    password, and no process's argv shows it (its readiness probe's neither)."""
    import subprocess

    import redis
    import yaml

    from lorafleet.redis_server import find_redis_server
    from tests.conftest import REPO

    (statefulset, _) = yaml.safe_load_all(open(os.path.join(REPO, "deploy", "k8s", "redis.yaml")))
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    port, password = free_port(), "s3cret-from-the-secret"
    # Here, not in a pod: a free port instead of 6379, a temporary folder instead of the volume.
    script = container["command"][-1].replace("redis-server - ", f"redis-server - --port {port} ")
    script = script.replace("--dir /data", f"--dir {tmp_path}")
    env = {
        "PATH": f"{os.path.dirname(find_redis_server())}:{os.environ['PATH']}",
        "REDIS_PASSWORD": password,
    }
    server = subprocess.Popen([*container["command"][:-1], script], env=env, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and server.poll() is None
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port).ping()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        argv = open(f"/proc/{server.pid}/cmdline", "rb").read()
        assert password.encode() not in argv and b"redis-server" in argv  # exec'd: the server is the pod's process
        probe = container["readinessProbe"]["exec"]["command"]
        assert password not in " ".join(probe)
        probe = [*probe[:-1], probe[-1].replace("redis-cli ping", f"redis-cli -p {port} ping")]
        assert subprocess.run(probe, env=env, capture_output=True).returncode == 0  # REDISCLI_AUTH, not -a
        probe_without = subprocess.run(probe, env={**env, "REDIS_PASSWORD": "wrong"}, capture_output=True)
        assert probe_without.returncode != 0
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_lorafleet_redis_keeps_other_local_users_out(tmp_path):
    """`lorafleet redis` (the README's own fleet): a generated password, in the URL it prints and in
    no process's argv, and a data folder only its owner can enter."""
    import stat

    import redis

    folder = tmp_path / "redis"
    started = lorafleet("redis", "--dir", str(folder), env=dict(os.environ))
    assert started.returncode == 0, started.stderr
    try:
        url = started.stdout.split()[1].removeprefix("LORAFLEET_REDIS_URL=")
        password = redis.connection.parse_url(url)["password"]
        assert len(password) >= 20, url
        assert redis.Redis.from_url(url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url.replace(f":{password}@", "")).ping()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        pid = int((folder / "redis.pid").read_text())
        assert password.encode() not in open(f"/proc/{pid}/cmdline", "rb").read()
        again = lorafleet("redis", "--dir", str(folder), env=dict(os.environ))  # the same server, the same URL
        assert again.stdout == started.stdout
    finally:
        lorafleet("redis", "--dir", str(folder), "--stop", env=dict(os.environ))


def test_a_worker_without_device_on_a_host_without_gpu_refuses_to_start(fleet_env):
    """It would take GPU jobs at CPU speed: it says how to ask for a CPU worker instead."""
    started = time.monotonic()
    done = lorafleet("worker", env={**fleet_env, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no GPU is visible to torch here: pass --device cpu to run a CPU worker" in done.stderr
    assert " ready." not in done.stdout + done.stderr and time.monotonic() - started < 60


@pytest.mark.parametrize(
    "command",
    [
        ["health"],
        ["cancel", "b"],
        ["pause", "b"],
        ["resume", "b"],
        ["retry", "b"],
        ["wait", "b"],
        ["status", "b"],
        ["submit", "JOBS"],
        ["top", "--once"],
        ["prune", "--older-than", "1d"],
        ["sweep", "examples/sweep.yaml", "--estimate"],
    ],  # fmt: skip
    ids=lambda command: command[0],
)
def test_every_command_that_talks_to_redis_gives_up_in_seconds_when_it_is_down(fleet_env, tmp_path, command):
    """Exit 3 and one line within 5 s (they once retried for 77 s); `prune --dry-run` needs only the store."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat", "seed": 1}\n')
    assert lorafleet("submit", str(jobs), "--batch", "b", env=fleet_env).returncode == 0  # a batch to name
    down = {**fleet_env, "LORAFLEET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    started = time.monotonic()
    done = lorafleet(*[str(jobs) if word == "JOBS" else word for word in command], env=down, timeout=60)
    took = time.monotonic() - started
    assert done.returncode == 3, done.stdout + done.stderr
    assert "cannot use Redis at redis://127.0.0.1:" in done.stderr and "Traceback" not in done.stderr
    assert took < 5, f"{command[0]} took {took:.1f}s"
    if command[0] == "prune":  # a dry run removes nothing, so it needs no store lock
        dry = lorafleet("prune", "--older-than", "1d", "--dry-run", env=down, timeout=60)
        assert dry.returncode == 0 and "would remove 0 batch(es)" in dry.stdout, dry.stdout + dry.stderr


def check_prune(env: dict, store) -> None:
    """Two batches sharing a key, the older one pruned: the shared video stays, the other goes; a dry
    run removes nothing; an old batch with a queued job is kept. Through `lorafleet prune`, as a user runs it."""
    from tests.helpers import plant_batch

    old, shared, new = "a" * 64, "b" * 64, "c" * 64
    plant_batch(store, "old", [old, shared])
    plant_batch(store, "busy", ["d" * 64], status="queued")
    time.sleep(1.1)  # the store's times are in whole seconds
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    time.sleep(1.1)
    plant_batch(store, "new", [shared, new])
    assert lorafleet("prune", "--older-than", "soon", env=env).returncode == 2
    dry = lorafleet("prune", "--before", cutoff, "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert (
        "would remove 1 batch(es) and" in dry.stdout and "kept 1 video(s) a newer batch also references" in dry.stdout
    )
    assert store.exists(f"videos/{old}.mp4") and store.exists("batches/old/manifest.jsonl")
    done = lorafleet("prune", "--before", cutoff, env=env)
    assert done.returncode == 0, done.stderr
    assert "kept batch busy: it has unfinished jobs" in done.stdout
    assert f"removed {store.uri(f'videos/{old}.mp4')}" in done.stdout and "MiB" in done.stdout
    assert not store.exists(f"videos/{old}.mp4") and not store.exists(f"videos/{old}.json")
    assert not store.exists("batches/old/manifest.jsonl") and "old" not in store.list_folder("batches")
    assert all(store.exists(f"videos/{key}.mp4") for key in (shared, new, "d" * 64))
    assert store.exists("batches/new/manifest.jsonl") and store.exists("batches/busy/manifest.jsonl")


def test_prune_removes_old_batches_and_only_the_videos_no_other_batch_needs(fleet_env):
    from common.store import Store

    check_prune(fleet_env, Store(fleet_env["LORAFLEET_STORE_URL"]))


def test_top_shows_the_running_job_its_step_and_its_batch(fleet_env, start_worker, tmp_path):
    worker = start_worker(fleet_env)
    jobs = tmp_path / "long.jsonl"
    jobs.write_text('{"prompt": "a long cat", "seed": 3, "steps": 1000, "height": 256, "width": 256}\n')
    jobs_low = tmp_path / "low.jsonl"
    jobs_low.write_text('{"prompt": "a later cat", "seed": 4}\n')
    assert lorafleet("submit", str(jobs), "--batch", "watched", env=fleet_env).returncode == 0
    assert lorafleet("submit", str(jobs_low), "--priority", "low", "--batch", "later", env=fleet_env).returncode == 0
    assert lorafleet("pause", "later", env=fleet_env).returncode == 0
    key = read_manifest_key(fleet_env, "watched")
    deadline, fleet = time.monotonic() + 60, {}
    while time.monotonic() < deadline:  # the heartbeat carries the step every 5 s
        shown = lorafleet("top", "--json", env=fleet_env)
        assert shown.returncode == 0, shown.stderr
        fleet = json.loads(shown.stdout)
        jobs_now = [w["job"] for w in fleet["workers"] if w["job"]]
        if jobs_now and jobs_now[0].get("step"):
            break
        time.sleep(0.5)
    (seen,) = fleet["workers"]
    assert seen["worker"] == worker.worker and seen["device"].startswith("cpu") and seen["tier"] == "float32"
    assert seen["job"]["key"] == key and seen["job"]["batch"] == "watched" and 0 < seen["job"]["step"] <= 1000
    assert seen["job"]["steps"] == 1000 and seen["job"]["step_s"] > 0
    assert fleet["queues"]["render"]["by_priority"]["low"] == 1 and fleet["paused"] == ["later"]
    (batch,) = fleet["batches"]
    assert batch["name"] == "watched" and batch["counts"] == {"running": 1} and batch["eta_s"] is None
    once = lorafleet("top", "--once", env=fleet_env)
    assert once.returncode == 0 and key[:12] in once.stdout and "watched" in once.stdout
    assert "paused batches: later" in once.stdout
    check_top_fits(fleet, key, width=80)  # a laptop's terminal
    check_top_fits(fleet, key, width=60)
    as_before = lorafleet("--json", "top", "--once", env=fleet_env)  # --json before the name, as -v goes
    assert as_before.returncode == 0 and json.loads(as_before.stdout)["paused"] == ["later"]
    refused = lorafleet("--json", "pause", "watched", env=fleet_env)
    assert refused.returncode == 2 and "this command prints no JSON" in refused.stderr
    assert lorafleet("cancel", "watched", env=fleet_env).returncode == 0
    log = open(worker.log_path).read()  # a bf16 worker imports no torchao, so it says nothing of it
    assert "torchao" not in log and "Failed to load" not in log


def check_top_fits(fleet: dict, key: str, width: int) -> None:
    """The table a terminal shows: within its width, the job, batch and step whole, nothing folded."""
    from rich.console import Console

    from producer.top import render

    terminal = Console(width=width, record=True, file=open(os.devnull, "w"))
    terminal.print(render(fleet, width))
    shown = terminal.export_text().splitlines()
    assert max(map(len, shown)) <= width, "\n".join(shown)
    (row,) = [line for line in shown if key[:12] in line]
    step = fleet["workers"][0]["job"]["step"]
    assert "watched" in row and f"{step}/1000" in row, "\n".join(shown)


def read_manifest_key(env: dict, batch: str) -> str:
    (entry,) = [
        json.loads(line) for line in open(os.path.join(env["LORAFLEET_STORE_URL"], "batches", batch, "manifest.jsonl"))
    ]
    return entry["key"]


def test_ctrl_c_on_submit_wait_says_the_jobs_stay_queued(fleet_env, tmp_path):
    import signal
    import subprocess
    import sys

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat", "seed": 1}\n')
    waiting = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "submit", str(jobs), "--batch", "ctrl-c", "--wait"],
        env=fleet_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    first = waiting.stdout.readline()  # enqueued: now waiting (no worker)
    assert "batch ctrl-c: 1 jobs, 1 enqueued" in first
    time.sleep(1)
    waiting.send_signal(signal.SIGINT)
    rest = waiting.communicate(timeout=30)[0]
    assert waiting.returncode == 130
    assert "interrupted: the jobs of batch ctrl-c stay queued" in rest and "lorafleet wait ctrl-c" in rest
    assert "Traceback" not in rest and queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 1


def test_a_worker_with_a_wrong_model_path_says_so_before_importing_torch(fleet_env, tmp_path):
    started = time.monotonic()
    env = {**fleet_env, "LORAFLEET_MODEL": str(tmp_path / "no-such-model")}
    done = lorafleet("worker", "--device", "cpu", env=env, timeout=120)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "cannot start" in done.stderr and "no-such-model" in done.stderr
    assert "importing torch" not in done.stderr and time.monotonic() - started < 5  # it took 17.7 s on a GPU host
