"""Following a submitted batch: its jobs' states from Celery's results and the store, progress
until every job ends (re-sending jobs found nowhere), the status command, the result table."""

import json
import logging
import math
import time
from collections import Counter

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from common.broker import check_redis, make_app, queue_length, send_job, sent_so_far, task_metas
from common.bulk import paused_gc
from common.errors import InputError, JobCancelled, StoreError, WaitTimeout
from common.leases import Ledger, WorkerRecord
from common.manifest import FAILED_OR_CANCELLED, UNFINISHED, Batch, JobStatus, ManifestEntry
from common.protocol import ENDED, RUNNING_STATES, ProgressReport, RenderResult, TaskState
from common.retry import backoff
from common.settings import Settings, queue_for
from common.store import Store, jobs_path, videos_present

log = logging.getLogger("lorafleet.producer")
# `wait` polls every 0.5 s after a change, and twice as long after each poll that saw none, up to
# 2 s: a batch's jobs take seconds to minutes, and each poll is an MGET (Redis traffic grew with
# every job's length before).
POLL_INTERVAL_S = 0.5
MAX_POLL_INTERVAL_S = 2.0
STORE_CHECK_S = 10.0  # look for finished videos in the store this often
WORKER_CHECK_S = 5.0  # look for live workers, their jobs' progress and jobs found nowhere this often
NO_WORKER_REPEAT_S = 30
PLAIN_SUMMARY_S = 30


def refresh(batch: Batch, app, store: Store | None = None) -> None:
    """Update the batch's unfinished entries from their tasks' results (read in bulk: one MGET
    per 10,000 tasks), and, given the store, from the videos already in it (the store is the
    truth: a worker killed after its upload but before its result reached Redis leaves a video
    and no result)."""
    with paused_gc():  # a big batch: many small objects; a full collection would cost more than the poll
        if batch.count(JobStatus.UNSENT):  # a submit cut off while sending: its counter says what went
            batch.settle_sent(sent_so_far(app, batch.name))
        tasks: dict[str, list[ManifestEntry]] = {}
        for entry in batch.entries:
            if entry.status in UNFINISHED:
                tasks.setdefault(entry.task_id, []).append(entry)
        for task_id, meta in task_metas(app, list(tasks)).items():
            state, entries = meta["status"], tasks[task_id]
            if state in ENDED:
                _record(entries, state, meta["result"])
            elif state == TaskState.PAUSED:
                for entry in entries:
                    entry.status = JobStatus.PAUSED
            elif state in RUNNING_STATES:
                for entry in entries:
                    entry.status = JobStatus.RUNNING
    if store is not None:
        unfinished = [entry for entry in batch.entries if entry.status in UNFINISHED]
        present = videos_present(store, [entry.key for entry in unfinished])
        for entry in unfinished:
            if entry.key in present:
                entry.record(JobStatus.DONE)


def progress_of(batch: Batch, live: list[WorkerRecord]) -> dict[str, ProgressReport]:
    """The denoising progress of each running job of the batch, by task id, as its worker's
    heartbeat last said it (every HEARTBEAT_S): progress costs Redis nothing per step."""
    rendering = {w.job.key: w for w in live if w.job is not None and w.job.step is not None and w.job.steps}
    return {
        entry.task_id: ProgressReport(key=entry.key, step=w.job.step, steps=w.job.steps, worker=w.worker)
        for entry in batch.entries
        if entry.status == JobStatus.RUNNING and (w := rendering.get(entry.key)) is not None
    }


def parse_report(model, raw):
    """A worker's report read through its model (common/protocol.py), or None if it is not one:
    any client can write a task's result."""
    try:
        return model.model_validate(raw)
    except ValueError:
        return None


