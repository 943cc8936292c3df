"""Jobs are sent as Celery itself sends them: a message `send_jobs` builds is, field for field, the
one Celery's `send_task` pushes (only the ids differ), on the list of its queue and priority.
A real worker consuming them is tested with every submit (tests/integration)."""

import base64
import json

import pytest
import redis

from common.broker import make_app, send_jobs
from common.protocol import PRIORITIES, TASK_NAME, queue_lists
from common.settings import Settings

pytestmark = pytest.mark.unit


def pushed(client, name: str) -> list[dict]:
    """The envelopes on a Redis list, oldest first, with their bodies decoded."""
    found = [json.loads(raw) for raw in reversed(client.lrange(name, 0, -1))]
    for envelope in found:
        envelope["body"] = json.loads(base64.b64decode(envelope["body"]))
    return found


def without_ids(envelope: dict, task_id: str) -> str:
    """An envelope as text, its task id and delivery tag replaced by placeholders."""
    envelope["properties"]["delivery_tag"] = "TAG"
    return json.dumps(envelope, sort_keys=True).replace(task_id, "ID")


@pytest.mark.parametrize("priority", ["high", "normal", "low"])
def test_a_sent_job_is_what_celerys_send_task_pushes(redis_url, priority):
    app = make_app(Settings(redis_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    queue = "render.test-" + priority
    client.delete(*queue_lists(queue))
    message = {"prompt": "a cat", "seed": 1, "key": "ab" * 32, "batch": "b1", "priority": priority}
    label = f"[job {'ab' * 6} of batch b1]"
    app.send_task(
        TASK_NAME, args=[message], queue=queue, task_id="celery-own-id", priority=PRIORITIES[priority],
        argsrepr=label, kwargsrepr="{}", declare=[],
    )  # fmt: skip
    assert send_jobs(app, [(message, "lorafleet-id", queue)]) == 1
    (name,) = [name for name in queue_lists(queue) if client.llen(name)]
    assert name == queue_lists(queue)[[0, 3, 6, 9].index(PRIORITIES[priority])]
    celerys, ours = pushed(client, name)
    assert ours["body"][0] == [message] and ours["headers"]["argsrepr"] == label
    assert without_ids(ours, "lorafleet-id") == without_ids(celerys, "celery-own-id")
    client.delete(*queue_lists(queue))


def test_many_jobs_go_in_pipelines_and_in_order(redis_url):
    app = make_app(Settings(redis_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    queue = "render.test-many"
    sent = send_jobs(app, (({"prompt": f"p{i}", "seed": i}, f"id-{i}", queue) for i in range(25)), chunk=10)
    assert sent == 25
    found = pushed(client, queue_lists(queue)[0])  # no priority: step 0, "high", where kombu itself sends one
    assert [envelope["headers"]["id"] for envelope in found] == [f"id-{i}" for i in range(25)]
    client.delete(*queue_lists(queue))


def test_ids_and_batch_names_that_json_must_escape_arrive_whole(redis_url):
    """A task id read back from a store anyone can write, a batch named in any script: the envelope
    stays valid JSON and the worker gets them as they were sent."""
    app = make_app(Settings(redis_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    queue = "render.test-escapes"
    client.delete(*queue_lists(queue))
    odd = 'id "quoted" \\ é \x01'
    message = {"prompt": "a cat", "seed": 1, "key": "ab" * 32, "batch": 'b"1\\é', "priority": "low"}
    assert send_jobs(app, [(message, odd, queue), ({**message, "seed": 2}, "plain-id", queue)]) == 2
    first, second = pushed(client, queue_lists(queue)[[0, 3, 6, 9].index(PRIORITIES["low"])])
    assert first["headers"]["id"] == first["headers"]["root_id"] == first["properties"]["correlation_id"] == odd
    assert first["headers"]["argsrepr"] == f"[job {'ab' * 6} of batch {message['batch']}]"
    assert first["body"][0] == [message] and second["body"][0] == [{**message, "seed": 2}]
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
    client.delete(*queue_lists(queue))


def test_a_body_arrives_as_sent_whatever_its_text_holds(redis_url):
    """Bodies are written by pydantic's serializer (UTF-8 as it is); a lone surrogate, which a JSON
    escape from any client can carry and UTF-8 cannot, goes through the json module's escape."""
    app = make_app(Settings(redis_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    queue = "render.test-bodies"
    client.delete(*queue_lists(queue))
    messages = [
        {"prompt": "un chat é 猫 \u2028", "seed": 2**70, "lora_scale": 1e-07, "key": "ab" * 32, "priority": "low"},
        {"prompt": "half a pair \udc80", "seed": 1, "key": "cd" * 32, "priority": "low"},
    ]
    assert send_jobs(app, [(message, f"id-{i}", queue) for i, message in enumerate(messages)]) == 2
    found = pushed(client, queue_lists(queue)[[0, 3, 6, 9].index(PRIORITIES["low"])])
    assert [envelope["body"][0] for envelope in found] == [[message] for message in messages]
    client.delete(*queue_lists(queue))


def test_a_task_result_celery_did_not_write_is_followed_as_pending(redis_url, caplog):
    """Anyone who can write to Redis can write a task's result: what is not Celery's own (not JSON,
    not a mapping, no status) leaves its job pending, logged, instead of crashing `wait` and `status`."""
    from common.broker import task_metas

    app = make_app(Settings(_env_file=None, redis_url=redis_url))
    client = redis.Redis.from_url(redis_url)
    app.backend.store_result("done", {"worker": "w1"}, "SUCCESS")
    malformed = {"garbage": b"{not json", "a-string": b'"SUCCESS"', "no-status": b'{"result": 1}'}
    for task_id, written in malformed.items():
        client.set(f"celery-task-meta-{task_id}", written)
    for _ in range(2):  # `wait` polls again and again: said once
        found = task_metas(app, ["done", *malformed, "pending"])
        assert list(found) == ["done"] and found["done"]["status"] == "SUCCESS"
    said = [r.message for r in caplog.records if "is not one Celery wrote" in r.message]
    assert len(said) == 3 and all(any(f"task {t}:" in m for m in said) for t in malformed)
