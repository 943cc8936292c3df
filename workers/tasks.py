"""The `lorafleet.render` Celery task, bound to one worker's warm renderer."""

import logging
import time

from celery import Celery

from common.broker import TASK_NAME
from common.errors import LorafleetError
from common.job import AdapterResolver, job_from_message
from common.store import Store
from workers.render import Renderer, render_job

log = logging.getLogger("lorafleet.worker")
PROGRESS_INTERVAL_S = 0.5


def register_render_task(app: Celery, renderer: Renderer, store: Store) -> None:
    """Define `lorafleet.render` on `app`, rendering on `renderer` into `store`."""
    resolver = AdapterResolver(store)

    @app.task(name=TASK_NAME, bind=True, throws=(LorafleetError,))
    def render(self, message):
        """Render one job (a JSON object, DESIGN.md's task contract) and return its outputs."""
        try:
            job = job_from_message(message, renderer.info, resolver)
        except LorafleetError as exc:
            log.error("%s: rejected a malformed message: %s", renderer.worker, exc)
            raise
        key = job["key"]
        last_report = 0.0

        def progress(step: int, steps: int) -> None:
            nonlocal last_report
            now = time.monotonic()
            if step == steps or now - last_report >= PROGRESS_INTERVAL_S:
                last_report = now
                meta = {"key": key, "step": step, "steps": steps, "worker": renderer.worker}
                self.update_state(state="PROGRESS", meta=meta)

        log.info("%s: %s started (%s)", renderer.worker, key[:12], job.get("id") or job["prompt"][:40])
        try:
            return render_job(renderer, store, job, progress)
        except LorafleetError as exc:
            log.error("%s: %s failed: %s", renderer.worker, key[:12], exc)
            raise
        except Exception:
            log.exception("%s: %s failed with an unexpected error", renderer.worker, key[:12])
            raise
