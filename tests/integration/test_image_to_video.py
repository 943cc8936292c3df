"""Image-to-video through the fleet: a worker serving the tiny I2V model under an alias renders jobs
with their images; the same image under another path is the same job; a text-to-video line with
an image is refused at submit with nothing enqueued."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.conftest import lorafleet
from tests.helpers import decode_video, queued_messages, read_manifest

pytestmark = pytest.mark.integration


def test_an_i2v_worker_renders_each_job_with_its_image(fleet_env, start_worker, tiny_kinds, tmp_path):
    i2v = tiny_kinds["i2v"]
    env = {**fleet_env, "LORAFLEET_MODELS": json.dumps({"i2v": i2v["model"]})}
    store = env["LORAFLEET_STORE_URL"]
    os.makedirs(os.path.join(store, "inputs"))
    shutil.copy(i2v["sunset"], os.path.join(store, "inputs", "sunset.png"))  # the same picture, in the store
    start_worker(env, flags=("--model", "i2v"))
    jobs = tmp_path / "i2v.jsonl"
    lines = [
        {"id": "sunset", "image": i2v["sunset"]},
        {"id": "sunset-in-store", "image": "inputs/sunset.png"},
        {"id": "tiles", "image": i2v["tiles"]},
        {"id": "tiles-styled", "image": i2v["tiles"], "adapters": [i2v["style"]]},
    ]
    jobs.write_text(
        "".join(json.dumps({"prompt": "a cat", "seed": 5, "steps": 4, "model": "i2v", **line}) + "\n" for line in lines)
    )
    submit = lorafleet("submit", str(jobs), "--wait", "--batch", "i2v", "--timeout", "180", env=env)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    manifest = {entry["id"]: entry for entry in read_manifest(os.path.join(store, "batches", "i2v", "manifest.jsonl"))}
    assert {entry["status"] for entry in manifest.values()} == {"done"}
    assert manifest["sunset"]["key"] == manifest["sunset-in-store"]["key"]  # the content is the job, not its path
    assert len({manifest[name]["key"] for name in ("sunset", "tiles", "tiles-styled")}) == 3
    videos = {name: decode_video(manifest[name]["video"]) for name in ("sunset", "tiles", "tiles-styled")}
    assert all(video.shape == (9, 16, 16, 3) for video in videos.values())
    assert not np.array_equal(videos["sunset"], videos["tiles"])
    with open(manifest["sunset"]["metadata"]) as f:
        image = json.load(f)["image"]
    assert (
        image["url"] == i2v["sunset"] and (image["width"], image["height"]) == (16, 16) and len(image["sha256"]) == 64
    )


def test_a_text_to_video_line_with_an_image_enqueues_nothing(fleet_env, tiny_kinds, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        json.dumps({"prompt": "a cat"})
        + "\n"
        + json.dumps({"prompt": "a dog", "image": tiny_kinds["i2v"]["sunset"]})
        + "\n"
    )
    submit = lorafleet("submit", str(jobs), env=fleet_env)
    assert submit.returncode == 2
    assert "line 2: image: this model is text-to-video and takes no image" in submit.stderr + submit.stdout
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 0


def test_cogvideox_1_5_workers_render_16n_plus_1_frames(fleet_env, start_worker, tiny_kinds, tmp_path):
    t2v, i2v = tiny_kinds["t2v-1.5"], tiny_kinds["i2v-1.5"]
    env = {**fleet_env, "LORAFLEET_MODELS": json.dumps({"t15": t2v["model"], "i15": i2v["model"]})}
    start_worker(env, "t15", flags=("--model", "t15"))
    start_worker(env, "i15", flags=("--model", "i15"))
    jobs = tmp_path / "jobs.jsonl"
    lines = [
        {"id": "t2v", "model": "t15", "adapters": [t2v["style"]]},
        {"id": "i2v", "model": "i15", "adapters": [i2v["style"]], "image": i2v["tiles"]},
    ]
    jobs.write_text("".join(json.dumps({"prompt": "a cat", "seed": 1, "steps": 3, **line}) + "\n" for line in lines))
    submit = lorafleet("submit", str(jobs), "--wait", "--batch", "v15", "--timeout", "180", env=env)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    manifest = read_manifest(os.path.join(env["LORAFLEET_STORE_URL"], "batches", "v15", "manifest.jsonl"))
    assert [entry["status"] for entry in manifest] == ["done", "done"]
    assert all(decode_video(entry["video"]).shape == (17, 16, 16, 3) for entry in manifest)
