"""`lorafleet submit`: validate a whole jobs file, enqueue what is not already rendered, write the manifest."""

import uuid

from common.broker import check_redis, make_app, send_job
from common.bulk import paused_gc
from common.job import Job
from common.jobs_file import load_jobs_for
from common.leases import Ledger
from common.manifest import Batch, JobStatus
from common.settings import Settings
from common.store import Store, videos_present

SEND_BATCH = 1000


def submit(path: str, settings: Settings, batch_name: str | None = None, priority: str = "normal") -> Batch:
    """Validate every line of `path`, then enqueue each job whose video is not in the store, at
    its line's priority or `priority`.

    Raises JobFileError (listing every bad line) before anything is enqueued.
    """
    store = Store(settings.store_url)
    batch = Batch.new(store, batch_name)
    with paused_gc():  # a big file's jobs are many small objects that live until the end
        jobs = [
            job if job.priority else job.model_copy(update={"priority": priority})
            for job in load_jobs_for(path, settings, store)
        ]
        return enqueue(jobs, batch, store, settings)


def enqueue(jobs: list[Job], batch: Batch, store: Store, settings: Settings) -> Batch:
    """Enqueue checked, keyed jobs in their order as one batch, skipping keys already in the store,
    and write the batch's manifest and jobs."""
    task_ids: dict[str, str] = {}  # key -> task id: a job listed twice is rendered once
    to_send = []
    present = videos_present(store, [job.key for job in jobs])
    for job in jobs:
        if job.key in present:
            batch.add(store, job, JobStatus.DONE)
            continue
        if job.key not in task_ids:
            task_ids[job.key] = str(uuid.uuid4())
            to_send.append((job, task_ids[job.key]))
        batch.add(store, job, JobStatus.QUEUED, task_ids[job.key])
    check_redis(settings.redis_url)
    # A new batch owes nothing to an earlier one of the same name (gone from the store): its cancel
    # and pause flags would capture this batch's jobs.
    Ledger.from_settings(settings).forget_batch(batch.name)
    batch.write_jobs(store, jobs)
    batch.write_manifest(store)
    app = make_app(settings)
    # Celery's task-sent events would double the messages of a big batch; Flower still sees each
    # job from the moment a worker receives it, and `lorafleet exporter` counts the queue.
    app.conf.task_send_sent_event = False
    # Nor does this process wait on any result (`wait` polls them in bulk): Celery's Redis backend
    # would subscribe to, then unsubscribe from, every job's result channel, two round trips each.
    app.backend.on_task_call = lambda producer, task_id: None
    with app.producer_or_acquire() as producer, producer.batch(SEND_BATCH):  # one Redis round trip per SEND_BATCH jobs
        for job, task_id in to_send:
            send_job(app, job.message(batch.name), task_id, producer=producer)
    return batch
