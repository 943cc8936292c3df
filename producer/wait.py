"""`lorafleet submit --wait`: live progress of a batch, then a summary table and the final manifest."""

import time

from celery.result import AsyncResult
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from common.batch import Batch
from common.broker import make_app
from common.settings import Settings
from common.store import Store

POLL_INTERVAL_S = 0.5


def _finish(entries: list[dict], result: AsyncResult) -> None:
    """Record a finished task's outcome in its manifest entries."""
    if result.successful():
        outcome = result.result or {}
        for entry in entries:
            entry.update(status="done", worker=outcome.get("worker"), error=None)
    else:
        error = result.result
        reason = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        for entry in entries:
            entry.update(status="failed", error=reason)


def wait_for_batch(batch: Batch, settings: Settings, console: Console) -> bool:
    """Follow every queued job of `batch` until it ends; returns True when none failed."""
    app = make_app(settings)
    pending: dict[str, list[dict]] = {}
    for entry in batch.entries:
        if entry["status"] == "queued":
            pending.setdefault(entry["task_id"], []).append(entry)
    total = len(batch.entries)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        overall = progress.add_task("", total=total)
        running: dict[str, int] = {}  # task id -> its progress row
        while pending:
            for task_id, entries in list(pending.items()):
                result = AsyncResult(task_id, app=app)
                state = result.state
                if state in ("SUCCESS", "FAILURE"):
                    _finish(entries, result)
                    del pending[task_id]
                    if task_id in running:
                        progress.remove_task(running.pop(task_id))
                elif state == "PROGRESS" and isinstance(result.info, dict):
                    info = result.info
                    label = f"  {info.get('worker', '?')} {info.get('key', '')[:12]}"
                    if task_id not in running:
                        running[task_id] = progress.add_task(label, total=info.get("steps"))
                    progress.update(running[task_id], description=label, completed=info.get("step", 0))
            done, failed = batch.count("done"), batch.count("failed")
            progress.update(
                overall,
                completed=done + failed,
                description=f"batch {batch.name}: [green]{done} done[/] · [red]{failed} failed[/] · {total} jobs",
            )
            if pending:
                time.sleep(POLL_INTERVAL_S)
    batch.write_manifest(Store(settings.store_url))
    batch.print_summary(console)
    return batch.count("done") == total
