"""What makes delivery at-least-once and rendering at-most-once, kept in Redis next to the queue.

- Leases: a running job holds a lease that its worker refreshes every `lease_s / 3`. A worker that
  dies (SIGKILL, OOM killer, power) stops refreshing; the sweeper in every live worker finds the
  lapsed lease and enqueues the job again within about `lease_s`, instead of waiting for Redis'
  visibility timeout (hours, since it must exceed the longest render).
- Delivery count: consecutive deliveries that did not end cleanly. A job that kills its worker
  `max_deliveries` times is failed with that reason instead of being delivered again.
- Key locks: one render per key at a time, fleet-wide; a second worker with the same key waits
  for the first one's video, or takes over if the first one's lock lapses.
- Fencing: a delivery's lease and key lock hold a random token. The heartbeat extends them only
  while they still hold it (compare and extend, in one step), so a worker that paused past its
  lease (SIGSTOP, a long GC, a frozen VM) learns that another delivery took its job over, stops at
  its next denoising step, and proves it still holds the token before any write to the store.
- Cancel flags per batch and per job: a job is admitted only if neither is set (one script, with
  the pause check). A running one is told at once by a notice on a pub/sub channel that every
  worker listens to, and, should a notice be missed (a dropped connection), finds the flag at its
  lease's next extension, which reads them: stopping costs no Redis command per denoising step.
- Worker heartbeats: each consuming worker refreshes a key naming it and its queue every
  HEARTBEAT_S, so a waiting command can tell a queue nobody serves from a busy one.
"""

import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from enum import IntEnum
from typing import Annotated

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.broker import queue_length
from common.errors import JobCancelled, LeaseLost
from common.protocol import (
    CANCELS,
    PAUSED_PREFIX,
    RUNNING,
    WORKER_PREFIX,
    batch_keys,
    cancelled_key,
    cancelled_task_key,
    deliveries_key,
    lease_key,
    lock_key,
    paused_key,
    set_aside_key,
    worker_key,
)
from common.retry import backoff, redis_retry

log = logging.getLogger("lorafleet.ledger")
HEARTBEAT_S = 5.0  # a worker's heartbeat lives 3 beats: a worker that stops beating is gone within 15 s
# Each script compares before it acts, in one step: a token no longer stored means the job is someone else's.
# KEYS: the ARGV[3] names the token holds (lease, key lock), then the cancel flags to read (the
# batch's, the job's); returns the index of a name lost, or minus the index of a flag set, or 0.
_EXTEND = """
local held = tonumber(ARGV[3])
for i = 1, held do
  if redis.call('get', KEYS[i]) ~= ARGV[1] then return i end
end
for i = 1, held do redis.call('pexpire', KEYS[i], ARGV[2]) end
for i = held + 1, #KEYS do
  if redis.call('exists', KEYS[i]) == 1 then return held - i end
end
return 0
"""
_HELD = """
for i, name in ipairs(KEYS) do
  if redis.call('get', name) ~= ARGV[1] then return i end
end
return 0
"""
_RELEASE_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('hdel', KEYS[2], ARGV[2])
end
"""
_RELEASE_LOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
# A job's admission, in one step: a paused batch's job is set aside (only while the batch is still
# paused: resuming takes the flag and every set-aside job in one step, so none is set aside after
# its batch resumed), a cancelled batch's or job's is refused. KEYS: the job's cancel flag, then,
# for a job of a batch, the batch's pause flag, set-aside list and cancel flag.
_ADMIT = """
if #KEYS == 4 then
  if redis.call('exists', KEYS[2]) == 1 then redis.call('rpush', KEYS[3], ARGV[1]) return 1 end
  if redis.call('exists', KEYS[4]) == 1 then return 2 end
end
if redis.call('exists', KEYS[1]) == 1 then return 3 end
return 0
"""
_RESUME = """
redis.call('del', KEYS[1])
local jobs = redis.call('lrange', KEYS[2], 0, -1)
redis.call('del', KEYS[2])
return jobs
"""


class Admission(IntEnum):
    """What `Ledger.admit` found of a job about to start (the values its script returns)."""

    GO = 0
    SET_ASIDE = 1  # its batch is paused: set aside, to be sent again on resume
    BATCH_CANCELLED = 2
    JOB_CANCELLED = 3


class Record(BaseModel):
    """A record lorafleet keeps in Redis as JSON. Whoever can write to Redis can write one, so each
    is read through its model: a malformed one is skipped (and logged once), never trusted. Every
    number in one is finite and in its range (a NaN time or a pace of 0 pixels is malformed)."""

    model_config = ConfigDict(frozen=True, extra="ignore", allow_inf_nan=False)


Seconds = Annotated[float, Field(ge=0)]  # a duration, or a Unix time


class RunningJob(Record):
    """What a worker's heartbeat says it runs: the job, since when, and how far its denoising got."""

    key: str
    since: Seconds
    task_id: str | None = None
    batch: str | None = None
    step: Annotated[int, Field(ge=0)] | None = None
    steps: Annotated[int, Field(ge=1)] | None = None
    step_s: Seconds | None = None  # seconds per denoising step so far