def _record(entries: list[ManifestEntry], state: str, outcome) -> None:
    if state == TaskState.SUCCESS:
        result = parse_report(RenderResult, outcome)
        for entry in entries:
            entry.record(JobStatus.DONE)
            entry.worker = result.worker if result is not None else None
            if result is not None and result.seconds is not None:
                entry.seconds = result.seconds  # the job's own time on its worker: what ETAs are made of
        return
    cancelled = state == TaskState.REVOKED or isinstance(outcome, JobCancelled)
    if state == TaskState.REVOKED:
        reason = "revoked through Celery (Flower's Revoke or Terminate, `celery control revoke`) before it started"
    elif isinstance(outcome, BaseException) and not cancelled:
        reason = f"{type(outcome).__name__}: {outcome}"
    else:
        reason = str(outcome)
    for entry in entries:
        entry.record(JobStatus.CANCELLED if cancelled else JobStatus.FAILED, reason)


def wait_for_batch(batch: Batch, settings: Settings, console: Console, timeout_s: float | None = None) -> bool:
    """Follow every job of `batch` until it ends, riding out Redis outages; returns True when all
    are done. Says within seconds when no live worker serves a queue the batch waits on, and again
    every 30 s while that lasts. Raises WaitTimeout after `timeout_s`, leaving the jobs queued."""
    app = make_app(settings)
    store = Store(settings.store_url)
    ledger = Ledger.from_settings(settings)
    view = LiveView(batch, console) if console.is_terminal else PlainView(batch, console)
    orphans: dict[str, int] = {}  # task id -> checks in a row it was found nowhere
    warned: dict[str, float] = {}  # queue nobody serves -> when that was last said
    started = time.monotonic()
    next_store_check, next_worker_check = started + STORE_CHECK_S, started
    workers, outage = 0, 0  # outage: failed polls in a row
    interval, seen = POLL_INTERVAL_S, None
    live: list[WorkerRecord] = []
    said_unsent = False
    with view:
        while True:
            now = time.monotonic()
            try:
                look_in_store = now >= next_store_check
                refresh(batch, app, store if look_in_store else None)
                if look_in_store:
                    next_store_check = now + STORE_CHECK_S
                if now >= next_worker_check:
                    live = ledger.live_workers()
                    workers = warn_of_unserved_queues(batch, live, warned, console)
                    resend_orphans(batch, app, store, ledger, orphans)  # three checks: found nowhere for 10 s
                    next_worker_check = now + WORKER_CHECK_S
                running = progress_of(batch, live)
            except (redis.RedisError, OSError, RuntimeError) as exc:  # Celery's result store says RuntimeError
                outage += 1
                view.note(f"Redis unreachable ({type(exc).__name__}), retrying")
                time.sleep(POLL_INTERVAL_S + backoff(outage, base=POLL_INTERVAL_S, cap=10))
                continue
            outage = 0
            if batch.count(JobStatus.UNSENT) and not said_unsent:
                said_unsent = True
                console.print(f"warning: {never_sent(batch)}; waiting for the rest", style="yellow", markup=False)
            view.update(running, eta_s(batch, workers))
            if not any(entry.status in UNFINISHED for entry in batch.entries):
                break
            standing = (Counter(entry.status for entry in batch.entries), running)
            interval = POLL_INTERVAL_S if standing != seen else min(2 * interval, MAX_POLL_INTERVAL_S)
            seen = standing
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                write_manifest_or_warn(batch, store, console)
                raise WaitTimeout(
                    f"batch {batch.name}: {summary(batch)} after {timeout_s:g}s; the unfinished jobs stay queued: "
                    f"follow them with `lorafleet wait {batch.name}`"
                )
            time.sleep(interval)
    write_manifest_or_warn(batch, store, console)
    view.finish()
    return batch.count(JobStatus.DONE) == len(batch.entries)


