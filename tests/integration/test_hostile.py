"""The store stays true under hostile clients and failing machines: `videos/<key>.mp4` is the render
of exactly the job whose content hashes to `<key>`, written once. Real workers, real Redis."""

import hashlib
import json
import os
import shutil
import signal
import time

import pytest
from celery.result import AsyncResult

from common.adapters import content_hash
from common.jobs_file import job_from_message
from common.model import model_info
from tests.conftest import lorafleet
from tests.helpers import (
    app_for,
    default_limits,
    long_job,
    progress_of,
    read_manifest,
    render_records,
    resolver_for,
    submit_one,
    wait_for,
)
from tests.unit.test_corpus import CORPUS

pytestmark = pytest.mark.integration


def store_files(store: str) -> dict[str, tuple[str, int]]:
    """Every file in the store: its content hash and modification time."""
    files = {}
    for folder, _, names in os.walk(store):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, store)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return files


def failure_of(result, timeout: float = 60) -> str:
    """The one-line reason a job failed with (the test fails if it did not)."""
    with pytest.raises(Exception) as failed:
        result.get(timeout=timeout)
    return str(failed.value)


def metadata(env: dict, key: str) -> dict:
    with open(os.path.join(env["LORAFLEET_STORE_URL"], "videos", f"{key}.json")) as f:
        return json.load(f)


def test_a_forged_key_is_refused_and_the_real_job_still_renders(fleet_env, start_worker, tiny, tmp_path):
    start_worker(fleet_env)
    real = {"prompt": "a red fox in the snow", "seed": 1}
    real_key = job_from_message(real, model_info(tiny["model"]), resolver_for(), default_limits().max_video_pixels).key
    forged = app_for(fleet_env).send_task(
        "lorafleet.render", args=[{"prompt": "something else entirely", "seed": 1, "key": real_key}]
    )
    reason = failure_of(forged)
    assert f"the message says {real_key} but its content hashes to " in reason
    assert not os.path.exists(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "videos", f"{real_key}.mp4"))

    submitted = submit_one(real, tmp_path, fleet_env, "--wait")
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "1 enqueued, 0 already in the store" in submitted.stdout
    assert metadata(fleet_env, real_key)["job"]["prompt"] == real["prompt"]


def test_a_worker_paused_past_its_lease_writes_nothing(fleet_env, start_worker):
    env = {**fleet_env, "LORAFLEET_LEASE_S": "5"}
    workers = [start_worker(env), start_worker(env)]
    job = {**long_job(7, steps=1000), "height": 96, "width": 96}  # seconds of rendering: paused mid-render
    result = app_for(env).send_task("lorafleet.render", args=[job])
    info = wait_for(lambda: progress_of(result, env), 60, "the job to start")
    paused = next(w for w in workers if w.worker == info["worker"])
    other = next(w for w in workers if w is not paused)
    os.killpg(paused.pid, signal.SIGSTOP)
    time.sleep(10)  # twice the lease: the other worker's sweeper hands the job on
    os.killpg(paused.pid, signal.SIGCONT)

    outcome = result.get(timeout=240)
    assert outcome["status"] == "done" and outcome["worker"] == other.worker
    written = store_files(env["LORAFLEET_STORE_URL"])
    wait_for(lambda: "stopped without writing" in open(paused.log_path).read(), 60, "the paused worker to stop", 0.5)
    time.sleep(2)
    assert store_files(env["LORAFLEET_STORE_URL"]) == written  # nothing changed after the job was reported done
    assert render_records([w.log_path for w in workers]) == {outcome["key"][:12]: 1}
    assert AsyncResult(result.id, app=app_for(env)).state == "SUCCESS"  # the paused worker did not overwrite it
    assert paused.poll() is None  # and it serves on


def test_a_render_that_overflows_fails_instead_of_storing_a_black_video(fleet_env, start_worker, tiny, tmp_path):
    start_worker(fleet_env)
    job = {"prompt": "a cat", "adapters": [tiny["style"]], "lora_scale": 1e30, "seed": 1, "height": 32, "width": 32}
    submitted = submit_one(job, tmp_path, fleet_env, "--wait", "--batch", "overflow")
    assert submitted.returncode == 1, submitted.stdout + submitted.stderr
    (entry,) = read_manifest(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "overflow", "manifest.jsonl"))
    assert entry["status"] == "failed" and "came out NaN or infinite: not stored" in entry["error"]
    assert not os.path.exists(entry["video"]) and not os.path.exists(entry["metadata"])


def test_a_non_finite_adapter_from_another_client_fails_naming_it(fleet_env, start_worker):
    """A client that computed the hash itself skips submit's checks: the worker checks the factors."""
    start_worker(fleet_env)
    path = os.path.join(CORPUS, "adapters", "nan.safetensors")
    with open(path, "rb") as f:
        sha256 = content_hash(f.read(), None)
    adapter = {"uri": path, "url": path, "sha256": sha256}
    result = app_for(fleet_env).send_task("lorafleet.render", args=[{"prompt": "x", "seed": 1, "adapters": [adapter]}])
    assert "nan.safetensors: tensor" in failure_of(result) and "holds NaN or infinite values" in failure_of(result)


