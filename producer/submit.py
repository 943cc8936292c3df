"""`lorafleet submit`: validate a whole jobs file, enqueue what is not already rendered, write the manifest."""

import uuid

from common.broker import check_redis, make_app, send_jobs
from common.bulk import paused_gc
from common.job import Job
from common.jobs_file import load_jobs_for
from common.leases import Ledger
from common.manifest import Batch, JobStatus
from common.settings import Settings
from common.store import Store, videos_present


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
    and write the batch's manifest and jobs. A batch that already holds jobs (a sweep's second
    round) gets these added to them."""
    earlier = list(batch.read_jobs(store).values()) if batch.entries else []
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
    if not earlier:
        # A new batch owes nothing to an earlier one of the same name (gone from the store): its
        # cancel and pause flags would capture this batch's jobs.
        Ledger.from_settings(settings).forget_batch(batch.name)
    batch.write_jobs(store, [*earlier, *jobs])
    batch.write_manifest(store)
    send_jobs(make_app(settings), ((job.message(batch.name), task_id, None) for job, task_id in to_send))
    return batch
