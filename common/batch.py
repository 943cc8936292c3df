"""A batch of jobs: its name, one manifest entry per job, and the manifest in the store."""

import json
import re
import secrets
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from common.errors import LorafleetError
from common.store import Store, jobs_path, manifest_path, output_uris


@dataclass
class Batch:
    """A submitted batch: its name and one manifest entry per job, in file order."""

    name: str
    entries: list[dict] = field(default_factory=list)

    def add(self, store: Store, job: dict, status: str, task_id: str | None = None) -> dict:
        """Add a job's manifest entry: id, key, status, task id, output URIs, error."""
        entry = {
            "id": job["id"],
            "key": job["key"],
            "status": status,
            "task_id": task_id,
            "model": job["model"],
            **output_uris(store, job["key"]),
            "error": None,
        }
        self.entries.append(entry)
        return entry

    @property
    def enqueued(self) -> int:
        """How many distinct jobs went to the queue (a job listed twice is enqueued once)."""
        return len({entry["task_id"] for entry in self.entries if entry["task_id"]})

    @classmethod
    def load(cls, store: Store, name: str) -> "Batch":
        """A batch from its manifest in the store; raises FileNotFoundError if there is none."""
        lines = store.read_bytes(manifest_path(check_batch_name(name))).decode().splitlines()
        return cls(name, [json.loads(line) for line in lines if line.strip()])

    def write_jobs(self, store: Store, jobs: list[dict]) -> None:
        """Write the batch's expanded jobs, one per key, for `lorafleet retry`."""
        unique = {job["key"]: job for job in jobs}
        store.write_bytes(jobs_path(self.name), "".join(json.dumps(job) + "\n" for job in unique.values()).encode())

    def count(self, status: str) -> int:
        """How many jobs have this status."""
        return sum(entry["status"] == status for entry in self.entries)

    def write_manifest(self, store: Store) -> str:
        """Write batches/<name>/manifest.jsonl (one line per job); returns its URI."""
        lines = "".join(json.dumps(entry) + "\n" for entry in self.entries)
        return store.write_bytes(manifest_path(self.name), lines.encode())

    def print_summary(self, console: Console) -> None:
        """A table of every job: its id, key, status, and its video or its error."""
        table = Table(
            title=f"batch {self.name}: {self.count('done')} done, {self.count('failed')} failed, {len(self.entries)} jobs"
        )
        for column in ("id", "key", "status", "video / error"):
            table.add_column(column, overflow="fold")
        for entry in self.entries:
            style = {"done": "green", "failed": "red", "cancelled": "yellow"}.get(entry["status"], "white")
            detail = entry["error"] if entry["status"] in ("failed", "cancelled") else entry["video"]
            table.add_row(entry["id"] or "", entry["key"][:12], f"[{style}]{entry['status']}[/]", detail)
        console.print(table)


def new_batch_name() -> str:
    """A batch name that sorts by time: 20261128-184500-3f2a."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(2)


BATCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_batch_name(name) -> str:
    """A batch name that is one plain folder name in the store, safe in a terminal and a URL:
    letters, digits, ".", "_" and "-", at most 128; raises LorafleetError otherwise."""
    if not (isinstance(name, str) and BATCH_NAME.fullmatch(name)):
        shown = json.dumps(name)[:60] + ("…" if len(json.dumps(name)) > 60 else "")  # never echo a huge name whole
        raise LorafleetError(
            f'batch name {shown} must be 1 to 128 letters, digits, ".", "_" or "-", starting with a letter or digit'
        )
    return name
