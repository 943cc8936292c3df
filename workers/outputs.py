"""A rendered job's outputs: its frames encoded as H.264 MP4 and a PNG poster, written to the store
with its metadata, the MP4 last (a video in the store means done). A worker does this in the
background while its next job renders (workers/uploads.py); `lorafleet render` in its own thread."""

import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable

from diffusers.utils import export_to_video
from PIL import Image

from common.job import Job
from common.store import Store, render_result, video_exists, video_path
from workers.metrics import observe_render
from workers.renderer import Progress, Rendered, Renderer, render_frames

log = logging.getLogger("lorafleet.render")


def encode_outputs(frames: list, fps: int) -> tuple[bytes, bytes]:
    """The frames as H.264 MP4 bytes and the first frame as PNG bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        export_to_video(frames, path, fps=fps)
        with open(path, "rb") as f:
            mp4 = f.read()
    poster = io.BytesIO()
    Image.fromarray((frames[0] * 255).round().clip(0, 255).astype("uint8")).save(poster, format="PNG")
    return mp4, poster.getvalue()


def upload(rendered: Rendered, store: Store, fence: Callable[[], None] | None = None) -> dict:
    """Encode a rendered job and write it to the store; returns the result the task reports: key,
    status, output URIs, worker. `fence()` runs right before the first write and raises if this
    process may no longer write (its lease was taken over meanwhile)."""
    job, timings, metadata = rendered.job, rendered.timings, rendered.metadata
    key, worker = job.key, metadata["worker"]
    upload_started = time.perf_counter()
    mp4, png = encode_outputs(rendered.frames, job.fps)
    if fence is not None:
        fence()
    # The MP4 goes last: a video in the store means its poster and metadata are there too.
    store.write_bytes(video_path(key, "png"), png)
    store.write_bytes(video_path(key, "json"), json.dumps(metadata, indent=2).encode())
    store.write_bytes(video_path(key, "mp4"), mp4)
    timings["export_upload"] = time.perf_counter() - upload_started
    observe_render(timings)
    caches = rendered.caches
    log.info(
        "%s: %s rendered in %.2fs (%s frames %sx%s, %s steps; variant %.1f ms), uploaded in %.2fs; "
        "adapter cache hits/misses: disk %d/%d, host %d/%d, device %d/%d",
        worker, key[:12], timings["total"], metadata["frames"], job.width, job.height, job.steps,
        timings["variant"] * 1e3, timings["export_upload"],
        caches.adapter_files.hits, caches.adapter_files.misses,
        caches.adapter_host.hits, caches.adapter_host.misses,
        caches.device_factors.hits, caches.device_factors.misses,
    )  # fmt: skip
    seconds = round(timings["total"] + timings["export_upload"], 3)
    return render_result(store, key, worker, "done", seconds)


def render_job(
    renderer: Renderer,
    store: Store,
    job: Job,
    progress: Progress | None = None,
    fence: Callable[[], None] | None = None,
) -> dict:
    """Render a finished job into the store, unless its video is already there, in this thread
    (`lorafleet render`); returns the result a task reports. Workers upload in the background
    (workers/uploads.py)."""
    key = job.key
    if video_exists(store, key):
        log.info("%s: %s already in the store, not rendered again", renderer.worker, key[:12])
        return render_result(store, key, renderer.worker, "exists")
    return upload(render_frames(renderer, job, progress), store, fence)
