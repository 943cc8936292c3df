"""The Celery app both sides use: Redis as broker and result backend, configured as docs/design.md
says (JSON only, late acks, no prefetch hoarding, a visibility timeout above the longest render)."""

from collections.abc import Iterable

from celery import Celery
from kombu import serialization
from kombu.utils import json

from common.protocol import EVAL_TASK_NAME, PRIORITIES, PRIORITY_SEPARATOR, PRIORITY_STEPS, TASK_NAME, queue_lists
from common.settings import Settings, queue_for

SEND_CHUNK = 1000  # messages a Redis round trip when sending many
PERSISTENT = 2  # AMQP's delivery mode that Celery's queues declare (kombu's default)


def make_app(settings: Settings) -> Celery:
    """A Celery app for the fleet's Redis: JSON only, late acks, no prefetch hoarding, events on."""
    app = Celery("lorafleet", broker=settings.redis_url, backend=settings.redis_url)
    transport = {"visibility_timeout": settings.visibility_timeout_s}
    app.conf.update(
        # No pickle anywhere: a pickled message is refused by every worker.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # A job is acknowledged only once rendered, and given back if its worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One GPU takes one job at a time; the rest stay in Redis for other workers.
        worker_prefetch_multiplier=1,
        # Redis hands an unacknowledged job to another worker after this: longer than any render.
        broker_transport_options={**transport, "priority_steps": list(PRIORITY_STEPS), "sep": PRIORITY_SEPARATOR},
        result_backend_transport_options=transport,
        result_expires=settings.result_expires_s,
        result_extended=True,
        task_track_started=True,
        # Flower and Prometheus exporters watch the fleet through these events.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Ride out Redis restarts: reconnect for as long as it takes.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        result_backend_always_retry=True,
        result_backend_max_retries=10**6,
        worker_hijack_root_logger=False,
        task_default_queue="render",
    )
    return app


def check_redis(url: str) -> None:
    """Raise redis' own error (refused, wrong password, TLS trouble) now, before anything is enqueued."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    finally:
        client.close()


def send_job(app: Celery, message: dict, task_id: str, queue: str | None = None) -> None:
    """Enqueue one `lorafleet.render` message (an expanded job with its batch) under a task id, on
    its model's queue unless `queue` is given (`send_jobs` of one)."""
    send_jobs(app, [(message, task_id, queue)])


def send_jobs(app: Celery, sends: Iterable[tuple[dict, str, str | None]], chunk: int = SEND_CHUNK) -> int:
    """Enqueue `lorafleet.render` messages, each (message, task id, queue or None for its model's),
    at the priority the message names: the one way every part of lorafleet sends a job. Returns how
    many were sent.

    Each message is what Celery's `send_task` publishes, built from the same parts (Celery's task
    headers, kombu's envelope and its Redis transport's list per priority), and pushed in
    pipelines of `chunk`: `send_task` cost half a millisecond a job in Celery's own layers (retry
    wrappers, routing, signals), most of a 100,000-job submit. What it skips: a task-sent event
    (Flower sees a job once a worker receives it) and the result channel subscription of a caller
    that waits on a result (lorafleet's `wait` polls results in bulk)."""
    sent = 0
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        pipe = channel.client.pipeline(transaction=False)
        for message, task_id, queue in sends:
            queue = queue or queue_for(message.get("model"))
            priority = PRIORITIES[message.get("priority") or "normal"]
            # What Flower shows of a job: its key and batch, not the repr of the whole job.
            label = f"[job {str(message.get('key', '?'))[:12]} of batch {message.get('batch')}]"
            reprs = {"argsrepr": label, "kwargsrepr": "{}"}
            headers, properties, body, _ = app.amqp.as_task_v2(
                task_id, TASK_NAME, args=[message], kwargs={}, reply_to=app.thread_oid, ignore_result=None, **reprs
            )
            content_type, content_encoding, data = serialization.dumps(body, serializer="json")
            properties.update(delivery_mode=PERSISTENT, **reprs)  # as send_task passes its options on
            envelope = channel.prepare_message(data, priority, content_type, content_encoding, headers, properties)
            channel._inplace_augment_message(envelope, "", queue)  # direct to the queue: its own list per priority
            pipe.lpush(channel._q_for_pri(queue, channel.priority(priority)), json.dumps(envelope))
            sent += 1
            if sent % chunk == 0:
                pipe.execute()
        pipe.execute()
    return sent


def send_evaluation(app: Celery, key: str, queue: str | None = None):
    """Enqueue one `lorafleet.evaluate` message ({"key": KEY}) on a model's queue; returns its AsyncResult."""
    return app.send_task(EVAL_TASK_NAME, args=[{"key": key}], queue=queue or queue_for(None))


def queue_length(redis, queue: str) -> int:
    """Jobs waiting in a queue, at every priority."""
    pipe = redis.pipeline(transaction=False)
    for name in queue_lists(queue):
        pipe.llen(name)
    return sum(pipe.execute())


def task_metas(app: Celery, task_ids: list[str], chunk: int = 10_000) -> dict[str, dict]:
    """The result metadata ({"status", "result", ...}, as Celery's backend decodes it) of each
    task that has one, read with one MGET per `chunk` tasks instead of a GET per task; a task
    without a result yet (pending) is left out."""
    backend = app.backend
    prefix = backend.get_key_for_task("-")[:-1]  # Celery's key for a task is this prefix and its id
    prefix = prefix.decode() if isinstance(prefix, bytes) else prefix
    found = {}
    for start in range(0, len(task_ids), chunk):
        part = task_ids[start : start + chunk]
        for task_id, raw in zip(part, backend.mget([prefix + t for t in part]), strict=True):
            if raw is not None:
                found[task_id] = backend.decode_result(raw)
    return found
