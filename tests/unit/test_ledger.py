"""The ledger against the test run's redis-server, without torch: records any client can write
are read through their models (a malformed one skipped, logged once), and the lease sweeper
survives whatever one round raises."""

import json
import logging
import threading
import time

import pytest
from kombu.exceptions import OperationalError

from common.errors import JobCancelled, LeaseLost
from common.leases import Admission, Ledger, RunningEntry, run_cancel_listener, run_sweeper
from common.protocol import CANCELS, RUNNING, worker_key

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


GOOD_BEAT = {"worker": "w", "queue": "render", "since": 1.0, "beat": 2.0}
GOOD_JOB = {"key": "ab" * 32, "since": 2.0, "step": 3, "steps": 10, "step_s": 0.5}
GOOD_PACE = {"pixels": 9 * 16 * 16, "step_s": 0.5, "other_s": 1.0}


@pytest.mark.parametrize(
    "record",
    [
        {**GOOD_BEAT, "since": float("nan")},
        {**GOOD_BEAT, "beat": float("inf")},
        {**GOOD_BEAT, "since": -1.0},
        {**GOOD_BEAT, "job": {**GOOD_JOB, "since": float("nan")}},
        {**GOOD_BEAT, "job": {**GOOD_JOB, "step": -1}},
        {**GOOD_BEAT, "job": {**GOOD_JOB, "steps": 0}},
        {**GOOD_BEAT, "job": {**GOOD_JOB, "step_s": float("nan")}},
        {**GOOD_BEAT, "pace": {**GOOD_PACE, "pixels": 0}},
        {**GOOD_BEAT, "pace": {**GOOD_PACE, "step_s": float("inf")}},
        {**GOOD_BEAT, "pace": {**GOOD_PACE, "other_s": -2.0}},
    ],
    ids=[
        "since NaN", "beat infinite", "since negative", "job since NaN", "step negative", "no steps",
        "step_s NaN", "pace of 0 pixels", "pace step_s infinite", "pace other_s negative",
    ],
)  # fmt: skip
def test_a_heartbeat_with_a_number_out_of_range_is_skipped_as_malformed(ledger, record):
    """Every number read back from Redis is finite and in range, or its record is skipped: a NaN
    `since` made `top --json` exit 1, a pace of 0 pixels divided `sweep --estimate` by zero."""
    ledger.redis.set(worker_key("good"), json.dumps({**GOOD_BEAT, "worker": "good", "job": GOOD_JOB, "pace": GOOD_PACE}))
    ledger.redis.set(worker_key("bad"), json.dumps(record))  # json writes NaN and Infinity as JavaScript does
    assert [record.worker for record in ledger.live_workers()] == ["good"]


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


def test_admission_sets_a_paused_batchs_job_aside_and_refuses_a_cancelled_one(ledger):
    message = {"prompt": "a cat", "seed": 1}
    assert ledger.admit("b1", "t1", message, "render") == Admission.GO
    assert ledger.admit(None, "t1", message, "render") == Admission.GO
    ledger.pause("b1")
    assert ledger.admit("b1", "t2", message, "render") == Admission.SET_ASIDE
    assert [job.task_id for job in ledger.resume("b1")] == ["t2"]  # sent again on resume
    assert ledger.admit("b1", "t3", message, "render") == Admission.GO  # resumed: nothing set aside any more
    ledger.cancel("b1", ["t4"])
    assert ledger.admit("b1", "t4", message, "render") == Admission.JOB_CANCELLED
    assert ledger.admit(None, "t4", message, "render") == Admission.JOB_CANCELLED
    assert ledger.admit("b1", "t5", message, "render") == Admission.GO
    ledger.cancel("b1")
    assert ledger.admit("b1", "t5", message, "render") == Admission.BATCH_CANCELLED


def test_a_lease_is_fenced_its_extension_compares_the_token_and_reads_the_cancel_flags(ledger):
    with ledger.running("t1", {"prompt": "x"}, "render", "w") as lease:
        lease.watch_cancel("b2")
        time.sleep(0.3)  # extended every lease_s / 3 while the token is ours
        lease.check()
        lease.confirm()
        assert ledger.redis.pttl(lease.name) > 0
        ledger.redis.set("lorafleet:cancelled:b2", 1)  # a flag whose notice was missed
        wait_until(lambda: lease.cancelled == "batch b2")
        with pytest.raises(JobCancelled, match="batch b2 was cancelled at step 3"):
            lease.check_cancelled(" at step 3")
        ledger.redis.set(lease.name, "another delivery's token")  # taken over while this one was paused
        wait_until(lambda: lease.lost.is_set())
        with pytest.raises(LeaseLost):
            lease.check()
        with pytest.raises(LeaseLost):
            lease.confirm()
    # Released only while ours: the delivery that took the job over keeps its lease.
    assert ledger.redis.get(lease.name) == b"another delivery's token"


def test_a_cancel_notice_stops_the_running_job_it_names_at_once(redis_url):
    ledger = Ledger(redis_url, lease_s=600, ttl_s=60)  # its extension would find a flag only in 200 s
    stop = threading.Event()
    listener = threading.Thread(target=run_cancel_listener, args=(ledger, stop, "w"), daemon=True)
    listener.start()
    try:
        with ledger.running("t1", {}, "render", "w") as one, ledger.running("t2", {}, "render", "w") as two:
            one.watch_cancel("b3")
            two.watch_cancel("b3")
            ledger.redis.publish(CANCELS, b"{not json")  # anyone can publish: skipped
            time.sleep(0.2)  # subscribed by now
            ledger.cancel("b3", ["t2"])
            wait_until(lambda: two.cancelled == "the job")
            assert one.cancelled is None
            ledger.cancel("b3")
            wait_until(lambda: one.cancelled == "batch b3")
    finally:
        stop.set()
        listener.join(timeout=5)


def wait_until(predicate, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_malformed_set_aside_entry_is_skipped_on_resume_and_the_rest_come_back(ledger, caplog):
    """Anyone who can write to Redis can push to a paused batch's set-aside list: `resume` once
    indexed each entry as it found it, and one malformed entry crashed it."""
    from common.protocol import set_aside_key

    message = {"prompt": "a cat", "seed": 1}
    ledger.pause("b2")
    assert ledger.admit("b2", "t1", message, "render") == Admission.SET_ASIDE
    ledger.redis.rpush(set_aside_key("b2"), b"{oops", json.dumps({"task_id": "t9"}), "[]")
    assert ledger.admit("b2", "t2", message, "render") == Admission.SET_ASIDE
    with caplog.at_level(logging.WARNING):
        assert [(job.task_id, job.queue, job.message) for job in ledger.resume("b2")] == [
            ("t1", "render", message), ("t2", "render", message),
        ]  # fmt: skip
    assert caplog.text.count("skipped a malformed SetAside record") == 3