class Pace(Record):
    """How long a worker's last job held its GPU, for estimates (`lorafleet sweep --estimate`): its
    size in pixels (frames × height × width), its seconds per denoising step, and the rest of its
    render (the prompt, the variant, the decode) in seconds. The upload runs beside the next job."""

    pixels: Annotated[int, Field(gt=0)]
    step_s: Seconds
    other_s: Seconds


class WorkerRecord(Record):
    """A worker's heartbeat: `lorafleet:worker:<name>`."""

    worker: str
    queue: str
    since: Seconds
    beat: Seconds
    job: RunningJob | None = None
    device: str | None = None  # "NVIDIA H200", "cpu"
    model: str | None = None  # the model it serves (alias or reference)
    tier: str | None = None  # "bf16", "fp8, compiled"
    pace: Pace | None = None  # its last job's, once it finished one


class CancelNotice(Record):
    """What `lorafleet cancel` publishes on CANCELS: a batch, or only these jobs (task ids) of it
    (of whatever batch, when a revoke names them)."""

    batch: str | None = None
    tasks: list[str] = []


class RunningEntry(Record):
    """A running job's entry in `lorafleet:running`: what to enqueue again if its lease lapses."""

    message: dict
    queue: str
    worker: str


_reported: set[str] = set()  # the malformed records already logged, once each per process


def parse_record(model: type[Record], name: str, raw) -> Record | None:
    """A Redis record read through its model, or None (logged once) if it is malformed."""
    try:
        return model.model_validate_json(raw)
    except (ValidationError, ValueError, TypeError) as exc:
        if name not in _reported:
            _reported.add(name)
            log.warning("skipped a malformed %s record %s: %s", model.__name__, name[:120], str(exc).splitlines()[0])
        return None


class Ledger:
    """The fleet's delivery bookkeeping in Redis."""

    def __init__(self, redis_url: str, lease_s: float, ttl_s: int, attempts: int = 40):
        # Ride out a Redis restart: each command retries with back-off, `attempts` times (about a
        # minute); a reader that must answer at once (the exporter's /scale) takes fewer.
        self.redis = redis.Redis.from_url(
            redis_url,
            socket_timeout=10,
            socket_connect_timeout=10,
            health_check_interval=30,
            retry=redis_retry(attempts),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        )
        self.lease_ms = int(lease_s * 1000)
        self.ttl_s = ttl_s  # how long counters and cancel flags outlive their job
        # Registered once, sent as EVALSHA (the script's text only when Redis lost it: a restart).
        self.extend = self.redis.register_script(_EXTEND)
        self.admit_script = self.redis.register_script(_ADMIT)
        self.release_lease = self.redis.register_script(_RELEASE_LEASE)
        self.release_lock = self.redis.register_script(_RELEASE_LOCK)
        self.resume_script = self.redis.register_script(_RESUME)
        self.held = self.redis.register_script(_HELD)
        self.leases: dict[str, Lease] = {}  # this process's running deliveries by task id: what a cancel notice stops

    @classmethod
    def from_settings(cls, settings) -> "Ledger":
        """The ledger on the fleet's Redis, with the settings' lease and retention."""
        return cls(settings.redis_url, settings.lease_s, settings.result_expires_s)

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

    def _quietly(self, call) -> None:
        try:
            call()
        except redis.RedisError as exc:  # Redis is away: the lease lapses, and the job is delivered again
            log.warning("redis: %s", exc)

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

    def cancel(self, batch: str | None, task_ids: list[str] | None = None) -> None:
        """Mark a batch (or only these tasks, of it or of any batch) cancelled: queued jobs never
        start, and running ones, told by a notice, stop at their next step."""
        names = [cancelled_task_key(t) for t in task_ids] if task_ids else [cancelled_key(batch)]
        for name in names:
            self.redis.set(name, 1, ex=self.ttl_s)
        self.redis.publish(CANCELS, CancelNotice(batch=batch, tasks=task_ids or []).model_dump_json())

    def hear_cancel(self, raw) -> None:
        """Stop this process's running deliveries that a cancel notice names (a malformed notice is
        skipped: anyone who can write to Redis can publish one)."""
        notice = parse_record(CancelNotice, CANCELS, raw)
        for lease in list(self.leases.values()) if notice else []:
            if lease.task_id in notice.tasks:
                lease.cancel("the job")
            elif not notice.tasks and notice.batch is not None and lease.batch == notice.batch:
                lease.cancel(f"batch {notice.batch}")

    def uncancel(self, batch: str, task_ids: list[str] = ()) -> None:
        """Lift a batch's cancel flags (before its jobs are retried)."""
        self.redis.delete(cancelled_key(batch), *(cancelled_task_key(t) for t in task_ids))

    def pause(self, batch: str) -> None:
        """Pause a batch: a worker that takes one of its jobs sets it aside instead of starting it."""
        self.redis.set(paused_key(batch), 1)

    def paused_batches(self) -> list[str]:
        """The names of the batches paused now, sorted."""
        names = self.redis.scan_iter(match=PAUSED_PREFIX + "*", count=1000)
        return sorted(name.decode(errors="replace").removeprefix(PAUSED_PREFIX) for name in names)

    def admit(self, batch: str | None, task_id: str, message: dict, queue: str) -> Admission:
        """Whether a job may start, in one round trip: set aside (to be sent again on resume) if
        its batch is paused, refused if its batch or the job itself was cancelled."""
        keys = [cancelled_task_key(task_id)]
        if batch is not None:
            keys += [paused_key(batch), set_aside_key(batch), cancelled_key(batch)]
        entry = json.dumps({"task_id": task_id, "message": message, "queue": queue})
        return Admission(self.admit_script(keys=keys, args=[entry]))

    def resume(self, batch: str) -> list[dict]:
        """Lift a batch's pause; returns the jobs set aside meanwhile ({"task_id", "message", "queue"})."""
        found = self.resume_script(keys=[paused_key(batch), set_aside_key(batch)])
        return [json.loads(entry) for entry in found]

    def forget_batch(self, batch: str) -> None:
        """Drop what Redis keeps of a batch by name (cancel and pause flags, jobs set aside): a
        new batch under a name an earlier one had starts clean."""
        self.redis.delete(*batch_keys(batch))


