"""What every part of the ledger shares: one Redis client that rides out restarts, the lease's
length, how long flags outlive their job, and the ledger's Lua scripts, read from the `.lua` files
beside this one once a process and registered once a client (sent as EVALSHA, their text only
when Redis lost it: a restart)."""

import logging
from importlib import resources

import redis

from common.retry import redis_retry

log = logging.getLogger("lorafleet.ledger")
SCRIPTS = {
    name: (resources.files(__package__) / f"{name}.lua").read_text()
    for name in ("extend", "held", "release_lease", "release_lock", "admit", "resume")
}


class Book:
    """The state the ledger's parts share (common/leases/__init__.py: Ledger)."""

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
        self.extend = self.redis.register_script(SCRIPTS["extend"])
        self.held = self.redis.register_script(SCRIPTS["held"])
        self.release_lease = self.redis.register_script(SCRIPTS["release_lease"])
        self.release_lock = self.redis.register_script(SCRIPTS["release_lock"])
        self.admit_script = self.redis.register_script(SCRIPTS["admit"])
        self.resume_script = self.redis.register_script(SCRIPTS["resume"])
        self.leases: dict = {}  # this process's running deliveries by task id (Lease): what a cancel notice stops

    def _quietly(self, call) -> None:
        try:
            call()
        except redis.RedisError as exc:  # Redis is away: the lease lapses, and the job is delivered again
            log.warning("redis: %s", exc)
