"""The `lorafleet.render` Celery task, bound to one worker's warm renderer.

A delivery goes: take a lease → count the delivery (fail it once its workers were lost
`max_deliveries` times) → check the message and re-derive its key (a bad one fails at once) →
set it aside if its batch is paused → skip it if it or its batch was cancelled or the key's video
is in the store → take the key's render lock → render → hand the frames to the background upload
and take the next job. The upload proves the lease is still ours, writes, reports the result and
only then releases the lock and the lease (workers/uploads.py). A delivery that learns another one
took its job over (it paused past its lease) stops and writes nothing.
Store and network trouble is retried with back-off (Celery's autoretry while rendering, the upload's
own retries after); everything else a job can do wrong fails that job with a one-line reason, and
the worker serves on.
"""

import logging
import random
import re
import time
from contextlib import ExitStack

import redis
from celery import Celery, Task
from celery.exceptions import Ignore

from common.broker import EVAL_TASK_NAME, TASK_NAME, send_job
from common.errors import EvaluationError, JobCancelled, LeaseLost, LorafleetError, StoreError, WorkerLost
from common.job import AdapterResolver, job_from_message
from common.leases import Lease, Ledger, RunningEntry
from common.settings import Settings
from common.store import Store, output_uris, video_exists
from workers.evaluator import Evaluator
from workers.metrics import EVALUATIONS, JOBS, STEP, STEPS, Health
from workers.renderer import Rendered, Renderer, render_frames, upload
from workers.uploads import Uploads

