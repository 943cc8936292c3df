"""A worker's `/metrics` (Prometheus), `/healthz` and `/readyz`, on `LORAFLEET_METRICS_PORT`.

The server starts first thing in a worker, before torch is imported, so a probe gets an answer
while the model loads: `/readyz` is 503 until the model is loaded and Celery consumes from the
broker, then 200; `/healthz` is 200 while the process serves and its heartbeat to Redis is fresh
(or not yet due, during start-up), 503 once the heartbeat stopped. The counters and histograms
are module-level (one worker per process); the caches and GPU memory are read at scrape time.
"""

import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common import http_server
from common.http_server import TEXT
from common.leases import HEARTBEAT_S

REGISTRY = CollectorRegistry()
JOBS = Counter("lorafleet_jobs", "Jobs this worker ended, by outcome", ["outcome"], registry=REGISTRY)
EVALUATIONS = Counter(
    "lorafleet_evaluations", "Videos this worker evaluated, by outcome", ["outcome"], registry=REGISTRY
)
RENDER_SECONDS = Histogram(
    "lorafleet_render_seconds",
    "Seconds of a job by phase: adapters, variant, denoise, decode, export_upload",
    ["phase"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280),
    registry=REGISTRY,
)
SWITCH_SECONDS = Histogram(
    "lorafleet_variant_switch_seconds",
    "Seconds to make the transformer hold a job's fused variant",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
    registry=REGISTRY,
)
STEP = Gauge("lorafleet_job_step", "The running job's denoising step (0 when idle)", registry=REGISTRY)
STEPS = Gauge("lorafleet_job_steps", "The running job's number of steps (0 when idle)", registry=REGISTRY)
HEARTBEAT = Gauge(
    "lorafleet_worker_heartbeat_timestamp_seconds",
    "When Redis last took this worker's heartbeat (Unix time): a stale one is a worker Redis no longer hears",
    registry=REGISTRY,
)
INFO = Info("lorafleet_worker", "What this worker serves: model, device, dtype, versions", registry=REGISTRY)
PHASES = ("adapters", "variant", "denoise", "decode", "export_upload")
OUTCOMES = ("done", "exists", "failed", "cancelled", "paused", "retried", "lease_lost")
# Every outcome's series from the start, at 0: Prometheus' rate() and alerts need it before the first job.
for outcome in OUTCOMES:
    JOBS.labels(outcome)
for outcome in ("done", "failed"):
    EVALUATIONS.labels(outcome)


def observe_render(timings: dict) -> None:
    """A rendered job's phases into the histograms (`timings` as `render_frames` and `upload` record them)."""
    for phase in PHASES:
        if phase in timings:
            RENDER_SECONDS.labels(phase).observe(timings[phase])
    if "variant" in timings:
        SWITCH_SECONDS.observe(timings["variant"])


class Health:
    """What the probes answer from: set by the worker as it starts, beats and stops."""

    def __init__(self):
        self.ready = False  # the model loaded and Celery consumes from the broker
        self.last_beat: float | None = None  # monotonic time of the last heartbeat written to Redis
        self.job: dict | None = None  # the job running now: RunningJob's fields ("since": a Unix time)
        self.about: dict = {}  # what the worker is: {"device", "model", "tier"}
        self.pace: dict | None = None  # its last rendered job's Pace (common/leases/records.py)
        self.wake = threading.Event()  # set: the heartbeat beats now instead of at its next interval

    def set_job(self, job: dict | None) -> None:
        """The job this worker starts (None: it ended), said by the heartbeat at once: `wait` and
        `top` see a job start and end without waiting out an interval."""
        self.job = job
        self.wake.set()

    def beat(self) -> None:
        """Redis took this worker's heartbeat."""
        self.last_beat = time.monotonic()
        HEARTBEAT.set(time.time())

    def doing(self) -> dict:
        """What the heartbeat says of this worker: what it is, and the job it runs (or None)."""
        return {**self.about, "job": dict(self.job) if self.job else None, "pace": self.pace}

    def alive(self) -> bool:
        if self.last_beat is None:
            return not self.ready  # starting: no heartbeat is due yet
        return time.monotonic() - self.last_beat < 3 * HEARTBEAT_S


class RendererCollector:
    """The caches' counters and the GPU's memory, read from the worker's renderer at scrape time."""

    def __init__(self):
        self.renderer = None

    def collect(self):
        renderer = self.renderer
        if renderer is None:
            return
        stats = renderer.cache_stats()
        tiers = {"disk": stats.adapter_files, "host": stats.adapter_host, "device": stats.device_factors}
        if stats.fused_variants is not None:
            tiers["variants"] = stats.fused_variants
        for event, name in (
            ("hits", "lorafleet_cache_hits"),
            ("misses", "lorafleet_cache_misses"),
            ("evictions", "lorafleet_cache_evictions"),
        ):
            family = CounterMetricFamily(name, f"Cache {event} by tier", labels=["tier"])
            for tier, counts in tiers.items():
                if getattr(counts, event) is not None:
                    family.add_metric([tier], getattr(counts, event))
            yield family
        yield CounterMetricFamily("lorafleet_variant_switches", "Variant switches", value=stats.switches)
        memory = renderer.gpu_memory()
        if memory is not None:
            family = GaugeMetricFamily("lorafleet_gpu_memory_bytes", "GPU memory allocated by torch", labels=["kind"])
            for kind, value in memory.items():
                family.add_metric([kind], value)
            yield family


RENDERER = RendererCollector()
REGISTRY.register(RENDERER)


def serve(host: str, port: int, health: Health):
    """Serve /metrics, /healthz and /readyz on host:port (0: any free port) in a daemon thread."""

    def healthz():
        alive = health.alive()
        return (200, b"ok\n", TEXT) if alive else (503, b"heartbeat stopped\n", TEXT)

    def readyz():
        return (200, b"ready\n", TEXT) if health.ready else (503, b"starting\n", TEXT)

    routes = {
        "/metrics": lambda: (200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST),
        "/healthz": healthz,
        "/readyz": readyz,
    }
    return http_server.serve(host, port, routes, "metrics and probes")
