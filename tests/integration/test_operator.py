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
