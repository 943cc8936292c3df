"""The store's lock against prune: while prune deletes videos, no submit may decide that a job is
already done because its video is in the store.

A readers-writer lock in Redis. A submit (and each round of a sweep) holds it shared, from its look
in the store until its manifest names the keys it called done; prune holds it alone, from its plan
to its last delete. Prune announces itself first, so new submits wait for it (and say so), then
waits for the submits already inside to write their manifests. Each holder extends its hold in
the background; one killed mid-way frees the lock within LOCK_TTL_S, and one that paused past it
(SIGSTOP, a frozen VM) finds out before its next write (`confirm`) and stops.
"""

import logging
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

import redis

from common.errors import StoreLockLost
from common.protocol import PRUNING, SUBMITTING
from common.retry import redis_retry

log = logging.getLogger("lorafleet.store")
LOCK_TTL_S = 30.0  # a holder killed mid-way frees the lock this long after its last extension
POLL_S = 0.2  # how often a waiting holder asks again

# Redis' own clock for every expiry: the hosts' clocks need not agree.
_NOW = "local t = redis.call('time') local now = t[1] * 1000 + math.floor(t[2] / 1000)"
# KEYS: prune's hold, the submits' holds (token -> expiry); ARGV: token, ttl ms. 1: held; 0: prune holds it.
_TAKE_SHARED = f"""
{_NOW}
if redis.call('exists', KEYS[1]) == 1 then return 0 end
redis.call('zadd', KEYS[2], now + ARGV[2], ARGV[1])
return 1
"""
# Extends a submit's hold if it still has one (1), else 0.
_EXTEND_SHARED = f"""
{_NOW}
if not redis.call('zscore', KEYS[2], ARGV[1]) then return 0 end
redis.call('zadd', KEYS[2], now + ARGV[2], ARGV[1])
return 1
"""
# How many submits still hold it (their expired holds dropped); -1 when prune's token is gone.
_SUBMITS_INSIDE = f"""
{_NOW}
if redis.call('get', KEYS[1]) ~= ARGV[1] then return -1 end
redis.call('pexpire', KEYS[1], ARGV[2])
redis.call('zremrangebyscore', KEYS[2], '-inf', now)
return redis.call('zcard', KEYS[2])
"""
_RELEASE_EXCLUSIVE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


class StoreLock:
    """The fleet-wide lock between prune's deletes and submits' "already in the store"."""

    def __init__(self, redis_url: str, ttl_s: float = LOCK_TTL_S):
        self.redis = redis.Redis.from_url(
            redis_url, socket_timeout=10, retry=redis_retry(), retry_on_error=[redis.ConnectionError]
        )
        self.ttl_ms = int(ttl_s * 1000)
        self.take_shared = self.redis.register_script(_TAKE_SHARED)
        self.extend_shared = self.redis.register_script(_EXTEND_SHARED)
        self.submits_inside = self.redis.register_script(_SUBMITS_INSIDE)
        self.release_exclusive = self.redis.register_script(_RELEASE_EXCLUSIVE)

    @contextmanager
    def shared(self, on_wait: Callable[[], None] | None = None):
        """Hold the lock beside other submits, waiting while a prune holds it (`on_wait` is called
        once if it must wait). Yields a Hold: `confirm()` before writing what the hold protects."""
        hold = Hold(self, lambda: self.extend_shared(keys=[PRUNING, SUBMITTING], args=[hold.token, self.ttl_ms]) == 1)
        waited = False
        while not self.take_shared(keys=[PRUNING, SUBMITTING], args=[hold.token, self.ttl_ms]):
            if not waited and on_wait is not None:
                on_wait()
            waited = True
            time.sleep(POLL_S)
        try:
            with hold.extended():
                yield hold
        finally:
            self.redis.zrem(SUBMITTING, hold.token)

    @contextmanager
    def exclusive(self, on_wait: Callable[[str], None] | None = None):
        """Hold the lock alone: wait for another prune to end, announce this one (no submit enters
        from now on), then wait for the submits inside to leave (`on_wait` is told what it waits
        for, once each). Yields a Hold: `confirm()` before each delete."""
        hold = Hold(self, lambda: self._inside(hold) >= 0)
        said = set()

        def waiting(what: str) -> None:
            if what not in said and on_wait is not None:
                on_wait(what)
            said.add(what)
            time.sleep(POLL_S)

        while not self.redis.set(PRUNING, hold.token, nx=True, px=self.ttl_ms):
            waiting("another prune")
        try:
            with hold.extended():
                while (inside := self._inside(hold)) > 0:
                    waiting(f"{inside} submit(s) to write their manifests")
                if inside < 0:
                    hold.lose()
                hold.confirm()
                yield hold
        finally:
            self.release_exclusive(keys=[PRUNING], args=[hold.token])

    def _inside(self, hold: "Hold") -> int:
        return self.submits_inside(keys=[PRUNING, SUBMITTING], args=[hold.token, self.ttl_ms])


class Hold:
    """One holder's hold on the store lock: extended every third of its time to live while the
    holder runs, and lost for good once an extension finds it gone."""

    def __init__(self, lock: StoreLock, extend: Callable[[], bool]):
        self.lock = lock
        self.token = secrets.token_hex(16)
        self.extend = extend
        self.lost = threading.Event()

    @contextmanager
    def extended(self):
        """Extend the hold in a background thread for the length of the block."""
        stop = threading.Event()

        def keep() -> None:
            while not stop.wait(self.lock.ttl_ms / 3000):
                try:
                    if not self.extend():
                        self.lose()
                        return
                except redis.RedisError as exc:  # unreachable is not lost: `confirm` asks again before a write
                    log.warning("store lock: redis: %s", exc)

        thread = threading.Thread(target=keep, daemon=True, name="store-lock")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def lose(self) -> None:
        self.lost.set()

    def confirm(self) -> None:
        """Prove, against Redis, that the hold is still ours; raises StoreLockLost otherwise."""
        if self.lost.is_set() or not self.extend():
            self.lose()
            raise StoreLockLost(
                f"the store lock lapsed (this process paused past {self.lock.ttl_ms / 1000:g}s): stopped before "
                "writing; run the command again"
            )
