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
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

from rich.console import Console

from common.errors import InputError, StoreError
from common.manifest import UNFINISHED, Batch
from common.store import Store, jobs_path, manifest_path, video_path
from common.store_lock import StoreLock

OUTPUT_SUFFIXES = ("mp4", "png", "json", "eval.json")
MANIFEST = "manifest.jsonl"
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
    unreadable: dict[str, str] = field(default_factory=dict)  # batch -> why its manifest cannot be read: kept
    outputs: list[str] = field(default_factory=list)  # store paths of videos and compile-cache entries
    batch_files: list[str] = field(default_factory=list)  # store paths of the removed batches' files, manifests last
    bytes: int = 0
    shared: int = 0  # outputs of removed batches that a kept batch still references
    failed: list[str] = field(default_factory=list)  # store paths a delete was refused for

    @property
    def files(self) -> list[str]:
        """Every store path it removes, in the order it removes them."""
        return self.outputs + self.batch_files


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
        except StoreError as exc:  # a malformed manifest: kept, and so is every key it may name
            plan.unreadable[name] = str(exc)
            kept_keys |= keys_named(store, name)
            continue
        keys = {entry.key for entry in batch.entries}
        submitted = store.modified(jobs_path(name))
        old = submitted is not None and submitted < cutoff
        if old and any(entry.status in UNFINISHED for entry in batch.entries):
            plan.busy.append(name)
            old = False
        if old:
            plan.batches.append(name)
            removed_keys |= keys
            files = sorted(list_files(store, f"batches/{name}"), key=lambda file: file == MANIFEST)
            plan.batch_files += [
                f"batches/{name}/{file}" for file in files
            ]  # the manifest last: a re-run finds the rest
        else:
            kept_keys |= keys
    plan.shared = len(removed_keys & kept_keys)
    for key in sorted(removed_keys - kept_keys):
        plan.outputs += [path for suffix in OUTPUT_SUFFIXES if store.exists(path := video_path(key, suffix))]
    for name in store.list_folder("compile-cache", kind="file"):
        written = store.modified(f"compile-cache/{name}")
        if written is not None and written < cutoff:
            plan.outputs.append(f"compile-cache/{name}")
    plan.bytes = sum(store.size(path) for path in plan.files)
    return plan


def keys_named(store: Store, name: str) -> set[str]:
    """Every job key a batch's manifest names, read line by line however malformed the rest of it is."""
    try:
        text = store.read_bytes(manifest_path(name)).decode(errors="replace")
    except (FileNotFoundError, StoreError):
        return set()
    return set(re.findall(r'"key"\s*:\s*"([0-9a-f]{64})"', text))


def list_files(store: Store, folder: str) -> list[str]:
    """Every file under a store folder, as paths relative to it."""
    files = store.list_folder(folder, kind="file")
    for sub in store.list_folder(folder):
        files += [f"{sub}/{name}" for name in list_files(store, f"{folder}/{sub}")]
    return files


def prune(
    store: Store,
    cutoff: str,
    console: Console,
    lock: StoreLock | None = None,
    planned: Callable[[Plan], None] | None = None,
) -> Plan:
    """Remove what `plan_prune` finds and say what, and the bytes freed; without a `lock`, a dry run
    that removes nothing. The lock is held alone from the plan to the last delete: no submit calls a
    video done meanwhile (common/store_lock.py). `planned` is called between the two (tests hold
    prune there). Outputs go first and each batch's manifest last, so a prune that stops part of the
    way (a delete refused) leaves batches that the next prune finds and finishes."""
    waiting = lambda what: console.print(f"waiting for {what} before pruning", markup=False)  # noqa: E731
    with lock.exclusive(on_wait=waiting) if lock else nullcontext() as hold:
        plan = plan_prune(store, cutoff)
        if planned is not None:
            planned(plan)
        say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
        for name in plan.busy:
            say(f"kept batch {name}: it has unfinished jobs (`lorafleet status {name}` to update it)")
        for name, why in plan.unreadable.items():
            say(f"warning: kept batch {name} and every video it names: its manifest cannot be read: {why}")
        verb = "removed" if hold else "would remove"
        for path in plan.outputs:
            if hold:
                try:
                    hold.confirm()
                    store.delete(path)
                except StoreError as exc:
                    plan.failed.append(path)
                    say(f"error: {exc}")
                    continue
            say(f"{verb} {store.uri(path)}")
        if plan.failed:
            say(
                f"{len(plan.failed)} file(s) could not be deleted: the {len(plan.batches)} batch(es) that named them "
                "are kept, so that `lorafleet prune` again finishes the job"
            )
            return plan
        for path in plan.batch_files:
            if hold:
                hold.confirm()
                store.delete(path)
            say(f"{verb} {store.uri(path)}")
        if hold:
            for name in plan.batches:
                store.delete_folder(f"batches/{name}")  # what is left of it: empty folders of a local store
    say(
        f"{verb} {len(plan.batches)} batch(es) and {len(plan.files)} file(s), {plan.bytes / 2**20:.1f} MiB; "
        f"kept {plan.shared} video(s) a newer batch also references"
    )
    return plan
