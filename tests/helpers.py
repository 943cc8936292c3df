"""What tests check the way a user would: decoding videos, reading manifests, counting the queue."""

import json
import re

import imageio.v3 as iio
import numpy as np


def decode_video(path: str) -> np.ndarray:
    """All frames of an MP4, decoded by ffmpeg: (frames, height, width, 3) uint8."""
    return np.stack(list(iio.imiter(path, plugin="FFMPEG")))


def read_manifest(path: str) -> list[dict]:
    """The lines of a batch manifest."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def queued_messages(redis_url: str, queue: str = "render") -> int:
    """How many messages wait in a Celery queue on Redis, at every priority."""
    import redis

    from common.broker import queue_length

    client = redis.Redis.from_url(redis_url)
    try:
        return queue_length(client, queue)
    finally:
        client.close()


def video_info(path: str) -> dict:
    """What ffmpeg says of a video: codec, fps, size (width, height)."""
    return iio.immeta(path, plugin="FFMPEG")


def render_records(log_paths) -> dict[str, int]:
    """How many times each key (its first 12 hex digits) was rendered, from the workers' own log lines."""
    counts: dict[str, int] = {}
    for path in log_paths:
        for key in re.findall(r": ([0-9a-f]{12}) rendered in ", open(path).read()):
            counts[key] = counts.get(key, 0) + 1
    return counts


def prepare_job(obj: dict, where: str, model, resolver) -> list[dict]:
    """Check, expand and finish one job object as submit does; raises JobError with every problem."""
    from common.errors import AdapterError, JobError
    from common.job import check_job, expand_job, finish_job

    job, errors = check_job(obj, where, model)
    if errors:
        raise JobError("\n".join(errors))
    try:
        return [finish_job(one, model, resolver) for one in expand_job(job)]
    except AdapterError as exc:
        raise JobError(f"{where}: {exc}") from None


def plant_batch(store, name: str, keys: list[str], status: str = "done") -> None:
    """A batch as `submit` and the workers leave it in a store (manifest, jobs, each key's outputs),
    without rendering: for tests of what reads or removes stored batches."""
    from common.manifest import Batch
    from common.store import video_path

    entries = []
    for key in keys:
        entries.append({"id": None, "key": key, "status": status, "task_id": key[:8], "error": None})
        for suffix in ("mp4", "png", "json"):
            store.write_bytes(video_path(key, suffix), b"\0" * 1000)
    batch = Batch(name, entries)
    batch.write_jobs(store, [{"key": key, "prompt": "a cat"} for key in keys])
    batch.write_manifest(store)
