"""Following a submitted batch: its jobs' states from Celery's results and the store, progress
until every job ends (re-sending jobs found nowhere), the status command, the result table."""

import logging
import time

import redis
from celery.result import AsyncResult
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.broker import make_app, send_job
from common.errors import StoreError
from common.leases import Ledger
from common.manifest import RETRYABLE, UNFINISHED, Batch, JobStatus
from common.settings import Settings, queue_for
from common.store import Store, video_exists

log = logging.getLogger("lorafleet.producer")
POLL_INTERVAL_S = 0.5
STORE_CHECK_EVERY = 20  # polls: look for finished videos in the store every 10 s
ENDED = {"SUCCESS", "FAILURE"}


def refresh(batch: Batch, app, store: Store | None = None) -> dict[str, dict]:
    """Update the batch's unfinished entries from their tasks' results, and, given the store, from
    the videos already in it (the store is the truth: a worker killed after its upload but before
    its result reached Redis leaves a video and no result); returns the progress
    ({"worker", "key", "step", "steps"}) of each running task by task id."""
    running = {}
    tasks: dict[str, list[dict]] = {}
    for entry in batch.entries:
        if entry["status"] in UNFINISHED:
            tasks.setdefault(entry["task_id"], []).append(entry)
    for task_id, entries in tasks.items():
        result = AsyncResult(task_id, app=app)
        state = result.state
        if state in ENDED:
            _record(entries, result)
        elif state in ("STARTED", "PROGRESS"):
            for entry in entries:
                entry["status"] = JobStatus.RUNNING
            if state == "PROGRESS" and isinstance(result.info, dict):
                running[task_id] = result.info
    if store is not None:
        for entry in batch.entries:
            if entry["status"] in UNFINISHED and video_exists(store, entry["key"]):
                entry.update(status=JobStatus.DONE, error=None)
                running.pop(entry["task_id"], None)
    return running


def _record(entries: list[dict], result: AsyncResult) -> None:
    if result.successful():
        outcome = result.result or {}
        for entry in entries:
            entry.update(status=JobStatus.DONE, worker=outcome.get("worker"), error=None)
        return
    error = result.result
    cancelled = type(error).__name__ == "JobCancelled"
    reason = (
        str(error)
        if cancelled
        else f"{type(error).__name__}: {error}"
        if isinstance(error, BaseException)
        else str(error)
    )
    for entry in entries:
        entry.update(status=JobStatus.CANCELLED if cancelled else JobStatus.FAILED, error=reason)


def wait_for_batch(batch: Batch, settings: Settings, console: Console) -> bool:
    """Follow every job of `batch` until it ends, riding out Redis outages; returns True when all are done."""
    app = make_app(settings)
    total = len(batch.entries)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("", total=total)
        rows: dict[str, int] = {}  # task id -> its progress row
        store = Store(settings.store_url)
        ledger = Ledger.from_settings(settings)
        orphans: dict[str, int] = {}  # task id -> checks in a row it was found nowhere
        polls = 0
        while True:
            polls += 1
            try:
                running = refresh(batch, app, store if polls % STORE_CHECK_EVERY == 0 else None)
            except (redis.RedisError, OSError, RuntimeError) as exc:  # Celery's result store says RuntimeError
                progress.update(
                    overall,
                    description=f"batch {batch.name}: [yellow]Redis unreachable ({type(exc).__name__}), retrying[/]",
                )
                time.sleep(2 * POLL_INTERVAL_S)
                continue
            if polls % STORE_CHECK_EVERY == 0:
                resend_orphans(batch, app, store, ledger, orphans)
            for task_id in list(rows):
                if task_id not in running:
                    progress.remove_task(rows.pop(task_id))
            for task_id, info in running.items():
                label = f"  {info.get('worker', '?')} {info.get('key', '')[:12]}"
                if task_id not in rows:
                    rows[task_id] = progress.add_task(label, total=info.get("steps"))
                progress.update(rows[task_id], description=label, completed=info.get("step", 0))
            done, failed, cancelled = (
                batch.count(JobStatus.DONE),
                batch.count(JobStatus.FAILED),
                batch.count(JobStatus.CANCELLED),
            )
            progress.update(
                overall,
                completed=done + failed + cancelled,
                description=f"batch {batch.name}: [green]{done} done[/] · [red]{failed} failed[/] · {total} jobs",
            )
            if done + failed + cancelled == total:
                break
            time.sleep(POLL_INTERVAL_S)
    write_manifest_or_warn(batch, store, console)
    print_summary(batch, console)
    return done == total