def test_a_fifo_adapter_fails_its_job_and_the_worker_serves_on(fleet_env, start_worker, tmp_path):
    fifo = str(tmp_path / "adapter.safetensors")
    os.mkfifo(fifo)
    start_worker(fleet_env)
    app = app_for(fleet_env)
    bad = app.send_task("lorafleet.render", args=[{"prompt": "x", "seed": 1, "adapters": [fifo]}])
    assert f"adapter {fifo} is not a regular file (a device, FIFO or socket): not read" in failure_of(bad, timeout=30)
    assert app.send_task("lorafleet.render", args=[{"prompt": "x", "seed": 2}]).get(timeout=60)["status"] == "done"


def test_a_worker_reads_an_adapter_anew_when_its_file_appears_or_changes(fleet_env, start_worker, tiny, tmp_path):
    start_worker(fleet_env)
    app = app_for(fleet_env)
    folder = tmp_path / "late-adapter"
    message = {"prompt": "x", "seed": 1, "adapters": [str(folder)]}
    assert "not found" in failure_of(app.send_task("lorafleet.render", args=[message]))

    seen = []
    for name in ("style", "subject"):  # the file appears, then is replaced in place
        folder.mkdir(exist_ok=True)
        shutil.copyfile(
            os.path.join(tiny[name], "pytorch_lora_weights.safetensors"), folder / "pytorch_lora_weights.safetensors"
        )
        outcome = app.send_task("lorafleet.render", args=[message]).get(timeout=60)
        assert outcome["status"] == "done"
        with open(folder / "pytorch_lora_weights.safetensors", "rb") as f:
            assert metadata(fleet_env, outcome["key"])["adapters"][0]["sha256"] == content_hash(f.read(), None)
        seen.append(outcome["key"])
    assert seen[0] != seen[1]


@pytest.fixture
def small_store(tmp_path):
    """A store on a 16 MiB tmpfs of its own, which a test can fill or make read-only (root mounts it);
    skipped where mounting is not allowed, failed in CI."""
    import subprocess

    mount = tmp_path / "store"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs for the store: {done.stderr.decode()}")
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("trouble", ["read-only", "full"])
def test_status_and_wait_report_what_they_can_on_a_store_that_cannot_be_written(
    fleet_env, start_worker, tmp_path, small_store, trouble
):
    """A real read-only or full filesystem under the store: the commands still show the batch."""
    import subprocess

    env = {**fleet_env, "LORAFLEET_STORE_URL": str(small_store)}
    start_worker(env)
    assert submit_one({"prompt": "a cat", "seed": 1}, tmp_path, env, "--wait", "--batch", "ro").returncode == 0
    if trouble == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", str(small_store)], check=True)
        reason = "Read-only file system"
    else:
        with open(small_store / "filler", "wb") as filler:  # until the filesystem says it is full
            try:
                while True:
                    filler.write(b"\0" * 2**20)
                    filler.flush()
            except OSError:
                pass
        reason = "No space left on device"
    shown = lorafleet("status", "ro", env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "batch ro: 1 done, 0 running, 0 queued, 0 failed, 0 cancelled of 1 jobs" in shown.stdout
    assert "warning: the manifest was not updated: cannot write" in shown.stdout + shown.stderr
    assert reason in shown.stdout + shown.stderr
    assert lorafleet("wait", "ro", env=env).returncode == 0


@pytest.mark.parametrize("flag", ["cancel", "pause"])
def test_a_reused_batch_name_is_refused_and_a_new_batch_is_not_captured_by_old_flags(
    fleet_env, start_worker, tmp_path, flag
):
    """A batch is its manifest: submitting to a name the store holds is refused (its manifest kept
    whole); once that batch is gone, a new one under its name starts clean of its cancel or pause."""
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "first", "prompt": "a cat", "seed": 1}\n')
    assert lorafleet("submit", str(jobs), "--batch", "reused", env=fleet_env).returncode == 0  # no worker yet
    assert lorafleet(flag, "reused", env=fleet_env).returncode == 0
    manifest = os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches", "reused", "manifest.jsonl")
    before = open(manifest).read()
    again = tmp_path / "again.jsonl"
    again.write_text('{"id": "second", "prompt": "a dog", "seed": 2}\n')
    refused = lorafleet("submit", str(again), "--batch", "reused", env=fleet_env)
    assert refused.returncode == 2 and 'batch "reused" already exists' in refused.stderr
    assert "lorafleet retry reused" in refused.stderr and open(manifest).read() == before
    # The earlier batch removed from the store (as pruning it will); Redis still holds its flag.
    shutil.rmtree(os.path.dirname(manifest))
    start_worker(fleet_env)
    done = lorafleet("submit", str(again), "--batch", "reused", "--wait", "--timeout", "120", env=fleet_env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (entry,) = read_manifest(manifest)
    assert entry["id"] == "second" and entry["status"] == "done"
