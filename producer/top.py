"""`lorafleet top`: the fleet at a glance. Every queue with its jobs per priority, the paused
batches, each live worker (device, model and tier, running job with its batch, step and seconds
per step, uptime), and each batch with a running job: its counts and an ETA (producer/follow.py:
`eta_s`). Refreshed live on a terminal; `--once` prints one snapshot (plain lines when the output
is not a terminal), `--json` one as JSON.

Everything comes from Redis (queues, heartbeats, pause flags, results) and the batches' manifests
in the store; nothing here writes.
"""

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from common.broker import make_app
from common.errors import InputError
from common.leases import Ledger
from common.manifest import Batch, JobStatus
from common.protocol import PRIORITIES, queue_lists
from common.settings import Settings, queue_for
from common.store import Store
from producer.follow import eta_s, format_duration, refresh, summary

# kombu's priority steps by name, as `submit --priority` names them (a message with none is "high");
# lorafleet sends nothing to step 9: only another client's priority 7 to 9 lands there
STEP_NAMES = {step: name for name, step in PRIORITIES.items()} | {9: "other"}
# The worker table's columns at each width, as `kubectl get` and `htop` drop theirs: a running job's
# worker, key, batch and step always, unbroken; the rest as the terminal has room.
WORKER_COLUMNS = (
    (150, ("worker", "queue", "device", "model", "tier", "job", "batch", "step", "s/step", "up")),
    (110, ("worker", "queue", "job", "batch", "step", "s/step", "up")),
    (0, ("worker", "job", "batch", "step")),
)


def snapshot(settings: Settings, ledger: Ledger, app, store: Store) -> dict:
    """The fleet now, as plain data (what `--json` prints)."""
    now = time.time()
    queues = {}
    for queue in [queue_for(None), *(queue_for(alias) for alias in settings.models)]:
        pipe = ledger.redis.pipeline(transaction=False)
        for name in queue_lists(queue):
            pipe.llen(name)
        lengths = pipe.execute()
        by_priority = {STEP_NAMES[step]: n for step, n in zip((0, 3, 6, 9), lengths, strict=True)}
        queues[queue] = {"queued": sum(lengths), "by_priority": by_priority}
    paused = ledger.paused_batches()
    workers, running_batches = [], {}
    for record in sorted(ledger.live_workers(), key=lambda r: r.worker):
        job = record.job.model_dump() if record.job else None
        workers.append(record.model_dump(exclude={"job"}) | {"uptime_s": round(now - record.since), "job": job})
        if job and job.get("batch"):
            running_batches.setdefault(job["batch"], record.queue)
    serving = {queue: sum(w["queue"] == queue for w in workers) for queue in queues}
    batches = []
    for name, queue in sorted(running_batches.items()):
        try:
            batch = Batch.load(store, name)
        except InputError:
            continue  # a batch another client named, with no manifest in this store
        refresh(batch, app)
        counts = {state.value: n for state in JobStatus if (n := batch.count(state))}
        eta = eta_s(batch, serving.get(queue, 0))
        batches.append({"name": name, "queue": queue, "jobs": len(batch.entries), "counts": counts, "eta_s": eta})
        batches[-1]["summary"] = summary(batch)
    return {"at": now, "queues": queues, "paused": paused, "workers": workers, "batches": batches}


