"""A batch's manifest: one entry per job (id, key, state, task, outputs, error), kept in the store
as batches/<batch>/manifest.jsonl, beside the batch's expanded jobs (batches/<batch>/jobs.jsonl)."""

import json
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum

from common.bulk import json_bytes, paused_gc
from common.errors import InputError, StoreError, quoted
from common.job import Job
from common.protocol import BATCH_NAME, BATCH_NAME_RULE
from common.store import Store, jobs_path, manifest_path, output_uris


class JobStatus(StrEnum):
    """A job's state in its batch's manifest (written as its plain value: "queued", ...)."""

    UNSENT = "unsent"  # recorded before its message is sent: a submit cut off mid-way leaves the rest so
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"  # set aside by a worker while its batch is paused; `lorafleet resume` queues it again
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED)
FAILED_OR_CANCELLED = (JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(slots=True)
class ManifestEntry:
    """One job's line in its batch's manifest: which job (its id, key, model, scale, seed), where it
    stands (status, task id, error), where its outputs are, and once rendered, which worker and how
    long it took. A line is read by `read_entry` and written by `as_dict` alone."""

    key: str
    status: JobStatus
    id: str | None = None
    task_id: str | None = None
    model: str | None = None
    lora_scale: float | None = None
    seed: int | None = None
    video: str | None = None
    poster: str | None = None
    metadata: str | None = None
    error: str | None = None
    worker: str | None = None  # once done: the worker that rendered it
    seconds: float | None = None  # once done: the job's own time on its worker, what ETAs are made of

    def record(self, status: JobStatus, error: str | None = None) -> None:
        """Its state now, with the reason where it failed or was cancelled (none otherwise)."""
        self.status, self.error = status, error

    def as_dict(self) -> dict:
        """The manifest line's object: every field a submitted job has, and a done job's worker
        and seconds once known."""
        line = {name: getattr(self, name) for name in ALWAYS_WRITTEN}
        for name in ("worker", "seconds"):
            if getattr(self, name) is not None:
                line[name] = getattr(self, name)
        return line


ALWAYS_WRITTEN = ("id", "key", "status", "task_id", "model", "lora_scale", "seed", "video", "poster", "metadata", "error")
# The type each field of a line must have, or null (anyone who can write the store can write a line).
FIELD_TYPES = {
    "id": str, "task_id": str, "model": str, "lora_scale": (int, float), "seed": int, "video": str, "poster": str,
    "metadata": str, "error": str, "worker": str, "seconds": (int, float),
}  # fmt: skip


@dataclass
class Batch:
    """A submitted batch: its name and one manifest entry per job, in file order."""

    name: str
    entries: list[ManifestEntry] = field(default_factory=list)

    def add(self, store: Store, job: Job, status: JobStatus, task_id: str | None = None) -> ManifestEntry:
        """Add a job's manifest entry: id, key, status, task id, output URIs, no error."""
        entry = ManifestEntry(
            key=job.key,
            status=status,
            id=job.id,
            task_id=task_id,
            model=job.model,
            lora_scale=job.lora_scale,
            seed=job.seed,
            **output_uris(store, job.key),
        )
        self.entries.append(entry)
        return entry

    @classmethod
    def new(cls, store: Store, name: str | None = None) -> "Batch":
        """A new, empty batch under `name` (checked), or under a fresh name that sorts by time.
        A batch is its manifest: a name the store already holds is refused (InputError), never
        overwritten, so an earlier batch's jobs never vanish from it."""
        if not name:
            return cls(new_batch_name())
        if store.exists(manifest_path(check_batch_name(name))):
            raise InputError(
                f'batch "{name}" already exists in {store.url}: give a new --batch name '
                f"(or `lorafleet retry {name}` to send the jobs an interrupted submit left unsent and run its "
                "failed and cancelled jobs again)"
            )
        return cls(name)

    @classmethod
    def new_numbered(cls, store: Store, name: str) -> "Batch":
        """A new batch named `name`, or `name-2`, `name-3`… if the store already holds that one."""
        candidate, number = check_batch_name(name), 1
        while store.exists(manifest_path(candidate)):
            number += 1
            candidate = f"{name}-{number}"
        return cls(check_batch_name(candidate))

    def send_order(self) -> list[tuple[str, str]]:
        """The batch's tasks in the order they are sent: (task id, key) of each distinct task, in
        manifest order. What a batch's sent counter (common/protocol.py: `sent_key`) counts along."""
        order: dict[str, str] = {}
        for entry in self.entries:
            if entry.task_id and entry.task_id not in order:
                order[entry.task_id] = entry.key
        return list(order.items())

    def settle_sent(self, sent: int) -> list[tuple[str, str]]:
        """Record as queued the unsent entries of the first `sent` tasks in send order (the ones a
        sent counter says went); returns the tasks after them, still to send."""
        order = self.send_order()
        went = {task_id for task_id, _ in order[:sent]}
        for entry in self.entries:
            if entry.status == JobStatus.UNSENT and entry.task_id in went:
                entry.status = JobStatus.QUEUED
        return order[sent:]

    @property
    def enqueued(self) -> int:
        """How many distinct jobs went to the queue (a job listed twice is enqueued once)."""
        return len({entry.task_id for entry in self.entries if entry.task_id})

    @classmethod
    def load(cls, store: Store, name: str) -> "Batch":
        """A batch from its manifest in the store; raises InputError if there is none, StoreError if
        a line of it is not a manifest entry (anyone who can write the store can write one)."""
        try:
            # split at "\n" alone: a line's JSON holds text as it is, and splitlines() would also cut
            # at U+2028, U+0085 and the like inside a job's id or error
            lines = store.read_bytes(manifest_path(check_batch_name(name))).decode(errors="replace").split("\n")
        except FileNotFoundError:
            raise InputError(f'no batch "{name}" in {store.url} (no {manifest_path(name)})') from None
        with paused_gc():
            return cls(
                name, [read_entry(line, store, name, number) for number, line in enumerate(lines, 1) if line.strip()]
            )

    def write_jobs(self, store: Store, jobs: list[Job]) -> None:
        """Write the batch's expanded jobs, one per key, for `lorafleet retry` and re-sends."""
        unique = {job.key: job for job in jobs}
        store.write_bytes(
            jobs_path(self.name), "".join(job.model_dump_json() + "\n" for job in unique.values()).encode()
        )

    def read_jobs(self, store: Store) -> dict[str, Job]:
        """The batch's expanded jobs by key, as `write_jobs` wrote them."""
        lines = [line for line in store.read_bytes(jobs_path(self.name)).decode().split("\n") if line]
        return {job.key: job for job in map(Job.model_validate_json, lines)}

    def count(self, status: JobStatus) -> int:
        """How many jobs have this status."""
        return sum(entry.status == status for entry in self.entries)

    def write_manifest(self, store: Store) -> str:
        """Write batches/<name>/manifest.jsonl (one line per job); returns its URI."""
        return store.write_bytes(manifest_path(self.name), b"".join(json_bytes(e.as_dict()) + b"\n" for e in self.entries))


STATES = {state.value for state in JobStatus}


def read_entry(line: str, store: Store, batch: str, number: int) -> ManifestEntry:
    """One manifest line as its entry; raises StoreError, naming the file and line, if it is not one:
    a JSON object with a key, a known status, and each other field of its type or null."""
    try:
        found = json.loads(line)
    except ValueError:
        found = None
    if not (
        isinstance(found, dict)
        and isinstance(found.get("key"), str)
        and found.get("status") in STATES
        and all(found.get(name) is None or isinstance(found[name], kind) for name, kind in FIELD_TYPES.items())
    ):
        raise StoreError(
            f"{store.uri(manifest_path(batch))} line {number}: not a manifest entry (a JSON object with a key and a status)"
        )
    fields = {name: found.get(name) for name in FIELD_TYPES}
    return ManifestEntry(key=found["key"], status=JobStatus(found["status"]), **fields)


def new_batch_name() -> str:
    """A batch name that sorts by time: 20261128-184500-3f2a."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def check_batch_name(name) -> str:
    """A batch name as common/protocol.py's BATCH_NAME allows it; raises InputError otherwise."""
    if not (isinstance(name, str) and BATCH_NAME.fullmatch(name)):
        raise InputError(f"batch name {quoted(name, 60)} {BATCH_NAME_RULE}")
    return name
