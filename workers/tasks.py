"""The `lorafleet.render` and `lorafleet.evaluate` Celery tasks, bound to one worker's warm renderer.

A delivery takes the steps of workers/delivery.py in order: a lease first (from then on, a
worker that dies or hangs has its job delivered again), the delivery counted, the message
checked and its key derived from its content, a paused batch's job set aside, a cancelled one
refused, the key's render lock taken (or the video found in the store), the render. Its frames go
to the background upload, which proves the lease is still ours, writes, reports the result and
only then releases the lock and the lease; meanwhile the worker takes its next job.
"""

import logging
import re
import time
from contextlib import ExitStack

from celery import Celery, Task
from celery.exceptions import Ignore

from common.broker import send_job
from common.errors import EvaluationError, LorafleetError
from common.jobs_file import job_from_message
from common.leases import Ledger, RunningEntry
from common.logs import job_fields
from common.protocol import EVAL_TASK_NAME, TASK_NAME
from common.resolver import AdapterResolver
from common.retry import backoff
from common.settings import Settings
from common.store import Store, render_result, video_exists
from workers.delivery import RETRYABLE, accounting, admit, count_delivery, progress_reporter
from workers.evaluator import Evaluator
from workers.metrics import EVALUATIONS, JOBS, Health
from workers.renderer import Renderer, render_frames
from workers.uploads import Uploads, upload_then_report

log = logging.getLogger("lorafleet.worker")


class LorafleetTask(Task):
    """What both tasks share: expected failures logged as one line, JSON arguments as they came,
    and store and network trouble retried through Celery with the project's back-off."""

    throws = (LorafleetError,)  # expected failures: logged as one line, no traceback
    typing = False
    max_retries: int

    def retry_later(self, exc: Exception):
        """Celery's retry of this delivery, after the project's back-off (common/retry.py)."""
        return self.retry(exc=exc, countdown=backoff(self.request.retries), max_retries=self.max_retries)


class RenderTask(LorafleetTask):
    """`lorafleet.render` on one worker: holds the warm renderer, the store and the ledger, and
    runs one delivery of a job as the module docstring says. Store and network trouble is retried
    through Celery (`self.retry`) with the project's back-off, `LORAFLEET_STORE_RETRIES` times."""

    name = TASK_NAME

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
        """Render one job (a JSON object, docs/design.md's task contract); the background upload
        reports its result."""
        task_id = self.request.id
        # `held` goes to the background upload with the frames; `logged` (the job's log fields) stays here.
        with accounting(self, task_id) as outcome, ExitStack() as held, ExitStack() as logged:
            lease = held.enter_context(self.ledger.running(task_id, message, self.queue, self.worker))
            deliveries = count_delivery(self.ledger, task_id, self.settings.max_deliveries)
            # A fresh resolver per message: a file replaced in place, or one that appeared since,
            # is read anew (a worker caches adapters by content hash, never by path).
            resolver = AdapterResolver.from_settings(self.settings, self.store)
            job = job_from_message(message, self.renderer.info, resolver, self.settings.max_video_pixels)
            outcome.key = job.key
            logged.enter_context(job_fields(key=job.key, batch=job.batch))  # on every record of this delivery
            admit(self, lease, job, task_id, message, self.queue)
            # One look at the store per job, once the lock is ours: on S3 each look is a request
            # while the GPU waits.
            done = lambda: video_exists(self.store, job.key)  # noqa: E731
            if not held.enter_context(self.ledger.key_lock(job.key, lease, done)) or done():
                JOBS.labels("exists").inc()
                return render_result(self.store, job.key, self.worker, "exists")
            log.info("%s: %s started (%s), delivery %d", self.worker, job.key[:12], job.id or job.prompt[:40], deliveries)
            self.health.set_job({"key": job.key, "task_id": task_id, "since": time.time(), "batch": job.batch})
            rendered = render_frames(self.renderer, job, progress_reporter(lease, self.health))
            self.health.pace = rendered.pace  # said with the job's end: what `sweep --estimate` prices from
            # The lease and the key lock go with the frames: released once they are stored.
            upload_then_report(self, rendered, lease, held.pop_all(), task_id)
            outcome.handed_off = True
            raise Ignore()  # the upload reports the result


class EvaluateTask(LorafleetTask):
    """`lorafleet.evaluate` on one worker: a key's eval.json (workers/evaluator.py). The message
    names only the key; everything else (the video, the prompt) is read from the store."""

    name = EVAL_TASK_NAME

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
        except RETRYABLE as exc:
            raise self.retry_later(exc) from exc
        except LorafleetError as exc:
            EVALUATIONS.labels("failed").inc()
            log.error("%s: %s evaluation failed: %s", self.worker, key[:12], exc)
            raise
        EVALUATIONS.labels("done").inc()
        log.info("%s: %s evaluated in %.2fs: %s", self.worker, key[:12], result["seconds"], result["numbers"])
        return {"key": key, "worker": self.worker, "numbers": result["numbers"]}


def requeue(app: Celery, task_id: str, entry: RunningEntry) -> None:
    """Enqueue a job whose worker died again, under the same task id (its delivery count goes on)."""
    send_job(app, entry.message, task_id, entry.queue)