def write_manifest_or_warn(batch: Batch, store: Store, console: Console) -> None:
    """Bring the manifest in the store up to date; a full or read-only store is a warning here,
    so that the user still sees the batch's state."""
    try:
        batch.write_manifest(store)
    except StoreError as exc:
        console.print(f"warning: the manifest was not updated: {exc}", style="yellow", markup=False)


def resend_orphans(batch: Batch, app, store: Store, ledger: Ledger, orphans: dict[str, int], checks: int = 3) -> None:
    """Send again the jobs found nowhere (no result, an empty queue, no worker holding them) at
    `checks` checks in a row. A job sent twice is rendered once: its key is in the store or locked."""
    # A running job is orphaned too when Redis restarted without its data: its lease is gone, and
    # its worker, unable to prove it holds the job, stopped without writing.
    pending = {e["task_id"]: e for e in batch.entries if e["status"] in UNFINISHED}
    jobs = None
    for task_id, entry in pending.items():
        queue = queue_for(entry.get("model"))
        if AsyncResult(task_id, app=app).state != "PENDING" or not ledger.orphaned(task_id, queue):
            orphans.pop(task_id, None)
            continue
        orphans[task_id] = orphans.get(task_id, 0) + 1
        if orphans[task_id] >= checks:
            if jobs is None:
                jobs = batch.read_jobs(store)
            log.warning("%s (%s) was found nowhere %d times: sending it again", entry["key"][:12], task_id, checks)
            send_job(app, {**jobs[entry["key"]], "batch": batch.name}, task_id)
            orphans.pop(task_id)


def status(settings: Settings, name: str, console: Console) -> Batch:
    """Bring the batch's manifest up to date and show counts by state, and each failure's reason."""
    store = Store(settings.store_url)
    batch = Batch.load(store, name)
    refresh(batch, make_app(settings), store)
    write_manifest_or_warn(batch, store, console)
    counts = {state.value: batch.count(state) for state in (JobStatus.DONE, *UNFINISHED[::-1], *RETRYABLE)}
    console.print(
        f"batch {name}: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + f" of {len(batch.entries)} jobs"
    )
    for entry in batch.entries:
        if entry["status"] in RETRYABLE:
            console.print(
                f"  {entry['key'][:12]} {entry['id'] or ''}: {entry['status']}: {entry['error']}", markup=False
            )
    return batch


def print_summary(batch: Batch, console: Console) -> None:
    """A table of every job: its id, key, lora_scale, seed, status, and its video or its error."""
    table = Table(
        title=f"batch {batch.name}: {batch.count(JobStatus.DONE)} done, {batch.count(JobStatus.FAILED)} failed, "
        f"{len(batch.entries)} jobs"
    )
    for column in ("id", "key", "scale", "seed", "status", "video / error"):
        table.add_column(column, overflow="fold")
    for entry in batch.entries:
        style = {JobStatus.DONE: "green", JobStatus.FAILED: "red", JobStatus.CANCELLED: "yellow"}.get(entry["status"])
        detail = entry["error"] if entry["status"] in RETRYABLE else entry["video"]
        table.add_row(
            entry["id"] or "",
            entry["key"][:12],
            str(entry.get("lora_scale", "")),
            str(entry.get("seed", "")),
            f"[{style or 'white'}]{entry['status']}[/]",
            detail,
        )
    console.print(table)