log = logging.getLogger("lorafleet.worker")
PROGRESS_INTERVAL_S = 0.5
PAUSED = "PAUSED"  # the result state of a job set aside while its batch is paused
RETRYABLE = (StoreError, redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


class RenderTask(Task):
    """`lorafleet.render` on one worker: holds the warm renderer, the store and the ledger, and
    runs one delivery of a job as the module docstring says. Store and network trouble is retried
    by Celery with exponential back-off and jitter, `LORAFLEET_STORE_RETRIES` times."""

    name = TASK_NAME
    throws = (LorafleetError,)  # expected failures: logged as one line, no traceback
    autoretry_for = RETRYABLE
    retry_backoff = True
    retry_jitter = True
    typing = False

    def __init__(
        self,
        renderer: Renderer,
        store: Store,
        ledger: Ledger,
        settings: Settings,
        queue: str,
        health: Health | None = None,
    ):
        self.renderer = renderer
        self.health = health or Health()  # what the heartbeat says this worker runs
        self.store = store
        self.ledger = ledger
        self.settings = settings
        self.queue = queue
        self.worker = renderer.worker
        self.max_retries = settings.store_retries
        self.uploads = Uploads()

    def run(self, message):
        """Render one job (a JSON object, docs/design.md's task contract) and return its outputs."""
        task_id, worker = self.request.id, self.worker
        key = "?" * 12
        handed_off = False
        try:
            # The lease comes first, before the message is even read: from here on, if this process
            # dies or hangs, the job is delivered again.
            with ExitStack() as held:
                lease = held.enter_context(self.ledger.running(task_id, message, self.queue, worker))
                deliveries = self.ledger.count_delivery(task_id)
                if deliveries > self.settings.max_deliveries:
                    raise WorkerLost(f"worker lost {deliveries - 1} times")
                job = self.check(message)
                key = job["key"]
                if self.ledger.set_aside_if_paused(job["batch"], task_id, message, self.queue):
                    # Not started, not lost: `lorafleet resume` sends it again under this task id.
                    JOBS.labels("paused").inc()
                    log.info("%s: %s set aside: batch %s is paused", worker, key[:12], job["batch"])
                    self.update_state(state=PAUSED, meta={"key": key, "batch": job["batch"]})
                    raise Ignore()
                outcome = self.render(job, lease, deliveries, task_id, held)
                if isinstance(outcome, Rendered):
                    # The lease and the key lock go with the frames: released once they are stored.
                    self.upload_later(outcome, lease, held.pop_all(), task_id)
                    handed_off = True
                    raise Ignore()  # the upload reports the result
                JOBS.labels(outcome["status"]).inc()
                return outcome
        except Ignore:
            raise
        except LeaseLost as exc:
            # Another delivery owns the job now and reports its result: store nothing, say nothing.
            JOBS.labels("lease_lost").inc()
            log.warning("%s: %s: %s", worker, key[:12], exc)
            raise Ignore() from exc
        except RETRYABLE as exc:
            JOBS.labels("retried").inc()
            attempt, attempts = self.request.retries + 1, self.max_retries + 1
            log.warning("%s: %s: %s (attempt %d of %d)", worker, key[:12], exc, attempt, attempts)
            raise
        except JobCancelled as exc:
            JOBS.labels("cancelled").inc()
            log.error("%s: %s failed: %s", worker, key[:12], exc)
            raise
        except LorafleetError as exc:
            JOBS.labels("failed").inc()
            log.error("%s: %s failed: %s", worker, key[:12], exc)
            raise
        except Exception:
            JOBS.labels("failed").inc()
            log.exception("%s: %s failed with an unexpected error", worker, key[:12])
            raise
        finally:
            STEP.set(0)
            STEPS.set(0)
            self.health.job = None
            if not handed_off:  # however it ended, its worker was not lost
                self.ledger.delivered_cleanly(task_id)

    def upload_later(self, rendered: Rendered, lease: Lease, held: ExitStack, task_id: str) -> None:
        """Encode and upload in the background (after the upload before it) while this worker takes
        its next job; then report the result, and release the key lock and the lease. Store and
        network trouble is retried with back-off; a failed upload fails the job."""
        key = rendered.job["key"]

        def finish():
            with held:
                try:
                    result = self.upload_with_retries(rendered, lease)
                except LeaseLost as exc:  # the delivery that took the job over reports it
                    JOBS.labels("lease_lost").inc()
                    log.warning("%s: %s: %s", self.worker, key[:12], exc)
                except Exception as exc:
                    JOBS.labels("failed").inc()
                    if isinstance(exc, LorafleetError):
                        log.error("%s: %s failed: %s", self.worker, key[:12], exc)
                    else:
                        log.exception("%s: %s failed while uploading", self.worker, key[:12])
                    self.backend.mark_as_failure(task_id, exc)
                    self.tell_monitors("task-failed", task_id, exception=repr(exc))
                else:
                    JOBS.labels(result["status"]).inc()
                    self.backend.mark_as_done(task_id, result)
                    self.tell_monitors("task-succeeded", task_id, result=repr(result), runtime=result["seconds"])
                finally:
                    self.ledger.delivered_cleanly(task_id)

        self.uploads.start(finish)

    def tell_monitors(self, event: str, task_id: str, **fields) -> None:
        """The task event Celery would have sent had the task ended in its own thread (Flower)."""
        try:
            with self.app.events.default_dispatcher(hostname=self.worker) as dispatcher:
                dispatcher.send(event, uuid=task_id, **fields)
        except Exception as exc:  # monitoring never fails a job
            log.warning("%s: cannot send %s for %s: %s", self.worker, event, task_id, exc)

    def upload_with_retries(self, rendered: Rendered, lease: Lease) -> dict:
        """The upload, tried again with exponential back-off and jitter on store or network trouble."""
        key = rendered.job["key"]
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return upload(rendered, self.store, lease.confirm)
            except RETRYABLE as exc:
                log.warning("%s: %s: %s (upload attempt %d of %d)", self.worker, key[:12], exc, attempt, attempts)
                if attempt == attempts:
                    raise
                JOBS.labels("retried").inc()
                time.sleep(random.uniform(0, min(2**attempt, 60)))
        raise AssertionError("unreachable")

    def check(self, message) -> dict:
        """The job a message asks for, its key derived from its content; raises JobError if bad."""
        try:
            # A fresh resolver per message: a file replaced in place, or one that appeared since,
            # is read anew (a worker caches adapters by content hash, never by path).
            resolver = AdapterResolver.from_settings(self.settings, self.store)
            return job_from_message(message, self.renderer.info, resolver, self.settings.max_video_pixels)
        except LorafleetError as exc:
            log.error("%s: rejected a malformed message %s: %s", self.worker, self.request.id, exc)
            raise

    def render(self, job: dict, lease: Lease, deliveries: int, task_id: str, held: ExitStack) -> dict | Rendered:
        """Render a checked job under its key's lock (held in `held`), unless it or its batch was
        cancelled or its video is in the store (or appears there while waiting for another
        worker's lock): then the result to report."""
        key, batch = job["key"], job["batch"]
        if self.ledger.is_cancelled(batch, task_id):
            raise JobCancelled(f"{_cancelled(self.ledger, batch)} was cancelled")
        # One look at the store per job, once the lock is ours: on S3 each look is a request
        # while the GPU waits.
        locked = held.enter_context(self.ledger.key_lock(key, lease, lambda: video_exists(self.store, key)))
        if not locked or video_exists(self.store, key):
            return {"key": key, "worker": self.worker, "status": "exists", **output_uris(self.store, key)}
        label = job["id"] or job["prompt"][:40]
        log.info("%s: %s started (%s), delivery %d", self.worker, key[:12], label, deliveries)
        self.health.job = {"key": key, "since": time.time(), "batch": batch}
        progress = progress_reporter(self, lease, key, batch, self.worker, task_id, self.health)
        return render_frames(self.renderer, job, progress)


class EvaluateTask(Task):
    """`lorafleet.evaluate` on one worker: a key's eval.json (workers/evaluator.py). The message
    names only the key; everything else (the video, the prompt) is read from the store."""

    name = EVAL_TASK_NAME
    throws = (LorafleetError,)
    autoretry_for = RETRYABLE
    retry_backoff = True
    retry_jitter = True
    typing = False

    def __init__(self, evaluator: Evaluator, store: Store, settings: Settings, worker: str):
        self.evaluator = evaluator
        self.store = store
        self.worker = worker
        self.max_retries = settings.store_retries

    def run(self, message):
        key = message.get("key") if isinstance(message, dict) else None
        if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{64}", key):
            raise EvaluationError(f"evaluate: the message names no job key (64 hex digits): {str(message)[:100]}")
        try:
            result = self.evaluator.evaluate(self.store, key)
        except LorafleetError as exc:
            EVALUATIONS.labels("failed").inc()
            log.error("%s: %s evaluation failed: %s", self.worker, key[:12], exc)
            raise
        EVALUATIONS.labels("done").inc()
        log.info("%s: %s evaluated in %.2fs: %s", self.worker, key[:12], result["seconds"], result["numbers"])
        return {"key": key, "worker": self.worker, "numbers": result["numbers"]}


def progress_reporter(
    task, lease: Lease, key: str, batch: str | None, worker: str, task_id: str | None = None, health=None
):
    """The per-step callback of a render: stop at once when the lease is lost; every
    PROGRESS_INTERVAL_S, stop if the batch was cancelled, else report the step. The report is
    fenced too, so a worker waking from a pause never overwrites the result of the delivery that
    took its job over. The step and the seconds per step go to the worker's heartbeat (`top`)."""
    last_report = 0.0
    first_step_at = None

    def progress(step: int, steps: int) -> None:
        nonlocal last_report, first_step_at
        lease.check()
        STEP.set(step)
        STEPS.set(steps)
        now = time.monotonic()
        first_step_at = first_step_at or now
        if health is not None and health.job is not None:
            pace = (now - first_step_at) / (step - 1) if step > 1 else None
            health.job = {**health.job, "step": step, "steps": steps, "step_s": pace}
        if step == steps or now - last_report >= PROGRESS_INTERVAL_S:
            last_report = now
            if lease.ledger.is_cancelled(batch, task_id):
                raise JobCancelled(
                    f"{_cancelled(lease.ledger, batch)} was cancelled (stopped at step {step} of {steps})"
                )
            lease.confirm()
            task.update_state(state="PROGRESS", meta={"key": key, "step": step, "steps": steps, "worker": worker})

    return progress


def _cancelled(ledger: Ledger, batch: str | None) -> str:
    """What was cancelled, for the job's error: its batch, or the job alone."""
    return f"batch {batch}" if ledger.is_cancelled(batch) else "the job"


def requeue(app: Celery, task_id: str, entry: RunningEntry) -> None:
    """Enqueue a job whose worker died again, under the same task id (its delivery count goes on)."""
    send_job(app, entry.message, task_id, entry.queue)
