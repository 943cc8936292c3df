"""`lorafleet sweep`: expand a sweep spec, submit it as one batch, wait, and write its report."""

import time

from rich.console import Console

from common.job import AdapterResolver, JobLimits
from common.manifest import Batch, JobStatus, check_batch_name
from common.model import model_resolver
from common.settings import Settings
from common.store import Store
from common.sweep_spec import load_sweep
from producer.follow import wait_for_batch
from producer.report import build_report, load_report
from producer.submit import enqueue


def run_sweep(
    path: str, settings: Settings, console: Console, batch_name: str | None = None, compare: str | None = None
) -> bool:
    """Run a sweep to its report; returns True when every job was rendered."""
    store = Store(settings.store_url)
    name, jobs, cells = load_sweep(
        path,
        model_resolver(settings),
        AdapterResolver.from_settings(settings, store),
        JobLimits.from_settings(settings),
    )
    previous = load_report(store, compare) if compare else None
    batch = Batch(check_batch_name(batch_name or f"{name}-{time.strftime('%Y%m%d', time.gmtime())}"))
    enqueue(jobs, batch, store, settings)
    console.print(
        f"sweep {batch.name}: {len(jobs)} cells, {batch.enqueued} enqueued, {batch.count(JobStatus.DONE)} already in the store"
    )
    ok = wait_for_batch(batch, settings, console)
    if not ok:
        console.print("[red]some cells failed: no report[/] (see `lorafleet status " + batch.name + "`)")
        return False
    prompts = {}
    for job, cell in zip(jobs, cells, strict=True):
        prompts[cell["prompt"]] = job["prompt"]
    report = build_report(batch, store, jobs, cells, [prompts[i] for i in sorted(prompts)], previous)
    moved = sum(bool(c["moved"]) for c in report["cells"])
    console.print(
        f"report: {store.uri(f'batches/{batch.name}/report.html')}"
        + (f" ({moved} cells moved since {compare})" if compare else "")
    )
    return True
