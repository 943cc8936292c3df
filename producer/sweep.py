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
    path: str,
    settings: Settings,
    console: Console,
    batch_name: str | None = None,
    compare: str | None = None,
    timeout_s: float | None = None,
) -> bool:
    """Run a sweep to its report; returns True when every job was rendered. `compare` names the
    batch to compare with ("latest": the newest earlier batch of this sweep); a baseline that is
    missing is a warning, and the report is written without comparison."""
    store = Store(settings.store_url)
    resolver = AdapterResolver.from_settings(settings, store)
    name, jobs, cells = load_sweep(path, model_resolver(settings), resolver, JobLimits.from_settings(settings))
    batch = Batch.new(batch_name or f"{name}-{time.strftime('%Y%m%d', time.gmtime())}")
    previous = baseline(store, compare, name, batch.name, console) if compare else None
    enqueue(jobs, batch, store, settings)
    with open(path, "rb") as f:
        store.write_bytes(f"batches/{batch.name}/spec.yaml", f.read())  # what this batch was run from
    console.print(
        f"sweep {batch.name}: {len(jobs)} cells, {batch.enqueued} enqueued, {batch.count(JobStatus.DONE)} already in the store"
    )
    if not wait_for_batch(batch, settings, console, timeout_s):
        console.print("[red]some cells failed: no report[/] (see `lorafleet status " + batch.name + "`)")
        return False
    prompts = {}
    for job, cell in zip(jobs, cells, strict=True):
        prompts[cell["prompt"]] = job["prompt"]
    report = build_report(batch, store, jobs, cells, [prompts[i] for i in sorted(prompts)], previous)
    moved = sum(bool(c["moved"]) for c in report["cells"])
    compared = f" ({moved} cells moved since {previous['batch']})" if previous else ""
    console.print(f"report: {store.uri(f'batches/{batch.name}/report.html')}{compared}")
    return True


def baseline(store: Store, compare: str, sweep: str, batch: str, console: Console) -> dict | None:
    """The report to compare tonight's with, or None (said as a warning): `compare` names a batch,
    or "latest", the newest earlier batch of the same sweep that has a report. Never the batch
    itself: a second run on the same day compares with the run before it, not with itself."""
    if compare == "latest":
        earlier = [
            name
            for name in store.list_folder("batches")
            if name.startswith(f"{sweep}-") and name != batch and store.exists(f"batches/{name}/report.json")
        ]
        if not earlier:
            console.print(
                f"warning: no earlier batch of sweep {sweep} has a report: nothing to compare with", style="yellow"
            )
            return None
        compare = max(earlier, key=lambda name: store.modified(f"batches/{name}/report.json") or name)
    if compare == batch:
        console.print(
            f"warning: --compare {compare} is this run's own batch (a second run today?): not compared; "
            "give --batch a new name, or --compare latest",
            style="yellow",
        )
        return None
    try:
        report = load_report(store, check_batch_name(compare))
    except FileNotFoundError:
        console.print(
            f"warning: batch {compare} has no report in the store: the report is written without comparison",
            style="yellow",
        )
        return None
    console.print(f"comparing with {compare}")
    return report
