"""The one back-off everything in lorafleet retries with: exponential with full jitter (a wait drawn
uniformly from 0 to min(cap, base·2^attempt)), so many workers that failed at once do not retry in
step. Celery's task retries (workers/tasks.py), the background upload, the supervisor's restarts,
waiting commands and every Redis client take their waits from here."""

import random
import time
from collections.abc import Callable

from redis.backoff import FullJitterBackoff
from redis.retry import Retry


def backoff(attempt: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before retry number `attempt` (0 for the first retry)."""
    return random.uniform(0, min(cap, base * 2**attempt))


def retrying(call: Callable, retry_on: tuple, attempts: int, on_retry: Callable[[Exception, int], None]):
    """`call()`, tried up to `attempts` times while it raises one of `retry_on`; `on_retry(exc,
    attempt)` hears of each failure (attempt counts from 1), and the last one is raised."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except retry_on as exc:
            on_retry(exc, attempt)
            if attempt == attempts:
                raise
            time.sleep(backoff(attempt - 1))
    raise ValueError("attempts must be at least 1")


def redis_retry(attempts: int = 40) -> Retry:
    """redis-py's per-command retry with the same back-off (base 0.1 s, cap 2 s: about a minute
    over 40 tries), so a client rides out a Redis restart."""
    return Retry(FullJitterBackoff(cap=2.0, base=0.1), attempts)
