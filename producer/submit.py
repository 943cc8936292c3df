"""`lorafleet submit`: validate a whole jobs file, enqueue what is not already rendered, write the manifest.

A batch's manifest is written before any of its messages is sent, each job recorded `unsent`; each
chunk of messages moves the batch's sent counter on in the same step (common/broker.py:
SendFence), and once every message went the manifest says `queued`. A submit cut off while it sends
(killed, Ctrl-C, Redis gone) leaves a batch that knows what went: `lorafleet retry BATCH` sends the
rest, none twice.
"""

import logging
import uuid

import redis
from kombu.exceptions import OperationalError

from common.broker import SendFence, check_redis, make_app, send_jobs, sent_so_far
from common.bulk import paused_gc
from common.errors import ExitCode, InputError, SendInterrupted
from common.job import Job
from common.jobs_file import load_jobs_for
from common.leases import Ledger
from common.manifest import Batch, JobStatus
from common.protocol import sent_key
from common.settings import Settings
from common.store import Store, videos_present
from common.store_lock import StoreLock

log = logging.getLogger("lorafleet.producer")


def submit(path: str, settings: Settings, batch_name: str | None = None, priority: str = "normal") -> Batch:
    """Validate every line of `path`, then enqueue each job whose video is not in the store, at
    its line's priority or `priority`.

    Raises JobFileError (listing every bad line) before anything is enqueued.
    """
    store = Store(settings.store_url)
    batch = Batch.new(store, batch_name)
    with paused_gc():  # a big file's jobs are many small objects that live until the end
        return enqueue(load_jobs_for(path, settings, store, priority), batch, store, settings)


def enqueue(jobs: list[Job], batch: Batch, store: Store, settings: Settings) -> Batch:
    """Enqueue checked, keyed jobs in their order as one batch, skipping keys already in the store,
    and write the batch's manifest and jobs. A batch that already holds jobs (a sweep's second
    round) gets these added to them."""
    if batch.count(JobStatus.UNSENT):
        raise InputError(f"batch {batch.name} has jobs never sent: `lorafleet retry {batch.name}` sends them first")
    earlier = list(batch.read_jobs(store).values()) if batch.entries else []
    sent_before = len(batch.send_order())  # an earlier round's tasks, all sent
    check_redis(settings.redis_url)
    ledger = Ledger.from_settings(settings)
    waiting = lambda: log.info("waiting for a prune of the store to finish before looking for finished videos")  # noqa: E731
    # From the look in the store until the manifest names what it found: no prune deletes meanwhile.
    with StoreLock(settings.redis_url).shared(on_wait=waiting) as hold:
        task_ids: dict[str, str] = {}  # key -> task id: a job listed twice is rendered once
        present = videos_present(store, [job.key for job in jobs])
        for job in jobs:
            if job.key in present:
                batch.add(store, job, JobStatus.DONE)
                continue
            task_ids.setdefault(job.key, str(uuid.uuid4()))
            batch.add(store, job, JobStatus.UNSENT, task_ids[job.key])
        if not earlier:
            # A new batch owes nothing to an earlier one of the same name (gone from the store): its
            # cancel and pause flags would capture this batch's jobs.
            ledger.forget_batch(batch.name)
        ledger.redis.set(sent_key(batch.name), sent_before, ex=settings.result_expires_s)
        batch.write_jobs(store, [*earlier, *jobs])
        hold.confirm()
        batch.write_manifest(store)
    first_of_key = {job.key: job for job in reversed(jobs)}  # a key listed twice is sent as its first line
    send_unsent(batch, first_of_key, store, settings)
    return batch


def send_unsent(batch: Batch, jobs: dict[str, Job], store: Store, settings: Settings) -> int:
    """Send the batch's jobs that never went (`jobs`: its jobs by key), each task once, in send
    order, then record them queued in the manifest; returns how many went now. Raises
    SendInterrupted, saying how to go on, if the send stops part of the way (Ctrl-C, Redis gone)."""
    app = make_app(settings)
    fence = SendFence(sent_key(batch.name), sent_so_far(app, batch.name), settings.result_expires_s)
    started = fence.sent
    left = batch.settle_sent(started)
    try:
        send_jobs(app, ((jobs[key].message(batch.name), task_id, None) for task_id, key in left), fence=fence)
    except (KeyboardInterrupt, redis.RedisError, OperationalError) as exc:
        why, code = (
            ("interrupted", ExitCode.INTERRUPTED)
            if isinstance(exc, KeyboardInterrupt)
            else (f"Redis: {exc}", ExitCode.REDIS_UNREACHABLE)
        )
        # The manifest keeps saying `unsent`: the counter in Redis says which of them went.
        raise SendInterrupted(
            f"batch {batch.name}: sending stopped ({why}) after {fence.sent} of {started + len(left)} job(s); "
            f"`lorafleet retry {batch.name}` sends the rest, none twice",
            code,
        ) from None
    batch.settle_sent(fence.sent)
    batch.write_manifest(store)
    app.backend.client.delete(fence.key)  # the manifest says it all now
    return fence.sent - started
