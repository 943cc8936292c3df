"""A 50-job batch on three CPU workers while a seeded script kills workers and restarts Redis.

Afterwards: 50 videos, 50 manifest lines done, and no key rendered twice, counted from the
workers' own render records (their log lines). The figures are printed (run with -s to see them).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from lorafleet.redis_server import RedisServer
from tests.helpers import decode_video, read_manifest, render_records, wait_for
from workers.supervisor import spawn_worker, stop_worker

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]
JOBS = 50
SEED = 20261128
MAX_KILLS = 6
MAX_REDIS_RESTARTS = 2


def test_fifty_jobs_survive_killed_workers_and_redis_restarts(fleet_env, start_worker, tmp_path):
    rng = random.Random(SEED)
    redis = RedisServer(directory=str(tmp_path / "redis"), appendonly=True)
    os.makedirs(redis.directory)
    redis.start()
    workers = []
    try:
        env = {
            **fleet_env,
            "LORAFLEET_REDIS_URL": redis.url,
            "LORAFLEET_LEASE_S": "3",
            "LORAFLEET_MAX_DELIVERIES": "20",  # random kills may hit one job often: it must still finish
            "PYTHONUNBUFFERED": "1",  # a killed worker's render records are on disk up to its last line
        }
        jobs = tmp_path / "jobs.jsonl"
        jobs.write_text(
            "".join(
                json.dumps(
                    {
                        "id": f"job{i}",
                        "prompt": "waves crash against dark rocks",
                        "seed": i,
                        "steps": 300,  # about 1 s a job: the batch outlasts the faults
                        "height": 32,
                        "width": 32,
                    }
                )
                + "\n"
                for i in range(JOBS)
            )
        )
        workers.extend(start_worker(env, f"w{i}") for i in range(3))
        logs = [w.log_path for w in workers]
        submit = subprocess.Popen(
            [sys.executable, "-m", "lorafleet", "submit", str(jobs), "--wait", "--batch", "chaos"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # The faults begin once the batch is enqueued and a job runs: a Redis restart before that
        # would fail the submit itself (it reports Redis unreachable, enqueueing nothing it cannot).
        wait_for(lambda: any(" started (" in open(p).read() for p in logs if os.path.exists(p)), 120, "a first job")
        kills = restarts = 0
        plan = rng.sample(["kill"] * MAX_KILLS + ["redis"] * MAX_REDIS_RESTARTS, MAX_KILLS + MAX_REDIS_RESTARTS)
        for action in plan:
            time.sleep(rng.uniform(1.0, 3.0))
            assert submit.poll() is None, "the batch ended before the faults did: make its jobs longer"
            if action == "kill":
                victim = rng.choice(workers)
                os.killpg(victim.pid, signal.SIGKILL)
                victim.wait()
                kills += 1
                workers.remove(victim)
                # Its replacement is not waited for: the next fault may find it starting up.
                logs.append(str(tmp_path / f"w{len(logs)}.log"))
                workers.append(spawn_worker(["--device", "cpu"], env, logs[-1]))
            else:
                redis.stop()
                time.sleep(rng.uniform(0.5, 2.0))
                redis.start()
                restarts += 1
        output, _ = submit.communicate(timeout=300)
        manifest = read_manifest(os.path.join(env["LORAFLEET_STORE_URL"], "batches", "chaos", "manifest.jsonl"))
        done = [e for e in manifest if e["status"] == "done"]
        records = render_records(logs)
        twice = {k: n for k, n in records.items() if n > 1}
        print(
            f"\nfaults: {JOBS} jobs, {kills} workers killed, {restarts} Redis restarts, "
            f"{JOBS - len(done)} lost, {len(twice)} rendered twice, {sum(records.values())} render records"
        )
        assert submit.returncode == 0, output[-3000:]
        assert len(done) == JOBS and kills == MAX_KILLS and restarts == MAX_REDIS_RESTARTS
        assert len({e["key"] for e in done}) == JOBS
        assert all(decode_video(e["video"]).shape == (9, 32, 32, 3) for e in done)
        assert twice == {}, twice
    finally:
        for worker in workers:  # told while their Redis is up: a warm shutdown without it waits out its timeout
            worker.terminate()
        for worker in workers:
            stop_worker(worker)
        redis.stop()
