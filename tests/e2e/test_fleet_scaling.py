"""benchmarks/fleet_scaling.py in its CPU mode, so the script that measures GPU fleets keeps working:
`lorafleet workers --cpus N` supervisors render a 32-job sweep, and a worker killed mid-render is
restarted and its job finished."""

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import decode_video, read_manifest

pytestmark = pytest.mark.e2e


def test_fleet_scaling_runs_on_cpu_workers(tmp_path, redis_server):  # redis_server: skip where none can start
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, "benchmarks/fleet_scaling.py", "--device", "cpu", "--workers", "1", "2", "--work", str(work)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    table = dict(
        (cells[0], cells[1:])
        for cells in (line.strip("| ").split(" | ") for line in result.stdout.splitlines() if line.startswith("| "))
    )
    assert table["metric"] == ["1 worker(s)", "2 worker(s)"]
    assert table["jobs"] == ["32", "32"]
    assert table["jobs per worker"][0] == "32"
    shares = [int(n) for n in table["jobs per worker"][1].split("/")]
    assert len(shares) == 2 and min(shares) > 0 and sum(shares) == 32  # both workers took jobs, none twice
    assert float(table["jobs/h over 1 worker(s)"][0]) == 1
    assert "killed worker: restarted by the supervisor, its job finished: yes" in result.stdout

    for count in (1, 2):
        manifest = read_manifest(os.path.join(work, f"store-{count}", "batches", f"scale-{count}", "manifest.jsonl"))
        assert [entry["status"] for entry in manifest] == ["done"] * 32
        assert decode_video(manifest[-1]["video"]).shape[0] == 9  # the tiny model's 9 frames
    supervisor_log = open(work / "workers-2.log").read()
    threads = os.environ.get("OMP_NUM_THREADS") or max(1, os.cpu_count() // 2)  # the cores, shared out
    assert f"started 2 worker(s), {threads} CPU thread(s) each" in supervisor_log
    killed = re.search(r"killed (cpu\d) \(pid (\d+)\)", result.stderr).group(1)
    assert f"{killed} worker died (code -9); restart 1" in supervisor_log
    kill_batch = read_manifest(os.path.join(work, "store-2", "batches", "kill", "manifest.jsonl"))
    assert [entry["status"] for entry in kill_batch] == ["done", "done"]
