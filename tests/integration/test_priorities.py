"""Priorities, pausing and cancelling one job, with a real worker and Redis."""

import json
import re
import time

import pytest

from tests.conftest import lorafleet

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


def busy_worker(fleet_env, start_worker, tmp_path, steps: int = 1000):
    """A worker that has just started a long job (id `busy`)."""
    worker = start_worker(fleet_env)
    busy = write_jobs(
        tmp_path / "busy.jsonl",
        [{"id": "busy", "prompt": "a long one", "seed": 1, "steps": steps, "height": 64, "width": 64}],
    )
    assert lorafleet("submit", busy, "--batch", "busy", env=fleet_env).returncode == 0
    wait_for(lambda: started(worker.log_path) == ["busy"], what="the long job never started")
    return worker


def test_a_high_priority_job_starts_before_twenty_low_ones(fleet_env, start_worker, tmp_path):
    worker = busy_worker(fleet_env, start_worker, tmp_path)
    low = write_jobs(tmp_path / "low.jsonl", [{"id": f"low{i}", "prompt": "a cat", "seed": i} for i in range(20)])
    assert lorafleet("submit", low, "--batch", "low", "--priority", "low", env=fleet_env).returncode == 0
    urgent = write_jobs(tmp_path / "urgent.jsonl", [{"id": "urgent", "prompt": "a dog", "seed": 1}])
    assert lorafleet("submit", urgent, "--batch", "urgent", "--priority", "high", env=fleet_env).returncode == 0
    assert started(worker.log_path) == ["busy"], "the long job ended before the test could queue behind it"
    done = lorafleet("wait", "low", "--timeout", "240", env=fleet_env)
    assert done.returncode == 0, done.stdout + done.stderr
    order = started(worker.log_path)
    assert order[:2] == ["busy", "urgent"] and sorted(order[2:]) == sorted(f"low{i}" for i in range(20)), order


def test_a_bad_priority_is_a_line_numbered_error(fleet_env, tmp_path):
    jobs = write_jobs(tmp_path / "bad.jsonl", [{"prompt": "a cat", "priority": "urgent"}])
    result = lorafleet("submit", jobs, env=fleet_env)
    assert result.returncode == 2
    assert "line 1: priority: must be one of 'high', 'normal' or 'low'" in result.stderr
