"""Controlling a submitted batch: cancel it, or enqueue its failed and cancelled jobs again."""

import uuid

from rich.console import Console

from common.broker import make_app, send_job
from common.leases import Ledger
from common.manifest import FAILED_OR_CANCELLED, Batch, JobStatus
from common.settings import Settings
from common.store import Store
from producer.follow import refresh


def cancel(settings: Settings, name: str, console: Console) -> Batch:
    """Cancel a batch: its queued jobs are cancelled at once (a worker that takes one anyway skips
    it), running ones stop at their next denoising step."""
    store = Store(settings.store_url)
    batch = Batch.load(store, name)
    Ledger.from_settings(settings).cancel(name)
    refresh(batch, make_app(settings))
    queued = [entry for entry in batch.entries if entry["status"] == JobStatus.QUEUED]
    for entry in queued:
        entry.update(status=JobStatus.CANCELLED, error=f"batch {name} was cancelled before the job started")
    batch.write_manifest(store)
    running = batch.count(JobStatus.RUNNING)
    console.print(
        f"batch {name}: cancelled {len(queued)} queued job(s); {running} running job(s) stop at their next step "
        f"(see `lorafleet status {name}`)"
    )
    return batch


def retry(settings: Settings, name: str, console: Console) -> Batch:
    """Enqueue the batch's failed and cancelled jobs again."""
    store = Store(settings.store_url)
    batch = Batch.load(store, name)
    app = make_app(settings)
    refresh(batch, app)
    jobs = batch.read_jobs(store)
    Ledger.from_settings(settings).uncancel(name)
    again: dict[str, str] = {}
    for entry in batch.entries:
        if entry["status"] in FAILED_OR_CANCELLED:
            key = entry["key"]
            if key not in again:
                again[key] = str(uuid.uuid4())
                send_job(app, {**jobs[key], "batch": name}, again[key])
            entry.update(status=JobStatus.QUEUED, task_id=again[key], error=None)
    batch.write_manifest(store)
    console.print(f"batch {name}: {len(again)} job(s) enqueued again")
    return batch
