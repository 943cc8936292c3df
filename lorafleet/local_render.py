"""`lorafleet render`: render a jobs file in this process, without Redis, into the usual store layout."""

import logging

from rich.console import Console

from common.errors import LorafleetError
from common.jobs_file import load_jobs_for
from common.manifest import Batch, JobStatus
from common.settings import Settings
from common.store import Store
from producer.follow import print_summary
from workers.outputs import render_job
from workers.renderer import Renderer

log = logging.getLogger("lorafleet.render")


def render_file(path: str, settings: Settings, device: str, console: Console, batch_name: str | None = None) -> Batch:
    """Render every job of `path` (checked first, as submit does) and write the batch manifest."""
    store = Store(settings.store_url)
    batch = Batch.new(store, batch_name)
    jobs = load_jobs_for(path, settings, store)
    renderers: dict[str | None, Renderer] = {}  # one warm pipeline per model alias in the file
    for number, job in enumerate(jobs, start=1):
        alias = job.model
        if alias not in renderers:
            tier = settings.model_tier(alias)
            renderers[alias] = Renderer(
                tier.ref, device, settings, f"local-{device}", tier.precision, tier.compile, tier.attention, tier.cache
            )
        entry = batch.add(store, job, JobStatus.RUNNING)
        console.print(f"[{number}/{len(jobs)}] {job.key[:12]} {job.id or job.prompt[:50]}", markup=False)
        try:
            render_job(renderers[alias], store, job)
            entry.record(JobStatus.DONE)
        except LorafleetError as exc:
            entry.record(JobStatus.FAILED, str(exc))
        except Exception as exc:
            log.exception("%s failed", job.key[:12])
            entry.record(JobStatus.FAILED, f"{type(exc).__name__}: {exc}")
    batch.write_manifest(store)
    print_summary(batch, console)
    return batch