def render(fleet: dict, width: int = 200) -> Group:
    """A snapshot as rich tables for a terminal `width` columns wide. Names come from Redis, where
    any client may write: text, not markup."""
    queues = Table(title="queues", title_justify="left")
    steps = [step for step, name in STEP_NAMES.items() if name != "other" or any(
        found["by_priority"].get("other") for found in fleet["queues"].values()
    )]  # fmt: skip
    for column in ("queue", "queued", *(STEP_NAMES[step] for step in steps)):
        queues.add_column(column, justify="right" if column != "queue" else "left")
    for queue, found in fleet["queues"].items():
        counts = (str(found["by_priority"].get(STEP_NAMES[step], 0)) for step in steps)
        queues.add_row(Text(queue), str(found["queued"]), *counts)
    shown = next(columns for least, columns in WORKER_COLUMNS if width >= least)
    rows = []
    for worker in fleet["workers"]:
        job = worker["job"] or {}
        rows.append({
            **{field: str(worker.get(field) or "") for field in ("worker", "queue", "device", "model", "tier")},
            "job": job.get("key", "")[:12],
            "batch": str(job.get("batch") or ""),
            "step": f"{job['step']}/{job['steps']}" if job.get("steps") else ("starting" if job else "idle"),
            "s/step": f"{job['step_s']:.2f}" if job.get("step_s") else "",
            "up": format_duration(worker["uptime_s"]),
        })  # fmt: skip
    workers = Table(title=f"workers ({len(fleet['workers'])} live)", title_justify="left")
    # What a reader looks for (the job, its batch and step) keeps its whole width; the worker's name
    # takes what is left, cut with "…"; the other columns are as wide as they need.
    needs = {column: max([len(column), *(len(row[column]) for row in rows)]) for column in shown}
    left = width - (3 * len(shown) + 1) - sum(n for column, n in needs.items() if column != "worker")
    for column in shown:
        if column == "worker":
            workers.add_column(column, no_wrap=True, overflow="ellipsis", max_width=max(8, left))
        else:
            workers.add_column(column, no_wrap=True, overflow="ellipsis", min_width=needs[column])
    for row in rows:
        workers.add_row(*(Text(row[column]) for column in shown))
    batches = Table(title="running batches", title_justify="left")
    for column in ("batch", "jobs", "ETA"):
        batches.add_column(column)
    for batch in fleet["batches"]:
        eta = format_duration(batch["eta_s"]) if batch["eta_s"] is not None else "?"
        batches.add_row(Text(batch["name"]), Text(batch["summary"]), eta)
    paused = Text("paused batches: " + (", ".join(fleet["paused"]) or "none"))
    return Group(queues, workers, batches, paused)


def lines(fleet: dict) -> list[str]:
    """A snapshot as plain lines, for a log or a pipe: nothing folded, one thing a line."""
    found = []
    for queue, queued in fleet["queues"].items():
        priorities = ", ".join(f"{name} {n}" for name, n in queued["by_priority"].items())
        found.append(f"queue {queue}: {queued['queued']} queued ({priorities})")
    for worker in fleet["workers"]:
        job = worker["job"]
        doing = "idle"
        if job:
            doing = f"running {job['key'][:12]} of batch {job.get('batch')}"
            if job.get("steps"):
                doing += f", step {job['step']}/{job['steps']}"
            if job.get("step_s"):
                doing += f", {job['step_s']:.2f} s/step"
        found.append(
            f"worker {worker['worker']}: queue {worker['queue']}, {worker.get('device')}, model {worker.get('model')}, "
            f"{worker.get('tier')}, {doing}, up {format_duration(worker['uptime_s'])}"
        )
    for batch in fleet["batches"]:
        eta = format_duration(batch["eta_s"]) if batch["eta_s"] is not None else "?"
        found.append(f"batch {batch['name']}: {batch['summary']}, ETA {eta}")
    found.append("paused batches: " + (", ".join(fleet["paused"]) or "none"))
    return found


def run_top(settings: Settings, console: Console, once: bool, as_json: bool, interval_s: float = 2.0) -> None:
    """Show the fleet: once (plain tables, or JSON), or live until Ctrl-C on a terminal."""
    import json

    ledger, app, store = Ledger.from_settings(settings), make_app(settings), Store(settings.store_url)
    if as_json:
        print(json.dumps(snapshot(settings, ledger, app, store)))
        return
    if not console.is_terminal:
        for line in lines(snapshot(settings, ledger, app, store)):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    if once:
        console.print(render(snapshot(settings, ledger, app, store), console.width))
        return
    with Live(render(snapshot(settings, ledger, app, store), console.width), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            live.update(render(snapshot(settings, ledger, app, store), console.width), refresh=True)
