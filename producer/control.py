"""Controlling a submitted batch: cancel it (or one job of it), pause and resume it, or enqueue
its failed and cancelled jobs again."""

import uuid

from rich.console import Console

from common.broker import make_app, send_job
from common.errors import InputError
from common.leases import Ledger
from common.manifest import FAILED_OR_CANCELLED, Batch, JobStatus, ManifestEntry
from common.settings import Settings
from common.store import Store
from producer.follow import refresh
from producer.submit import send_unsent


def cancel(settings: Settings, name: str, console: Console, job: str | None = None) -> Batch:
    """Cancel a batch, or with `job` (an id, or a key or its first 8+ hex digits) that job alone:
    queued jobs are cancelled at once (a worker that takes one anyway skips it), running ones stop
    at their next denoising step."""
    store = Store(settings.store_url)
    batch = Batch.load(store, name)
    refresh(batch, make_app(settings))
    chosen = batch.entries if job is None else find_jobs(batch, job)
    Ledger.from_settings(settings).cancel(name, None if job is None else sorted({e.task_id for e in chosen}))
    what = f"batch {name}" if job is None else f"job {job}"
    queued = [entry for entry in chosen if entry.status in (JobStatus.QUEUED, JobStatus.PAUSED)]
    for entry in queued:
        entry.record(JobStatus.CANCELLED, f"{what} was cancelled before the job started")
    batch.write_manifest(store)
    running = sum(entry.status == JobStatus.RUNNING for entry in chosen)
    console.print(
        f"{what}: cancelled {len(queued)} queued job(s); {running} running job(s) stop at their next step "
        f"(see `lorafleet status {name}`)"
    )
    return batch


def find_jobs(batch: Batch, job: str) -> list[ManifestEntry]:
    """A batch's entries whose id is `job`, or whose key is or starts with it (8 hex digits at least)."""
    found = [e for e in batch.entries if e.id == job]
    if not found and len(job) >= 8 and all(c in "0123456789abcdef" for c in job):
        found = [e for e in batch.entries if e.key.startswith(job)]
    if not found:
        raise InputError(f"batch {batch.name} has no job with id {job} or a key starting with it")
    return found


def pause(settings: Settings, name: str, console: Console) -> None:
    """Pause a batch: its queued jobs are not started (a worker sets each aside as it takes it);
    running ones finish."""
    store = Store(settings.store_url)
    batch = Batch.load(store, name)
    Ledger.from_settings(settings).pause(name)
    refresh(batch, make_app(settings))
    console.print(
        f"batch {name} paused: its {batch.count(JobStatus.QUEUED)} queued job(s) will not start, "
        f"{batch.count(JobStatus.RUNNING)} running job(s) finish; `lorafleet resume {name}` goes on"
    )


def resume(settings: Settings, name: str, console: Console) -> Batch:
    """Lift a batch's pause and queue again the jobs workers set aside meanwhile (same task ids)."""
    store = Store(settings.store_url)
    batch = Batch.load(store, name)
    app = make_app(settings)
    set_aside = Ledger.from_settings(settings).resume(name)
    for entry in set_aside:
        send_job(app, entry.message, entry.task_id, entry.queue)
    again = {entry.task_id for entry in set_aside}
    for entry in batch.entries:
        if entry.task_id in again:
            entry.status = JobStatus.QUEUED
    batch.write_manifest(store)
    console.print(f"batch {name} resumed: {len(set_aside)} job(s) set aside while paused are queued again")
    return batch


def retry(settings: Settings, name: str, console: Console) -> Batch:
    """Send the batch's jobs that never went (a submit cut off while sending), each once, and
    enqueue its failed and cancelled jobs again."""
    store = Store(settings.store_url)
    batch = Batch.load(store, name)
    app = make_app(settings)
    refresh(batch, app)
    jobs = batch.read_jobs(store)
    unsent = batch.count(JobStatus.UNSENT)
    if unsent:
        sent = send_unsent(batch, jobs, store, settings)
        console.print(f"batch {name}: {sent} job(s) never sent are sent now")
    Ledger.from_settings(settings).uncancel(name)
    again: dict[str, str] = {}
    for entry in batch.entries:
        if entry.status in FAILED_OR_CANCELLED:
            key = entry.key
            if key not in again:
                again[key] = str(uuid.uuid4())
                send_job(app, jobs[key].message(name), again[key])
            entry.task_id = again[key]
            entry.record(JobStatus.QUEUED)
    batch.write_manifest(store)
    if again or not unsent:  # after an interrupted submit's rest, a line of none again says nothing
        console.print(f"batch {name}: {len(again)} job(s) enqueued again")
    return batch