class Lease:
    """One delivery's hold on its job: a random token stored under the lease (and the key lock,
    once taken), extended in the background only while Redis still holds that token."""

    def __init__(self, ledger: Ledger, task_id: str, name: str):
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


def run_heartbeat(ledger: Ledger, worker: str, queue: str, stop: threading.Event, health=None) -> None:
    """Every HEARTBEAT_S until `stop`, say this worker is alive, consuming `queue`, and what it
    runs (from `health`, the worker's probes, which hear of each beat Redis took, and can ask for
    a beat now: `health.wake`, which whoever sets `stop` sets too)."""
    since = time.time()
    while True:
        try:
            ledger.beat(worker, queue, since, health.doing() if health else None)
            if health is not None:
                health.beat()
        except redis.RedisError as exc:
            log.warning("%s: heartbeat: redis: %s", worker, exc)
        if health is not None:
            health.wake.wait(HEARTBEAT_S)
            health.wake.clear()
        else:
            stop.wait(HEARTBEAT_S)
        if stop.is_set():
            ledger.forget_worker(worker)
            return


def run_cancel_listener(ledger: Ledger, stop: threading.Event, worker: str) -> None:
    """Until `stop`, hear cancel notices and stop the running deliveries they name, listening
    again with back-off after a lost connection (meanwhile a lease's extension still finds the flags)."""
    attempt = 0
    while not stop.is_set():
        try:
            pubsub = ledger.redis.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(CANCELS)
            attempt = 0
            while not stop.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    ledger.hear_cancel(message["data"])
        except redis.RedisError as exc:
            attempt += 1
            log.warning("%s: cancel notices: redis: %s", worker, exc)
            stop.wait(backoff(attempt))


def run_sweeper(
    ledger: Ledger,
    requeue: Callable[[str, RunningEntry], None],
    stop: threading.Event,
    worker: str,
    on_death: Callable[[], None] | None = None,
) -> None:
    """Every lease_s / 2, enqueue again the jobs whose worker died (their lease lapsed). Any error
    in a round is logged and the next round runs: without a sweeper a dead worker's job waits
    hours. Should the loop itself die, `on_death` is called (the worker stops rather than serve on
    without recovery)."""
    try:
        while not stop.wait(ledger.lease_ms / 2000):
            try:
                for task_id, entry in ledger.lapsed():
                    log.warning("%s: %s lost its worker %s: enqueued again", worker, task_id, entry.worker)
                    requeue(task_id, entry)
            except redis.RedisError as exc:
                log.warning("%s: sweeper: redis: %s", worker, exc)
            except Exception:  # kombu's OperationalError in a Redis blip, anything else: next round
                log.exception("%s: sweeper: a round failed; trying again in %.0fs", worker, ledger.lease_ms / 2000)
    except BaseException:
        log.exception("%s: the lease sweeper died", worker)
        if on_death is not None:
            on_death()
        raise
