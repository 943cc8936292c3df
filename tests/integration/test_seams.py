"""Where an operator's second command meets the first one still running: a submit cut off while it
sends, prune beside a submit, a revoke from Flower beside a render."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from tests.conftest import lorafleet
from tests.helpers import wait_for

pytestmark = pytest.mark.integration


def queued_task_ids(redis_url: str, queue: str = "render") -> list[str]:
    """The task id of every message waiting in a queue, at every priority (a task sent twice shows twice)."""
    from common.protocol import queue_lists

    client = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw)["headers"]["id"] for name in queue_lists(queue) for raw in client.lrange(name, 0, -1)]
    finally:
        client.close()


def many_jobs(path, scales: int = 100, seeds: int = 200) -> int:
    """A jobs file of one line that expands into scales × seeds jobs."""
    path.write_text(
        json.dumps({"prompt": "a cat", "lora_scale": [i / 10 for i in range(scales)], "seed": list(range(seeds))})
        + "\n"
    )
    return scales * seeds


def cut_off_while_sending(env: dict, jobs, batch: str, how: int) -> subprocess.Popen:
    """Start `lorafleet submit`, let its first messages land, freeze Redis' writes so the send
    stalls mid-way, and send the submit `how` (SIGKILL: a node drain; SIGINT: Ctrl-C)."""
    url = env["LORAFLEET_REDIS_URL"]
    submit = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "submit", str(jobs), "--batch", batch],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    client = redis.Redis.from_url(url)
    try:
        wait_for(lambda: len(queued_task_ids(url)) >= 1000, 120, "the first messages in Redis", interval=0.01)
        client.execute_command("CLIENT", "PAUSE", 20000, "WRITE")
        time.sleep(0.5)
        submit.send_signal(how)
        submit.wait(timeout=30)
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        client.close()
    return submit


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["killed", "ctrl-c"])
def test_a_submit_cut_off_while_sending_is_finished_by_retry_none_twice(fleet_env, tmp_path, how):
    jobs = tmp_path / "jobs.jsonl"
    total = many_jobs(jobs)
    url = fleet_env["LORAFLEET_REDIS_URL"]
    submit = cut_off_while_sending(fleet_env, jobs, "cut", how)
    sent = len(queued_task_ids(url))
    assert 0 < sent < total, sent
    if how == signal.SIGINT:
        said = submit.stderr.read()
        assert submit.returncode == 130, said
        assert "lorafleet retry cut" in said and "Traceback" not in said, said
        assert f"{sent} of {total}" in said, said

    status = json.loads(lorafleet("status", "cut", "--json", env=fleet_env).stdout)
    assert status["counts"]["queued"] == sent  # what is in Redis, no more
    assert status["counts"]["unsent"] == total - sent
    said = lorafleet("status", "cut", env=fleet_env).stdout
    assert f"{total - sent} unsent" in said and "lorafleet retry cut" in said, said

    again = lorafleet("retry", "cut", env=fleet_env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{total - sent} job(s) never sent are sent now" in again.stdout, again.stdout
    assert "enqueued again" not in again.stdout, again.stdout  # no line of none failed or cancelled
    ids = queued_task_ids(url)
    assert len(ids) == total and len(set(ids)) == total  # every job once, none twice
    status = json.loads(lorafleet("status", "cut", "--json", env=fleet_env).stdout)
    assert status["counts"]["queued"] == total and status["counts"].get("unsent", 0) == 0
    assert lorafleet("retry", "cut", env=fleet_env).returncode == 0  # nothing left to send: sends nothing
    assert len(queued_task_ids(url)) == total


def test_prune_and_a_submit_never_race_a_job_called_done_has_its_video(fleet_env, tmp_path):
    import threading

    from rich.console import Console

    from common.store import Store, video_path
    from common.store_lock import StoreLock
    from producer.prune import prune

    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat", "seed": 7}\n')
    store = Store(fleet_env["LORAFLEET_STORE_URL"])
    first = lorafleet("submit", str(jobs), "--batch", "old", "--json", env=fleet_env)
    (entry,) = json.loads(first.stdout)["entries"]
    key = entry["key"]
    for suffix in ("mp4", "png", "json"):  # as if a worker rendered it
        store.write_bytes(video_path(key, suffix), b"\0" * 1000)
    lorafleet("status", "old", env=fleet_env)  # the manifest says done
    time.sleep(1.1)  # the store's times are in whole seconds
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    time.sleep(1.1)

    in_window, go_on = threading.Event(), threading.Event()

    def hold(plan):  # prune has planned to delete the video: a submit lands now
        assert f"videos/{key}.mp4" in plan.files
        in_window.set()
        assert go_on.wait(120)

    lock = StoreLock(fleet_env["LORAFLEET_REDIS_URL"])
    said_by_prune = Console(file=open(tmp_path / "prune.out", "w"))
    pruning = threading.Thread(target=prune, args=(store, cutoff, said_by_prune, lock), kwargs={"planned": hold})
    pruning.start()
    assert in_window.wait(60)
    out = open(tmp_path / "submit.out", "w+")
    submit = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "submit", str(jobs), "--batch", "new"],
        env=fleet_env, stdout=out, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    wait_for(
        lambda: submit.poll() is not None or "waiting for a prune" in open(out.name).read(),
        60,
        "the submit to decide or wait",
    )
    go_on.set()
    pruning.join(60)
    assert submit.wait(60) == 0, open(out.name).read()
    said = open(out.name).read()
    status = json.loads(lorafleet("status", "new", "--json", env=fleet_env).stdout)
    (entry,) = status["entries"]
    assert not store.exists(video_path(key, "mp4"))  # prune removed the old batch's video...
    assert entry["status"] != "done", said  # ...so the new batch cannot call its job done
    assert entry["status"] == "queued" and "1 enqueued, 0 already in the store" in said, said
    assert "waiting for a prune of the store to finish" in said


@pytest.mark.parametrize(
    "bad", ['{"status": "done", "task_id": null}', "not json", '["a", "list"]'], ids=["no key", "not json", "a list"]
)
def test_prune_keeps_a_batch_whose_manifest_is_malformed_names_it_and_prunes_the_rest(redis_url, tmp_path, bad):
    from common.store import Store
    from tests.helpers import plant_batch

    env = {**os.environ, "LORAFLEET_REDIS_URL": redis_url, "LORAFLEET_STORE_URL": str(tmp_path / "store")}
    store = Store(env["LORAFLEET_STORE_URL"])
    gone, named = "1" * 64, "2" * 64
    plant_batch(store, "old", [gone])
    plant_batch(store, "bad", [named])
    manifest = tmp_path / "store" / "batches" / "bad" / "manifest.jsonl"
    manifest.write_text(manifest.read_text() + bad + "\n")
    time.sleep(1.1)  # the store's times are in whole seconds
    cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    done = lorafleet("prune", "--before", cutoff, env=env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert (
        f"warning: kept batch bad and every video it names: its manifest cannot be read: {manifest} line 2: not a"
        in done.stdout
    )
    assert not store.exists(f"videos/{gone}.mp4") and "old" not in store.list_folder("batches")
    assert store.exists(f"videos/{named}.mp4") and manifest.exists()


def test_a_revoke_from_flower_cancels_as_lorafleet_cancel_does(fleet_env, start_worker, tmp_path):
    """Flower's Terminate and Revoke buttons are Celery's `revoke` (terminate or not): a running job
    stops at its next step and a queued one never starts, both recorded cancelled."""
    from celery.result import AsyncResult

    from tests.helpers import app_for, frozen, long_job, progress_of, read_manifest

    worker = start_worker(fleet_env)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(long_job(1, steps=1000)) + "\n" + json.dumps(long_job(2, steps=1000)) + "\n")
    assert lorafleet("submit", str(jobs), "--batch", "revoked", env=fleet_env).returncode == 0
    busy, waiting = read_manifest(f"{fleet_env['LORAFLEET_STORE_URL']}/batches/revoked/manifest.jsonl")
    app = app_for(fleet_env)
    wait_for(lambda: progress_of(AsyncResult(busy["task_id"], app=app), fleet_env), 60, "the first job to start")
    with frozen(worker):  # 1000 steps take 3 s here: the revokes land while the first job runs
        app.control.revoke(busy["task_id"], terminate=True)  # Flower's Terminate
        app.control.revoke(waiting["task_id"])  # Flower's Revoke
    status = wait_for(
        lambda: (
            (s := json.loads(lorafleet("status", "revoked", "--json", env=fleet_env).stdout))["counts"]["cancelled"]
            == 2
            and s
        ),
        60,
        "both jobs cancelled",
        interval=1,
    )
    first, second = status["entries"]
    assert "stopped at step" in first["error"], first
    assert "revoked" in second["error"], second
    assert "NotImplementedError" not in open(worker.log_path).read()
    replies = app.control.revoke(busy["task_id"], terminate=True, reply=True, timeout=5)
    (reply,) = [answer for reply in replies for answer in reply.values()]
    assert "stop at their next denoising step" in reply["ok"], reply
    assert not any(os.path.exists(entry["video"]) for entry in (busy, waiting))


def test_heartbeats_holding_nan_or_zero_are_skipped_by_top_health_and_the_estimate(fleet_env, tiny, tmp_path):
    from common.protocol import worker_key

    beat = {"queue": "render", "since": time.time(), "beat": time.time()}
    pace = {"pixels": 0, "step_s": 0.5, "other_s": 1.0}
    client = redis.Redis.from_url(fleet_env["LORAFLEET_REDIS_URL"])
    client.set(worker_key("nan@host"), json.dumps({**beat, "worker": "nan@host", "since": float("nan")}), ex=60)
    client.set(worker_key("zero@host"), json.dumps({**beat, "worker": "zero@host", "pace": pace}), ex=60)
    client.close()

    top = lorafleet("top", "--once", "--json", env=fleet_env)
    assert top.returncode == 0, top.stdout + top.stderr
    assert json.loads(top.stdout)["workers"] == []
    health = lorafleet("health", env=fleet_env)
    assert health.returncode == 1 and "nan" not in health.stdout and "no worker has a fresh heartbeat" in health.stdout
    spec = tmp_path / "sweep.json"
    spec.write_text(
        json.dumps({"name": "n", "prompts": ["a cat"], "adapter_sets": [[tiny["style"]]], "lora_scales": [0, 1]})
    )
    estimate = lorafleet("sweep", str(spec), "--estimate", env=fleet_env)
    assert estimate.returncode == 0, estimate.stdout + estimate.stderr
    assert "no live worker serves it: no pace to estimate from" in estimate.stdout
