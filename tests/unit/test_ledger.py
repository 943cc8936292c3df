"""The ledger against the test run's redis-server, without torch: records any client can write
are read through their models (a malformed one skipped, logged once), and the lease sweeper
survives whatever one round raises."""

import json
import logging
import threading

import pytest
from kombu.exceptions import OperationalError

from common.leases import Ledger, RunningEntry, run_sweeper
from common.protocol import RUNNING, worker_key

pytestmark = pytest.mark.unit


@pytest.fixture
def ledger(redis_url) -> Ledger:
    return Ledger(redis_url, lease_s=0.2, ttl_s=60)


def test_lapsed_jobs_are_claimed_and_malformed_entries_skipped_not_lost(ledger, caplog):
    good = {"message": {"prompt": "a cat"}, "queue": "render", "worker": "gone@host"}
    ledger.redis.hset(
        RUNNING,
        mapping={"good": json.dumps(good), "not-json": b"{oops", "no-fields": json.dumps({"queue": 1}), "list": "[]"},
    )
    with caplog.at_level(logging.WARNING):
        assert ledger.lapsed() == [("good", RunningEntry(**good))]
        assert ledger.lapsed() == []  # claimed once; the malformed ones are left, logged once each
    assert sorted(k.decode() for k in ledger.redis.hkeys(RUNNING)) == ["list", "no-fields", "not-json"]
    assert caplog.text.count("skipped a malformed RunningEntry record lorafleet:running[not-json]") == 1
    assert ledger.running_queues() == []


def test_a_malformed_heartbeat_is_skipped(ledger):
    ledger.beat("gpu0@host", "render", since=1.0, doing={"job": {"key": "ab" * 32, "since": 2.0}})
    ledger.redis.set(worker_key("forged"), json.dumps({"worker": "forged", "queue": "render"}))  # no since
    ledger.redis.set(worker_key("junk"), b"\xff\xfe")
    (live,) = ledger.live_workers()
    assert live.worker == "gpu0@host" and live.job.key == "ab" * 32


def test_the_sweeper_survives_a_failing_round_and_requeues_on_the_next(ledger):
    entry = {"message": {"prompt": "a cat"}, "queue": "render", "worker": "gone@host"}
    requeued, stop = [], threading.Event()

    def requeue(task_id, found):
        requeued.append(task_id)
        if len(requeued) == 1:
            ledger.redis.hset(RUNNING, task_id, json.dumps(entry))  # as if it were never claimed
            raise OperationalError("Redis blipped while kombu published")  # killed the thread before

    ledger.redis.hset(RUNNING, "job-1", json.dumps(entry))
    sweeper = threading.Thread(target=run_sweeper, args=(ledger, requeue, stop, "gpu0@host"), daemon=True)
    sweeper.start()
    deadline = threading.Event()
    for _ in range(100):
        if len(requeued) >= 2:
            break
        deadline.wait(0.05)
    stop.set()
    sweeper.join(timeout=5)
    assert requeued == ["job-1", "job-1"]


def test_a_dead_sweeper_stops_its_worker():
    class Broken(threading.Event):
        def wait(self, timeout=None):
            raise RuntimeError("the loop itself broke")

    told = []
    with pytest.raises(RuntimeError):
        run_sweeper(Ledger("redis://127.0.0.1:1/0", 1, 1), lambda *_: None, Broken(), "w", on_death=lambda: told.append(1))
    assert told == [1]
