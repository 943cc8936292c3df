"""Priorities, pausing and cancelling one job, with a real worker and Redis."""

import json
import re
import time

import pytest

from tests.conftest import lorafleet
from tests.helpers import frozen

pytestmark = pytest.mark.integration


def write_jobs(path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def started(log_path: str) -> list[str]:
    """The labels of the jobs a worker started, in order."""
    return re.findall(r" started \(([^)]+)\), delivery", open(log_path).read())


def wait_for(condition, timeout_s: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def busy_worker(fleet_env, start_worker, tmp_path):
    """A worker that has just started a long job (id `busy`)."""
    worker = start_worker(fleet_env)
    busy = write_jobs(
        tmp_path / "busy.jsonl",
        [{"id": "busy", "prompt": "a long one", "seed": 1, "steps": 1000, "height": 64, "width": 64}],
    )
    assert lorafleet("submit", busy, "--batch", "busy", env=fleet_env).returncode == 0
    wait_for(lambda: started(worker.log_path) == ["busy"], what="the long job never started")
    return worker


def test_a_high_priority_job_starts_before_twenty_low_ones(fleet_env, start_worker, tmp_path):
    worker = busy_worker(fleet_env, start_worker, tmp_path)
    with frozen(worker):
        low = write_jobs(tmp_path / "low.jsonl", [{"id": f"low{i}", "prompt": "a cat", "seed": i} for i in range(20)])
        assert lorafleet("submit", low, "--batch", "low", "--priority", "low", env=fleet_env).returncode == 0
        urgent = write_jobs(tmp_path / "urgent.jsonl", [{"id": "urgent", "prompt": "a dog", "seed": 1}])
        assert lorafleet("submit", urgent, "--batch", "urgent", "--priority", "high", env=fleet_env).returncode == 0
        assert lorafleet("cancel", "busy", env=fleet_env).returncode == 0  # the worker is free from its next step
    done = lorafleet("wait", "low", "--timeout", "240", env=fleet_env)
    assert done.returncode == 0, done.stdout + done.stderr
    order = started(worker.log_path)
    assert order[:2] == ["busy", "urgent"] and sorted(order[2:]) == sorted(f"low{i}" for i in range(20)), order


def test_a_bad_priority_is_a_line_numbered_error(fleet_env, tmp_path):
    jobs = write_jobs(tmp_path / "bad.jsonl", [{"prompt": "a cat", "priority": "urgent"}])
    result = lorafleet("submit", jobs, env=fleet_env)
    assert result.returncode == 2
    assert "line 1: priority: must be one of 'high', 'normal' or 'low'" in result.stderr


def statuses(fleet_env, batch: str) -> dict[str, str]:
    result = lorafleet("status", batch, "--json", env=fleet_env)
    return {entry["id"]: entry["status"] for entry in json.loads(result.stdout)["entries"]}


def test_a_paused_batch_starts_nothing_until_resumed_and_running_jobs_finish(fleet_env, start_worker, tmp_path):
    worker = busy_worker(fleet_env, start_worker, tmp_path)
    with frozen(worker):  # still running once "later" is paused
        paused = lorafleet("pause", "busy", env=fleet_env)  # the running job finishes
        assert paused.returncode == 0 and "1 running job(s) finish" in paused.stdout
        later = write_jobs(
            tmp_path / "later.jsonl", [{"id": f"later{i}", "prompt": "a cat", "seed": i} for i in range(4)]
        )
        assert lorafleet("submit", later, "--batch", "later", env=fleet_env).returncode == 0
        paused = lorafleet("pause", "later", env=fleet_env)
        assert paused.returncode == 0 and "its 4 queued job(s) will not start" in paused.stdout, paused.stdout

    assert lorafleet("wait", "busy", "--timeout", "120", env=fleet_env).returncode == 0  # finished though paused
    wait_for(lambda: set(statuses(fleet_env, "later").values()) == {"paused"}, what="the jobs were not set aside")
    assert started(worker.log_path) == ["busy"]  # taken from the queue, set aside, not started
    assert lorafleet("wait", "later", "--timeout", "3", env=fleet_env).returncode == 7  # still waiting, not lost

    resumed = lorafleet("resume", "later", env=fleet_env)
    assert resumed.returncode == 0 and "4 job(s) set aside while paused are queued again" in resumed.stdout
    done = lorafleet("wait", "later", "--timeout", "120", env=fleet_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(started(worker.log_path)[1:]) == [f"later{i}" for i in range(4)]


def test_cancel_one_job_by_id_or_by_key_and_the_rest_render(fleet_env, start_worker, tmp_path):
    worker = busy_worker(fleet_env, start_worker, tmp_path)
    with frozen(worker):
        three = write_jobs(
            tmp_path / "three.jsonl", [{"id": name, "prompt": "a cat", "seed": i} for i, name in enumerate("abc")]
        )
        assert lorafleet("submit", three, "--batch", "three", env=fleet_env).returncode == 0
        queued = lorafleet("cancel", "three", "--job", "b", env=fleet_env)
        assert queued.returncode == 0 and "job b: cancelled 1 queued job(s)" in queued.stdout
        busy_key = json.loads(lorafleet("status", "busy", "--json", env=fleet_env).stdout)["entries"][0]["key"]
        running = lorafleet("cancel", "busy", "--job", busy_key[:10], env=fleet_env)  # the running one, by its key
        assert running.returncode == 0 and "1 running job(s) stop at their next step" in running.stdout
    assert lorafleet("wait", "three", "--timeout", "120", env=fleet_env).returncode == 1  # one was cancelled
    assert statuses(fleet_env, "three") == {"a": "done", "b": "cancelled", "c": "done"}
    assert statuses(fleet_env, "busy") == {"busy": "cancelled"}
    assert started(worker.log_path) == ["busy", "a", "c"]
    missing = lorafleet("cancel", "three", "--job", "zzz", env=fleet_env)
    assert missing.returncode == 2 and "batch three has no job with id zzz" in missing.stderr
