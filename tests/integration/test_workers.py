"""Worker processes: progress reports, the per-GPU supervisor, --compile, and a clean stop."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from celery.result import AsyncResult

from common.broker import make_app
from common.errors import JobCancelled, LorafleetError, StoreError
from common.protocol import EVAL_TASK_NAME, TASK_NAME
from common.settings import Settings
from tests.conftest import lorafleet
from tests.helpers import progress_of, read_manifest
from workers.supervisor import list_gpus, worker_slots

pytestmark = pytest.mark.integration


def test_running_job_reports_its_denoising_step(fleet_env, start_worker):
    """A running job's step is in its worker's heartbeat (what `wait` and `top` show), said at once
    when it starts and when its denoising ends; its task stays STARTED (no rewrite per step)."""
    start_worker(fleet_env)
    app = make_app(Settings(redis_url=fleet_env["LORAFLEET_REDIS_URL"]))
    # A message without a key, as any Celery client may send: the worker checks and keys it.
    result = app.send_task(TASK_NAME, args=[{"prompt": "a cat", "seed": 1, "steps": 200, "height": 64, "width": 64}])
    seen, states = [], set()
    deadline = time.monotonic() + 120
    while not result.ready() and time.monotonic() < deadline:
        if info := progress_of(result, fleet_env):
            seen.append(info)
        states.add(app.backend.get_task_meta(result.id)["status"])
        time.sleep(0.02)
    outcome = result.get(timeout=5)
    assert outcome["status"] == "done" and len(outcome["key"]) == 64
    assert seen, "the heartbeat never said the job was running"
    assert seen[0]["key"] == outcome["key"] and seen[0]["worker"].startswith("cpu-")
    steps = [info["step"] for info in seen if info["step"] is not None]
    assert steps and steps[-1] == 200 and all(0 < step <= 200 for step in steps), steps
    assert "PROGRESS" not in states and "STARTED" in states, states


def test_a_malformed_message_fails_that_job_and_the_worker_keeps_serving(fleet_env, start_worker):
    start_worker(fleet_env)
    app = make_app(Settings(redis_url=fleet_env["LORAFLEET_REDIS_URL"]))
    bad = app.send_task(TASK_NAME, args=[{"prompt": "a cat", "lora_sacle": 2}])
    with pytest.raises(Exception, match='unknown field "lora_sacle"'):
        bad.get(timeout=60)
    good = app.send_task(TASK_NAME, args=[{"prompt": "a cat", "seed": 2}])
    assert good.get(timeout=60)["status"] == "done"
    assert AsyncResult(bad.id, app=app).state == "FAILURE"
    # An evaluation that names no key, or a key with no video: one-line failures, the worker serves on.
    for message, reason in (({"key": "../../etc/passwd"}, "names no job key"), ({"key": "0" * 64}, "no video")):
        with pytest.raises(Exception, match=reason):
            app.send_task(EVAL_TASK_NAME, args=[message]).get(timeout=60)
    assert app.send_task(TASK_NAME, args=[{"prompt": "a cat", "seed": 3}]).get(timeout=60)["status"] == "done"


def test_gpu_lists_and_worker_slots():
    assert list_gpus("0,2") == [0, 2]
    with pytest.raises(LorafleetError, match="--gpus"):
        list_gpus("first")
    assert worker_slots([0, 2]) == {"gpu0": ["--gpu", "0"], "gpu2": ["--gpu", "2"]}
    assert worker_slots([], cpus=2) == {"cpu0": ["--device", "cpu"], "cpu1": ["--device", "cpu"]}


def test_supervisor_restarts_a_dying_worker_and_stops_on_sigterm(fleet_env, tmp_path):
    env = {**fleet_env, "LORAFLEET_MODEL": str(tmp_path / "no-such-model")}  # every start fails
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "lorafleet", "workers", "--gpus", "0"], env=env, stderr=subprocess.PIPE, text=True
    )
    log = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any("restart 2" in line for line in log):
        log.append(supervisor.stderr.readline())
    supervisor.send_signal(signal.SIGTERM)
    _, rest = supervisor.communicate(timeout=60)
    log.append(rest)
    text = "".join(log)
    assert "gpu0 worker died (code 5); restart 1" in text and "restart 2" in text, text[-3000:]
    assert "cannot start" in text and "no-such-model" in text
    assert supervisor.returncode == 0


def test_worker_compile_flag_compiles_once_and_switching_adds_no_graph(fleet_env, start_worker, tiny):
    env = {**fleet_env, "LORAFLEET_COMPILE_BACKEND": "aot_eager"}  # inductor would need minutes on the CPU
    start_worker(env, flags=("--compile",))
    app = make_app(Settings(redis_url=env["LORAFLEET_REDIS_URL"]))
    graphs = []
    for adapters in ([], [tiny["style"]], [tiny["subject"]]):
        job = {"prompt": "a cat", "seed": 1, "steps": 4, "height": 32, "width": 32, "adapters": adapters}
        outcome = app.send_task(TASK_NAME, args=[job]).get(timeout=120)
        metadata = json.loads(open(outcome["metadata"]).read())
        graphs.append(metadata["caches"]["compiled_graphs"])
    assert graphs[0] >= 1 and graphs[1:] == [graphs[0], graphs[0]], graphs


def test_store_trouble_is_retried_with_back_off_then_fails_with_its_reason(fleet_env, start_worker, tmp_path):
    store = tmp_path / "broken-store"
    store.mkdir()
    (store / "videos").write_text("a file where the videos folder should be")  # every write fails
    env = {**fleet_env, "LORAFLEET_STORE_URL": str(store), "LORAFLEET_STORE_RETRIES": "2"}
    worker = start_worker(env)
    result = make_app(Settings(redis_url=env["LORAFLEET_REDIS_URL"])).send_task(
        TASK_NAME, args=[{"prompt": "x", "seed": 1}]
    )
    with pytest.raises(StoreError, match="cannot write"):
        result.get(timeout=60)
    log = open(worker.log_path).read()
    # Rendered once; only the upload is tried again.
    assert all(f"(upload attempt {n} of 3)" in log for n in (1, 2, 3))
    assert log.count("started (") == 1 and log.count("rendered in") == 0 and worker.poll() is None


def test_supervisor_gives_up_on_a_model_that_never_loads(fleet_env, tmp_path):
    env = {**fleet_env, "LORAFLEET_MODEL": str(tmp_path / "no-such-model")}  # every start fails
    command = [sys.executable, "-m", "lorafleet", "workers", "--gpus", "0"]
    supervisor = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    text = supervisor.stderr
    assert "gpu0 worker died (code 5); restart 1" in text and "restart 2" in text, text[-3000:]
    assert "the model failed to load 3 times in a row" in text
    assert "restart 3" not in text and supervisor.returncode == 5


def test_the_next_job_renders_while_the_last_one_uploads(fleet_env, start_worker):
    """A job's encode and upload run in the background while the next job renders, and its result
    is reported only once its video is in the store."""
    start_worker(fleet_env)
    app = make_app(Settings(redis_url=fleet_env["LORAFLEET_REDIS_URL"]))
    jobs = [
        {"prompt": f"a cat {i}", "seed": i, "steps": 2, "num_frames": 25, "height": 64, "width": 64} for i in range(4)
    ]
    results = [app.send_task(TASK_NAME, args=[job]) for job in jobs]
    video_there_when_reported = {}
    deadline = time.monotonic() + 180
    while len(video_there_when_reported) < len(results) and time.monotonic() < deadline:
        for result in results:
            if result.id not in video_there_when_reported and result.state == "SUCCESS":
                video_there_when_reported[result.id] = os.path.exists(result.result["video"])
        time.sleep(0.005)
    assert list(video_there_when_reported.values()) == [True] * len(results)
    rendered = []  # (metadata, seconds the job took in all: render, then encode and upload)
    for result in results:
        rendered.append((json.loads(open(result.result["metadata"]).read()), result.result["seconds"]))
    rendered.sort(key=lambda one: one[0]["rendering"]["started"])
    for (last, seconds), (following, _) in zip(rendered, rendered[1:], strict=False):
        upload_ended = last["rendering"]["started"] + seconds
        assert following["rendering"]["started"] < upload_ended  # rendering began while the last one uploaded


def test_monitors_hear_a_job_succeed_once_its_upload_ended(fleet_env, start_worker):
    """The result comes from the background upload, so does the task event Flower shows."""
    start_worker(fleet_env)
    app = make_app(Settings(redis_url=fleet_env["LORAFLEET_REDIS_URL"]))
    heard: dict[str, str] = {}
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(
            connection, handlers={"task-succeeded": lambda event: heard.setdefault(event["uuid"], event["result"])}
        )
        listening = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True)
        listening.start()
        time.sleep(1)  # the receiver's queue is bound: events from now on reach it
        result = app.send_task(TASK_NAME, args=[{"prompt": "a cat", "seed": 1, "steps": 2}])
        outcome = result.get(timeout=120)
        deadline = time.monotonic() + 10
        while result.id not in heard and time.monotonic() < deadline:
            time.sleep(0.05)
        receiver.should_stop = True
    assert outcome["key"] in heard.get(result.id, ""), heard


def test_a_rendering_worker_stays_visible_to_flower_and_celery_inspect(fleet_env, start_worker, tmp_path):
    """The job renders off the consumer's loop: while it runs, the worker keeps sending heartbeats
    (Flower counts a worker offline without them) and answers `celery inspect active` with the job."""
    worker = start_worker(fleet_env)
    app = make_app(Settings(redis_url=fleet_env["LORAFLEET_REDIS_URL"]))
    beats: list[float] = []  # the worker's own send times of its heartbeat events
    state = app.events.State()  # what Flower keeps of the fleet, fed the same events
    online_while_rendering: list[bool] = []

    def heard(event):
        state.event(event)
        if event["type"] == "worker-heartbeat" and event["hostname"] == worker.worker:
            beats.append(event["timestamp"])

    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": heard})
        threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True).start()
        time.sleep(1)
        jobs = tmp_path / "long.jsonl"
        jobs.write_text(json.dumps({"prompt": "a long cat", "seed": 5, "steps": 1000, "num_frames": 25, "height": 256, "width": 256}) + "\n")
        submitted = lorafleet("submit", str(jobs), "--batch", "visible", env=fleet_env)
        assert submitted.returncode == 0, submitted.stderr
        (entry,) = read_manifest(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "visible", "manifest.jsonl"))
        result = AsyncResult(entry["task_id"], app=app)
        deadline = time.monotonic() + 60
        while result.state != "STARTED" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert result.state == "STARTED", result.state
        rendering_from = time.time()
        # `celery inspect active --safe`: answered mid-render, not after it, with the job's readable label
        active = app.control.inspect(timeout=3).active(safe=True)
        assert result.state == "STARTED", "the job ended before inspect answered: make it longer"
        (running,) = active[worker.worker]
        assert running["id"] == entry["task_id"]
        assert running["args"] == f"[job {entry['key'][:12]} of batch visible]"
        # Heartbeats must keep coming while it renders: watched for 10 s, then the job is cancelled
        # (it stops at its next step), so the test takes the same time on any machine.
        while result.state == "STARTED" and time.time() - rendering_from < 10:
            online_while_rendering.append(state.workers[worker.worker].alive)  # Flower's "online"
            time.sleep(0.05)
        rendering_until = time.time()
        assert result.state == "STARTED", "the render ended before 10 s of heartbeats: make it longer"
        lorafleet("cancel", "visible", env=fleet_env)
        receiver.should_stop = True
    during = sorted(t for t in beats if rendering_from - 2.5 <= t <= rendering_until + 2.5)
    gaps = [later - earlier for earlier, later in zip(during, during[1:], strict=False)]
    assert len(during) >= 4 and max(gaps) <= 2.2, gaps  # Celery's heartbeat interval is 2 s
    assert online_while_rendering and all(online_while_rendering)
    with pytest.raises(JobCancelled, match="stopped at step"):  # the worker stopped it when told: still responsive
        result.get(timeout=60)
    print(f"heartbeat gaps during the render: {[round(g, 2) for g in gaps]}; watched for {rendering_until - rendering_from:.1f}s")


def test_json_logs_are_one_object_a_line_with_the_worker_the_job_and_its_batch(fleet_env, start_worker, tmp_path):
    """LORAFLEET_LOG_FORMAT=json, as a cluster's log pipeline reads it: every line of the worker's
    output one JSON object (no banner, no progress bar, warnings as records), and the records of a
    job carry its key and batch (the upload's too, logged from another thread)."""
    env = {**fleet_env, "LORAFLEET_LOG_FORMAT": "json"}
    worker = start_worker(env)
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"prompt": "a cat in json", "seed": 5}\n')
    assert lorafleet("submit", str(jobs), "--batch", "json-logs", "--wait", env=env).returncode == 0
    (entry,) = read_manifest(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "json-logs", "manifest.jsonl"))
    lines = [line for line in open(worker.log_path).read().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # each line parses: nothing else was printed
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    assert all(record["worker"] == worker.worker for record in records)
    (rendered,) = [r for r in records if " rendered in " in r["message"]]
    assert rendered["key"] == entry["key"] and rendered["batch"] == "json-logs" and rendered["level"] == "INFO"
    assert any("READY" in r["message"] and "key" not in r for r in records)  # no job: no job fields
