"""A finished job's MP4 encode and upload, in a background thread while the next job denoises,
and the report of the job's end once its files are stored.

Encoding and uploading a 5B job takes about a second in which the GPU would wait. One upload is
in flight at a time: the next job's upload starts only when this one ended, so a slow store slows
the worker down rather than piling frames up in host memory. The job's delivery keeps its lease and
key lock until its upload ended; its result is reported only then.
"""

import contextvars
import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack

from common.errors import LeaseLost
from common.leases import Lease
from common.retry import retrying
from workers.delivery import RETRYABLE, report_failure
from workers.metrics import JOBS
from workers.outputs import upload
from workers.renderer import Rendered

log = logging.getLogger("lorafleet.worker")


class Uploads:
    """One background thread running one upload at a time."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="upload")
        self._last: Future | None = None

    def start(self, upload: Callable[[], None]) -> None:
        """Run `upload()` in the background once the previous upload ended (it handles its own errors)."""
        self.wait()
        # In the context it was started in: its log records name the job it uploads.
        self._last = self._pool.submit(contextvars.copy_context().run, upload)
        self._last.add_done_callback(_log_escaped)

    def wait(self) -> None:
        """Until the upload in flight, if any, ended."""
        if self._last is not None:
            wait([self._last])


def _log_escaped(upload: Future) -> None:
    """An error the upload did not handle, logged with its traceback: a thread pool keeps it
    silently in the future otherwise, and the job would end without a word."""
    error = upload.exception()
    if error is not None:
        log.error("an upload failed unexpectedly", exc_info=error)


def upload_then_report(task, rendered: Rendered, lease: Lease, held: ExitStack, task_id: str) -> None:
    """Encode and upload a render task's frames in the background (`task.uploads`, after the upload
    before it) while the worker takes its next job; then report the result, and release what the
    delivery `held` (the key lock, the lease). Store and network trouble is retried with the
    project's back-off; a failed upload fails the job; a lost lease reports nothing (the delivery
    that took the job over does).

    The task's own thread has returned by then, so its end is reported as Celery would have: the
    result through the task's backend, the task event through its dispatcher (Flower)."""
    key, attempts = rendered.job.key, task.max_retries + 1

    def on_retry(exc: Exception, attempt: int) -> None:
        log.warning("%s: %s: %s (upload attempt %d of %d)", task.worker, key[:12], exc, attempt, attempts)
        if attempt < attempts:
            JOBS.labels("retried").inc()

    def finish():
        with held:
            try:
                result = retrying(lambda: upload(rendered, task.store, lease.confirm), RETRYABLE, attempts, on_retry)
            except LeaseLost as exc:
                JOBS.labels("lease_lost").inc()
                log.warning("%s: %s: %s", task.worker, key[:12], exc)
                return
            except Exception as exc:
                report_failure(task.worker, key, exc, " while uploading")
                task.backend.mark_as_failure(task_id, exc)
                event, fields = "task-failed", {"exception": repr(exc)}
            else:
                JOBS.labels(result["status"]).inc()
                task.backend.mark_as_done(task_id, result)
                event, fields = "task-succeeded", {"result": repr(result), "runtime": result["seconds"]}
            finally:
                task.ledger.delivered_cleanly(task_id)
        try:
            with task.app.events.default_dispatcher(hostname=task.worker) as dispatcher:
                dispatcher.send(event, uuid=task_id, **fields)
        except Exception as exc:  # monitoring never fails a job
            log.warning("%s: cannot send %s for %s: %s", task.worker, event, task_id, exc)

    task.uploads.start(finish)
