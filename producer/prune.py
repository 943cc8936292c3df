"""`lorafleet prune`: the store does not only grow. Batches submitted before a cutoff go, with
every stored output that no remaining batch references.

The store is content-addressed: a key's video (`videos/<key>.{mp4,png,json,eval.json}`) is shared
by every batch that asked for the same job, so a video goes only when no batch that stays names
its key. A batch whose manifest still records queued, running or paused jobs is never touched
(`lorafleet status NAME` brings a manifest up to date first). Compile-cache entries not written
since the cutoff go too (a worker of the current stack that needs one compiles and shares it again).
"""

import datetime
import re
from dataclasses import dataclass, field

from rich.console import Console

from common.errors import InputError
from common.manifest import UNFINISHED, Batch
from common.store import Store, jobs_path, video_path

OUTPUT_SUFFIXES = ("mp4", "png", "json", "eval.json")
ISO = "%Y-%m-%dT%H:%M:%SZ"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 90m, 12h, 30d or 2w; raises InputError otherwise."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not found:
        raise InputError(f'--older-than "{text}": give a number and a unit, s, m, h, d or w (e.g. 30d)')
    return float(found[1]) * UNITS[found[2]]


@dataclass
class Plan:
    """What a prune removes (or, in a dry run, would remove)."""

    batches: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # old enough, but with unfinished jobs: kept
    files: list[str] = field(default_factory=list)  # store paths
    bytes: int = 0
    shared: int = 0  # outputs of removed batches that a kept batch still references


def cutoff_before(older_than_s: float) -> str:
    """The cutoff of `--older-than`: that long before now, as the store writes times (ISO 8601, UTC)."""
    return (datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=older_than_s)).strftime(ISO)


def parse_time(text: str) -> str:
    """A `--before` time (ISO 8601, UTC; e.g. 2026-11-01 or 2026-11-01T12:00:00Z) as the store writes times."""
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f'--before "{text}": give a date or time such as 2026-11-01 or 2026-11-01T12:00:00Z') from None
    when = when if when.tzinfo else when.replace(tzinfo=datetime.UTC)
    return when.astimezone(datetime.UTC).strftime(ISO)


def plan_prune(store: Store, cutoff: str) -> Plan:
    """Which batches and files a prune removes: batches submitted before `cutoff` (ISO 8601, UTC)."""
    plan, kept_keys, removed_keys = Plan(), set(), set()
    for name in store.list_folder("batches"):
        try:
            batch = Batch.load(store, name)  # each manifest read once
        except InputError:
            continue  # a folder without a manifest: not a batch lorafleet made
        keys = {entry["key"] for entry in batch.entries}
        submitted = store.modified(jobs_path(name))
        old = submitted is not None and submitted < cutoff
        if old and any(entry["status"] in UNFINISHED for entry in batch.entries):
            plan.busy.append(name)
            old = False
        if old:
            plan.batches.append(name)
            removed_keys |= keys
            plan.files += [f"batches/{name}/{file}" for file in list_files(store, f"batches/{name}")]
        else:
            kept_keys |= keys
    plan.shared = len(removed_keys & kept_keys)
    for key in sorted(removed_keys - kept_keys):
        plan.files += [path for suffix in OUTPUT_SUFFIXES if store.exists(path := video_path(key, suffix))]
    for name in store.list_folder("compile-cache", kind="file"):
        written = store.modified(f"compile-cache/{name}")
        if written is not None and written < cutoff:
            plan.files.append(f"compile-cache/{name}")
    plan.bytes = sum(store.size(path) for path in plan.files)
    return plan


def list_files(store: Store, folder: str) -> list[str]:
    """Every file under a store folder, as paths relative to it."""
    files = store.list_folder(folder, kind="file")
    for sub in store.list_folder(folder):
        files += [f"{sub}/{name}" for name in list_files(store, f"{folder}/{sub}")]
    return files


def prune(store: Store, cutoff: str, console: Console, dry_run: bool = False) -> Plan:
    """Remove what `plan_prune` finds (nothing with `dry_run`) and say what, and the bytes freed."""
    plan = plan_prune(store, cutoff)
    verb = "would remove" if dry_run else "removed"
    for name in plan.busy:
        console.print(f"kept batch {name}: it has unfinished jobs (`lorafleet status {name}` to update it)", markup=False)
    for path in plan.files:
        if not dry_run:
            store.delete(path)
        console.print(f"{verb} {store.uri(path)}", markup=False, highlight=False, soft_wrap=True)
    if not dry_run:
        for name in plan.batches:
            store.delete_folder(f"batches/{name}")  # what is left of it: empty folders of a local store
    console.print(
        f"{verb} {len(plan.batches)} batch(es) and {len(plan.files)} file(s), {plan.bytes / 2**20:.1f} MiB; "
        f"kept {plan.shared} video(s) a newer batch also references",
        markup=False,
    )
    return plan
