"""The Celery app both sides use: Redis as broker and result backend, configured as docs/design.md
says (JSON only, late acks, no prefetch hoarding, a visibility timeout above the longest render)."""

import itertools
import logging
import re
from collections.abc import Iterable

from celery import Celery
from kombu import serialization
from kombu.utils import json

from common.bulk import json_bytes
from common.errors import SendConflict
from common.protocol import (
    EVAL_TASK_NAME,
    PRIORITIES,
    PRIORITY_SEPARATOR,
    PRIORITY_STEPS,
    TASK_NAME,
    queue_lists,
    sent_key,
)
from common.settings import Settings, queue_for

log = logging.getLogger("lorafleet.producer")

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


class SendFence:
    """Sends that must happen once: a counter in Redis (protocol's `sent_key`) says how many of a
    batch's unsent tasks were sent, in their manifest order. Each chunk of messages is pushed only if
    the counter still says what this sender expects, and moves it on in the same step (one script):
    a sender cut off mid-way leaves a counter that says exactly what went, and a second sender
    (`lorafleet retry` beside a submit that was only slow) cannot send what the first one sent."""

    def __init__(self, key: str, sent: int, ttl_s: int):
        self.key = key
        self.sent = sent  # what the counter says, as this sender last saw it
        self.ttl_s = ttl_s


# KEYS: the counter, then the lists pushed to; ARGV: the count expected, the counter's time to live,
# then (index of a list in KEYS, message) pairs. Returns the counter after the call.
_SEND_ONCE = """
local sent = tonumber(redis.call('get', KEYS[1]) or '0') or -1
if sent ~= tonumber(ARGV[1]) then return sent end
for i = 3, #ARGV, 2 do redis.call('lpush', KEYS[tonumber(ARGV[i])], ARGV[i + 1]) end
sent = sent + (#ARGV - 2) / 2
redis.call('set', KEYS[1], sent, 'EX', ARGV[2])
return sent
"""


def send_jobs(
    app: Celery, sends: Iterable[tuple[dict, str, str | None]], chunk: int = SEND_CHUNK, fence: SendFence | None = None
) -> int:
    """Enqueue `lorafleet.render` messages, each (message, task id, queue or None for its model's),
    at the priority the message names: the one way every part of lorafleet sends a job. Returns how
    many were sent. With a `fence`, each chunk goes only while its counter agrees (SendFence);
    raises SendConflict when it does not.

    Each message is what Celery's `send_task` publishes, built from the same parts (Celery's task
    headers, kombu's envelope and its Redis transport's list per priority), and pushed `chunk` at a
    time in one round trip: `send_task` cost half a millisecond a job in Celery's own layers (retry
    wrappers, routing, signals), most of a 100,000-job submit. What it skips: a task-sent event
    (Flower sees a job once a worker receives it) and the result channel subscription of a caller
    that waits on a result (lorafleet's `wait` polls results in bulk)."""
    sent = 0
    with app.connection_for_write() as connection:
        envelopes = _Envelopes(app, connection.default_channel)
        push = _pusher(connection.default_channel.client, fence)
        pushes: list[tuple[str, str]] = []  # (Redis list, envelope)
        for message, task_id, queue in sends:
            pushes.append(envelopes.of(message, task_id, queue or queue_for(message.get("model"))))
            if len(pushes) == chunk:
                push(pushes)
                sent, pushes = sent + len(pushes), []
        if pushes:
            push(pushes)
            sent += len(pushes)
    return sent