def warn_of_unserved_queues(batch: Batch, live: list[WorkerRecord], warned: dict[str, float], console: Console) -> int:
    """Say which queues the batch waits on that no live worker (`live`) serves (each again every
    30 s); returns how many live workers serve the queues it waits on."""
    aliases = {queue_for(e.model): e.model for e in batch.entries if e.status in UNFINISHED}
    served = {worker.queue for worker in live}
    now = time.monotonic()
    for queue, alias in aliases.items():
        if queue in served:
            warned.pop(queue, None)
        elif now - warned.get(queue, -math.inf) >= NO_WORKER_REPEAT_S:
            warned[queue] = now
            model = f" --model {alias}" if alias else ""
            console.print(
                f"warning: no live worker serves queue {queue}: its jobs wait until one does. Start one with "
                f"`lorafleet worker --device cpu{model}` or `lorafleet workers --gpus all{model}`",
                style="yellow",
                markup=False,
                soft_wrap=True,
            )
    return sum(worker.queue in aliases for worker in live)


def eta_s(batch: Batch, workers: int) -> float | None:
    """Seconds until `batch` ends at the pace it has shown: the median time of its jobs rendered so
    far (each as its worker measured it: adapters to upload), times its unfinished jobs, divided by
    the live workers serving its queue. 0 when nothing is left; None before its first render ends
    or while no worker serves it. Jobs of other batches sharing the workers make it optimistic."""
    left = sum(entry.status in UNFINISHED for entry in batch.entries)
    if not left:
        return 0.0
    times = sorted(entry.seconds for entry in batch.entries if entry.seconds)
    if not times or workers <= 0:
        return None
    return times[len(times) // 2] * left / workers


def format_duration(seconds: float) -> str:
    """`45s`, `3m20s`, `2h05m`: a duration for a person."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def summary(batch: Batch) -> str:
    """`3 done, 1 failed, 2 running, 4 queued of 10 jobs`: the counts that are not zero."""
    states = (JobStatus.DONE, *FAILED_OR_CANCELLED, *UNFINISHED[::-1], JobStatus.UNSENT)
    counts = [(batch.count(state), state.value) for state in states]
    return ", ".join(f"{n} {state}" for n, state in counts if n) + f" of {len(batch.entries)} jobs"


class LiveView:
    """Progress in a terminal: a bar for the batch and one per running job's denoising steps."""

    def __init__(self, batch: Batch, console: Console):
        self.batch = batch
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.progress = Progress(*columns, console=console)
        self.overall = self.progress.add_task("", total=len(batch.entries))
        self.rows: dict[str, int] = {}  # task id -> its progress row

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def finish(self) -> None:
        """The table of every job, once the bars are gone."""
        print_summary(self.batch, self.progress.console)

    def note(self, text: str) -> None:
        """A passing condition, shown in place of the batch's counts."""
        self.progress.update(self.overall, description=f"batch {self.batch.name}: [yellow]{text}[/]")

    def update(self, running: dict[str, ProgressReport], eta: float | None = None) -> None:
        """Show the batch's counts, its ETA and each running job's step."""
        for task_id in list(self.rows):
            if task_id not in running:
                self.progress.remove_task(self.rows.pop(task_id))
        for task_id, info in running.items():
            label = f"  {info.worker} {info.key[:12]}"
            if task_id not in self.rows:
                self.rows[task_id] = self.progress.add_task(label, total=info.steps)
            self.progress.update(self.rows[task_id], description=label, completed=info.step)
        ended = sum(entry.status not in UNFINISHED for entry in self.batch.entries)
        done, failed = self.batch.count(JobStatus.DONE), self.batch.count(JobStatus.FAILED)
        description = (
            f"batch {self.batch.name}: [green]{done} done[/] · [red]{failed} failed[/] · {len(self.batch.entries)} jobs"
            + (f" · ETA {format_duration(eta)}" if eta else "")
        )
        self.progress.update(self.overall, completed=ended, description=description)


class PlainView:
    """Progress for a log (cron, CI, a pipe): a line per job that ends, a summary every 30 s."""

    def __init__(self, batch: Batch, console: Console):
        self.batch = batch
        self.console = console
        self.seen = [entry.status for entry in batch.entries]
        self.said_at = time.monotonic()

    def __enter__(self):
        for entry in self.batch.entries:  # the jobs that had ended before the wait began
            if entry.status not in UNFINISHED:
                self.say(job_line(entry))
        return self

    def __exit__(self, *exc):
        return None

    def finish(self) -> None:
        """Every job was said as it ended: the counts close the log."""
        self.say(f"batch {self.batch.name}: {summary(self.batch)}")

    def say(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        """A passing condition, said at most every 30 s."""
        if time.monotonic() - self.said_at >= PLAIN_SUMMARY_S:
            self.said_at = time.monotonic()
            self.say(f"batch {self.batch.name}: {text}")

    def update(self, running: dict[str, ProgressReport], eta: float | None = None) -> None:
        """Say each job that ended since the last update, and the counts (with the ETA) every 30 s."""
        for i, entry in enumerate(self.batch.entries):
            if entry.status != self.seen[i] and entry.status not in UNFINISHED:
                self.say(job_line(entry))
            self.seen[i] = entry.status
        if time.monotonic() - self.said_at >= PLAIN_SUMMARY_S:
            self.said_at = time.monotonic()
            self.say(
                f"batch {self.batch.name}: {summary(self.batch)}" + (f", ETA {format_duration(eta)}" if eta else "")
            )


def job_line(entry: ManifestEntry) -> str:
    """One job as one line: status, key, id, scale, seed, then its video or its error."""
    detail = entry.error if entry.status in FAILED_OR_CANCELLED else entry.video
    label = f" {entry.id}" if entry.id else ""
    return (
        f"{entry.status:<9} {entry.key[:12]}{label} "
        f"scale={entry.lora_scale} seed={entry.seed} {detail}"
    )


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
    pending = {e.task_id: e for e in batch.entries if e.status in UNFINISHED}
    # While a queue holds jobs none of its jobs is orphaned: one length per queue spares a
    # 100,000-job batch 100,000 lookups. Only the jobs of empty queues are looked at one by one.
    lengths: dict[str, int] = {}
    for entry in pending.values():
        queue = queue_for(entry.model)
        if queue not in lengths:
            lengths[queue] = queue_length(ledger.redis, queue)
    candidates = [t for t, e in pending.items() if lengths[queue_for(e.model)] == 0]
    with_result = task_metas(app, candidates)
    jobs = None
    for task_id, entry in pending.items():
        queue = queue_for(entry.model)
        if lengths[queue] or task_id in with_result or not ledger.orphaned(task_id, queue):
            orphans.pop(task_id, None)
            continue
        orphans[task_id] = orphans.get(task_id, 0) + 1
        if orphans[task_id] >= checks:
            if jobs is None:
                jobs = batch.read_jobs(store)
            log.warning("%s (%s) was found nowhere %d times: sending it again", entry.key[:12], task_id, checks)
            send_job(app, jobs[entry.key].message(batch.name), task_id)
            orphans.pop(task_id)


def status(settings: Settings, name: str, console: Console, as_json: bool = False) -> Batch:
    """Bring the batch's manifest up to date and show counts by state and each failure's reason
    (or, with `as_json`, the counts and every entry as JSON). With Redis down, show the states as
    last recorded, say so, and raise Redis' error."""
    store = Store(settings.store_url)
    batch = Batch.load(store, name)
    try:
        check_redis(settings.redis_url)
    except redis.RedisError as exc:
        unreachable = exc
        console.print("warning: Redis is unreachable: the states below are as last recorded", style="yellow")
    else:
        unreachable = None
        refresh(batch, make_app(settings), store)
        write_manifest_or_warn(batch, store, console)
    shown = (JobStatus.DONE, *UNFINISHED[::-1], *FAILED_OR_CANCELLED, JobStatus.UNSENT)
    counts = {state.value: batch.count(state) for state in shown}
    if as_json:
        entries = [entry.as_dict() for entry in batch.entries]
        print(json.dumps({"batch": name, "counts": counts, "jobs": len(batch.entries), "entries": entries}))
    else:
        console.print(
            f"batch {name}: "
            + ", ".join(f"{n} {state}" for state, n in counts.items() if n or state not in OPTIONAL_COUNTS)
            + f" of {len(batch.entries)} jobs"
        )
        if batch.count(JobStatus.UNSENT):
            console.print(never_sent(batch), markup=False, soft_wrap=True)
        for entry in batch.entries:
            if entry.status in FAILED_OR_CANCELLED:
                console.print(f"  {job_line(entry)}", markup=False, highlight=False, soft_wrap=True)
    if unreachable is not None:
        raise unreachable
    return batch


OPTIONAL_COUNTS = (JobStatus.PAUSED, JobStatus.UNSENT)  # said only when a batch has some


def never_sent(batch: Batch) -> str:
    """What to do about a batch's unsent jobs."""
    return (
        f"{batch.count(JobStatus.UNSENT)} job(s) of batch {batch.name} were never sent (its submit was cut off "
        f"while sending): `lorafleet retry {batch.name}` sends them, none twice"
    )


def list_batches(store: Store) -> list[dict]:
    """Every batch in the store, oldest first: name, when it was submitted, its job count and
    counts by state as its manifest last recorded them, and whether it is a sweep."""
    found = []
    for name in store.list_folder("batches"):
        try:
            batch = Batch.load(store, name)
        except InputError:
            continue  # a folder without a manifest (or with a name lorafleet never makes)
        except StoreError as exc:  # a malformed manifest: the other batches are still listed
            log.warning("skipped batch %s: %s", name, exc)
            continue
        found.append(
            {
                "name": name,
                "submitted": store.modified(jobs_path(name)),
                "jobs": len(batch.entries),
                "counts": {state.value: n for state in JobStatus if (n := batch.count(state))},
                "sweep": store.exists(f"batches/{name}/report.json") or store.exists(f"batches/{name}/spec.yaml"),
            }
        )
    return sorted(found, key=lambda b: (b["submitted"] or "", b["name"]))


def print_summary(batch: Batch, console: Console) -> None:
    """Every job with its video or its error: a table in a terminal, one line per job in a log
    (full paths, never wrapped)."""
    title = f"batch {batch.name}: {summary(batch)}"
    if not console.is_terminal:
        for entry in batch.entries:
            console.print(job_line(entry), markup=False, highlight=False, soft_wrap=True)
        console.print(title, markup=False, highlight=False, soft_wrap=True)
        return
    # A video's full URI folds over several lines of an 80-column table in every row: the table
    # says once where the videos are and how they are named (a log, or --json, has every full path).
    folders = {entry.video.rsplit("/", 1)[0] for entry in batch.entries if entry.video}
    where = None
    if batch.count(JobStatus.DONE) and len(folders) == 1:
        where = f"videos: {folders.pop()}/KEY.mp4 (full keys: lorafleet status {batch.name} --json)"
    table = Table(title=title, caption=where, caption_justify="left")
    for column in ("id", "key", "scale", "seed", "status", "error" if where else "video / error"):
        table.add_column(column, overflow="fold")
    for entry in batch.entries:
        style = {JobStatus.DONE: "green", JobStatus.FAILED: "red", JobStatus.CANCELLED: "yellow"}.get(entry.status)
        detail = entry.error if entry.status in FAILED_OR_CANCELLED else None if where else entry.video
        # Ids and errors are the user's or a worker's text: shown as text, never read as markup.
        table.add_row(
            Text(entry.id or ""),
            entry.key[:12],
            str(entry.lora_scale) if entry.lora_scale is not None else "",
            str(entry.seed) if entry.seed is not None else "",
            Text(str(entry.status), style=style or "white"),
            Text(str(detail or "")),
        )
    console.print(table)
