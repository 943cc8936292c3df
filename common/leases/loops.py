"""The ledger's background loops in a worker: its heartbeat, its ear for cancel notices, and the
sweeper that enqueues again the jobs whose worker died."""

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from common.leases.heartbeats import HEARTBEAT_S
from common.leases.records import RunningEntry
from common.protocol import CANCELS
from common.retry import backoff

if TYPE_CHECKING:
    from common.leases import Ledger

log = logging.getLogger("lorafleet.ledger")


def run_heartbeat(ledger: "Ledger", worker: str, queue: str, stop: threading.Event, health=None) -> None:
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


def run_cancel_listener(ledger: "Ledger", stop: threading.Event, worker: str) -> None:
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
    ledger: "Ledger",
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