class _Envelopes:
    """The Redis list and envelope (JSON text) of each message, as `send_task` would push it.

    Of one queue and priority, envelopes differ only in the task id, the label, the body and kombu's
    delivery tag. The first of each is built through Celery's and kombu's own steps, with
    placeholders for those four, and kept as text cut at them; each message then fills them in
    (Celery's steps took 40 µs a job, 4 s of a 100,000-job submit), its body written as compact JSON
    (common/bulk.py: json_bytes), which any JSON reader, kombu's included, reads as the same value."""

    PLACEHOLDERS = ("lorafleet-placeholder-id", "lorafleet-placeholder-label", "lorafleet-placeholder-body",
                    "lorafleet-placeholder-tag")  # fmt: skip

    def __init__(self, app: Celery, channel):
        self.app, self.channel = app, channel
        self.templates: dict[tuple[str, int], tuple[str, list[str]]] = {}  # (queue, priority) -> (list, parts)

    def of(self, message: dict, task_id: str, queue: str) -> tuple[str, str]:
        # A message without a priority (another client's) goes where kombu sends one: step 0,
        # served first; sent again (a lapsed lease, a resume), it stays there.
        priority = PRIORITIES[message.get("priority") or "high"]
        if (queue, priority) not in self.templates:
            self.templates[queue, priority] = self._template(queue, priority)
        name, parts = self.templates[queue, priority]
        # What Flower shows of a job: its key and batch, not the repr of the whole job.
        label = f"[job {str(message.get('key', '?'))[:12]} of batch {message.get('batch')}]"
        body, _ = self.channel.encode_body(json_bytes(_task_body(message)), self.channel.body_encoding)
        # (task ids come from anywhere, a store or another client: escaped where JSON must)
        filling = (_json_text(task_id), _json_text(label), body, self.channel._next_delivery_tag())
        values = dict(zip(self.PLACEHOLDERS, filling, strict=True))
        parts = parts.copy()
        parts[1::2] = [values[placeholder] for placeholder in parts[1::2]]
        return name, "".join(parts)

    def _template(self, queue: str, priority: int) -> tuple[str, list[str]]:
        """The list and the envelope's text of a queue and priority, cut at the placeholders (which
        then sit at the odd places)."""
        task_id, label, body_text, tag = self.PLACEHOLDERS
        reprs = {"argsrepr": label, "kwargsrepr": "{}"}
        headers, properties, body, _ = self.app.amqp.as_task_v2(
            task_id, TASK_NAME, args=[{}], kwargs={}, reply_to=self.app.thread_oid, ignore_result=None, **reprs
        )
        if tuple(body) != _task_body({}):
            raise RuntimeError(f"this Celery's task body is {body!r}: common/broker.py's _task_body must follow it")
        content_type, content_encoding, data = serialization.dumps(body, serializer="json")
        properties.update(delivery_mode=PERSISTENT, **reprs)  # as send_task passes its options on
        envelope = self.channel.prepare_message(data, priority, content_type, content_encoding, headers, properties)
        self.channel._inplace_augment_message(envelope, "", queue)  # direct to the queue: its own list per priority
        envelope["body"], envelope["properties"]["delivery_tag"] = body_text, tag
        cut = re.split("(" + "|".join(self.PLACEHOLDERS) + ")", json.dumps(envelope))
        return self.channel._q_for_pri(queue, self.channel.priority(priority)), cut


_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f-\U0010ffff]*')  # what JSON (ensure_ascii) writes as it is


def _json_text(text: str) -> str:
    """`text` as it reads inside a JSON string, as kombu's JSON writes it."""
    return text if _PLAIN.fullmatch(text) else json.dumps(text)[1:-1]


def _task_body(message: dict) -> tuple:
    """Celery's task body (protocol 2) of one message: its argument, no keyword arguments, no callbacks."""
    return [message], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def _pusher(client, fence: SendFence | None):
    """How a chunk of (list, envelope) pushes goes to Redis: a pipeline, or under a fence, one script."""
    if fence is None:

        def push(pushes: list[tuple[str, str]]) -> None:
            pipe = client.pipeline(transaction=False)
            for name, run in itertools.groupby(pushes, key=lambda push: push[0]):  # one LPUSH a run, in order
                pipe.lpush(name, *(envelope for _, envelope in run))
            pipe.execute()

        return push
    script = client.register_script(_SEND_ONCE)

    def push_once(pushes: list[tuple[str, str]]) -> None:
        lists = list(dict.fromkeys(name for name, _ in pushes))
        where = {name: i for i, name in enumerate(lists, start=2)}  # KEYS[1] is the counter
        args = [fence.sent, fence.ttl_s, *(part for name, envelope in pushes for part in (where[name], envelope))]
        now = int(script(keys=[fence.key, *lists], args=args))
        if now != fence.sent + len(pushes):
            raise SendConflict(
                f"another sender moved {fence.key} to {now} while this one expected {fence.sent}: "
                "stopped, sending nothing twice"
            )
        fence.sent = now

    return push_once


def sent_so_far(app: Celery, batch: str) -> int:
    """How many of a batch's tasks (in its send order) went to the queue, as its SendFence counter
    says: 0 when Redis keeps none (none sent, or the whole send ended and the manifest says so)."""
    raw = app.backend.client.get(sent_key(batch))
    try:
        return max(0, int(raw or 0))
    except ValueError:  # anyone can write Redis: a counter that is not one counts nothing
        return 0


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
    without a result yet (pending) is left out, and so is one whose result is not what Celery
    writes (anyone who can write to Redis can write one: its job is followed as pending, logged,
    and a real result or its video in the store ends it)."""
    backend = app.backend
    prefix = backend.get_key_for_task("-")[:-1]  # Celery's key for a task is this prefix and its id
    prefix = prefix.decode() if isinstance(prefix, bytes) else prefix
    found = {}
    for start in range(0, len(task_ids), chunk):
        part = task_ids[start : start + chunk]
        for task_id, raw in zip(part, backend.mget([prefix + t for t in part]), strict=True):
            if raw is None:
                continue
            try:
                meta = backend.decode_result(raw)
            except Exception:  # Celery's decoding fails in many ways on what it did not write
                meta = None
            if isinstance(meta, dict) and isinstance(meta.get("status"), str):
                found[task_id] = meta
            elif task_id not in _SAID_MALFORMED:  # once a process: `wait` polls every second or two
                _SAID_MALFORMED.add(task_id)
                log.warning(
                    "task %s: its result in Redis is not one Celery wrote (%.80r): followed as pending", task_id, raw
                )
    return found


_SAID_MALFORMED: set[str] = set()
