"""`lorafleet exporter`: the fleet's queue-side numbers for Prometheus, from one place.

Per worker, `/metrics` says what that worker did (workers/metrics.py). What belongs to no worker
is here, so Prometheus scrapes it once: the length of each model's queue, the jobs running now
(their leases), the live workers per queue (their heartbeats), and the jobs of the newest batches
by state, as their manifests last recorded them (read at most every `refresh_s`: a store with
thousands of batches is not read on every scrape).

`/scale` answers KEDA's metrics-api scaler (deploy/k8s/keda.yaml) with what each queue owes, as
JSON: `{"queues": {"render": {"queued": 3, "running": 2, "owed": 5}}}`. `owed` counts the jobs
waiting at every priority plus the ones running now, so a fleet is never scaled below the jobs it
is rendering. A model alias's queue is `render.ALIAS`: its GJSON path escapes the dot
(`value_location`). With Redis unreachable both routes answer 503 within seconds, and KEDA's
`fallback` keeps the fleet as it is.
"""

import json
import logging
import time

import redis
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from common import http_server
from common.broker import queue_length
from common.leases import Ledger
from common.manifest import JobStatus
from common.settings import Settings, queue_for
from common.store import Store
from producer.follow import list_batches

log = logging.getLogger("lorafleet.exporter")


class FleetCollector:
    def __init__(self, settings: Settings, batches: int, refresh_s: float):
        self.settings = settings
        # Two tries, not a minute of them: KEDA and Prometheus wait seconds for an answer.
        self.ledger = Ledger(settings.redis_url, settings.lease_s, settings.result_expires_s, attempts=2)
        self.store = Store(settings.store_url)
        self.batches, self.refresh_s = batches, refresh_s
        self._batch_counts: list[dict] = []
        self._read_at = -float("inf")

    def queues(self) -> list[str]:
        return [queue_for(None), *(queue_for(alias) for alias in self.settings.models)]

    def collect(self):
        redis = self.ledger.redis
        lengths = GaugeMetricFamily("lorafleet_queue_length", "Jobs waiting in a model's queue", labels=["queue"])
        for queue in self.queues():
            lengths.add_metric([queue], queue_length(redis, queue))
        yield lengths
        yield GaugeMetricFamily(
            "lorafleet_running_jobs", "Jobs running now (a lease each)", value=self.ledger.running_count()
        )
        workers = GaugeMetricFamily(
            "lorafleet_live_workers", "Workers with a fresh heartbeat, by queue", labels=["queue"]
        )
        live: dict[str, int] = dict.fromkeys(self.queues(), 0)
        for record in self.ledger.live_workers():
            live[record.queue] = live.get(record.queue, 0) + 1
        for queue, count in live.items():
            workers.add_metric([queue], count)
        yield workers
        jobs = GaugeMetricFamily(
            "lorafleet_batch_jobs", "Jobs of the newest batches by state, as last recorded", labels=["batch", "state"]
        )
        for batch in self.batch_counts():
            for state in JobStatus:
                jobs.add_metric([batch["name"], state.value], batch["counts"].get(state.value, 0))
        yield jobs

    def owed(self) -> dict[str, dict[str, int]]:
        """Per queue: jobs waiting (every priority), jobs running (by their leases), and their sum."""
        running = dict.fromkeys(self.queues(), 0)
        for queue in self.ledger.running_queues():
            running[queue] = running.get(queue, 0) + 1
        owed = {}
        for queue, count in running.items():
            queued = queue_length(self.ledger.redis, queue)
            owed[queue] = {"queued": queued, "running": count, "owed": queued + count}
        return owed

    def batch_counts(self) -> list[dict]:
        if time.monotonic() - self._read_at >= self.refresh_s:
            self._batch_counts = list_batches(self.store)[-self.batches :]
            self._read_at = time.monotonic()
        return self._batch_counts


def value_location(alias: str | None = None) -> str:
    """The GJSON path of what a model's queue owes in /scale's answer, as KEDA's metrics-api
    trigger takes it (`valueLocation`): a dot in a key is escaped, so `render.2b` is `render\\.2b`."""
    queue = queue_for(alias).replace("\\", "\\\\").replace(".", "\\.")
    return f"queues.{queue}.owed"


def unless_redis_is_down(route: http_server.Route) -> http_server.Route:
    """A route that answers 503 and why when Redis cannot be asked, instead of a 500."""

    def answer():
        try:
            return route()
        except redis.RedisError as exc:
            return 503, f"redis unreachable: {type(exc).__name__}: {exc}\n".encode(), http_server.TEXT

    return answer


def serve_exporter(settings: Settings, port: int, batches: int = 20, refresh_s: float = 30):
    """Serve /metrics, /scale and /healthz on LORAFLEET_METRICS_HOST:`port` in a daemon thread; returns the server."""
    registry = CollectorRegistry()
    collector = FleetCollector(settings, batches, refresh_s)
    registry.register(collector)
    routes = {
        "/healthz": lambda: (200, b"ok\n", http_server.TEXT),  # alive: the liveness probe's, whatever Redis does
        "/metrics": unless_redis_is_down(lambda: (200, generate_latest(registry), CONTENT_TYPE_LATEST)),
        "/scale": unless_redis_is_down(lambda: (200, json.dumps({"queues": collector.owed()}).encode(), "application/json")),
    }
    log.info("fleet numbers for queues %s", ", ".join(collector.queues()))
    return http_server.serve(settings.metrics_host, port, routes, "exporter")


def run_exporter(settings: Settings, port: int, batches: int = 20, refresh_s: float = 30) -> None:
    """Serve the fleet's numbers on `port` until interrupted."""
    serve_exporter(settings, port, batches, refresh_s)
    while True:
        time.sleep(3600)
