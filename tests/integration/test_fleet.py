"""The whole flow with a private redis-server, real worker processes and the tiny model."""

import glob
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from common.broker import make_app
from common.protocol import TASK_NAME
from common.settings import Settings
from tests.conftest import REPO, lorafleet
from tests.helpers import decode_video, queued_messages, read_manifest, video_info

pytestmark = pytest.mark.integration
EXAMPLES = os.path.join(REPO, "examples", "prompts.jsonl")


@pytest.fixture
def workdir(tmp_path, tiny) -> str:
    """A folder laid out as after `make demo`: demo/adapters/{style,subject}, as examples/ expects."""
    for name in ("style", "subject"):
        shutil.copytree(tiny[name], tmp_path / "work" / "demo" / "adapters" / name)
    return str(tmp_path / "work")


def expected_videos(path: str) -> list[tuple[int, int, int, int]]:
    """(frames, height, width, fps) of each job in a jobs file, after expansion, with the tiny model's defaults."""
    out = []
    for line in open(path):
        job = json.loads(line)
        for _ in range(len(job["lora_scale"]) if isinstance(job.get("lora_scale"), list) else 1):
            out.append((job.get("num_frames", 9), job.get("height", 16), job.get("width", 16), job.get("fps", 8)))
    return out


def only_manifest(store: str) -> list[dict]:
    (path,) = glob.glob(os.path.join(store, "batches", "*", "manifest.jsonl"))
    return read_manifest(path)


def test_submit_wait_renders_every_job_and_resubmitting_enqueues_nothing(fleet_env, start_worker, workdir):
    start_worker(fleet_env)
    result = lorafleet("submit", EXAMPLES, "--wait", "--batch", "first", env=fleet_env, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "batch first: 5 jobs, 5 enqueued, 0 already in the store" in result.stdout

    store = fleet_env["LORAFLEET_STORE_URL"]
    manifest = read_manifest(os.path.join(store, "batches", "first", "manifest.jsonl"))
    assert [entry["status"] for entry in manifest] == ["done"] * 5
    assert len({entry["key"] for entry in manifest}) == 5
    for entry, (frames, height, width, fps) in zip(manifest, expected_videos(EXAMPLES), strict=True):
        assert entry["video"] == os.path.join(store, "videos", f"{entry['key']}.mp4")
        video = decode_video(entry["video"])
        assert video.shape == (frames, height, width, 3)
        info = video_info(entry["video"])
        assert info["codec"] == "h264" and info["fps"] == fps
        assert os.path.getsize(entry["poster"]) > 0
        metadata = json.load(open(entry["metadata"]))
        assert metadata["key"] == entry["key"] and metadata["worker"].startswith("cpu-")
        assert metadata["frames"] == frames and metadata["model"] == fleet_env["LORAFLEET_MODEL"]

    again = lorafleet("submit", EXAMPLES, "--wait", "--batch", "second", env=fleet_env, cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "batch second: 5 jobs, 0 enqueued, 5 already in the store" in again.stdout
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 0
    second = read_manifest(os.path.join(store, "batches", "second", "manifest.jsonl"))
    assert [(e["key"], e["status"]) for e in second] == [(e["key"], "done") for e in manifest]


def test_malformed_file_names_each_line_and_enqueues_nothing(fleet_env, tmp_path, tiny):
    jobs = tmp_path / "bad.jsonl"
    jobs.write_text(
        json.dumps({"prompt": "fine", "adapters": [tiny["style"]]})
        + "\n"
        + "{this is not json\n"
        + '{"prompt": "x", "lora_sacle": 1.0}\n'
        + '{"prompt": "x", "adapters": ["missing/adapter"]}\n'
        + '{"prompt": "x", "lora_scale": NaN}\n'
    )
    result = lorafleet("submit", str(jobs), env=fleet_env)
    assert result.returncode == 2
    assert "4 error(s), nothing was enqueued" in result.stderr
    assert "line 2: not valid JSON" in result.stderr
    assert 'line 3: unknown field "lora_sacle" (did you mean "lora_scale"?)' in result.stderr
    assert 'line 4: adapter "missing/adapter" not found' in result.stderr
    assert "line 5: lora_scale: must be a finite number, got nan" in result.stderr
    assert "line 1" not in result.stderr
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 0
    assert not os.path.exists(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches"))


def test_an_adapter_the_model_cannot_take_is_refused_at_submit_and_fails_a_direct_message(
    fleet_env, start_worker, tmp_path, tiny
):
    wrong = tmp_path / "wrong-shape.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(4, 7),
            "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(32, 4),
        },
        str(wrong),
    )
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"id": "bad", "prompt": "x", "adapters": [str(wrong)], "seed": 1}) + "\n")
    result = lorafleet("submit", str(jobs), "--wait", env=fleet_env)
    assert result.returncode == 2
    assert "transformer_blocks.0.attn1.to_q is 32×32 in the model but 32×7 in the adapter" in result.stderr
    assert result.stderr.splitlines()[1].startswith(f'line 1: adapter "{wrong}"')
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 0

    # Another Celery client may send it anyway: that job fails with the same reason, the worker serves on.
    start_worker(fleet_env)
    app = make_app(Settings(redis_url=fleet_env["LORAFLEET_REDIS_URL"]))
    bad = app.send_task(TASK_NAME, args=[{"prompt": "x", "adapters": [str(wrong)], "seed": 1}])
    with pytest.raises(Exception, match="is 32×32 in the model but 32×7 in the adapter"):
        bad.get(timeout=60)
    good = app.send_task(TASK_NAME, args=[{"prompt": "x", "adapters": [tiny["style"]], "seed": 1}])
    assert good.get(timeout=60)["status"] == "done"


def test_no_corpus_file_reaches_the_queue(fleet_env, monkeypatch, tmp_path):
    """Each hostile file, with a good line before its bad ones, enqueues nothing; the same path
    enqueues the good line alone (so the count below can see a message)."""
    from common.errors import JobFileError
    from producer.submit import submit
    from tests.unit.test_corpus import CORPUS, EXPECTED

    settings = Settings(
        redis_url=fleet_env["LORAFLEET_REDIS_URL"],
        store_url=fleet_env["LORAFLEET_STORE_URL"],
        model=fleet_env["LORAFLEET_MODEL"],
    )
    monkeypatch.chdir(CORPUS)  # adapter paths in the corpus are relative to it
    good = json.dumps({"prompt": "a good line", "seed": 1}).encode() + b"\n"
    for name in EXPECTED:
        with open(name, "rb") as f:
            hostile = f.read()
        mixed = tmp_path / name
        mixed.write_bytes(good + hostile if hostile.strip() else hostile)
        with pytest.raises(JobFileError):
            submit(str(mixed), settings)
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 0
    assert not os.path.exists(os.path.join(fleet_env["LORAFLEET_STORE_URL"], "batches"))
    (tmp_path / "good.jsonl").write_bytes(good)
    submit(str(tmp_path / "good.jsonl"), settings)
    assert queued_messages(fleet_env["LORAFLEET_REDIS_URL"]) == 1
