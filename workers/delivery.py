"""One delivery of a `lorafleet.render` message, as small steps the task takes in order
(workers/tasks.py), each a function or a context manager over the ledger in Redis
(common/leases/):

    lease → count the delivery → check the message → admit (pause, cancel) → key lock → render → fence

and `accounting`, which turns however a delivery ended into one metric, one log line and the
exception Celery should see. Each step raises to stop the delivery; none knows of the others.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis
from celery.exceptions import Ignore

from common.errors import JobCancelled, LeaseLost, LorafleetError, StoreError, WorkerLost
from common.job import Job
from common.leases import Admission, Lease, Ledger
from common.protocol import PausedReport, TaskState
from workers.metrics import JOBS, STEP, STEPS

log = logging.getLogger("lorafleet.worker")
# Store and network trouble: tried again with back-off (the render by Celery, an upload by itself).
RETRYABLE = (StoreError, redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def count_delivery(ledger: Ledger, task_id: str, max_deliveries: int) -> int:
    """Count this delivery; a job whose workers were lost `max_deliveries` times in a row fails."""
    deliveries = ledger.count_delivery(task_id)
    if deliveries > max_deliveries:
        raise WorkerLost(f"worker lost {deliveries - 1} times")
    return deliveries


def admit(task, lease: Lease, job: Job, task_id: str, message: dict, queue: str) -> None:
    """Start a job only if it may: a paused batch's job is set aside in Redis, not started and not
    lost (`lorafleet resume` sends it again under this task id), and the delivery ends as PAUSED;
    a cancelled batch's or job's is refused (JobCancelled). From here on the lease's heartbeat
    watches the cancel flags, and the render stops at its next step once one is set."""
    admission = lease.ledger.admit(job.batch, task_id, message, queue)
    if admission == Admission.SET_ASIDE:
        JOBS.labels("paused").inc()
        log.info("%s: %s set aside: batch %s is paused", task.worker, job.key[:12], job.batch)
        task.update_state(state=TaskState.PAUSED, meta=PausedReport(key=job.key, batch=job.batch).model_dump())
        raise Ignore()
    if admission != Admission.GO:
        what = f"batch {job.batch}" if admission == Admission.BATCH_CANCELLED else "the job"
        raise JobCancelled(f"{what} was cancelled")
    lease.watch_cancel(job.batch)


@dataclass
class Outcome:
    """How a delivery is going, for `accounting`: its job's key once known, and whether its
    frames went to the background upload (which then reports the job's end)."""

    key: str  # the job's, once known; until then the message's task id
    handed_off: bool = False


@contextmanager
def accounting(task, task_id: str) -> Iterator[Outcome]:
    """However the delivery ends, one metric and one log line, and the exception Celery should see:
    a lost lease is ignored (the delivery that took the job over reports it), store and network
    trouble is retried by Celery with the project's back-off, anything else fails the job (a
    known failure as one line, an unknown one with its traceback)."""
    outcome = Outcome(task_id)
    try:
        yield outcome
    except Ignore:
        raise
    except LeaseLost as exc:
        JOBS.labels("lease_lost").inc()
        log.warning("%s: %s: %s", task.worker, outcome.key[:12], exc)
        raise Ignore() from exc
    except RETRYABLE as exc:
        JOBS.labels("retried").inc()
        attempt, attempts = task.request.retries + 1, task.max_retries + 1
        log.warning("%s: %s: %s (attempt %d of %d)", task.worker, outcome.key[:12], exc, attempt, attempts)
        raise task.retry_later(exc) from exc
    except BaseException as exc:
        report_failure(task.worker, outcome.key, exc)
        raise
    finally:
        STEP.set(0)
        STEPS.set(0)
        task.health.set_job(None)
        if not outcome.handed_off:  # however it ended, its worker was not lost
            task.ledger.delivered_cleanly(task_id)


def report_failure(worker: str, key: str, exc: BaseException, while_doing: str = "") -> None:
    """A job's end other than done, counted and logged once: cancelled (info), or failed, known (one
    error line) or not (its traceback)."""
    JOBS.labels("cancelled" if isinstance(exc, JobCancelled) else "failed").inc()
    if isinstance(exc, JobCancelled):  # what someone asked for, not an error
        log.info("%s: %s cancelled: %s", worker, key[:12], exc)
    elif isinstance(exc, LorafleetError):
        log.error("%s: %s failed: %s", worker, key[:12], exc)
    elif isinstance(exc, Exception):
        log.exception("%s: %s failed with an unexpected error%s", worker, key[:12], while_doing)


def progress_reporter(lease: Lease, health=None):
    """The per-step callback of a render, with no Redis round trip: stop at once when the lease's
    heartbeat found the lease lost or the job or its batch cancelled; else put the step and the
    seconds per step in the worker's metrics and heartbeat, which is where `wait` and `top` read a
    running job's progress (a result-backend write per report cost five commands every half second)."""
    first_step_at = None

    def progress(step: int, steps: int) -> None:
        nonlocal first_step_at
        lease.check()
        lease.check_cancelled(f" (stopped at step {step} of {steps})")
        STEP.set(step)
        STEPS.set(steps)
        now = time.monotonic()
        first_step_at = first_step_at or now
        if health is not None and health.job is not None:
            pace = (now - first_step_at) / (step - 1) if step > 1 else None
            health.job = {**health.job, "step": step, "steps": steps, "step_s": pace}
            if step == steps:  # denoised: said at once, as a job's start and end are
                health.wake.set()

    return progress
