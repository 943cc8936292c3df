"""Deliveries: a running job's lease (refreshed in the background, fencing every write with its
token), consecutive deliveries that did not end cleanly, a key's fleet-wide render lock, and the
running jobs whose lease lapsed (for the sweeper to enqueue again)."""

import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import redis

from common.broker import queue_length
from common.errors import JobCancelled, LeaseLost
from common.leases.book import Book
from common.leases.records import RunningEntry, parse_record
from common.protocol import RUNNING, cancelled_key, cancelled_task_key, deliveries_key, lease_key, lock_key

log = logging.getLogger("lorafleet.ledger")


class Deliveries(Book):
    """The ledger's part that tracks running deliveries."""

    def count_delivery(self, task_id: str) -> int:
        """Count this delivery of a job; returns how many deliveries in a row did not end cleanly."""
        name = deliveries_key(task_id)
        count = self.redis.incr(name)
        self.redis.expire(name, self.ttl_s)
        return count

    def delivered_cleanly(self, task_id: str) -> None:
        """The job ended (done, failed or retried on purpose): its worker was not lost."""
        self._quietly(lambda: self.redis.delete(deliveries_key(task_id)))

    @contextmanager
    def running(self, task_id: str, message: dict, queue: str, worker: str):
        """Hold a lease on a running job, refreshed in the background; the job is enqueued again
        by a sweeper if this process dies or pauses past the lease before the block ends.

        Yields the delivery's Lease: its token fences every write this delivery makes."""
        lease = Lease(self, task_id, lease_key(task_id))
        self.redis.set(lease.name, lease.token, px=self.lease_ms)  # the lease first: a sweeper never sees it missing
        entry = RunningEntry(message=message, queue=queue, worker=worker)
        self.redis.hset(RUNNING, task_id, entry.model_dump_json())
        heartbeat = threading.Thread(target=lease.refresh_until_released, daemon=True, name="lease")
        heartbeat.start()
        self.leases[task_id] = lease
        try:
            yield lease
        finally:
            self.leases.pop(task_id, None)
            lease.released.set()
            heartbeat.join()
            # Only while the lease is still ours: a delivery that took the job over keeps its entry.
            self._quietly(lambda: self.release_lease(keys=[lease.name, RUNNING], args=[lease.token, task_id]))

    @contextmanager
    def key_lock(self, key: str, lease: "Lease", done: Callable[[], bool], poll_s: float = 0.5):
        """Hold the render lock of a key under the delivery's lease (refreshed and fenced with it);
        yields False instead if `done()` turns true (another worker rendered the key) while waiting."""
        lock = lock_key(key)
        waited = False
        while not self.redis.set(lock, lease.token, nx=True, px=self.lease_ms):
            lease.check()  # a delivery that lost its job while waiting stops waiting
            if not waited:
                log.info("%s is being rendered by another worker: waiting for it", key[:12])
                waited = True
            if done():
                yield False
                return
            time.sleep(poll_s)
        lease.names.append(lock)
        try:
            yield True
        finally:
            lease.names.remove(lock)
            self._quietly(lambda: self.release_lock(keys=[lock], args=[lease.token]))

    def lapsed(self) -> list[tuple[str, RunningEntry]]:
        """Running jobs whose lease lapsed, each claimed by this caller alone (to enqueue again).
        A malformed entry is skipped and left where it is: nothing can be enqueued from it."""
        claimed = []
        for task_id, raw in self.redis.hgetall(RUNNING).items():
            task_id = task_id.decode(errors="replace")
            entry = parse_record(RunningEntry, f"{RUNNING}[{task_id}]", raw)
            if entry is None or self.redis.exists(lease_key(task_id)):
                continue
            if self.redis.hdel(RUNNING, task_id):
                claimed.append((task_id, entry))
        return claimed

    def running_queues(self) -> list[str]:
        """The queue of each job running now (one entry per lease held); a malformed entry is skipped."""
        entries = self.redis.hgetall(RUNNING).items()
        found = (parse_record(RunningEntry, f"{RUNNING}[{t!r}]", raw) for t, raw in entries)
        return [entry.queue for entry in found if entry is not None]

    def running_count(self) -> int:
        """How many jobs run now (a lease each, malformed entries too: each holds a slot)."""
        return self.redis.hlen(RUNNING)

    def orphaned(self, task_id: str, queue: str) -> bool:
        """Whether a job that has no result yet is nowhere: not waiting in its (empty) queue and
        held by no worker. Kombu's Redis transport can lose a message that is in flight to a worker
        at the instant Redis restarts; the producer sends such a job again."""
        return queue_length(self.redis, queue) == 0 and not self.redis.exists(lease_key(task_id))


class Lease:
    """One delivery's hold on its job: a random token stored under the lease (and the key lock,
    once taken), extended in the background only while Redis still holds that token."""

    def __init__(self, ledger: Deliveries, task_id: str, name: str):
        self.ledger = ledger
        self.task_id = task_id
        self.name = name
        self.names = [name]  # what the heartbeat extends: the lease, then also the key lock
        self.token = secrets.token_hex(16)
        self.lost = threading.Event()  # set once Redis says another delivery holds the job
        self.released = threading.Event()
        self.batch: str | None = None  # the job's batch, once known: its cancel flag is watched too
        self.cancelled: str | None = None  # what was cancelled ("batch NAME", "the job"), once seen

    def watch_cancel(self, batch: str | None) -> None:
        """From now on, the heartbeat also reads the cancel flags of this job and its batch."""
        self.batch = batch

    def refresh_until_released(self) -> None:
        """The heartbeat: every `lease_s / 3`, extend while the token is ours (else mark the lease
        lost) and read the job's cancel flags, in one script."""
        while not self.released.wait(self.ledger.lease_ms / 3000):
            flags = ([cancelled_key(self.batch)] if self.batch else []) + [cancelled_task_key(self.task_id)]
            try:
                found = self.ledger.extend(
                    keys=[*self.names, *flags], args=[self.token, self.ledger.lease_ms, len(self.names)]
                )
            except redis.RedisError as exc:  # unreachable is not lost: the next beat asks again
                log.warning("redis: %s", exc)
                continue
            if found > 0:
                self._lose(self.names[found - 1])
                return
            if found < 0:
                self.cancel(f"batch {self.batch}" if flags[-found - 1] != flags[-1] else "the job")

    def cancel(self, what: str) -> None:
        """Mark the job cancelled (`what`: "the job", "batch NAME"): its render stops at its next step."""
        if self.cancelled is None:
            self.cancelled = what

    def check(self) -> None:
        """Raise LeaseLost if the heartbeat found the job taken over (no Redis round trip)."""
        if self.lost.is_set():
            raise LeaseLost(f"{self.task_id}: another delivery holds this job now; stopped without writing")

    def check_cancelled(self, where: str = "") -> None:
        """Raise JobCancelled if the heartbeat found the job or its batch cancelled (no Redis round
        trip); `where` says where the render stopped."""
        if self.cancelled is not None:
            raise JobCancelled(f"{self.cancelled} was cancelled{where}")

    def confirm(self) -> None:
        """Prove, against Redis, that this delivery still holds its lease and lock (before a write);
        raises LeaseLost otherwise, and Redis' own error if it cannot be asked."""
        self.check()
        lost_at = self.ledger.held(keys=self.names, args=[self.token])
        if lost_at:
            self._lose(self.names[lost_at - 1])
            self.check()

    def _lose(self, name: str) -> None:
        if not self.lost.is_set():
            log.warning("%s: %s is no longer ours (paused or cut off past the lease): stopping", self.task_id, name)
        self.lost.set()
