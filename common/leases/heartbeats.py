"""Worker heartbeats: each consuming worker refreshes a key naming it, its queue and what it runs
every HEARTBEAT_S, so a waiting command can tell a queue nobody serves from a busy one."""

import json
import time

from common.leases.book import Book
from common.leases.records import WorkerRecord, parse_record
from common.protocol import WORKER_PREFIX, worker_key

HEARTBEAT_S = 5.0  # a worker's heartbeat lives 3 beats: a worker that stops beating is gone within 15 s


class Heartbeats(Book):
    """The ledger's part that keeps workers' heartbeats."""

    def beat(self, worker: str, queue: str, since: float, doing: dict | None = None) -> None:
        """Say this worker is alive and consuming `queue` (since `since`, a Unix time), and what it
        is and does (WorkerRecord's other fields: `{"job": {...} or None, "device", "model", "tier"}`)."""
        record = {"worker": worker, "queue": queue, "since": since, "beat": time.time(), **(doing or {})}
        self.redis.set(worker_key(worker), json.dumps(record), ex=int(3 * HEARTBEAT_S))

    def forget_worker(self, worker: str) -> None:
        """The worker stopped: it serves no queue from now on."""
        self._quietly(lambda: self.redis.delete(worker_key(worker)))

    def live_workers(self) -> list[WorkerRecord]:
        """The workers whose heartbeat is fresh; a malformed heartbeat is skipped."""
        names = list(self.redis.scan_iter(match=WORKER_PREFIX + "*", count=1000))
        records = zip(names, self.redis.mget(names) if names else [], strict=True)
        found = (parse_record(WorkerRecord, name.decode(errors="replace"), raw) for name, raw in records if raw)
        return [record for record in found if record is not None]
