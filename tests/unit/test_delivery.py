"""The delivery's steps (workers/delivery.py) without torch or a worker process, as dramatiq's
StubBroker tests its workers: a stub task in place of RenderTask, and the real ledger on the test
run's redis-server. Each way a delivery can end gives one outcome: the exception Celery sees, one
metric, the delivery counted clean or not."""

import logging
from types import SimpleNamespace

import pytest
from celery.exceptions import Ignore, Retry

from common.errors import JobCancelled, LeaseLost, StoreError, WorkerLost
from common.job import Job
from common.leases import Ledger
from common.protocol import TaskState, deliveries_key
from workers.delivery import accounting, admit, count_delivery, progress_reporter
from workers.metrics import REGISTRY, Health

pytestmark = pytest.mark.unit
MESSAGE = {"prompt": "a cat", "seed": 1}


class StubTask:
    """What the delivery's steps use of a RenderTask: its worker's name, health, ledger, the
    Celery request, state updates and the project's retry."""

    worker = "stub@host"
    max_retries = 2

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.health = Health()
        self.request = SimpleNamespace(retries=0)
        self.states: list[tuple[str, dict]] = []

    def update_state(self, state: str, meta: dict) -> None:
        self.states.append((state, meta))

    def retry_later(self, exc: Exception) -> Retry:
        return Retry(exc=exc, when=1)


@pytest.fixture
def ledger(redis_url) -> Ledger:
    return Ledger(redis_url, lease_s=30, ttl_s=60)


def jobs_ended(outcome: str) -> float:
    return REGISTRY.get_sample_value("lorafleet_jobs_total", {"outcome": outcome}) or 0.0


def a_job(batch: str | None = "b1") -> Job:
    return Job(key="ab" * 32, prompt="a cat", lora_scale=1.0, seed=1, num_frames=9, height=16, width=16, steps=2,
               guidance_scale=6.0, use_dynamic_cfg=False, fps=8, fuse=True, batch=batch)  # fmt: skip


def test_a_job_is_started_set_aside_while_its_batch_is_paused_or_refused_when_cancelled(ledger):
    task, job = StubTask(ledger), a_job()
    with ledger.running("t1", MESSAGE, "render", task.worker) as lease:
        admit(task, lease, job, "t1", MESSAGE, "render")
        assert lease.batch == "b1"  # from here on its heartbeat watches the batch's cancel flag
    ledger.pause("b1")
    paused = jobs_ended("paused")
    with ledger.running("t2", MESSAGE, "render", task.worker) as lease, pytest.raises(Ignore):
        admit(task, lease, job, "t2", MESSAGE, "render")
    assert task.states == [(TaskState.PAUSED, {"key": job.key, "batch": "b1"})] and jobs_ended("paused") == paused + 1
    assert [entry.task_id for entry in ledger.resume("b1")] == ["t2"]
    ledger.cancel("b1")
    with ledger.running("t3", MESSAGE, "render", task.worker) as lease, pytest.raises(JobCancelled, match="batch b1"):
        admit(task, lease, job, "t3", MESSAGE, "render")


def test_a_job_whose_workers_die_under_it_is_failed_after_max_deliveries(ledger):
    assert [count_delivery(ledger, "t1", max_deliveries=3) for _ in range(3)] == [1, 2, 3]
    with pytest.raises(WorkerLost, match="worker lost 3 times"):
        count_delivery(ledger, "t1", max_deliveries=3)


@pytest.mark.parametrize(
    "raised, seen, outcome",
    [
        (None, None, None),
        (Ignore(), Ignore, None),
        (LeaseLost("another delivery holds this job"), Ignore, "lease_lost"),
        (StoreError("cannot write s3://b/videos/x.mp4"), Retry, "retried"),
        (JobCancelled("the job was cancelled"), JobCancelled, "cancelled"),
        (ValueError("a bug"), ValueError, "failed"),
    ],
    ids=["done", "ignored", "lease lost", "store trouble", "cancelled", "unexpected"],
)
def test_accounting_turns_each_ending_into_one_outcome(ledger, caplog, raised, seen, outcome):
    task = StubTask(ledger)
    before = jobs_ended(outcome) if outcome else None
    ledger.count_delivery("t1")
    task.health.set_job({"key": "k", "since": 1.0})
    with caplog.at_level(logging.INFO):
        if seen is None:
            with accounting(task, "t1") as ending:
                ending.key = "ab" * 32
        else:
            with pytest.raises(seen), accounting(task, "t1") as ending:
                ending.key = "ab" * 32
                raise raised
    if outcome:
        assert jobs_ended(outcome) == before + 1
    assert task.health.job is None  # the heartbeat says the worker is free again
    assert not ledger.redis.exists(deliveries_key("t1"))  # however it ended, its worker was not lost
    assert ("Traceback" in caplog.text) == (outcome == "failed")  # only the unexpected with a traceback
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert bool(errors) == (outcome == "failed")  # a cancel is what someone asked for: logged, not an error


def test_a_delivery_handed_to_the_upload_leaves_the_count_to_it(ledger):
    task = StubTask(ledger)
    ledger.count_delivery("t1")
    with accounting(task, "t1") as ending:
        ending.handed_off = True
    assert ledger.redis.exists(deliveries_key("t1"))  # the upload reports the job's end


def test_progress_stops_a_cancelled_render_at_its_next_step_and_says_its_pace(ledger):
    task = StubTask(ledger)
    task.health.set_job({"key": "k", "since": 1.0})
    with ledger.running("t1", MESSAGE, "render", task.worker) as lease:
        progress = progress_reporter(lease, task.health)
        progress(1, 4)
        progress(2, 4)
        assert task.health.job["step"] == 2 and task.health.job["steps"] == 4 and task.health.job["step_s"] >= 0
        lease.cancel("the job")
        with pytest.raises(JobCancelled, match=r"the job was cancelled \(stopped at step 3 of 4\)"):
            progress(3, 4)
        lease.lost.set()
        with pytest.raises(LeaseLost):
            progress(3, 4)
