"""The `lorafleet.render` Celery task, bound to one worker's warm renderer.

A delivery goes: take a lease → count the delivery (fail it once its workers were lost
`max_deliveries` times) → check the message and re-derive its key (a bad one fails at once) →
skip it if the batch was cancelled or the key's video is in the store → take the key's render
lock → render → prove the lease is still ours → write. A delivery that learns another one took
its job over (it paused past its lease) stops and writes nothing.
Store and network trouble is retried with back-off; everything else a job can do wrong fails
that job with a one-line reason, and the worker serves on.
"""

import logging
import time

import redis
from celery import Celery
from celery.exceptions import Ignore

from common.broker import TASK_NAME, send_job
from common.errors import JobCancelled, LeaseLost, LorafleetError, StoreError, WorkerLost
from common.job import AdapterResolver, job_from_message
from common.leases import Lease, Ledger
from common.settings import Settings
from common.store import Store, output_uris, video_exists
from workers.renderer import Renderer, render_job

log = logging.getLogger("lorafleet.worker")
PROGRESS_INTERVAL_S = 0.5
RETRYABLE = (StoreError, redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def register_render_task(
    app: Celery, renderer: Renderer, store: Store, ledger: Ledger, settings: Settings, queue: str
) -> None:
    """Define `lorafleet.render` on `app`, rendering on `renderer` into `store`."""
    worker = renderer.worker

    @app.task(name=TASK_NAME, bind=True, throws=(LorafleetError,))
    def render(self, message):
        """Render one job (a JSON object, DESIGN.md's task contract) and return its outputs."""
        task_id = self.request.id
        key = "?" * 12
        try:
            # The lease comes first, before the message is even read: from here on, if this process
            # dies or hangs, the job is delivered again.
            with ledger.running(task_id, message, queue, worker) as lease:
                deliveries = ledger.count_delivery(task_id)
                if deliveries > settings.max_deliveries:
                    raise WorkerLost(f"worker lost {deliveries - 1} times")
                try:
                    # A fresh resolver per message: a file replaced in place, or one that appeared
                    # since, is read anew (a worker caches adapters by content hash, never by path).
                    job = job_from_message(
                        message,
                        renderer.info,
                        AdapterResolver.from_settings(settings, store),
                        settings.max_video_pixels,
                    )
                except LorafleetError as exc:
                    log.error("%s: rejected a malformed message %s: %s", worker, task_id, exc)
                    raise
                key, batch = job["key"], job.get("batch")
                if ledger.is_cancelled(batch):
                    raise JobCancelled(f"batch {batch} was cancelled")
                done = {"key": key, "worker": worker, "status": "exists", **output_uris(store, key)}
                if video_exists(store, key):
                    return done
                log.info(
                    "%s: %s started (%s), delivery %d",
                    worker,
                    key[:12],
                    job.get("id") or job["prompt"][:40],
                    deliveries,
                )
                with ledger.key_lock(key, lease, lambda: video_exists(store, key)) as locked:
                    if not locked or video_exists(store, key):
                        return done
                    return render_job(
                        renderer, store, job, progress_reporter(self, lease, key, batch, worker), lease.confirm
                    )
        except LeaseLost as exc:
            # Another delivery owns the job now and reports its result: store nothing, say nothing.
            log.warning("%s: %s: %s", worker, key[:12], exc)
            raise Ignore() from exc
        except RETRYABLE as exc:
            retries = self.request.retries
            if retries >= settings.store_retries:
                log.error("%s: %s failed after %d retries: %s", worker, key[:12], retries, exc)
                raise StoreError(f"{type(exc).__name__}: {exc} (after {retries} retries)") from exc
            log.warning("%s: %s: %s; retry %d in %ds", worker, key[:12], exc, retries + 1, 2**retries)
            raise self.retry(exc=exc, countdown=2**retries, max_retries=settings.store_retries) from exc
        except LorafleetError as exc:
            log.error("%s: %s failed: %s", worker, key[:12], exc)
            raise
        except Exception:
            log.exception("%s: %s failed with an unexpected error", worker, key[:12])
            raise
        finally:
            ledger.delivered_cleanly(task_id)  # however it ended, its worker was not lost


def progress_reporter(task, lease: Lease, key: str, batch: str | None, worker: str):
    """The per-step callback of a render: stop at once when the lease is lost; every
    PROGRESS_INTERVAL_S, stop if the batch was cancelled, else report the step. The report is
    fenced too, so a worker waking from a pause never overwrites the result of the delivery that
    took its job over."""
    last_report = 0.0

    def progress(step: int, steps: int) -> None:
        nonlocal last_report
        lease.check()
        now = time.monotonic()
        if step == steps or now - last_report >= PROGRESS_INTERVAL_S:
            last_report = now
            if lease.ledger.is_cancelled(batch):
                raise JobCancelled(f"batch {batch} was cancelled (stopped at step {step} of {steps})")
            lease.confirm()
            task.update_state(state="PROGRESS", meta={"key": key, "step": step, "steps": steps, "worker": worker})

    return progress


def requeue(app: Celery, task_id: str, entry: dict) -> None:
    """Enqueue a job whose worker died again, under the same task id (its delivery count goes on)."""
    send_job(app, entry["message"], task_id, entry.get("queue"))
