"""A batch's manifest: one entry per job (id, key, state, task, outputs, error), kept in the store
as batches/<batch>/manifest.jsonl, beside the batch's expanded jobs (batches/<batch>/jobs.jsonl)."""

import json
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum

from common.bulk import paused_gc
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


@dataclass
class Batch:
    """A submitted batch: its name and one manifest entry per job, in file order."""

    name: str
    entries: list[dict] = field(default_factory=list)

    def add(self, store: Store, job: Job, status: JobStatus, task_id: str | None = None) -> dict:
        """Add a job's manifest entry: id, key, status, task id, output URIs, error."""
        entry = {
            "id": job.id,
            "key": job.key,
            "status": status,
            "task_id": task_id,
            "model": job.model,
            "lora_scale": job.lora_scale,
            "seed": job.seed,
            **output_uris(store, job.key),
            "error": None,
        }
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
            if entry["task_id"] and entry["task_id"] not in order:
                order[entry["task_id"]] = entry["key"]
        return list(order.items())

    def settle_sent(self, sent: int) -> list[tuple[str, str]]:
        """Record as queued the unsent entries of the first `sent` tasks in send order (the ones a
        sent counter says went); returns the tasks after them, still to send."""
        order = self.send_order()
        went = {task_id for task_id, _ in order[:sent]}
        for entry in self.entries:
            if entry["status"] == JobStatus.UNSENT and entry["task_id"] in went:
                entry["status"] = JobStatus.QUEUED
        return order[sent:]

    @property
    def enqueued(self) -> int:
        """How many distinct jobs went to the queue (a job listed twice is enqueued once)."""
        return len({entry["task_id"] for entry in self.entries if entry["task_id"]})

    @classmethod
    def load(cls, store: Store, name: str) -> "Batch":
        """A batch from its manifest in the store; raises InputError if there is none, StoreError if
        a line of it is not a manifest entry (anyone who can write the store can write one)."""
        try:
            lines = store.read_bytes(manifest_path(check_batch_name(name))).decode(errors="replace").splitlines()
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
        lines = store.read_bytes(jobs_path(self.name)).decode().splitlines()
        return {job.key: job for job in map(Job.model_validate_json, lines)}

    def count(self, status: JobStatus) -> int:
        """How many jobs have this status."""
        return sum(entry["status"] == status for entry in self.entries)

    def write_manifest(self, store: Store) -> str:
        """Write batches/<name>/manifest.jsonl (one line per job); returns its URI."""
        lines = "".join(json.dumps(entry) + "\n" for entry in self.entries)
        return store.write_bytes(manifest_path(self.name), lines.encode())


STATES = {state.value for state in JobStatus}


def read_entry(line: str, store: Store, batch: str, number: int) -> dict:
    """One manifest line as its entry; raises StoreError, naming the file and line, if it is not one."""
    try:
        entry = json.loads(line)
    except ValueError:
        entry = None
    if not (isinstance(entry, dict) and isinstance(entry.get("key"), str) and entry.get("status") in STATES):
        raise StoreError(
            f"{store.uri(manifest_path(batch))} line {number}: not a manifest entry (a JSON object with a key and a status)"
        )
    entry.setdefault("task_id", None)
    return entry


def new_batch_name() -> str:
    """A batch name that sorts by time: 20261128-184500-3f2a."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


def check_batch_name(name) -> str:
    """A batch name as common/protocol.py's BATCH_NAME allows it; raises InputError otherwise."""
    if not (isinstance(name, str) and BATCH_NAME.fullmatch(name)):
        raise InputError(f"batch name {quoted(name, 60)} {BATCH_NAME_RULE}")
    return name
