"""What makes delivery at-least-once and rendering at-most-once, kept in Redis next to the queue.

- Leases: a running job holds a lease that its worker refreshes every `lease_s / 3`. A worker that
  dies (SIGKILL, OOM killer, power) stops refreshing; the sweeper in every live worker finds the
  lapsed lease and enqueues the job again within about `lease_s`, instead of waiting for Redis'
  visibility timeout (hours, since it must exceed the longest render).
- Delivery count: consecutive deliveries that did not end cleanly. A job that kills its worker
  `max_deliveries` times is failed with that reason instead of being delivered again.
- Key locks: one render per key at a time, fleet-wide; a second worker with the same key waits
  for the first one's video, or takes over if the first one's lock lapses.
- Cancel flags per batch.
"""

import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

log = logging.getLogger("lorafleet.ledger")
PREFIX = "lorafleet"


class Ledger:
    """The fleet's delivery bookkeeping in Redis."""

    def __init__(self, redis_url: str, lease_s: float, ttl_s: int):
        # Ride out a Redis restart: each command retries with back-off for about a minute.
        self.redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=10,
            health_check_interval=30,
            retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), 40),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self.lease_ms = int(lease_s * 1000)
        self.ttl_s = ttl_s  # how long counters and cancel flags outlive their job

    @classmethod
    def from_settings(cls, settings) -> "Ledger":
        """The ledger on the fleet's Redis, with the settings' lease and retention."""
        return cls(settings.redis_url, settings.lease_s, settings.result_expires_s)

    def count_delivery(self, task_id: str) -> int:
        """Count this delivery of a job; returns how many deliveries in a row did not end cleanly."""
        name = f"{PREFIX}:deliveries:{task_id}"
        count = self.redis.incr(name)
        self.redis.expire(name, self.ttl_s)
        return count

    def delivered_cleanly(self, task_id: str) -> None:
        """The job ended (done, failed or retried on purpose): its worker was not lost."""
        self._quietly(lambda: self.redis.delete(f"{PREFIX}:deliveries:{task_id}"))

    @contextmanager
    def running(self, task_id: str, message: dict, queue: str, worker: str):
        """Hold a lease on a running job, refreshed in the background; the job is enqueued again
        by a sweeper if this process dies before the block ends."""
        lease = f"{PREFIX}:lease:{task_id}"
        self.redis.set(lease, worker, px=self.lease_ms)  # the lease first: a sweeper never sees it missing
        self.redis.hset(
            f"{PREFIX}:running", task_id, json.dumps({"message": message, "queue": queue, "worker": worker})
        )
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._refresh, args=([lease], stop), daemon=True, name="lease")
        heartbeat.start()
        try:
            yield
        finally:
            stop.set()
            heartbeat.join()
            self._quietly(lambda: self.redis.hdel(f"{PREFIX}:running", task_id))
            self._quietly(lambda: self.redis.delete(lease))

    @contextmanager
    def key_lock(self, key: str, task_id: str, done: Callable[[], bool], poll_s: float = 0.5):
        """Hold the render lock of a key; yields False instead if `done()` turns true (another
        worker rendered the key) while waiting for the lock."""
        lock = f"{PREFIX}:lock:{key}"
        waited = False
        while not self.redis.set(lock, task_id, nx=True, px=self.lease_ms):
            if not waited:
                log.info("%s is being rendered by another worker: waiting for it", key[:12])
                waited = True
            if done():
                yield False
                return
            time.sleep(poll_s)
        stop = threading.Event()
        heartbeat = threading.Thread(target=self._refresh, args=([lock], stop), daemon=True, name="key-lock")
        heartbeat.start()
        try:
            yield True
        finally:
            stop.set()
            heartbeat.join()
            # Release only our own lock: compare and delete in one step.
            self._quietly(
                lambda: self.redis.eval(
                    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end",
                    1,
                    lock,
                    task_id,
                )
            )

    def _refresh(self, names: list[str], stop: threading.Event) -> None:
        while not stop.wait(self.lease_ms / 3000):
            for name in names:
                self._quietly(lambda n=name: self.redis.pexpire(n, self.lease_ms))

    def _quietly(self, call) -> None:
        try:
            call()
        except redis.RedisError as exc:  # Redis is away: the lease lapses, and the job is delivered again
            log.warning("redis: %s", exc)

    def lapsed(self) -> list[tuple[str, dict]]:
        """Running jobs whose lease lapsed, each claimed by this caller alone (to enqueue again)."""
        claimed = []
        for task_id, entry in self.redis.hgetall(f"{PREFIX}:running").items():
            task_id = task_id.decode()
            if not self.redis.exists(f"{PREFIX}:lease:{task_id}") and self.redis.hdel(f"{PREFIX}:running", task_id):
                claimed.append((task_id, json.loads(entry)))
        return claimed

    def orphaned(self, task_id: str, queue: str) -> bool:
        """Whether a job that has no result yet is nowhere: not waiting in its (empty) queue and
        held by no worker. Kombu's Redis transport can lose a message that is in flight to a worker
        at the instant Redis restarts; the producer sends such a job again."""
        return self.redis.llen(queue) == 0 and not self.redis.exists(f"{PREFIX}:lease:{task_id}")

    def cancel(self, batch: str) -> None:
        """Mark a batch cancelled: its queued jobs never start, its running ones stop at their next step."""
        self.redis.set(f"{PREFIX}:cancelled:{batch}", 1, ex=self.ttl_s)

    def uncancel(self, batch: str) -> None:
        """Lift a batch's cancel flag (before its jobs are retried)."""
        self.redis.delete(f"{PREFIX}:cancelled:{batch}")

    def is_cancelled(self, batch: str | None) -> bool:
        """Whether a batch was cancelled."""
        return batch is not None and bool(self.redis.exists(f"{PREFIX}:cancelled:{batch}"))


def run_sweeper(ledger: Ledger, requeue: Callable[[str, dict], None], stop: threading.Event, worker: str) -> None:
    """Every lease_s / 2, enqueue again the jobs whose worker died (their lease lapsed)."""
    while not stop.wait(ledger.lease_ms / 2000):
        try:
            for task_id, entry in ledger.lapsed():
                log.warning("%s: %s lost its worker %s: enqueued again", worker, task_id, entry["worker"])
                requeue(task_id, entry)
        except redis.RedisError as exc:
            log.warning("%s: sweeper: redis: %s", worker, exc)
